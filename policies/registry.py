"""Policy registry: names to classes, and construction from a job spec."""

from __future__ import annotations

from dataclasses import MISSING, fields

from policies.base import Policy

_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"policy {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str, **params) -> Policy:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(policy_names())}") from None
    return cls(**params)


def describe() -> list[dict]:
    """One entry per policy: name, parameters with defaults, paper."""
    rows = []
    for name in policy_names():
        cls = _REGISTRY[name]
        params = {f.name: (None if f.default is MISSING else f.default) for f in fields(cls.Params)}
        rows.append({"name": name, "params": params, "paper": cls.paper, "compresses": cls.compresses})
    return rows
