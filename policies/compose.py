"""Composed policies: an eviction policy followed by a storage form, named "evictor+storage".

`make_policy("snapkv+kivi", ...)`: after each layer's attention the evictor chooses the tokens
to keep (`keep()` on the storage layer), then the storage form stores what was kept in its own
form (KIVI: quantised). The storage form's layer is the cache layer.

Parameters are routed to the components in any of three spellings (mixable):
- prefixed keywords: ``make_policy("snapkv+kivi", **{"snapkv.window": 16, "kivi.bits": 4})``;
- one dict per component: ``make_policy("snapkv+kivi", snapkv={"window": 16}, kivi={"bits": 4})``;
- bare names, when exactly one component has a parameter of that name:
  ``make_policy("snapkv+kivi", window=16, bits=4)`` (an ambiguous bare name is an error).
"""

from __future__ import annotations

from dataclasses import fields

from policies.base import Budget, Policy


def is_storage_form(cls: type[Policy]) -> bool:
    return bool(getattr(cls, "storage_form", False))


def is_evictor(cls: type[Policy]) -> bool:
    """A policy that only selects tokens of a dense layer (it does not bring its own layer)."""
    return cls.compresses and not is_storage_form(cls) and cls.make_layer is Policy.make_layer


def route_params(names: list[str], classes: list[type[Policy]], params: dict) -> list[dict]:
    """Split `params` over the components (see the module docstring)."""
    routed: list[dict] = [{} for _ in names]
    known = [{f.name for f in fields(c.Params)} for c in classes]
    for key, value in params.items():
        if key in names and isinstance(value, dict):
            routed[names.index(key)].update(value)
        elif "." in key:
            comp, _, pname = key.partition(".")
            if comp not in names:
                raise ValueError(f"parameter {key!r}: {comp!r} is not a component of {'+'.join(names)}")
            routed[names.index(comp)][pname] = value
        else:
            owners = [i for i, k in enumerate(known) if key in k]
            if len(owners) != 1:
                where = "no component" if not owners else f"several components ({[names[i] for i in owners]})"
                raise ValueError(
                    f"parameter {key!r} belongs to {where} of {'+'.join(names)}; "
                    f"prefix it with the component, e.g. '{names[-1]}.{key}'"
                )
            routed[owners[0]][key] = value
    return routed


class ComposedPolicy(Policy):
    """`evictor+storage`: eviction selects, the storage form stores the kept tokens."""

    def __init__(self, evictor: Policy, storage: Policy) -> None:
        self.evictor = evictor
        self.storage = storage
        self.name = f"{evictor.name}+{storage.name}"
        self.paper = f"{evictor.paper} + {storage.paper}"
        self.compress_during_decode = evictor.compress_during_decode
        self.params = {evictor.name: evictor.params, storage.name: storage.params}

    def make_layer(self):
        return self.storage.make_layer()

    def compress_layer(self, layer, queries, step, layer_idx, num_layers, scaling) -> None:
        self.evictor.compress_layer(layer, queries, step, layer_idx, num_layers, scaling)
        self.storage.compress_layer(layer, queries, step, layer_idx, num_layers, scaling)

    def target_ratio(
        self, prompt_tokens: int, budget: Budget, dtype_bytes: int = 2, head_dim: int = 64
    ) -> float:
        """Stated byte ratio: the evictor keeps `budget.for_length(n)` tokens per (row, kv head)
        (uniform budgets; pyramid/adaptive evictors keep that on average), which the storage
        form stores at its own ratio for that many tokens."""
        kept = budget.for_length(prompt_tokens)
        return self.storage.target_ratio(kept, dtype_bytes, head_dim) * kept / prompt_tokens

    def __repr__(self) -> str:
        return f"ComposedPolicy({self.evictor!r}, {self.storage!r})"


def make_composed(name: str, registry: dict[str, type[Policy]], params: dict) -> ComposedPolicy:
    names = name.split("+")
    if len(names) != 2 or not all(names):
        raise ValueError(f"a composed policy is 'evictor+storage', got {name!r}")
    missing = [n for n in names if n not in registry]
    if missing:
        raise ValueError(
            f"unknown policy {missing[0]!r} in {name!r}; known policies: {', '.join(sorted(registry))}"
        )
    classes = [registry[n] for n in names]
    if not is_evictor(classes[0]):
        raise ValueError(f"{names[0]!r} is not an eviction policy; compose as 'evictor+storage'")
    if not is_storage_form(classes[1]):
        raise ValueError(
            f"{names[1]!r} is not a storage form; storage forms: "
            + ", ".join(sorted(n for n, c in registry.items() if is_storage_form(c)))
        )
    routed = route_params(names, classes, params)
    return ComposedPolicy(classes[0](**routed[0]), classes[1](**routed[1]))


def composed_names(registry: dict[str, type[Policy]]) -> list[str]:
    """Every evictor+storage pair the registry allows."""
    evictors = sorted(n for n, c in registry.items() if is_evictor(c))
    storages = sorted(n for n, c in registry.items() if is_storage_form(c))
    return [f"{e}+{s}" for s in storages for e in evictors]
