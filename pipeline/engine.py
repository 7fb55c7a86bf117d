"""An inference engine: a loaded model (plain transformers or DeepSpeed-inference), the job's
policy, and the batching of prepared rows into generate() calls.

`InferenceEngine.process(rows)` takes input rows (dicts) and returns one result dict per row,
in order, each with its output or its error.
"""

from __future__ import annotations

import logging
import socket

import torch

from pipeline.generate import GenerationConfig, Generator, RowResult
from pipeline.models import load_model
from pipeline.planner import MemoryModel, Planner, agree_min, fixed_batches, free_device_bytes
from pipeline.rows import PreparedRow, prepare_row, score_output
from policies import Budget, make_policy

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but no GPU is visible")
    return torch.device(device)


def resolve_dtype_name(dtype: str, device: torch.device) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def wrap_deepspeed(model, dtype: torch.dtype, tensor_parallel: int):
    """DeepSpeed-inference over the HF model: AutoTP shards the linears, attention stays ours."""
    import deepspeed

    engine = deepspeed.init_inference(
        model,
        dtype=dtype,
        tensor_parallel={"tp_size": tensor_parallel},
        replace_with_kernel_inject=False,
    )
    # engine.generate refuses prompts over max_out_tokens; kvpipe drives the HF module directly.
    return engine.module


class InferenceEngine:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.device = resolve_device(spec["device"])
        dtype_name = resolve_dtype_name(spec["dtype"], self.device)
        model, self.tokenizer = load_model(spec["model"], dtype=dtype_name, device=self.device)
        if spec["engine"] == "deepspeed":
            model = wrap_deepspeed(model, model.dtype, spec["tensor_parallel"])
        elif spec["tensor_parallel"] != 1:
            raise ValueError("tensor_parallel > 1 needs engine: deepspeed")
        self.model = model
        pol = spec["policy"]
        self.policy = make_policy(pol["name"], **(pol.get("params") or {}))
        budget = None
        if self.policy.compresses:
            budget = Budget(ratio=pol.get("ratio"), tokens=pol.get("tokens"))
        self.generator = Generator(model, self.tokenizer, self.policy, budget)
        self.gen_config = self._generation_config(spec["generation"])
        self.max_context = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.replica = f"{socket.gethostname()}:{self.device}"

    def set_policy(
        self, name: str, ratio: float | None = None, params: dict | None = None, tokens: int | None = None
    ) -> None:
        """Swap the compression policy (and budget) without reloading the model: rebuilds the Generator."""
        pol = {"name": name, "ratio": ratio, "tokens": tokens, "params": dict(params or {})}
        self.policy = make_policy(name, **pol["params"])
        budget = Budget(ratio=ratio, tokens=tokens) if self.policy.compresses else None
        self.generator = Generator(self.model, self.tokenizer, self.policy, budget)
        self.spec = {**self.spec, "policy": pol}

    def _generation_config(self, gen: dict) -> GenerationConfig:
        stop = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        for text in gen.get("stop") or []:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(
                    f"generation.stop: {text!r} is {len(ids)} tokens; stop strings must be one token"
                )
            stop.add(ids[0])
        return GenerationConfig(
            max_new_tokens=gen["max_new_tokens"],
            do_sample=gen["do_sample"],
            temperature=gen["temperature"],
            top_p=gen["top_p"],
            top_k=gen["top_k"],
            seed=gen["seed"],
            stop_token_ids=tuple(sorted(stop)),
            prefill_chunk_tokens=gen.get("prefill_chunk_tokens"),
        )

    # -- rows ---------------------------------------------------------------------------------
    def prepare(self, rows: list[dict]) -> list[PreparedRow]:
        inp = self.spec["input"]
        return [
            prepare_row(
                row,
                i,
                self.tokenizer,
                prompt_mode=inp["prompt_mode"],
                chat_template=inp["chat_template"],
                max_context=self.max_context,
                max_new_tokens=self.gen_config.max_new_tokens,
            )
            for i, row in enumerate(rows)
        ]

    def process(self, rows: list[dict]) -> list[dict]:
        """One result dict per input row, in input order."""
        prepared = self.prepare(rows)
        results: list[dict | None] = [None] * len(rows)
        for p in prepared:
            if p.error:
                results[p.index] = self._row(rows[p.index], p, error=p.error)
        ready = sorted((p for p in prepared if not p.error), key=lambda p: p.total_tokens)
        for group in self.plan_batches([p.total_tokens for p in ready]):  # similar lengths together
            for p, out in self._run_batch([ready[i] for i in group]):
                results[p.index] = self._finish(rows[p.index], p, out)
        return results  # type: ignore[return-value]

    def plan_batches(self, lengths: list[int]) -> list[list[int]]:
        """Batches (index lists into the ascending `lengths`): memory-planned on a GPU, else fixed.

        See pipeline/planner.py for the formula. Under tensor parallelism every rank plans with
        the smallest free memory of the group, so all ranks run the same batches.
        """
        cluster = self.spec["cluster"]
        free = free_device_bytes(self.device)
        if cluster.get("batch_planner", "memory") != "memory" or free is None:
            return fixed_batches(len(lengths), cluster["batch_size"])
        free = agree_min(free)
        shape = MemoryModel.from_config(
            self.model.config, self.generator.dtype.itemsize, self.spec["tensor_parallel"]
        )
        planner = Planner(
            shape,
            self.policy,
            self.generator.budget,
            new_tokens=self.gen_config.max_new_tokens,
            max_batch_size=cluster.get("max_batch_size", 64),
            max_batch_tokens=cluster.get("max_batch_tokens"),
            prefill_chunk=self.gen_config.prefill_chunk_tokens,
        )
        return planner.plan(lengths, free * cluster.get("memory_fraction", 0.9))

    def _run_batch(self, batch: list[PreparedRow]):
        """Generate for a batch; on out-of-memory split it and retry; other failures mark the rows."""
        try:
            suffixes = [p.suffix_ids for p in batch] if any(p.suffix_ids for p in batch) else None
            outs, stats = self.generator.generate([p.prompt_ids for p in batch], self.gen_config, suffixes)
            for p, out in zip(batch, outs):
                yield p, (out, stats)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                yield batch[0], "out of memory for a single row"
                return
            half = len(batch) // 2
            log.warning("out of memory at batch %d: retrying as %d + %d", len(batch), half, len(batch) - half)
            yield from self._run_batch(batch[:half])
            yield from self._run_batch(batch[half:])
        except Exception as exc:  # noqa: BLE001  (a failed batch must not lose its rows)
            log.exception("generation failed for a batch of %d rows", len(batch))
            for p in batch:
                yield p, f"generation failed: {type(exc).__name__}: {exc}"

    def _finish(self, row: dict, p: PreparedRow, out) -> dict:
        if isinstance(out, str):
            return self._row(row, p, error=out)
        result, stats = out
        return self._row(row, p, result=result, batch_rows=stats.rows, peak=stats.peak_device_bytes)

    def _row(
        self,
        row: dict,
        p: PreparedRow,
        *,
        result: RowResult | None = None,
        error: str | None = None,
        batch_rows: int | None = None,
        peak: int | None = None,
    ) -> dict:
        out = {
            "id": p.id,
            "error": error,
            "policy": self.spec["policy"]["name"],
            "model": self.spec["model"],
            "prompt_mode": p.prompt_mode,
            "replica": self.replica,
            "prompt_tokens": p.total_tokens if p.prompt_ids else None,
        }
        if result is None:
            return out
        text = self.tokenizer.decode(result.output_ids, skip_special_tokens=True)
        out.update(
            output_text=text,
            output_tokens=len(result.output_ids),
            kv_tokens_full=result.kv_tokens_full,
            kv_tokens_kept=result.kv_tokens_kept,
            kv_bytes_full=result.kv_bytes_full,
            kv_bytes_kept=result.kv_bytes_kept,
            prefill_s=result.prefill_s,
            decode_s=result.decode_s,
            ttft_s=result.ttft_s,
            finish_reason=result.finish_reason,
            batch_rows=batch_rows,
            batch_peak_device_bytes=peak,
        )
        try:
            out["score"] = score_output(row, text)
        except Exception as exc:  # noqa: BLE001  (a scorer problem is the row's error, not the job's)
            out["error"] = f"scoring failed: {type(exc).__name__}: {exc}"
        return out
