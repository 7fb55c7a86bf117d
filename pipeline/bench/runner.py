"""The benchmark run: plan the cells, measure them one by one, save after every step.

Robust by construction: every stage and every cell runs under `attempt` (an OOM or any
other error is recorded in the cell and the run goes on), a `--max-minutes` budget is
checked between stages (cells not reached are marked `skipped`), SIGTERM ends the run
cleanly, and the JSON + Markdown results are rewritten after every cell, so a killed run
still leaves what it measured.
"""

from __future__ import annotations

import gc
import signal
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from pipeline.bench import gpu, measure, report
from pipeline.bench.settings import BenchSettings
from policies import kivi_kernels


class OutOfTime(Exception):
    """The --max-minutes budget is spent."""


class Interrupted(BaseException):
    """SIGTERM: stop, save, exit."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def describe(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    kind = "out of memory" if gpu.is_oom(exc) else type(exc).__name__
    return f"{kind}: {first}" if first else kind


def budget_independent(policy) -> bool:
    """A storage form alone (KIVI) stores what it stores whatever the budget: one cell per context."""
    return bool(getattr(type(policy), "storage_form", False)) and "+" not in getattr(policy, "name", "")


def plan(s: BenchSettings) -> list[dict]:
    """Every requested (context, policy, ratio), full first in each context (it is the baseline)."""
    from policies import make_policy

    names = ["full"] + [p for p in s.policies if p != "full"]
    cells = []
    for context in s.contexts:
        order = 0
        for name in names:
            ratios: list = [None]
            covered = None
            if name != "full":
                try:
                    pol = make_policy(name, **s.policy_params.get(name, {}))
                    if not pol.compresses:
                        ratios = [None]
                    elif budget_independent(pol):
                        ratios, covered = [None], list(s.ratios)
                    else:
                        ratios = list(s.ratios)
                except Exception:  # noqa: BLE001 - an unknown policy becomes an error cell
                    ratios = list(s.ratios)
            for ratio in ratios:
                cells.append(
                    {
                        "key": f"{context}/{name}/{ratio if ratio is not None else '-'}",
                        "order": order,
                        "context": context,
                        "policy": name,
                        "ratio": ratio,
                        "ratios_covered": covered,
                        "params": s.policy_params.get(name, {}),
                        "requested": name in s.policies,
                        "status": "pending",
                        "error": None,
                        "sub_errors": {},
                        "prefill": {},
                        "decode": {},
                    }
                )
                order += 1
    return cells


class Bench:
    def __init__(self, settings: BenchSettings, command: str) -> None:
        self.s = settings
        self.t0 = time.monotonic()
        self.deadline = None if settings.max_minutes is None else self.t0 + 60.0 * settings.max_minutes
        self._paired_full = None  # `_full_generator`
        self.device = gpu.resolve_device(settings.device)
        if settings.dtype == "auto":
            self.dtype = torch.bfloat16 if gpu.is_cuda(self.device) else torch.float32
        else:
            from pipeline.models import resolve_dtype

            self.dtype = resolve_dtype(settings.dtype)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        tag = f"-{settings.tag}" if settings.tag else ""
        name = (
            Path(settings.model).name
            if settings.model not in ("llama8b", "smollm2", "tiny")
            else settings.model
        )
        out = Path(settings.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.json_path = out / f"bench-{name}{tag}-{stamp}.json"
        self.md_path = out / f"bench-{name}{tag}-{stamp}.md"
        self.result: dict = {
            "schema": 1,
            "tool": "kvpipe bench",
            "command": command,
            "argv": list(sys.argv),
            "cwd": str(Path.cwd()),
            "started": _now(),
            "finished": None,
            "status": "running",
            "settings": settings.to_dict(),
            "environment": {},
            "model": {"name": settings.model},
            "notes": {
                "weights": "random weights built from a config: speed and memory depend on shapes only",
                "decode_batch": "decode at batch B tiles the prefilled rows' compressed caches to B rows",
                "max_batch_method": "estimate from measured bytes, verified by decode probes on tiled caches "
                "while holding one prefill group's measured transient (see each cell's max_batch.method)",
                "full_added": "full is always measured first in each context: it is the baseline",
                "timing": "CUDA events (median step); wall clock over the steps for tok/s; synchronised",
                "prefill_overhead": "a compressing cell's prefill against full-cache prefills of the same "
                "ids timed beside its runs (ABBA), the median of the pairs' ratios; "
                "derived.overhead_pct_*_vs_full_cell compares with the full cell instead",
            },
            "errors": [],
            "bandwidth": {},
            "chunk_activation": {},
            "micro": {},
            "baselines": {"hf_generate": []},
            "cells": plan(settings),
        }
        self.bm: measure.BenchModel | None = None

    # -- plumbing ---------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def log(self, msg: str) -> None:
        print(f"[bench {self.elapsed():7.1f}s] {msg}", file=sys.stderr, flush=True)

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime(f"--max-minutes {self.s.max_minutes} spent")

    def save(self) -> None:
        try:
            report.save(self.result, self.json_path, self.md_path)
        except Exception as exc:  # noqa: BLE001 - saving must never end the run
            self.log(f"could not save results: {describe(exc)}")

    def attempt(self, what: str, fn):
        """(value, None) or (None, error text); OOM and errors are recorded, never raised."""
        err = None
        try:
            return fn(), None
        except (OutOfTime, Interrupted, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the benchmark records and goes on
            err = describe(exc)
            tb = traceback.format_exc(limit=-6)
            self.log(f"{what}: {err}\n{tb}")
        gpu.cleanup(self.device)  # after the exception's frames are released
        return None, err

    def stage(self, name: str, fn):
        self.check_time()
        self.log(f"{name} ...")
        value, err = self.attempt(name, fn)
        if err:
            self.result["errors"].append({"stage": name, "error": err})
        self.save()
        return value

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> dict:
        previous = None
        try:
            previous = signal.signal(signal.SIGTERM, _raise_interrupted)
        except ValueError:  # not the main thread
            pass
        try:
            self.save()
            self.result["environment"] = gpu.environment(self.device)
            self.bm = self.stage("build model", self._build)
            if self.bm is None:
                raise RuntimeError("could not build the model")
            self.result["model"] = self.bm.shape_summary()
            self.result["bandwidth"] = (
                self.stage("copy bandwidth", lambda: gpu.copy_bandwidth(self.device)) or {}
            )
            if self.s.micro:
                self.result["micro"] = self.stage("attention micro-benchmarks", self._micro) or {}
            self.result["chunk_activation"] = self.stage("one chunk's activations", self._chunk_act) or {}
            self.stage("warm-up", self._warmup)
            for cell in self.result["cells"]:
                self.check_time()
                self._cell(cell)
                self.save()
                if cell["policy"] == "full" and self.s.hf_baseline:
                    self._hf(cell)
                    self.save()
            self.result["status"] = "complete"
        except OutOfTime as exc:
            self.result["status"] = "budget_exhausted"
            self.log(str(exc))
        except (Interrupted, KeyboardInterrupt):
            self.result["status"] = "interrupted"
            self.log("interrupted")
        except Exception as exc:  # noqa: BLE001 - whatever happens, the results so far are written
            self.result["status"] = "failed"
            self.result["errors"].append(
                {"stage": "run", "error": describe(exc), "trace": traceback.format_exc()}
            )
            self.log(traceback.format_exc())
        finally:
            for cell in self.result["cells"]:
                if cell["status"] in ("pending", "running"):
                    cell["status"] = "skipped" if cell["status"] == "pending" else "partial"
                    cell["error"] = cell["error"] or f"not reached ({self.result['status']})"
            self.result["finished"] = _now()
            self.result["elapsed_s"] = self.elapsed()
            self.save()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self.result

    def _build(self):
        bm = measure.build_model(self.s, self.device, self.dtype)
        self.log(f"model {self.s.model}: {bm.params / 1e9:.2f} B params, {bm.weight_bytes / gpu.GIB:.2f} GiB")
        return bm

    def _micro(self):
        from pipeline.bench.micro import attention_micro, prefill_attention_micro

        cuda = gpu.is_cuda(self.device)
        slots = max(16, min(16384, int(max(self.s.contexts) * 0.25)))
        batch = min(16, self.s.max_batch) if cuda else 2
        bw = self.result["bandwidth"].get("bytes_per_s")
        out = {"decode": attention_micro(self.bm.config, self.device, self.dtype, batch, slots, bw)}
        q_len = min(self.s.prefill_chunk, 2048 if cuda else 64)
        prefix = min(8192 if cuda else 64, max(self.s.contexts) // 4)
        value, err = self.attempt(
            "prefill attention micro",
            lambda: prefill_attention_micro(self.bm.config, self.device, self.dtype, q_len, prefix, bw),
        )
        out["prefill_chunk"] = value if err is None else {"error": err}
        return out

    @property
    def decode_room(self) -> int:
        """Slots a prefilled cache is sized for: every decode step a cell runs on it (as the engine does)."""
        return self.s.decode_warmup + max(self.s.decode_steps, self.s.search_steps)

    def _chunk_act(self):
        chunk = min(self.s.prefill_chunk, max(self.s.contexts))
        return measure.chunk_activation_bytes(self.bm, self.s.prefill_batch, chunk, self.s.seed)

    def _warmup(self):
        """Load every kernel once on small shapes (every policy, both prefill modes, decode)."""
        from policies import Budget, make_policy

        length = min(512, min(self.s.contexts))
        ids = measure.random_ids(self.bm, min(2, self.s.prefill_batch + 1), length, self.s.seed)
        done = {}
        for name in dict.fromkeys(["full", *self.s.policies]):
            ok, err = self.attempt(
                f"warm-up {name}", lambda n=name: self._warm_one(n, ids, length, make_policy, Budget)
            )
            done[name] = "ok" if err is None else err
        measure.use_kvpipe_attention(self.bm)
        return done

    def _warm_one(self, name, ids, length, make_policy, Budget):
        pol = make_policy(name, **self.s.policy_params.get(name, {}))
        budget = Budget(ratio=self.s.ratios[0]) if pol.compresses else None
        gen = measure.make_generator(self.bm, pol, budget)
        for chunk in (None, max(1, length // 2)):
            pre = measure.kvpipe_prefill(gen, ids, chunk, 2)
            measure.decode_steps(gen, pre, 2)
        gpu.sync(self.device)

    # -- one cell ---------------------------------------------------------------------------
    def _cell(self, cell: dict) -> None:
        from policies import Budget, make_policy

        s, bm = self.s, self.bm
        cell["status"] = "running"
        t_cell = time.monotonic()
        self.log(f"cell {report.label(cell)}")
        pol, err = self.attempt("policy", lambda: make_policy(cell["policy"], **cell["params"]))
        if pol is None:
            cell.update(status="error", error=err)
            return
        ratio = cell["ratio"] if cell["ratio"] is not None else (s.ratios[0] if pol.compresses else None)
        budget = Budget(ratio=ratio) if pol.compresses else None
        cell["budget_ratio_used"] = ratio
        kivi_kernels.release_workspace()  # an earlier cell's decode scratch is not this cell's memory
        gen = measure.make_generator(bm, pol, budget)
        measure.use_kvpipe_attention(bm)
        ids = measure.random_ids(bm, s.prefill_batch, cell["context"], s.seed + cell["context"])

        # oneshot first, chunked last: decode continues from the chunked cache (the bounded-memory
        # mode); each prefill starts with the previous cache freed, so its peak is its own.
        modes = sorted(s.prefill_modes, key=lambda m: m == "chunked")
        pre, mode, transient = None, None, 0
        for m in modes:
            self.check_time()
            pre = None
            gpu.cleanup(self.device)
            chunk = None if m == "oneshot" else s.prefill_chunk
            paired = self._full_generator() if pol.compresses else None
            out, err = self.attempt(f"prefill {m}", lambda c=chunk, f=paired: self._prefill(gen, ids, c, f))
            if err:
                cell["prefill"][m] = {"error": err}
                cell["sub_errors"][f"prefill_{m}"] = err
                continue
            info, pre = out
            out = None  # the next mode's peak must not include this cache
            mode, transient = m, info.get("transient_bytes") or 0
            cell["prefill"][m] = info
            pair = f", full beside it {info['paired_full_seconds']:.3f} s" if paired is not None else ""
            self.log(f"  prefill {m}: {info['seconds']:.3f} s{pair}, peak {_gib(info['peak_bytes'])}")
        if pre is None and mode is not None:  # the last mode failed: rebuild the earlier one's cache
            chunk = None if mode == "oneshot" else s.prefill_chunk
            pre, err = self.attempt(
                "prefill again", lambda: measure.kvpipe_prefill(gen, ids, chunk, self.decode_room)
            )
        if pre is None:
            cell.update(
                status="error", error="no prefill mode succeeded: " + "; ".join(cell["sub_errors"].values())
            )
            return
        cell["decode_cache_from"] = mode
        kept_b, stored_b = measure.kv_bytes(pre.cache)
        rows = s.prefill_batch
        full_row = bm.kv_bytes_per_token() * cell["context"]
        cell["kv"] = {
            "kept_bytes_per_row": kept_b / rows,
            "stored_bytes_per_row": stored_b / rows,
            "full_bytes_per_row": full_row,
            "kept_fraction": kept_b / rows / full_row,
            "kept_tokens_per_head": float(pre.cache.filled_slots_per_row().float().mean())
            / (bm.config.num_hidden_layers * bm.config.num_key_value_heads),
        }
        self.save()

        self.check_time()
        maxb, err = self.attempt(
            "largest batch",
            lambda: measure.search_max_batch(gen, bm, pre, s, int(max(0, transient)), self.check_time),
        )
        if err:
            cell["sub_errors"]["max_batch"] = err
        else:
            cell["max_batch"] = maxb
            self.log(
                f"  largest batch {maxb['batch']}{' (cap)' if maxb['capped'] else ''} after {maxb['probes']}"
            )
        self.save()
        largest = (maxb or {}).get("batch") or 0
        given = min(s.decode_batch, largest) if largest else s.decode_batch
        bw = self.result["bandwidth"].get("bytes_per_s")
        for which, batch in (("given", given), ("max", largest)):
            if batch < 1:
                continue
            if which == "max" and batch == given and "given" in cell["decode"]:
                cell["decode"]["max"] = cell["decode"]["given"]
                continue
            self.check_time()
            out, err = self.attempt(
                f"decode {which}",
                lambda b=batch: measure.measure_decode(gen, bm, pre, b, s.decode_steps, s.decode_warmup, bw),
            )
            if err and which == "max" and "out of memory" in err and batch > 1:
                # the probe ran fewer steps than the timing does: the cache grew past the edge
                smaller = max(1, int(batch * 0.9))
                self.log(f"  decode at {batch} ran out of memory; timing at {smaller} instead")
                out, err2 = self.attempt(
                    "decode max (90%)",
                    lambda b=smaller: measure.measure_decode(
                        gen, bm, pre, b, s.decode_steps, s.decode_warmup, bw
                    ),
                )
                if out is not None:
                    out["reduced_from_batch"] = batch
                    err = None
                else:
                    err = f"{err}; at {smaller}: {err2}"
            if err:
                cell["sub_errors"][f"decode_{which}"] = err
            else:
                cell["decode"][which] = out
                roof = out.get("roofline_pct", float("nan"))
                self.log(
                    f"  decode batch {out['batch']}: {out['median_ms']:.2f} ms/step, "
                    f"{out['tokens_per_s']:.0f} tok/s, roofline {roof:.0f}%"
                )
        pre = None
        gpu.cleanup(self.device)
        cell["seconds"] = time.monotonic() - t_cell
        measured = bool(cell["prefill"]) and any("seconds" in v for v in cell["prefill"].values())
        cell["status"] = "ok" if not cell["sub_errors"] else ("partial" if measured else "error")
        if cell["sub_errors"] and not cell["error"]:
            cell["error"] = "; ".join(f"{k}: {v}" for k, v in cell["sub_errors"].items())

    def _full_generator(self):
        """A full-cache generator on the bench's model, timed beside each compressing prefill."""
        from policies import make_policy

        if self._paired_full is None:
            self._paired_full = measure.make_generator(self.bm, make_policy("full"), None)
        return self._paired_full

    def _prefill(self, gen, ids, chunk, paired=None):
        """Prefill timed in a job's steady state: one untimed run at the cell's shapes first (kernels
        built, the allocator holding blocks of these sizes), then `prefill_reps` timed runs without
        returning memory to the driver between them. Flushing the allocator before every run
        (`empty_cache`) charged its regrowth (device page mapping) to each run, which weighs most on
        the policies that allocate many small tensors; a job's engine never flushes between batches.
        The untimed run's time is kept as `cold_seconds`. Peaks are allocated bytes (reset before
        each run), which the allocator's cache does not change.

        `paired`: a full-cache generator timed on the same ids beside every timed run, in turn
        (full first, then this, then this first: ABBA), its cache dropped before the next run.
        The overhead is then the median of the pairs' ratios (`paired_overhead_pct`): against the
        full cell, minutes earlier and after other cells, the same code moved by up to 30 points
        between runs (SmolLM2's full chunked prefill alone: 0.257 s in one run, 0.335 s in another)."""
        device = self.device
        times, peaks, pre, full_times = [], [], None, []
        room = self.decode_room
        gpu.cleanup(device)
        base = gpu.allocated_bytes(device)
        # (the untimed run's cache is dropped at once: a name holding it would add one cache to
        # every timed run's peak)
        cold = gpu.timed(lambda: measure.kvpipe_prefill(gen, ids, chunk, room), device)[1]
        if paired is not None:  # its untimed run, in this allocator state
            measure.kvpipe_prefill(paired, ids, chunk, room)

        def full_run() -> None:
            gc.collect()
            _, seconds = gpu.timed(lambda: measure.kvpipe_prefill(paired, ids, chunk, room), device)
            full_times.append(seconds)

        for rep in range(self.s.prefill_reps):
            pre = None
            if paired is not None and rep % 2 == 0:
                full_run()
            gc.collect()
            gpu.reset_peak(device)
            pre, seconds = gpu.timed(lambda: measure.kvpipe_prefill(gen, ids, chunk, room), device)
            times.append(seconds)
            peaks.append(gpu.peak_bytes(device))
            if paired is not None and rep % 2 == 1:
                full_run()
        kept_b, stored_b = measure.kv_bytes(pre.cache)
        peak = None if peaks[0] is None else max(peaks)
        info = {
            "chunk": chunk,
            "seconds": statistics.median(times),
            "all_seconds": times,
            "cold_seconds": cold,
            "tokens_per_s": ids.numel() / statistics.median(times),
            "peak_bytes": peak,
            "base_bytes": base,
            "cache_kept_bytes": kept_b,
            "cache_stored_bytes": stored_b,
            "transient_bytes": None if peak is None else peak - base - stored_b,
        }
        if full_times:
            ratios = [mine / full for mine, full in zip(times, full_times)]
            info["paired_full_seconds"] = statistics.median(full_times)
            info["paired_full_all_seconds"] = full_times
            info["paired_overhead_pct"] = 100.0 * (statistics.median(ratios) - 1.0)
        return info, pre

    def _hf(self, full: dict) -> None:
        s = self.s
        largest = (full.get("max_batch") or {}).get("batch") or 0
        given = (full.get("decode", {}).get("given") or {}).get("batch") or (
            min(s.decode_batch, largest) or 1
        )
        batches = [given] + ([largest] if s.hf_at_max_batch and largest and largest != given else [])
        for batch in batches:
            for sdpa in measure.HF_SDPA_VARIANTS:
                self.check_time()
                self.log(f"HF generate ctx {full['context']} batch {batch} ({sdpa} sdpa) ...")
                out, err = self.attempt(
                    "hf generate",
                    lambda b=batch, v=sdpa: measure.hf_generate(
                        self.bm, b, full["context"], s.decode_steps, s.seed, v
                    ),
                )
                measure.use_kvpipe_attention(self.bm)
                entry = out or {"context": full["context"], "batch": batch, "sdpa": sdpa, "error": err}
                self.result["baselines"]["hf_generate"].append(entry)
                if out:
                    self.log(f"  HF step {out['step_ms']:.2f} ms at batch {batch} ({sdpa})")


def _gib(n) -> str:
    return "-" if n is None else f"{n / gpu.GIB:.2f} GiB"


def _raise_interrupted(signum, frame):  # noqa: ARG001
    raise Interrupted()


def run_bench(settings: BenchSettings, command: str, resolved: str | None = None) -> tuple[dict, Path, Path]:
    gpu.prefer_expandable_segments()
    bench = Bench(settings, command)
    bench.result["resolved_command"] = resolved
    with torch.inference_mode():
        result = bench.run()
    return result, bench.json_path, bench.md_path
