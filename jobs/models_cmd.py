"""`kvpipe models prepare smollm2`: convert and cache the embedded model."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="prepare embedded models")
    sub = parser.add_subparsers(dest="models_command", required=True)
    prepare = sub.add_parser("prepare", help="fetch and convert an embedded model once")
    prepare.add_argument("alias", choices=["smollm2"])
    prepare.set_defaults(func=_prepare)


def _prepare(args) -> int:
    from pipeline.models import prepare_model

    print(prepare_model(args.alias))
    return 0
