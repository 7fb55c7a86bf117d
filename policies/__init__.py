"""KV-cache compression policies, one per module; importing the package registers them all."""

# importing each method's module registers it (kivi and spindlekv are storage forms)
from policies import (  # noqa: F401
    adakv,
    full,
    h2o,
    kivi,
    knorm,
    pyramidkv,
    snapkv,
    spindlekv,
    streaming_llm,
    tova,
)
from policies.base import Budget, Policy, ScorePolicy
from policies.registry import describe, make_policy, policy_names, register

__all__ = ["Budget", "Policy", "ScorePolicy", "describe", "make_policy", "policy_names", "register"]
