"""LongBench (v1 / LongBench-E) support: prompt templates, metrics, generation lengths, row mapping.

A LongBench JSONL row has ``context, input, answers, all_classes, dataset, length, _id``. Its
dataset's template puts the instructions, the context, then the question; the mapping cuts
the template where the context ends, so ``context`` = instructions + context and
``question`` = everything after (the input and the answer cue), with an empty separator: the
user turn ``context + question`` is LongBench's prompt exactly (also stored as ``prompt``),
and the ``context_only`` mode can still compress the context alone.

As in LongBench's ``pred.py``, the few-shot and code datasets (trec, triviaqa, samsum, lsht,
lcc, repobench-p) are not wrapped in the chat template (``chat=False`` on the row), and the
first four are scored on the first line of the prediction (``first_line=True``). LongBench
also truncates over-long prompts in the middle to the model's window; that is the caller's
choice and is not done here.
"""

from __future__ import annotations

from pathlib import Path

_QA_EN = (
    "Answer the question based on the given passages. "
    "Only give me the answer and do not output any other words."
)
_MULTIDOC = (
    f"{_QA_EN}\n\nThe following are given passages.\n{{context}}\n\n{_QA_EN}\n\nQuestion: {{input}}\nAnswer:"
)
_CODE = "Please complete the code given below. \n"

PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
        "question as concisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as "
        "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}"
        "\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, "
        "using a single phrase or sentence if possible. If the question cannot be answered based on the "
        'information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer '
        "the question based on the above article as concisely as you can, using a single phrase or sentence "
        "if possible. If the question cannot be answered based on the information in the article, write "
        '"unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do '
        "not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
        "based on the above text, only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，"
        "不要输出任何其他字词。\n\n问题：{input}\n回答："
    ),
    "hotpotqa": _MULTIDOC,
    "2wikimqa": _MULTIDOC,
    "musique": _MULTIDOC,
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the "
        "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
        "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}"
        "\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    ),
    "vcsum": (
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结："
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. "
        "The following are some examples.\n\n{context}\n\n{input}"
    ),
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output format "
        "should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
        "the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
        'number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", '
        '"Paragraph 2", etc.\n\nThe answer is: '
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n"
        '{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：'
    ),
    "lcc": _CODE + "{context}Next line of code:\n",
    "repobench-p": _CODE + "{context}{input}Next line of code:\n",
}

METRICS: dict[str, str] = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_zh",
    "gov_report": "rouge",
    "qmsum": "rouge",
    "multi_news": "rouge",
    "vcsum": "rouge_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge",
    "lsht": "classification",
    "passage_retrieval_en": "retrieval",
    "passage_count": "count",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}

NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})
LONGBENCH_FIELDS = frozenset({"context", "input", "answers"})


def base_dataset(name: str) -> str:
    """The LongBench dataset a name refers to (LongBench-E's ``qasper_e`` -> ``qasper``)."""
    if name in PROMPTS:
        return name
    if name.endswith("_e") and name[:-2] in PROMPTS:
        return name[:-2]
    raise ValueError(f"unknown LongBench dataset {name!r}; known: {sorted(PROMPTS)}")


def is_longbench(raw: dict) -> bool:
    return LONGBENCH_FIELDS <= raw.keys() and "question" not in raw


def longbench_row(raw: dict, dataset: str | None = None, index: int = 0) -> dict:
    """Map one LongBench record onto the pipeline row schema."""
    name = raw.get("dataset") or dataset
    if not name:
        raise ValueError("a LongBench row needs a 'dataset' field (or a file named after its dataset)")
    base = base_dataset(name)
    head, rest = PROMPTS[base].split("{context}", 1)
    context = head + (raw.get("context") or "")
    question = rest.replace("{input}", raw.get("input") or "")
    answers = raw.get("answers") or []
    if isinstance(answers, str):
        answers = [answers]
    classes = raw.get("all_classes")
    return {
        "id": str(raw.get("_id") or f"{name}-{index}"),
        "task": name,
        "context": context,
        "question": question,
        "answer": [str(a) for a in answers],
        "scorer": METRICS[base],
        "prompt": context + question,
        "prompt_mode": "question_last",
        "separator": "",
        "answer_prefix": "",
        "max_new_tokens": MAX_NEW_TOKENS[base],
        "all_classes": [str(c) for c in classes] if classes else None,
        "first_line": base in FIRST_LINE,
        "chat": base not in NO_CHAT,
        "length": raw.get("length"),
        "language": raw.get("language"),
        "context_length": None,
        "depth": None,
    }


def dataset_from_path(path: Path) -> str | None:
    """A LongBench data file is named after its dataset (``narrativeqa.jsonl``, ``qasper_e.jsonl``)."""
    try:
        base_dataset(path.stem)
    except ValueError:
        return None
    return path.stem
