"""RULER's common-words extraction: name the words repeated most often in a long numbered list.

`num_cw` common words appear `freq_cw` times each and the uncommon words `freq_ucw` times
each; the number of uncommon words is what fills the context to the requested length.
RULER uses freq_cw=30 at 4K tokens and above; below 4K the default scales it down
(``30 * length / 4096``, at least freq_ucw + 3) so the common words leave room for the list.
There is no haystack and no needle depth (``depth`` is null).
"""

from __future__ import annotations

import random

from pipeline.tasks.base import RowMeta, Sample, make_row
from pipeline.tasks.fitting import fit_units
from pipeline.tasks.prompts import count_prompt_tokens
from pipeline.tasks.words import vocabulary

PREAMBLE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)


def default_freq_cw(context_length: int, freq_ucw: int) -> int:
    if context_length >= 4096:
        return 30
    return max(freq_ucw + 3, int(30 * context_length / 4096))


def common_words_row(
    meta: RowMeta,
    rng: random.Random,
    tokenizer,
    chat: bool = True,
    num_cw: int = 10,
    freq_cw: int | None = None,
    freq_ucw: int = 3,
) -> dict:
    if freq_cw is None:
        freq_cw = default_freq_cw(meta.context_length, freq_ucw)
    if freq_cw <= freq_ucw:
        raise ValueError("freq_cw must exceed freq_ucw for the common words to be well defined")
    k_max = meta.context_length // max(freq_ucw, 1) + 1
    words = vocabulary(rng, num_cw + k_max)
    common, uncommon = words[:num_cw], words[num_cw:]
    shuffle_seed = rng.getrandbits(64)
    sample = Sample(
        preamble=PREAMBLE,
        needles=[],
        question=f"Question: What are the {num_cw} most common words in the above list?",
        answer=list(common),
        answer_prefix=f"Answer: The top {num_cw} words that appear most often in the list are:",
        separator="\n",
        depth=None,
    )

    def build(k: int) -> dict:
        entries = common * freq_cw + uncommon[:k] * freq_ucw
        random.Random(shuffle_seed).shuffle(entries)
        listing = " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries))
        return make_row(meta, PREAMBLE + listing, sample)

    _, row, tokens = fit_units(
        build, lambda r: count_prompt_tokens(r, tokenizer, chat=chat), meta.context_length, k_max
    )
    row["prompt_tokens"] = tokens
    return row
