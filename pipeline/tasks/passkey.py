"""Passkey retrieval (Mohtashami & Jaggi, 2023): find a number hidden in filler text.

Two styles (task option ``style``):

- ``plain`` (default): filler with "The pass key is {key}. Remember it." inside, and the
  question "What is the pass key?" continuing the same paragraph; no instruction line.
- ``paper``: the paper's wording: the instruction line ("There is an important info hidden
  ..."), the needle "The pass key is {key}. Remember it. {key} is the pass key.", and the
  question in its own paragraph.

Both end the prompt with the answer prefix "The pass key is" after the assistant header.
``plain`` exists because three parts of ``paper`` each make a small chat model (SmolLM2-135M,
full cache, greedy) fail a task it can do: the question in its own paragraph (it answers
from general knowledge: "a magical key that can unlock ..."), the instruction line (needles
near it, depth ~0.1, are missed) and the needle's tail "{key} is the pass key." (after the
prefix "The pass key is" it copies " the pass key." instead of the number). The answer
prefix itself does no harm. See tests/test_tasks_generate.py for the formats.
"""

from __future__ import annotations

import random

from pipeline.tasks.base import Sample

PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
STYLES = ("plain", "paper")


def passkey_sample(rng: random.Random, depth: float, digits: int = 5, style: str = "plain") -> Sample:
    if style not in STYLES:
        raise ValueError(f"passkey style {style!r}: choose one of {STYLES}")
    key = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    paper = style == "paper"
    needle = f"The pass key is {key}. Remember it." + (f" {key} is the pass key." if paper else "")
    return Sample(
        preamble=PREAMBLE if paper else "",
        needles=[(depth, needle)],
        question="What is the pass key?",
        answer=[key],
        answer_prefix="The pass key is",
        separator="\n\n" if paper else " ",
        depth=depth,
    )
