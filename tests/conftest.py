"""Shared fixtures: the real SmolLM2 (loaded once per session) and the tiny random Llama."""

from __future__ import annotations

import os

import pytest
import torch

# The policies' Triton kernels are tested on CPU tensors under Triton's interpreter, which is
# chosen once, before triton is first imported in the process. The pipeline itself runs them on
# CUDA only; a test opts in to the CPU path (each kernel module's CPU_INTERPRET flag).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def smollm2():
    from pipeline.models import load_model

    model, tokenizer = load_model("smollm2", dtype="float32")
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_llama():
    from pipeline.models import load_model

    return load_model("tiny-llama", dtype="float32")


@pytest.fixture
def bf16_interpreter_dot(monkeypatch):
    """Triton's interpreter (3.9, on CPU) multiplies bfloat16 `tl.dot` operands as their raw uint16
    bits (garbage); with this fixture it multiplies their float32 values instead, which is exact
    (every bfloat16 is a float32) and what a tensor core multiplies, so that kernels' bf16 tensor-core
    paths can be checked on CPU. Other operations on bf16 tensors (loads, casts) already work."""
    import numpy as np
    from triton import language as tl
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_dot

    def as_float32(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *rest):
        return real(self, as_float32(a), as_float32(b), d, *rest)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
    )


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def long_prompt_ids(
    tokenizer, tokens: int, needle: str = "The pass key is 71432. Remember it. "
) -> list[int]:
    """A chat prompt of about `tokens` tokens with a needle in the middle."""
    per = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    reps = max(1, (tokens - 40) // per)
    text = FILLER * (reps // 2) + needle + FILLER * (reps - reps // 2) + "What is the pass key?"
    return chat_ids(tokenizer, text)


def prefilled(gen, prompts: list[list[int]], new_tokens: int):
    """A left-padded batch prefilled by `gen` in one shot, room made for `new_tokens` decode tokens:
    (cache, last logits, row budgets, next positions)."""
    from pipeline.kv_cache import EMPTY, CompressedCache
    from policies.base import row_budgets

    cache = CompressedCache(gen.num_layers, gen.policy)
    ids, filled = gen._left_pad(prompts)
    positions = torch.where(filled, filled.long().cumsum(-1) - 1, torch.full_like(ids, EMPTY))
    lengths = [len(p) for p in prompts]
    budgets = row_budgets(gen.budget, lengths, gen.device)
    logits = gen.prefill(cache, ids, positions, budgets, None, new_tokens, ids.shape[1] - min(lengths))
    return cache, logits, budgets, torch.tensor(lengths)
