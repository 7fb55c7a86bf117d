"""The memory-aware batch planner: how many rows of a given length fit one generate() call.

Compression is only worth something if a smaller cache becomes a bigger batch. The planner
turns the policy's budget and storage form into bytes per row and divides the free device
memory by it. Per row of n prompt tokens (padded to the batch's longest), with m new tokens:

    F        = L * h * (2 * d * s + 4)            full-cache bytes per token, all layers
                                                  (keys + values + the slot's int32 position)
    r(n)     = the policy's stated byte ratio of a prompt's cache: budget tokens / n for an
               evictor, the storage form's ratio for quantised/codebook forms (their
               `target_ratio`), 1 for `full`
    cache(n) = F * (n * r(n) + m)                 the kept prompt cache + the decoded tokens
                                                  (new tokens are stored dense)
    peak(n)  = one layer's working set during prefill of a forward of q tokens over S slots
               (one-shot: q = S = n; chunked: q = chunk, S = kept + chunk):
                 h * S * (2 * d * s + 4)          that layer's full, not yet compressed KV
               + q * (H * d * s + 4 * D * s + 3 * I * s)
                                                  queries, residual/norm/attention-out copies,
                                                  the MLP's gate/up/activation
               + q * S * (s + 4)                  the boolean mask and its additive form
               + H * min(q, 256) * S * 4 * 2      a policy's attention-signal block (fp32)
               + V * 4 * 2                        last-token logits (fp32)

L layers, h kv heads and H query heads per tensor-parallel rank, d head_dim, D hidden size,
I intermediate size per rank, V vocabulary, s bytes of the dtype. Compressed layers before
the current one are already in `cache(n)`, so a batch of B rows needs about
B * (cache(n) + peak(n)) bytes, and the planner picks the largest B with

    B * (cache(n) + peak(n)) <= memory_fraction * free_bytes,   B <= max_batch_size,
    B * n <= max_batch_tokens (when set).

Rows are sorted by length and batched greedily; a batch never crosses a power-of-two length
bucket, so rows of similar length share a batch (little padding). The estimate is a plan,
not a promise: on out-of-memory the engine still splits the batch and retries. On CPU (no
device memory to read) the engine uses the fixed `cluster.batch_size` instead.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

POSITION_BYTES = 4  # int32 position stored beside every (layer, head) slot
MASK_BYTES = 4  # bool mask + the comparisons that build it, per (query, slot)
HIDDEN_COPIES = 4  # residual, normed input, attention output, o_proj output
MLP_COPIES = 3  # gate, up, activation product
SIGNAL_BLOCK = 256  # queries per block of a policy's attention signal (policies/signals.py)


@dataclass(frozen=True)
class MemoryModel:
    """The shapes that decide a row's memory, per tensor-parallel rank."""

    num_layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int

    @classmethod
    def from_config(cls, config, dtype_bytes: int, tensor_parallel: int = 1) -> MemoryModel:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
        return cls(
            num_layers=config.num_hidden_layers,
            kv_heads=max(1, kv // tensor_parallel),
            q_heads=max(1, heads // tensor_parallel),
            head_dim=head_dim,
            hidden=config.hidden_size,
            intermediate=max(1, inter // tensor_parallel),
            vocab=config.vocab_size,
            dtype_bytes=dtype_bytes,
        )

    def kv_bytes_per_token(self) -> int:
        """F: bytes of a full cache per token over all layers."""
        return self.num_layers * self.kv_heads * (2 * self.head_dim * self.dtype_bytes + POSITION_BYTES)

    def cache_bytes(self, n: int, ratio: float, new_tokens: int) -> float:
        """cache(n): the kept prompt cache plus the decoded tokens of one row."""
        return self.kv_bytes_per_token() * (n * ratio + new_tokens)

    def prefill_peak_bytes(self, n: int, chunk: int | None = None, kept: int | None = None) -> float:
        """peak(n): one layer's transient working set while prefilling one row."""
        s = self.dtype_bytes
        if chunk and chunk < n:
            q = chunk
            slots = (kept if kept is not None else n) + chunk
        else:
            q = slots = n
        layer_kv = self.kv_heads * slots * (2 * self.head_dim * s + POSITION_BYTES)
        width = self.q_heads * self.head_dim + HIDDEN_COPIES * self.hidden + MLP_COPIES * self.intermediate
        acts = q * width * s
        mask = q * slots * (s + MASK_BYTES)
        signals = self.q_heads * min(q, SIGNAL_BLOCK) * slots * 4 * 2
        logits = self.vocab * 4 * 2
        return layer_kv + acts + mask + signals + logits


def cache_ratio(policy, budget, n: int, dtype_bytes: int, head_dim: int) -> float:
    """r(n): kept bytes / full bytes of an n-token prompt's cache under `policy` and `budget`."""
    if policy is None or not policy.compresses or n <= 0:
        return 1.0
    stated = getattr(policy, "target_ratio", None)
    if stated is None:  # an evictor: dense kept tokens
        return budget.for_length(n) / n if budget is not None else 1.0
    params = inspect.signature(stated).parameters
    kwargs = {}
    if "dtype_bytes" in params:
        kwargs["dtype_bytes"] = dtype_bytes
    if "head_dim" in params:
        kwargs["head_dim"] = head_dim
    if "budget" in params:
        if budget is None:
            return 1.0
        kwargs["budget"] = budget
    return float(stated(n, **kwargs))


@dataclass
class Planner:
    """Plans the batches of one replica from its free memory and the job's policy."""

    model: MemoryModel
    policy: object | None
    budget: object | None
    new_tokens: int
    max_batch_size: int = 64
    max_batch_tokens: int | None = None
    prefill_chunk: int | None = None

    def row_bytes(self, n: int) -> float:
        """cache(n) + peak(n) for a row padded to n tokens."""
        ratio = cache_ratio(self.policy, self.budget, n, self.model.dtype_bytes, self.model.head_dim)
        kept = math.ceil(n * ratio)
        return self.model.cache_bytes(n, ratio, self.new_tokens) + self.model.prefill_peak_bytes(
            n, self.prefill_chunk, kept
        )

    def batch_size(self, n: int, budget_bytes: float) -> int:
        """The largest B (>= 1) whose rows of n tokens fit `budget_bytes`."""
        rows = int(budget_bytes // self.row_bytes(n)) if budget_bytes > 0 else 0
        rows = min(rows, self.max_batch_size)
        if self.max_batch_tokens:
            rows = min(rows, self.max_batch_tokens // max(1, n))
        return max(1, rows)

    def plan(self, lengths: list[int], budget_bytes: float) -> list[list[int]]:
        """Indices into `lengths` (sorted ascending) grouped into batches."""
        batches: list[list[int]] = []
        current: list[int] = []
        for i, n in enumerate(lengths):
            if current:
                same_bucket = length_bucket(lengths[current[0]]) == length_bucket(n)
                fits = len(current) + 1 <= self.batch_size(n, budget_bytes)
                if not (same_bucket and fits):
                    batches.append(current)
                    current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches


def length_bucket(n: int) -> int:
    """Power-of-two bucket of a length: 1..1 -> 0, 2 -> 1, 3..4 -> 2, 5..8 -> 3, ..."""
    return max(0, math.ceil(math.log2(max(1, n))))


def fixed_batches(count: int, size: int) -> list[list[int]]:
    return [list(range(lo, min(count, lo + size))) for lo in range(0, count, size)]


def free_device_bytes(device) -> int | None:
    """Free memory of a CUDA device (the allocator's cached free blocks included); None on CPU."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached_free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached_free))


def agree_min(value: int) -> int:
    """The smallest `value` over the tensor-parallel group (every rank must plan the same batches)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
