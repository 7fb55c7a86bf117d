"""Batched generation over a stock Hugging Face causal LM with kvpipe's compressed cache.

One call handles one batch: left-pad the prompts, prefill (one shot, or in chunks with
compression between chunks), optionally prefill an uncompressed suffix (the question in
context-only mode), then decode greedily or by seeded sampling until every row stops.
Finished rows leave the batch, so their cache stops costing memory and compute.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field

import torch

from pipeline import attention
from pipeline.attention_math import decode_backends
from pipeline.decode_graph import DecodeRunner, default_mode
from pipeline.kv_cache import EMPTY, CompressedCache, StepContext
from policies.base import Budget, Policy, row_budget_values, row_budgets


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    prefill_chunk_tokens: int | None = None  # None: one-shot prefill, compress once at the end

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be >= 1")


@dataclass
class RowResult:
    output_ids: list[int]
    prompt_tokens: int
    kv_tokens_full: int  # prompt tokens a full cache holds per (layer, kv head) after prefill
    kv_tokens_kept: int  # tokens this row keeps per (layer, kv head) after prefill, averaged
    kv_bytes_full: int
    kv_bytes_kept: int
    prefill_s: float  # the batch's prefill wall time
    ttft_s: float  # batch start to this row's first token
    decode_s: float  # first token to this row's last token
    finish_reason: str = "length"


@dataclass
class BatchStats:
    """Batch-level figures the job aggregates."""

    rows: int = 0
    cache_stored_bytes_after_prefill: int = 0
    peak_device_bytes: int = 0
    extra: dict = field(default_factory=dict)


def chunk_facts(lengths: list[int], width: int, lo: int, hi: int) -> dict:
    """The host facts of a forward over columns [lo, hi) of left-padded prompts of `lengths` in
    `width` columns: each row's non-padding tokens in it and the tokens it has seen by `hi`."""
    first = [width - n for n in lengths]  # each row's first real column
    return {
        "valid_host": [max(0, hi - max(lo, f)) for f in first],
        "seen_host": [max(0, hi - f) for f in first],
    }


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.2x; use whichever this version takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class Generator:
    """Runs batches through `model` (a HF causal LM, possibly wrapped by DeepSpeed) with `policy`."""

    def __init__(
        self, model, tokenizer, policy: Policy, budget: Budget | None, decode_mode: str | None = None
    ) -> None:
        """`decode_mode`: "graphs", "static" or "eager" (`pipeline.decode_graph`); None: the
        `KVPIPE_DECODE` environment variable, else graphs on one CUDA device, eager elsewhere."""
        attention.register()
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy
        self.budget = budget if policy.compresses else None
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        model.set_attn_implementation(attention.ATTN_NAME)
        self._cache_kw = _cache_kwarg(model)
        # A ready 4D mask keeps transformers from building one (one element, expanded per call).
        self._ready_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)
        self.decode = DecodeRunner(self._static_forward, decode_mode or default_mode(self.device))

    # -- helpers ----------------------------------------------------------------------------
    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        filled = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                filled[i, width - len(s) :] = True
        return ids.to(self.device), filled.to(self.device)

    def _forward(
        self, cache, ids, positions, compress, budgets, padded: bool = True, static_slots=None, **host
    ) -> torch.Tensor:
        """One forward over `ids` ([b, q]) at `positions` (EMPTY for padding); last logits [b, vocab].

        `padded` False promises that no position is EMPTY (it lets attention skip the mask);
        `static_slots` makes it a static-shape decode step (`StepContext.static_slots`); `host`:
        the step's per-row host facts (`StepContext.budgets_host`, `valid_host`, `seen_host`).
        """
        step = StepContext(
            cache=cache,
            positions=positions,
            compress=compress,
            row_budgets=budgets,
            padded=padded,
            static_slots=static_slots,
            **host,
        )
        cache.step = step
        b, q = ids.shape
        rope_positions = positions.clamp(min=0) if padded else positions  # padding's angle is irrelevant
        out = self.model(
            input_ids=ids,
            position_ids=rope_positions,
            attention_mask=self._ready_mask.expand(b, 1, q, 1),  # never read: the cache masks
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache, attention.CTX_KWARG: step},
        )
        return out.logits[:, -1, :].float()

    @staticmethod
    def _spare_slots(compressing: bool, width: int, hi: int, after_prefill: int) -> int:
        """Slots a layer should allocate beyond its need while prefilling up to column `hi`.

        A full cache allocates once, for the whole prompt and every token after it (so does a
        storage form that keeps every token, `Policy.keeps_every_token`: `compressing` False); a
        compressed one allocates no spare between chunks (a layer grows when the next chunk
        arrives, copying only its kept tokens; room for the next chunk reserved in every layer
        at once would hold a whole chunk's KV beyond the budget), and its last compression
        makes room for the tokens after prefill, so that decoding copies nothing.
        """
        if not compressing:
            return width - hi + after_prefill
        return 0 if hi < width else after_prefill

    def _choose(self, logits: torch.Tensor, cfg: GenerationConfig, rng: torch.Generator | None):
        if not cfg.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / cfg.temperature
        if cfg.top_k > 0:
            kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > cfg.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(-1)
        return torch.multinomial(probs.cpu(), 1, generator=rng).squeeze(-1).to(logits.device)

    # -- the phases (the benchmark drives these too) -------------------------------------------
    def prefill(
        self,
        cache: CompressedCache,
        ids: torch.Tensor,
        positions: torch.Tensor,
        budgets: torch.Tensor,
        chunk_tokens: int | None,
        after_prefill: int,
        padded_columns: int = 0,
        lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """Prefill `ids` ([b, width], left-padded): one shot, or chunks compressed after each.

        `after_prefill`: slots decoding will append (storage is sized for them here, so decoding
        never reallocates); `padded_columns`: the first columns holding some row's padding;
        `lengths`: the prompts' lengths, given when `positions` are 0..n-1 after each row's
        padding and `budgets` are `row_budgets(self.budget, lengths)` (as `generate` makes them):
        the host then knows every per-row fact a compression needs (`StepContext.budgets_host`...),
        and compressions read nothing from the device. Returns the last logits [b, vocab].
        """
        width = ids.shape[1]
        chunk = chunk_tokens or width
        compressing = self.budget is not None
        # storage that keeps every token is sized once for the prompt, as a full cache is
        sized_once = not compressing or getattr(self.policy, "keeps_every_token", False)
        if lengths is not None:
            budgets_host = row_budget_values(self.budget, lengths)
        else:  # one read for the whole prefill rather than one per forward
            budgets_host = budgets.tolist() if compressing else None
        for lo in range(0, width, chunk):
            hi = min(width, lo + chunk)
            compress = compressing and (hi == width or chunk_tokens is not None)
            cache.set_spare(self._spare_slots(not sized_once, width, hi, after_prefill))
            host = chunk_facts(lengths, width, lo, hi) if lengths is not None else {}
            logits = self._forward(
                cache,
                ids[:, lo:hi],
                positions[:, lo:hi],
                compress,
                budgets,
                padded=lo < padded_columns,
                budgets_host=budgets_host,
                **host,
            )
        cache.reserve(after_prefill)  # a no-op when prefill sized it already
        cache.set_spare(0)
        return logits

    def _static_forward(self, cache, ids, positions, budgets, static_slots) -> torch.Tensor:
        """The static-shape decode forward the `DecodeRunner` runs eagerly or captures."""
        return self._forward(cache, ids, positions, False, budgets, padded=False, static_slots=static_slots)

    def decode_step(self, cache, tokens: torch.Tensor, next_pos: torch.Tensor, budgets) -> torch.Tensor:
        """One decode step: `tokens` [b] at `next_pos` [b]; next logits [b, vocab].

        Static-shape (CUDA graph) where the cache and policy allow it (`pipeline.decode_graph`):
        the logits are then the graph's output tensor, valid until the next step.
        """
        compress = self.budget is not None and self.policy.compress_during_decode
        if not compress:
            logits = self.decode.step(cache, tokens, next_pos, budgets)
            if logits is not None:
                return logits
        with decode_backends() if self.device.type == "cuda" else contextlib.nullcontext():
            return self._forward(cache, tokens[:, None], next_pos[:, None], compress, budgets, padded=False)

    # -- the batch --------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        cfg: GenerationConfig,
        suffixes: list[list[int]] | None = None,
    ) -> tuple[list[RowResult], BatchStats]:
        """Generate for a batch. `suffixes` (optional) are appended after compression, uncompressed."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        batch = len(prompts)
        cache = CompressedCache(self.num_layers, self.policy)
        ids, filled = self._left_pad(prompts)
        positions = torch.where(filled, filled.long().cumsum(-1) - 1, torch.full_like(ids, EMPTY))
        lengths = [len(p) for p in prompts]
        budgets = row_budgets(self.budget, lengths, self.device)

        # slots appended after prefill: the suffix, then every new token but the last
        suffix_tokens = max((len(x) for x in suffixes or [] if x), default=0)
        after_prefill = suffix_tokens + cfg.max_new_tokens - 1
        padded_columns = ids.shape[1] - min(lengths)
        logits = self.prefill(
            cache, ids, positions, budgets, cfg.prefill_chunk_tokens, after_prefill, padded_columns, lengths
        )
        kept_bytes = cache.kept_bytes_per_row().tolist()
        kept_slots = cache.filled_slots_per_row().tolist()
        stats = BatchStats(rows=batch, cache_stored_bytes_after_prefill=cache.stored_bytes())
        next_pos = torch.tensor(lengths, device=self.device)

        if suffixes is not None and any(suffixes):
            if len(suffixes) != batch:
                raise ValueError("one suffix per prompt")
            s_ids, s_filled = self._left_pad([s or [self.pad_id] for s in suffixes])
            for i, s in enumerate(suffixes):  # an empty suffix adds nothing
                if not s:
                    s_filled[i] = False
            s_pos = next_pos[:, None] + s_filled.long().cumsum(-1) - 1
            s_pos = torch.where(s_filled, s_pos, torch.full_like(s_pos, EMPTY))
            uneven = any(len(x) != len(suffixes[0]) for x in suffixes)
            logits = self._forward(cache, s_ids, s_pos, False, budgets, padded=uneven or not all(suffixes))
            next_pos = next_pos + s_filled.sum(-1)
        prefill_s = time.perf_counter() - start

        rng = torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None
        stop_ids = torch.tensor(sorted(set(cfg.stop_token_ids)), dtype=torch.long, device=self.device)
        outputs: list[list[int]] = [[] for _ in range(batch)]
        ttft = [0.0] * batch
        finished_at = [0.0] * batch
        reasons = ["length"] * batch
        active = torch.arange(batch, device=self.device)  # original row of each batch slot

        for step_idx in range(cfg.max_new_tokens):
            tokens = self._choose(logits, cfg, rng)
            now = time.perf_counter() - start
            done = (
                torch.isin(tokens, stop_ids)
                if stop_ids.numel()
                else torch.zeros_like(tokens, dtype=torch.bool)
            )
            for row, tok, stop in zip(active.tolist(), tokens.tolist(), done.tolist()):
                if step_idx == 0:
                    ttft[row] = now
                if stop:
                    reasons[row] = "stop"
                else:
                    outputs[row].append(tok)
                finished_at[row] = now
            if step_idx == cfg.max_new_tokens - 1:
                break
            if done.any():
                keep = (~done).nonzero().squeeze(-1)
                if keep.numel() == 0:
                    break
                active, tokens, next_pos = active[keep], tokens[keep], next_pos[keep]
                cache.select_rows(keep)
                budgets = budgets[keep]
            logits = self.decode_step(cache, tokens, next_pos, budgets)
            next_pos = next_pos + 1

        self.decode.release()  # the batch's graph (its buffers are gone with the cache)
        if self.device.type == "cuda":
            stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.device)
        bytes_per_slot = 2 * self.head_dim * self.dtype.itemsize
        full_slots = [n * self.num_layers * self.kv_heads for n in lengths]
        results = [
            RowResult(
                output_ids=outputs[i],
                prompt_tokens=lengths[i],
                kv_tokens_full=lengths[i],
                kv_tokens_kept=round(kept_slots[i] / (self.num_layers * self.kv_heads)),
                kv_bytes_full=full_slots[i] * bytes_per_slot,
                kv_bytes_kept=int(kept_bytes[i]),
                prefill_s=prefill_s,
                ttft_s=ttft[i],
                decode_s=finished_at[i] - ttft[i],
                finish_reason=reasons[i],
            )
            for i in range(batch)
        ]
        return results, stats
