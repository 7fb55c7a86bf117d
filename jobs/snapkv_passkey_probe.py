"""Why does SnapKV lose the pass key? Which prompt tokens each (layer, kv head) keeps, on CPU.

One uncompressed prefill per row; at every layer a spy computes, from that layer's real
queries and keys, the kept set of several score variants (SnapKV with other windows, kernels,
pooling; TOVA's last-query score) at the same budget, and checks whether the needle's key
digits survive. Optionally decodes with a few of the variants to measure accuracy.

    python -m jobs.snapkv_passkey_probe --length 2048 --rows 5 --ratio 0.25
    python -m jobs.snapkv_passkey_probe --decode            # + accuracy per variant
    python -m jobs.snapkv_passkey_probe --haystack essays
    python -m jobs.snapkv_passkey_probe --no-answer-prefix
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from pipeline.generate import GenerationConfig, Generator
from pipeline.models import load_model
from pipeline.rows import prepare_row
from pipeline.tasks import generate
from policies.base import Budget, best_first
from policies.registry import make_policy
from policies.signals import KEEP_BASE, attention_probs, group_mean, snapkv_scores

# name -> (window, kernel, pooling); "tova" and "tova_per_head" are the last query alone
VARIANTS = {
    "w32_k7_avg (default)": (32, 7, "avg"),
    "w32_k7_max": (32, 7, "max"),
    "w32_k1": (32, 1, "avg"),
    "w16_k7_avg": (16, 7, "avg"),
    "w8_k7_avg": (8, 7, "avg"),
    "w8_k1": (8, 1, "avg"),
    "w1_k7_avg": (1, 7, "avg"),
    "w1_k1 (per kv head)": (1, 1, "avg"),
    "tova (last query, all heads)": None,
    "reference w32_k7 (kvpress-style)": "reference",
    "w32 filler queries only (first 16)": "filler16",
}


def reference_scores(layer, queries, window, kernel):
    """SnapKV as kvpress / the SnapKV repo compute it (batch 1, no padding, slot == position):
    softmax of the last `window` queries over all keys with a causal mask, mean over the window
    queries, avg_pool1d over the prefix columns, mean over each GQA group; window kept."""
    keys = layer.keys.float()
    b, num_heads, q_len, d = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    q = queries[:, :, -window:].float()
    k = keys.repeat_interleave(num_heads // kv_heads, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    mask = torch.ones(window, n, dtype=torch.bool).triu(diagonal=n - window + 1)
    probs = logits.masked_fill(mask, float("-inf")).softmax(-1)[..., : n - window]
    scores = F.avg_pool1d(probs.mean(-2), kernel, padding=kernel // 2, stride=1)
    scores = scores.view(b, kv_heads, num_heads // kv_heads, n - window).mean(2)
    return F.pad(scores, (0, window), value=KEEP_BASE)


def needle_positions(ids: list[int], key: str, tok) -> list[int]:
    """Positions of the key's digit tokens (the first occurrence of the key in the prompt)."""
    key_ids = tok(key, add_special_tokens=False)["input_ids"]
    n = len(key_ids)
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == key_ids:
            return list(range(i, i + n))
    raise ValueError(f"key {key} not found in the prompt tokens")


def tova_scores(layer, queries, positions, scaling):
    probs = attention_probs(layer, queries[:, :, -1:], positions[:, -1:], scaling)[:, :, 0]
    mean = probs.mean(dim=1)
    scores = mean[:, None, :].expand(layer.positions.shape).clone()
    newest = layer.positions == positions[:, -1:, None]
    return torch.where(newest, KEEP_BASE + layer.positions.float(), scores)


def probe_row(model, tok, ids, digits, budget, variants, capture_attn=False):
    """Run one prefill; for every layer and variant, which kv heads keep all the digits."""
    policy = make_policy("full")
    gen = Generator(model, tok, policy, None)
    out = {name: [] for name in variants}  # name -> per layer: [kv heads] bool
    ranks = {name: [] for name in variants}  # name -> per layer: [kv heads] worst digit rank
    agree = []  # per layer: our default kept set == the reference's, every kv head
    attn = []  # per layer: window(32) attention mass on digits vs whole prefix, per kv head
    digits_t = torch.tensor(digits)

    from pipeline import attention as attn_mod

    orig = attn_mod.kvpipe_attention

    def hooked(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        res = orig(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        step = kwargs[attn_mod.CTX_KWARG]
        layer = step.cache.layers[module.layer_idx]
        if query.shape[2] > 1:  # the prefill
            sc = scaling if scaling is not None else query.shape[-1] ** -0.5
            tops = {}
            for name, v in variants.items():
                if v is None:
                    s = tova_scores(layer, query, step.positions, sc)
                elif v == "reference":
                    s = reference_scores(layer, query, 32, 7)
                elif v == "filler16":  # the window's 16 oldest queries (filler text), scored alone
                    s = snapkv_scores(layer, query[:, :, :-16], step.positions[:, :-16], sc, 16, 7, "avg")
                else:
                    s = snapkv_scores(layer, query, step.positions, sc, *v)
                order = best_first(s.float(), layer.positions)[0]  # [h, s]
                tops[name] = order[:, :budget].sort(dim=1).values
                rank = torch.empty_like(order)
                rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
                worst = rank[:, digits_t].max(dim=1).values  # [h]
                ranks[name].append(worst.tolist())
                out[name].append((worst < budget).tolist())
            if "reference w32_k7 (kvpress-style)" in tops:
                same = tops["reference w32_k7 (kvpress-style)"] == tops["w32_k7_avg (default)"]
                agree.append(bool(same.all()))
            if capture_attn:
                w = 32
                p = attention_probs(layer, query[:, :, -w:], step.positions[:, -w:], sc).sum(2)
                p = group_mean(p, layer.keys.shape[1])[0]  # [h, s]
                prefix = p[:, : len(ids) - w]
                attn.append(
                    {
                        "digits": (prefix[:, digits_t].sum(1) / w).tolist(),
                        "prefix": (prefix.sum(1) / w).tolist(),
                    }
                )
        return res

    attn_mod.AttentionInterface.register(attn_mod.ATTN_NAME, hooked)
    try:
        gen.generate([ids], GenerationConfig(max_new_tokens=1))
    finally:
        attn_mod.AttentionInterface.register(attn_mod.ATTN_NAME, orig)
    return out, ranks, attn, agree


def decode_accuracy(model, tok, prompts, answers, budget_ratio, params, stop):
    name = "full" if params is None else "snapkv"
    policy = make_policy(name, **(params or {}))
    gen = Generator(model, tok, policy, None if params is None else Budget(ratio=budget_ratio))
    cfg = GenerationConfig(max_new_tokens=10, stop_token_ids=stop)
    texts = []
    for ids in prompts:  # one at a time: no padding questions, small memory
        res, _ = gen.generate([ids], cfg)
        texts.append(tok.decode(res[0].output_ids))
    hits = [a in t for a, t in zip(answers, texts)]
    return sum(hits) / len(hits), texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--haystack", default="repeat")
    ap.add_argument("--no-answer-prefix", action="store_true")
    ap.add_argument("--decode", nargs="*", default=None, help="variants to decode (default: a few)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    depths = [round(0.1 + 0.8 * i / max(1, args.rows - 1), 3) for i in range(args.rows)]
    rows = generate(args.task, args.length, args.rows, 0, tok, depths=depths, haystack=args.haystack)
    prompts, answers, digit_pos = [], [], []
    for i, row in enumerate(rows):
        if args.no_answer_prefix:
            row = {**row, "answer_prefix": None}
        p = prepare_row(
            row, i, tok, prompt_mode="question_last", chat_template=True, max_context=8192, max_new_tokens=16
        )
        prompts.append(p.prompt_ids)
        answers.append(row["answer"][0])
        digit_pos.append(needle_positions(p.prompt_ids, row["answer"][0], tok))
    print(
        f"loaded + {len(rows)} rows in {time.perf_counter() - t0:.1f}s; "
        f"prompt tokens {[len(p) for p in prompts]}; depths {depths}"
    )
    print("last 32 prompt tokens:", [tok.decode([t]) for t in prompts[0][-32:]])

    summary: dict = {"config": vars(args), "depths": depths, "variants": {}, "rows": []}
    per_variant_layers: dict[str, list[list[float]]] = {n: [] for n in VARIANTS}
    attn_rows = []
    for i, (ids, dpos) in enumerate(zip(prompts, digit_pos)):
        budget = Budget(ratio=args.ratio).for_length(len(ids))
        t1 = time.perf_counter()
        kept, ranks, attn, agree = probe_row(model, tok, ids, dpos, budget, VARIANTS, capture_attn=True)
        attn_rows.append(attn)
        print(
            f"row {i} depth {depths[i]} key {answers[i]} digits at {dpos[0]}..{dpos[-1]} "
            f"budget {budget}/{len(ids)}; kept set == reference in {sum(agree)}/{len(agree)} layers "
            f"({time.perf_counter() - t1:.1f}s)"
        )
        for name in VARIANTS:
            per_layer = [sum(h) / len(h) for h in kept[name]]
            per_variant_layers[name].append(per_layer)
        summary["rows"].append(
            {"depth": depths[i], "key": answers[i], "digits": dpos, "kept": kept, "worst_digit_rank": ranks}
        )

    n_layers = len(per_variant_layers["w32_k7_avg (default)"][0])
    print("\nfraction of (layer, kv head) that keep ALL key digits, averaged over rows")
    print(f"{'variant':32s} {'all':>6s}  per layer (L0..L{n_layers - 1})")
    for name, rows_layers in per_variant_layers.items():
        layer_mean = [sum(r[li] for r in rows_layers) / len(rows_layers) for li in range(n_layers)]
        overall = sum(layer_mean) / n_layers
        summary["variants"][name] = {"all": overall, "per_layer": layer_mean}
        print(f"{name:32s} {overall:6.3f}  " + " ".join(f"{x:.1f}" for x in layer_mean))

    # the window's attention mass on the digits, relative to uniform over the prefix
    print("\nwindow(32) attention on the 5 digit tokens / on the whole prefix, mean over rows and kv heads")
    ratios = []
    for li in range(n_layers):
        d = sum(sum(a[li]["digits"]) for a in attn_rows) / (len(attn_rows) * len(attn_rows[0][li]["digits"]))
        p = sum(sum(a[li]["prefix"]) for a in attn_rows) / (len(attn_rows) * len(attn_rows[0][li]["digits"]))
        ratios.append(d / p)
    uniform = len(digit_pos[0]) / (len(prompts[0]) - 32)
    print(" ".join(f"{r:.3f}" for r in ratios), f"(uniform would be {uniform:.4f})")
    summary["window_digit_share_per_layer"] = ratios

    if args.decode is not None:
        stop = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
        todo = args.decode or ["full", "w32_k7_avg (default)", "w8_k7_avg", "w1_k1 (per kv head)"]
        summary["accuracy"] = {}
        for name in todo:
            if name == "full":
                params = None
            else:
                w, k, pool = VARIANTS[name]
                params = {"window": w, "kernel": k, "pooling": pool}
            t1 = time.perf_counter()
            acc, texts = decode_accuracy(model, tok, prompts, answers, args.ratio, params, stop)
            summary["accuracy"][name] = {"accuracy": acc, "outputs": texts}
            print(f"decode {name}: acc {acc:.3f} ({time.perf_counter() - t1:.1f}s) {texts}")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh)


if __name__ == "__main__":
    main()
