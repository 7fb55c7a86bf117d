"""KV-cache compression policies, one per module; importing the package registers them all."""

from policies import adakv, full, h2o, knorm, pyramidkv, snapkv, streaming_llm, tova  # noqa: F401  (registration side effects)
from policies import kivi, spindlekv  # noqa: F401  (storage forms)
from policies.base import Budget, Policy, ScorePolicy
from policies.registry import describe, make_policy, policy_names, register

__all__ = ["Budget", "Policy", "ScorePolicy", "describe", "make_policy", "policy_names", "register"]
