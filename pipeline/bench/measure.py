"""The measurements: kvpipe prefill and decode, the largest batch, HF generate, chunk activations.

kvpipe is driven through its own `Generator._forward` (the engine's forward: cache, step
context, attention hook, per-layer compression), so what is timed is what the engine runs;
only the loop around it is the benchmark's, so that prefill and decode steps are timed apart.

Decode at batch B tiles the caches of the `prefill_batch` prefilled rows to B rows with the
cache's own `select_rows` (every storage form implements it): decode speed and memory depend
on the kept shapes, not on which tokens were kept, and prefilling B rows for every probe
would cost B prefills.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from pipeline.bench import gpu
from pipeline.bench.settings import MODEL_SHAPES, BenchSettings


@dataclass
class BenchModel:
    model: object
    name: str
    config: object
    device: torch.device
    dtype: torch.dtype
    weight_bytes: int  # every parameter, once
    step_weight_bytes: int  # read by one decode step (an untied input embedding reads only B rows)
    params: int

    @property
    def vocab(self) -> int:
        return self.config.vocab_size

    def shape_summary(self) -> dict:
        c = self.config
        return {
            "name": self.name,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "vocab_size": c.vocab_size,
            "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
            "dtype": str(self.dtype).replace("torch.", ""),
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "step_weight_bytes": self.step_weight_bytes,
            "weights": "random (speed and memory depend on shapes and dtype only)",
        }

    def kv_bytes_per_token(self) -> int:
        """Full-cache bytes of one token over all layers and kv heads (keys + values)."""
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * self.dtype.itemsize


def build_model(
    settings: BenchSettings, device: torch.device, dtype: torch.dtype, layers: int | None = None
) -> BenchModel:
    """A random-weight causal LM with the named shapes, built directly on `device`.

    `layers`: fewer decoder layers than the shapes name (the check and profile scripts' quick runs).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    positions = max(8192, 2 * max(settings.contexts) + 1024)
    if settings.model in MODEL_SHAPES:
        config = LlamaConfig(
            **MODEL_SHAPES[settings.model],
            max_position_embeddings=positions,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
    else:  # a local directory's config.json: its shapes, random weights
        config = AutoConfig.from_pretrained(settings.model)
        config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0) or 0, positions)
        config.eos_token_id = None
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(settings.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    model.requires_grad_(False)
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:  # random weights: never stop early, never warn about pads
        gen_cfg.eos_token_id = None
        gen_cfg.pad_token_id = 0
        gen_cfg.bos_token_id = None
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    step_bytes = weight_bytes if tied else weight_bytes - embed.numel() * embed.element_size()
    return BenchModel(
        model=model,
        name=settings.model,
        config=model.config,
        device=device,
        dtype=dtype,
        weight_bytes=weight_bytes,
        step_weight_bytes=step_bytes,
        params=sum(p.numel() for p in params),
    )


# -- kvpipe ------------------------------------------------------------------------------------


def make_generator(bm: BenchModel, policy, budget):
    from pipeline.generate import Generator

    tokenizer = SimpleNamespace(pad_token_id=0)  # random ids: no tokenizer needed
    return Generator(bm.model, tokenizer, policy, budget)


def use_kvpipe_attention(bm: BenchModel) -> None:
    from pipeline import attention

    attention.register()
    bm.model.set_attn_implementation(attention.ATTN_NAME)


def use_sdpa_attention(bm: BenchModel) -> None:
    bm.model.set_attn_implementation("sdpa")


def random_ids(bm: BenchModel, rows: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, bm.vocab, (rows, length), generator=g).to(bm.device)


@dataclass
class Prefilled:
    cache: object
    logits: torch.Tensor  # [P, vocab]
    budgets: torch.Tensor  # [P]
    next_pos: torch.Tensor  # [P]


def kvpipe_prefill(gen, ids: torch.Tensor, chunk: int | None, after_prefill: int = 0) -> Prefilled:
    """Prefill exactly as `Generator.generate` does (its own `prefill`); no padding, random ids.

    `after_prefill`: the slots decoding will append (the engine sizes storage for them).
    """
    from pipeline.kv_cache import CompressedCache
    from policies.base import row_budgets

    rows, width = ids.shape
    cache = CompressedCache(gen.num_layers, gen.policy)
    positions = torch.arange(width, device=ids.device).expand(rows, width)
    budgets = row_budgets(gen.budget, [width] * rows, ids.device)
    logits = gen.prefill(cache, ids, positions, budgets, chunk, after_prefill, lengths=[width] * rows)
    next_pos = torch.full((rows,), width, device=ids.device, dtype=torch.long)
    return Prefilled(cache, logits, budgets, next_pos)


def tile(pre: Prefilled, batch: int) -> Prefilled:
    """A `batch`-row copy of a prefilled state: row i is prefilled row i % P (fresh tensors)."""
    rows = torch.arange(batch, device=pre.logits.device) % pre.logits.shape[0]
    cache = copy.copy(pre.cache)
    layers = []
    for layer in pre.cache.layers:
        new = copy.copy(layer)  # KVLayer.__copy__: own buffers' bookkeeping, shared tensors
        new.select_rows(rows)  # fresh tensors for the copy; the original is untouched
        layers.append(new)
    cache.layers = layers
    cache.step = None
    return Prefilled(cache, pre.logits[rows], pre.budgets[rows], pre.next_pos[rows])


def kv_bytes(cache) -> tuple[int, int]:
    """(kept payload bytes of all rows, bytes of every stored tensor) of a cache."""
    return int(cache.kept_bytes_per_row().sum()), int(cache.stored_bytes())


def decode_steps(gen, state: Prefilled, steps: int, marks: gpu.Marks | None = None) -> Prefilled:
    """Greedy decode steps on `state` (in place), as the engine's loop does; marks each step's end."""
    tokens = state.logits.argmax(-1)
    logits = state.logits
    for _ in range(steps):
        logits = gen.decode_step(state.cache, tokens, state.next_pos, state.budgets)
        tokens = logits.argmax(-1)
        state.next_pos = state.next_pos + 1
        if marks is not None:
            marks.mark()
    state.logits = logits
    return state


def measure_decode(
    gen, bm: BenchModel, pre: Prefilled, batch: int, steps: int, warmup: int, bw: float | None
):
    """Tile to `batch`, warm up, time `steps` decode steps; step times, throughput, roofline."""
    device = bm.device
    gpu.cleanup(device)
    gpu.reset_peak(device)
    state = tile(pre, batch)
    decode_steps(gen, state, warmup)
    gpu.sync(device)
    kept0, stored0 = kv_bytes(state.cache)
    marks = gpu.Marks(device)
    marks.mark()
    import time

    wall0 = time.perf_counter()
    decode_steps(gen, state, steps, marks)
    gpu.sync(device)
    wall = time.perf_counter() - wall0
    step_s = marks.intervals()
    kept1, stored1 = kv_bytes(state.cache)
    out = {"batch": batch, "steps": steps, **gpu.summary(step_s)}
    out["wall_step_ms"] = wall / steps * 1e3
    out["tokens_per_s"] = batch * steps / wall
    out["peak_bytes"] = gpu.peak_bytes(device)
    out["kv_kept_bytes"] = (kept0 + kept1) / 2  # read by the average step
    out["kv_stored_bytes"] = (stored0 + stored1) / 2
    out["weight_bytes"] = bm.step_weight_bytes
    if bw:
        roof = (bm.step_weight_bytes + out["kv_kept_bytes"]) / bw
        out["roofline_ms"] = roof * 1e3
        out["roofline_pct"] = 100.0 * roof * 1e3 / out["median_ms"]
    del state
    gpu.cleanup(device)
    return out


def probe_fits(gen, bm: BenchModel, pre: Prefilled, batch: int, steps: int, reserve: int) -> tuple[bool, str]:
    """Does `batch` rows' cache + `steps` decode steps + `reserve` bytes fit? (OOM is the answer)."""
    device = bm.device
    ok, why = _probe(gen, bm, pre, batch, steps, reserve)
    gpu.cleanup(device)  # after the exception (and its frames) are gone
    return ok, why


def _probe(gen, bm, pre, batch, steps, reserve) -> tuple[bool, str]:
    held = None
    state = None
    try:
        if reserve > 0 and gpu.is_cuda(bm.device):
            held = torch.empty(reserve, dtype=torch.uint8, device=bm.device)
        state = tile(pre, batch)
        decode_steps(gen, state, steps)
        gpu.sync(bm.device)
        return True, "fits"
    except Exception as exc:  # noqa: BLE001 - only OOM is an answer; anything else propagates
        if gpu.is_oom(exc):
            return False, "out of memory"
        raise
    finally:
        del held, state


def search_max_batch(
    gen, bm: BenchModel, pre: Prefilled, s: BenchSettings, reserve: int, budget_check
) -> dict:
    """Largest decode batch that fits: estimate from measured bytes, then verify by probing.

    A probe holds `batch` tiled rows of compressed cache, `reserve` bytes (the transient of
    prefilling one more group of rows, measured) and runs `search_steps` decode steps; an OOM
    is a no. Growth by 25% until a no or the cap, then bisection to within 3% (or 1 row).
    """
    device = bm.device
    rows = pre.logits.shape[0]
    gpu.cleanup(device)
    _, stored = kv_bytes(pre.cache)
    per_row = stored / rows
    free = gpu.free_bytes(device)
    cap = s.max_batch
    if free is None:  # CPU: nothing to run out of that we could catch; try the cap
        estimate = cap
    else:
        margin = 1 * gpu.GIB  # decode activations, logits, allocator slack
        per_row_grown = per_row * 1.02 + 2 * bm.vocab * 4  # a little growth + fp32 logits
        estimate = int(max(1, (free - reserve - margin) // max(per_row_grown, 1)))
    estimate = max(1, min(cap, estimate))
    lo, hi = 0, cap + 1
    probes: list[list] = []
    batch = estimate
    for _ in range(16):
        if batch <= lo or batch >= hi:
            break
        budget_check()
        ok, _why = probe_fits(gen, bm, pre, batch, s.search_steps, reserve)
        probes.append([batch, ok])
        if ok:
            lo = batch
        else:
            hi = batch
        if hi - lo <= max(1, int(lo * 0.03)):
            break
        if hi == cap + 1:
            batch = min(cap, max(lo + 1, math.ceil(lo * 1.25)))
        elif lo == 0:
            batch = max(1, hi // 2) if hi > 1 else 0
        else:
            batch = (lo + hi) // 2
    return {
        "batch": lo,
        "capped": lo == cap,
        "estimate_from_bytes": estimate,
        "stored_bytes_per_row": per_row,
        "reserve_bytes": reserve,
        "free_bytes_at_start": free,
        "probes": probes,
        "method": (
            "estimate from measured bytes, verified by probes: tile the prefilled rows' compressed "
            f"cache to B rows, hold the measured prefill transient of one group ({reserve} B), run "
            f"{s.search_steps} decode steps; OOM means no. Grow 25% until no or --max-batch, then bisect "
            "(3%). The prefilled group's own rows stay held too, so B is conservative by prefill_batch rows."
        ),
    }


# -- baselines ---------------------------------------------------------------------------------


HF_SDPA_VARIANTS = ("default", "no-cudnn")


def hf_generate(
    bm: BenchModel, batch: int, context: int, steps: int, seed: int, sdpa: str = "default"
) -> dict:
    """transformers `generate` (DynamicCache, sdpa): step = (t(N+1 tokens) - t(1 token)) / N.

    `sdpa`: "default" (PyTorch picks the backend: cuDNN on Hopper, which plans anew for every
    cache length) or "no-cudnn" (flash / memory-efficient / math only, as kvpipe decodes); the
    targets compare with the faster of the two.
    """
    import contextlib
    import time

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if sdpa not in HF_SDPA_VARIANTS:
        raise ValueError(f"sdpa variant must be one of {HF_SDPA_VARIANTS}")

    def backends():  # a fresh context manager per use
        if sdpa == "no-cudnn":
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
        return contextlib.nullcontext()

    device = bm.device
    use_sdpa_attention(bm)
    ids = random_ids(bm, batch, context, seed)
    mask = torch.ones_like(ids)

    def run(n: int, x: torch.Tensor, m: torch.Tensor) -> tuple[float, int]:
        gpu.sync(device)
        t0 = time.perf_counter()
        with backends():
            out = bm.model.generate(
                input_ids=x,
                attention_mask=m,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        gpu.sync(device)
        return time.perf_counter() - t0, out.shape[1] - x.shape[1]

    short = min(context, 256)
    run(2, ids[:, :short], mask[:, :short])  # warm-up
    gpu.cleanup(device)
    gpu.reset_peak(device)
    t1, n1 = run(1, ids, mask)
    gpu.cleanup(device)
    tn, nn = run(steps + 1, ids, mask)
    step = (tn - t1) / max(1, nn - n1)
    out = {
        "batch": batch,
        "context": context,
        "sdpa": sdpa,
        "steps": nn - n1,
        "t_1_token_s": t1,
        "t_n_tokens_s": tn,
        "step_ms": step * 1e3,
        "tokens_per_s": batch / step if step > 0 else None,
        "reliable": step > 0,  # t(N+1) <= t(1) only happens when noise swamps N steps
        "peak_bytes": gpu.peak_bytes(device),
        "method": f"model.generate(max_new_tokens=min_new_tokens=n, greedy), attn sdpa ({sdpa} backends), "
        "DynamicCache; step = (t(N+1) - t(1)) / N",
    }
    del ids, mask
    gpu.cleanup(device)
    return out


def chunk_activation_bytes(bm: BenchModel, rows: int, chunk: int, seed: int) -> dict:
    """Peak bytes above the weights of one forward over one chunk (sdpa, no cache): its activations."""
    device = bm.device
    use_sdpa_attention(bm)
    ids = random_ids(bm, rows, chunk, seed)
    gpu.cleanup(device)
    base = gpu.allocated_bytes(device)
    gpu.reset_peak(device)
    (_, seconds) = gpu.timed(lambda: bm.model(input_ids=ids, use_cache=False, logits_to_keep=1), device)
    peak = gpu.peak_bytes(device)
    ids = None
    gpu.cleanup(device)
    return {
        "rows": rows,
        "chunk": chunk,
        "bytes": None if peak is None else peak - base,
        "seconds": seconds,
        "method": "peak - allocated before, of model(chunk, use_cache=False, logits_to_keep=1) with sdpa",
    }
