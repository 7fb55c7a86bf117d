"""The synthetic task registry and `generate`, which turns a task name into length-fitted rows."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.tasks.base import RowMeta, fit_haystack_row
from pipeline.tasks.common_words import common_words_row
from pipeline.tasks.haystacks import HAYSTACKS
from pipeline.tasks.niah import niah_sample
from pipeline.tasks.passkey import passkey_sample
from pipeline.tasks.prompts import PROMPT_MODES
from pipeline.tasks.variable_tracking import variable_tracking_sample


@dataclass(frozen=True)
class TaskSpec:
    name: str
    scorer: str
    max_new_tokens: int
    description: str
    options: dict = field(default_factory=dict)  # option name -> default (its type is the default's)
    sample: Callable | None = None  # (rng, depth, **options) -> Sample, for haystack tasks
    row: Callable | None = None  # (meta, rng, tokenizer, chat, **options) -> row, for other tasks
    uses_depth: bool = True


def _niah(**fixed):
    def sample(rng, depth, **opts):
        return niah_sample(rng, depth, **{**opts, **fixed})

    return sample


_VALUE_OPTS = {"key_type": "words", "value_type": "numbers"}

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec(
            "passkey",
            "contains",
            16,
            "find the pass key hidden in filler text",
            {"digits": 5, "style": "plain"},
            sample=passkey_sample,
        ),
        TaskSpec(
            "niah_single",
            "string_match_all",
            128,
            "RULER NIAH: one needle, one query",
            dict(_VALUE_OPTS),
            sample=_niah(num_keys=1, num_values=1, num_queries=1),
        ),
        TaskSpec(
            "niah_multikey",
            "string_match_all",
            128,
            "RULER NIAH: several keys, one queried",
            {"num_keys": 4, **_VALUE_OPTS},
            sample=_niah(num_values=1, num_queries=1),
        ),
        TaskSpec(
            "niah_multivalue",
            "string_match_all",
            128,
            "RULER NIAH: one key with several values",
            {"num_values": 4, **_VALUE_OPTS},
            sample=_niah(num_keys=1, num_queries=1),
        ),
        TaskSpec(
            "niah_multiquery",
            "string_match_all",
            128,
            "RULER NIAH: several keys, all queried",
            {"num_queries": 4, **_VALUE_OPTS},
            sample=_niah(num_keys=1, num_values=1),
        ),
        TaskSpec(
            "variable_tracking",
            "string_match_all",
            30,
            "RULER: track chains of variable assignments",
            {"num_chains": 1, "num_hops": 4},
            sample=variable_tracking_sample,
        ),
        TaskSpec(
            "common_words",
            "string_match_all",
            120,
            "RULER: the most common words of a long list",
            {"num_cw": 10, "freq_cw": None, "freq_ucw": 3},
            row=common_words_row,
            uses_depth=False,
        ),
    ]
}


def _check(task: str, haystack: str, prompt_mode: str, opts: dict) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose one of {HAYSTACKS}")
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt_mode {prompt_mode!r}; choose one of {PROMPT_MODES}")
    spec = TASKS[task]
    unknown = set(opts) - set(spec.options)
    if unknown:
        raise ValueError(f"task {task!r} takes options {sorted(spec.options)}, not {sorted(unknown)}")
    return spec


def generate(
    task: str,
    context_length: int,
    samples: int,
    seed: int,
    tokenizer,
    depths: Sequence[float] | None = None,
    haystack: str = "repeat",
    prompt_mode: str = "question_last",
    chat: bool = True,
    **opts,
) -> list[dict]:
    """`samples` rows of `task`, each prompt fitted to at most `context_length` tokens.

    Sample i is drawn from its own rng, seeded by (task, context_length, seed, i), so it does
    not depend on how many samples were asked for. With `depths`, sample i puts its (first)
    needle at ``depths[i % len(depths)]``; without, at a depth drawn from its rng.
    Lengths are counted with :func:`pipeline.tasks.prompts.count_prompt_tokens` (`chat`
    chooses whether the chat template is part of the count).
    """
    spec = _check(task, haystack, prompt_mode, {k: v for k, v in opts.items() if v is not None})
    options = {**spec.options, **{k: v for k, v in opts.items() if v is not None}}
    if depths is not None:
        depths = [float(d) for d in depths]
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError("depths must be a non-empty list of numbers in [0, 1]")
    rows = []
    for i in range(samples):
        rng = random.Random(f"kvpipe:{task}:{context_length}:{seed}:{i}")
        meta = RowMeta(task, i, context_length, spec.scorer, spec.max_new_tokens, haystack, prompt_mode)
        if spec.row is not None:
            row = spec.row(meta, rng, tokenizer, chat, **options)
        else:
            depth = depths[i % len(depths)] if depths else round(rng.random(), 4)
            row = fit_haystack_row(spec.sample(rng, depth, **options), meta, tokenizer, rng, chat=chat)
        if not spec.uses_depth:
            row["haystack"] = None
        rows.append(row)
    return rows
