"""Which INT8 artefact export recommends, written into export.json (`recommended`) once every
artefact is made, so bench, serving bundles and sweeps read one decision instead of re-deriving it.

An INT8 artefact is recommended only when both hold, and its one-line verdict says which rule
decided:
- the judge (rise_edge.export.judge) found it within the accuracy budget on the source validation
  images: a best-of-those-that-missed is kept and benchable, never recommended;
- it is faster than its own backend's FP32 model: at least `export.int8_min_speedup` times at batch
  1, measured at export on a machine of the kind it was built for (rise_edge.export.int8_target).
  Where export ran on another kind, the speed is unknown and the verdict says so; the accuracy
  rule alone decides.

Of the recommended ones, each backend's best by the judge's rule is that backend's recommendation,
and the overall one is the fastest of those (the judge has already bounded their accuracy).
"""

from __future__ import annotations

from typing import Any

RULE = ("recommended when the judge found it within the accuracy budget on the source validation "
        "images and, where it was timed on a CPU of the kind it was built for, it ran at least "
        "export.int8_min_speedup times as fast as its backend's FP32 model at batch 1; per backend "
        "the best by the judge's rule, overall the fastest of those")


def cpu_int8(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The CPU INT8 artefacts made (name -> the backend that runs it): INT8 records whose target is
    a CPU runtime (the TensorRT Q/DQ graphs are judged as the engines built from them)."""
    from rise_edge.backend_table import backends

    table = backends()
    found = {}
    for name, record in records.items():
        if record.get("status") == "ok" and record.get("precision") == "int8" and \
                str(record.get("target", "")).endswith("-cpu"):
            fmt = str(record.get("format", ""))
            found[name] = table[fmt].name if fmt in table else fmt
    return found


def judge_of(record: dict[str, Any]) -> dict[str, Any]:
    """The judge's verdict an INT8 record carries (post-training INT8 keeps it in
    accuracy_budget)."""
    return dict(record.get("accuracy_budget", {}).get("judge") or record.get("judge") or {})


def candidate(record: dict[str, Any], min_speedup: float) -> dict[str, Any]:
    """One INT8 artefact's recommendation and the rule that decided it."""
    judged, speed = judge_of(record), dict(record.get("speed") or {})
    agreement = judged.get("agreement_pct")
    facts = {"met": bool(judged.get("met")), "drop_upper95": judged.get("drop_upper95"),
             "agreement_pct": agreement, "speedup": speed.get("speedup"),
             "speed_on_target": bool(speed.get("on_target"))}
    if not judged:
        return {**facts, "recommended": False, "decided_by": "judge",
                "verdict": "not recommended: the judge has no verdict for it"}
    if not judged.get("met"):
        return {**facts, "recommended": False, "decided_by": "accuracy budget",
                "verdict": f"not recommended: missed the {judged.get('budget_points', '?')}-point "
                           f"accuracy budget (drop 95 % upper bound {judged.get('drop_upper95')} "
                           "points on the source validation images)"}
    if min_speedup > 0 and speed.get("on_target") and float(speed.get("speedup", 0)) < min_speedup:
        return {**facts, "recommended": False, "decided_by": "speed",
                "verdict": f"not recommended: {speed['speedup']:.2f}x its FP32 model at batch 1 on "
                           f"its target ({speed.get('measured_on')}), under the "
                           f"{min_speedup:g}x that export.int8_min_speedup asks"}
    if min_speedup > 0 and not speed.get("on_target"):
        where = speed.get("measured_on") or "no machine"
        return {**facts, "recommended": True, "decided_by": "accuracy budget (speed unknown)",
                "verdict": "recommended: within the accuracy budget; its speed was not measured on "
                           f"its target (timed on {where}): bench it there"}
    return {**facts, "recommended": True, "decided_by": "accuracy budget and speed",
            "verdict": "recommended: within the accuracy budget"
                       + (f", {speed['speedup']:.2f}x its FP32 model at batch 1"
                          if speed.get("speedup") else "")}


def recommendation(records: dict[str, dict[str, Any]], min_speedup: float) -> dict[str, Any]:
    """export.json's `recommended`: per CPU INT8 artefact made, its verdict; per backend and
    overall, the recommended artefact's name or None."""
    runs_on = cpu_int8(records)
    candidates = {name: candidate(records[name], min_speedup) for name in runs_on}
    chosen: dict[str, Any] = {}
    for backend in sorted(set(runs_on.values())):
        ok = [n for n, c in candidates.items() if runs_on[n] == backend and c["recommended"]]
        # the judge's 'best': the smaller bound, then the higher agreement; ties to post-training
        chosen[backend] = min(ok, key=lambda n: (float(candidates[n]["drop_upper95"] or 100.0),
                                                 -float(candidates[n]["agreement_pct"] or 0.0),
                                                 n != "onnx-int8"), default=None)
    picks = [n for n in chosen.values() if n]
    overall = max(picks, key=lambda n: float(candidates[n]["speedup"] or 0.0), default=None)
    return {"int8": overall, **chosen, "candidates": candidates, "rule": RULE,
            "min_speedup": min_speedup}


def recommended_int8(document: dict[str, Any], backend: str = "onnxruntime") -> str | None:
    """The INT8 artefact export.json recommends for `backend` ('int8': overall), or None (none was
    recommended, or the record predates recommendations: nothing unjudged is recommended)."""
    recommended, artefacts = document.get("recommended"), document.get("artefacts")
    value = recommended.get(backend) if isinstance(recommended, dict) else None
    return value if isinstance(value, str) and isinstance(artefacts, dict) and value in artefacts \
        else None
