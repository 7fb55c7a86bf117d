"""`full`: no compression, the reference every policy is compared with."""

from __future__ import annotations

from policies.base import Policy
from policies.registry import register


@register
class FullCache(Policy):
    name = "full"
    paper = "no compression (reference)"
    compresses = False
