"""Shared shape of a haystack task sample, and turning one into a length-fitted row."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pipeline.tasks.fitting import fit_units
from pipeline.tasks.haystacks import ends_sentence, haystack_pieces
from pipeline.tasks.placement import insert_needles
from pipeline.tasks.prompts import count_prompt_tokens

SENTENCE_SLACK = 0.99  # a fitted haystack may give up to 1% of the length to end on a sentence


@dataclass
class Sample:
    """Everything about one sample except how much haystack surrounds the needles."""

    preamble: str  # task instructions, placed before the haystack inside `context`
    needles: list[tuple[float, str]]  # (depth, sentence), in insertion order
    question: str
    answer: list[str]
    answer_prefix: str = ""
    separator: str = "\n"
    depth: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RowMeta:
    task: str
    index: int
    context_length: int
    scorer: str
    max_new_tokens: int
    haystack: str
    prompt_mode: str = "question_last"

    @property
    def row_id(self) -> str:
        return f"{self.task}-{self.context_length}-{self.index}"


def make_row(meta: RowMeta, context: str, sample: Sample) -> dict:
    return {
        "id": meta.row_id,
        "task": meta.task,
        "context": context,
        "question": sample.question,
        "answer": list(sample.answer),
        "context_length": meta.context_length,
        "depth": sample.depth,
        "scorer": meta.scorer,
        "prompt_mode": meta.prompt_mode,
        "answer_prefix": sample.answer_prefix,
        "separator": sample.separator,
        "max_new_tokens": meta.max_new_tokens,
        "haystack": meta.haystack,
        "needle_depths": [float(d) for d, _ in sample.needles],
        "prompt_tokens": None,
    }


def fit_haystack_row(sample: Sample, meta: RowMeta, tokenizer, rng: random.Random, chat: bool = True) -> dict:
    """A row whose full prompt is as long as possible without exceeding `meta.context_length`."""
    hay = haystack_pieces(meta.haystack, meta.context_length + 64, rng)

    def build(k: int) -> dict:
        return make_row(meta, sample.preamble + insert_needles(hay[:k], sample.needles), sample)

    def measure(r: dict) -> int:
        return count_prompt_tokens(r, tokenizer, chat=chat)

    k, row, tokens = fit_units(build, measure, meta.context_length, len(hay))
    # End the haystack on a whole sentence when that costs at most 1% of the length.
    for j in range(k, max(k - 64, 0), -1):
        if ends_sentence(hay[j - 1]):
            if j < k:
                shorter = build(j)
                shorter_tokens = measure(shorter)
                if shorter_tokens >= SENTENCE_SLACK * meta.context_length:
                    row, tokens = shorter, shorter_tokens
            break
    row["prompt_tokens"] = tokens
    return row
