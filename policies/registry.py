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
    if "+" in name:  # "evictor+storage", e.g. "snapkv+kivi" (policies/compose.py routes the params)
        from policies.compose import make_composed

        return make_composed(name, _REGISTRY, params)
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
    from policies.compose import composed_names

    for name in composed_names(_REGISTRY):  # evictor+storage forms, params per component
        parts = [_REGISTRY[n] for n in name.split("+")]
        params = {
            cls.name: {f.name: (None if f.default is MISSING else f.default) for f in fields(cls.Params)}
            for cls in parts
        }
        paper = " + ".join(cls.paper for cls in parts)
        rows.append({"name": name, "params": params, "paper": paper, "compresses": True})
    return rows
