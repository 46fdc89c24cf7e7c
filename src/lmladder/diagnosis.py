"""Why a rung fails, from its own predictions, and what to try next in the seeds' terms.

One ``diagnose(...)`` per rung, read back from ``rungs/<rung>/predictions.jsonl`` by the
report (so ``lmladder report DIR`` rebuilds it). What it looks at, in order:

* **format**: outputs that do not parse (``pred`` is null) and, for extraction, outputs
  that parse but break the schema -> constrained decoding, or fine-tuning;
* **label bias**: the share of the most-predicted label against its share in gold
  (classification; the answer position for multiple-choice), with the confusion matrix
  -> calibration (Zhao et al. 2021, "Calibrate Before Use");
* **retrieval** (rag, when the data names each example's gold passage): misses where the
  gold passage was not retrieved (knowledge the retriever did not find) vs misses where it
  was (reading) -> retrieval settings vs fine-tuning;
* **agreement** (self-consistency): how often the sampled paths agree;
* **under-trained**: a training rung that cannot be told apart from the majority
  baseline -> more steps.

When nothing specific is found and the rung is below the target, the seeds' default
applies: a prompt rung that falls short on behaviour / format / skill -> fine-tuning;
a question-answering task without retrieval -> RAG for knowledge.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

BIAS_MARGIN = 0.2  # most-predicted share this far above its gold share counts as label bias
FORMAT_MIN = 0.05  # unparseable / schema-breaking share worth a remedy


def _key(pred, kind: str):
    if pred is None:
        return None
    if kind == "multiple-choice" and isinstance(pred, dict):
        return pred.get("choice")
    return pred if isinstance(pred, (str, int, float, bool)) else None


def diagnose(kind: str, labels: list[str] | None, rows: list[dict], result: dict,
             target: float | None = None, rule: str = "point", trains: bool = False,
             vs_baseline: dict | None = None) -> dict[str, Any]:
    """The diagnosis of one rung: ``{n, unparseable, label_bias?, confusion?, schema_invalid?,
    retrieval?, agreement?, under_trained?, findings: [...], next: [...]}``."""
    from lmladder import verdict

    n = len(rows)
    out: dict[str, Any] = {"n": n}
    findings: list[str] = []
    nxt: list[str] = []
    if not n:
        return {**out, "findings": [], "next": []}
    unparseable = sum(1 for r in rows if r.get("pred") is None) / n
    out["unparseable"] = round(unparseable, 4)
    if unparseable >= FORMAT_MIN:
        errs = Counter((r.get("error") or "")[:80] for r in rows if r.get("pred") is None).most_common(1)
        findings.append(f"format: {unparseable:.0%} of outputs do not parse"
                        + (f" (most often: {errs[0][0]})" if errs and errs[0][0] else ""))
        nxt.append("format -> constrained decoding (`constrained: true`) or fine-tuning (`lora`)")
    schema = (result.get("metrics") or {}).get("schema_valid")
    valid = (result.get("metrics") or {}).get("valid_json")
    if schema is not None and valid is not None:
        bad = valid["value"] - schema["value"]
        out["schema_invalid"] = round(bad, 4)
        if bad >= FORMAT_MIN:
            findings.append(f"schema: {bad:.0%} of outputs are JSON that breaks the schema")
            if not any(s.startswith("format") for s in nxt):
                nxt.append("format -> constrained decoding (`constrained: true`) or fine-tuning (`lora`)")
    if kind in ("classification", "multiple-choice"):
        preds = [_key(r.get("pred"), kind) for r in rows]
        golds = [r.get("gold") for r in rows]
        pc, gc = Counter(p for p in preds if p is not None), Counter(golds)
        if pc:
            top, k = max(sorted(pc, key=str), key=lambda x: pc[x]), None
            k = pc[top]
            name = top if kind == "classification" else f"choice {top}"
            share, gshare = k / n, gc.get(top, 0) / n
            # far above its gold share, or (nearly) one label for every input when gold has others
            biased = share >= gshare + BIAS_MARGIN or (share >= 0.95 and gshare <= 0.9)
            out["label_bias"] = {"label": name, "pred_share": round(share, 4), "gold_share": round(gshare, 4),
                                 "biased": biased}
            if biased:
                findings.append(f"label bias: predicts {name} for {share:.0%} of inputs ({gshare:.0%} in gold)")
                if (result.get("details") or {}).get("calibration"):
                    nxt.append("label bias left after calibration -> fine-tuning (`lora`)")
                else:
                    nxt.append("label bias -> calibration (`calibrate: true`, or the `calibrated` rung)")
        if kind == "classification" and labels:
            idx = {l: i for i, l in enumerate(labels)}
            m = [[0] * len(labels) for _ in labels]
            for p, g in zip(preds, golds):
                if p in idx and g in idx:
                    m[idx[g]][idx[p]] += 1
            out["confusion"] = {"labels": list(labels), "matrix": m, "rows": "gold", "columns": "predicted"}
    hits = [(r.get("gold_retrieved"), bool(r.get("correct"))) for r in rows if r.get("gold_retrieved") is not None]
    if hits:
        miss_ret = sum(1 for h, c in hits if not c and not h)
        miss_read = sum(1 for h, c in hits if not c and h)
        out["retrieval"] = {"with_gold": len(hits), "retrieval_misses": miss_ret, "reading_misses": miss_read}
        wrong = miss_ret + miss_read
        if miss_ret >= miss_read and miss_ret:
            findings.append(f"knowledge: for {miss_ret} of the {wrong} wrong answers the gold passage was not retrieved")
            nxt.append("knowledge not found -> better retrieval (`rag.top_k`, `rag.retriever`, query writing)")
        elif miss_read:
            findings.append(f"reading: for {miss_read} of the {wrong} wrong answers the gold passage was retrieved")
            nxt.append("reading (skill) -> fine-tuning on the retrieved context (`lora`)")
    det = result.get("details") or {}
    if det.get("agreement_rate") is not None:
        out["agreement"] = det["agreement_rate"]
    at_chance = vs_baseline is not None and not (verdict.distinct(vs_baseline) and vs_baseline["diff"] > 0)
    if at_chance and not trains:
        findings.append("no better than the majority baseline (paired difference "
                        f"{vs_baseline['diff']:+.3f}, 95% CI [{vs_baseline['ci'][0]:+.3f}, {vs_baseline['ci'][1]:+.3f}])")
    if trains and at_chance:
        out["under_trained"] = True
        findings.append("under-trained: cannot be told apart from the majority baseline "
                        f"(paired difference {vs_baseline['diff']:+.3f}, 95% CI [{vs_baseline['ci'][0]:+.3f}, "
                        f"{vs_baseline['ci'][1]:+.3f}])")
        nxt.append("under-trained -> more steps (`epochs`, `max_steps`) or a higher `lr`")
    below = target is not None and not verdict.meets(result, target, rule)
    if below and not nxt:
        if kind == "qa":
            nxt.append("knowledge -> RAG (`rag` with `--corpus`), then fine-tuning for the answer style")
        elif not trains:
            nxt.append("behaviour / format / skill -> fine-tuning (`lora`)")
        else:
            nxt.append("more data or more steps (see the learning curve), or a larger model")
    out["findings"], out["next"] = findings, nxt
    return out


def disagreements(rungs: dict[str, list[dict]], limit: int = 20) -> list[dict]:
    """Up to ``limit`` test examples on which the rungs' predictions differ: ``{input, gold,
    preds: {rung: pred}}`` (same test order in every rung's predictions)."""
    names = list(rungs)
    if len(names) < 2:
        return []
    n = min(len(v) for v in rungs.values())
    out = []
    for i in range(n):
        preds = {k: rungs[k][i].get("answer", rungs[k][i].get("pred")) for k in names}
        if len({repr(v) for v in preds.values()}) > 1:
            first = rungs[names[0]][i]
            out.append({"id": first.get("id"), "input": first.get("input"), "gold": first.get("gold"), "preds": preds})
            if len(out) >= limit:
                break
    return out
