"""Metric functions on one prediction and one reference string (scores in [0, 1]).

The LongBench metrics follow LongBench's ``metrics.py`` in behaviour, reimplemented here
without its dependencies:

- ``qa_f1``: SQuAD-style normalisation (lower case, drop punctuation and the articles a/an/the,
  collapse whitespace), then token-bag F1.
- ``longbench_rouge``: ROUGE-L F as the ``rouge`` package computes it (sentences split on ".",
  summary-level union LCS, counts over distinct words: its default ``exclusive`` mode).
- ``*_zh``: LongBench segments Chinese with ``jieba``; here Chinese text is split into single
  characters (ASCII words stay whole), a dependency-free approximation.
- ``code_sim``: the first prediction line with no backtick, ``#`` or ``//``, compared by an
  edit similarity in percent rounded to an integer (``fuzz.ratio``, here the insert/delete
  edit distance: ``2 * LCS / (len(a) + len(b))``).
- ``classification``: classes named in the prediction, minus those that are only substrings of
  the reference; 1/len(matches) when the reference is among them. (LongBench removes items
  from the list it iterates over, which skips some; here every such class is removed.)
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_ZH_PUNCT = set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ZH_TOKEN = re.compile(
    r"[\u3400-\u9fff\uf900-\ufaff]|[A-Za-z0-9_]+|[^\sA-Za-z0-9_\u3400-\u9fff\uf900-\ufaff]"
)
_CONTROL = re.compile(r"[\x00-\x1f]")


# --- normalisation -------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, remove punctuation, articles and extra whitespace (SQuAD / LongBench)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, remove ASCII and Chinese punctuation and all whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _PUNCT and ch not in _ZH_PUNCT and not ch.isspace())


def zh_tokens(text: str) -> list[str]:
    """Chinese characters one by one, ASCII words whole, other symbols one by one."""
    return _ZH_TOKEN.findall(text)


def ruler_postprocess(prediction: str) -> str:
    """RULER replaces control characters by newlines and strips the prediction."""
    return _CONTROL.sub("\n", prediction).strip()


# --- token overlap -------------------------------------------------------------------------


def token_f1(prediction: list[str], reference: list[str]) -> float:
    common = Counter(prediction) & Counter(reference)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str, **_) -> float:
    def toks(text: str) -> list[str]:
        return [t for t in (normalize_zh_answer(tok) for tok in zh_tokens(text)) if t]

    return token_f1(toks(prediction), toks(reference))


# --- longest common subsequence ------------------------------------------------------------


def lcs_length(a, b) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def lcs_items(ref: list[str], hyp: list[str]) -> list[str]:
    """One longest common subsequence (items of `ref`), backtracking up before left on ties."""
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, above = table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = above[j - 1] + 1 if ref[i - 1] == hyp[j - 1] else max(above[j], row[j - 1])
    out: list[str] = []
    i, j = n, m
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            out.append(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l(prediction: str, reference: str, **_) -> float:
    """Plain ROUGE-L F1: LCS of lower-cased word tokens, precision and recall weighted equally."""
    hyp, ref = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", reference.lower())
    if not hyp or not ref:
        return 0.0
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _sentences(text: str) -> list[list[str]]:
    return [words for words in (part.split() for part in text.split(".")) if words]


def longbench_rouge(prediction: str, reference: str, **_) -> float:
    """LongBench's ROUGE-L F (see the module docstring)."""
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not hyp or not ref:
        return 0.0
    m = len({w for s in ref for w in s})
    n = len({w for s in hyp for w in s})
    union: set[str] = set()
    for ref_s in ref:
        for hyp_s in hyp:
            union.update(lcs_items(ref_s, hyp_s))
    recall, precision = len(union) / m, len(union) / n
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def rouge_zh(prediction: str, reference: str, **_) -> float:
    return longbench_rouge(" ".join(zh_tokens(prediction)), " ".join(zh_tokens(reference)))


# --- LongBench's task-specific metrics -----------------------------------------------------


def classification(prediction: str, reference: str, all_classes=None, **_) -> float:
    matched = [c for c in (all_classes or []) if c in prediction]
    matched = [c for c in matched if not (c in reference and c != reference)]
    return 1.0 / len(matched) if reference in matched else 0.0


def _share_of(numbers: list[str], target: str) -> float:
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str, **_) -> float:
    found = re.findall(r"Paragraph (\d+)", reference) or re.findall(r"\d+", reference)
    return _share_of(re.findall(r"\d+", prediction), found[0]) if found else 0.0


def retrieval_zh(prediction: str, reference: str, **_) -> float:
    found = re.findall(r"段落(\d+)", reference) or re.findall(r"\d+", reference)
    return _share_of(re.findall(r"\d+", prediction), found[0]) if found else 0.0


def count(prediction: str, reference: str, **_) -> float:
    return _share_of(re.findall(r"\d+", prediction), str(reference).strip())


def edit_ratio(a: str, b: str) -> float:
    """Insert/delete edit similarity in [0, 1]; two empty strings score 0 as fuzz.ratio does."""
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def code_sim(prediction: str, reference: str, **_) -> float:
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return round(100 * edit_ratio(line, reference)) / 100
