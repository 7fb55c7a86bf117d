"""Evaluation data and scoring: synthetic long-context tasks, loaders and scorers.

- :data:`TASKS` / :func:`generate`: passkey, RULER's NIAH variants, variable tracking and
  common-words extraction, fitted to a length in the target model's tokens.
- :func:`load_rows`: Parquet, JSONL, and LongBench JSONL (mapped onto the row schema).
- :func:`score` / :func:`score_row`: the scorer registry (RULER, LongBench, generic).
- :func:`build_prompt_parts`: the (compressible prefix, suffix) split of a row's prompt.
"""

from pipeline.tasks.io import load_rows, write_rows
from pipeline.tasks.prompts import build_prompt_parts, count_prompt_tokens
from pipeline.tasks.registry import TASKS, TaskSpec, generate
from pipeline.tasks.scorers import SCORERS, score, score_row

__all__ = [
    "SCORERS",
    "TASKS",
    "TaskSpec",
    "build_prompt_parts",
    "count_prompt_tokens",
    "generate",
    "load_rows",
    "score",
    "score_row",
    "write_rows",
]
