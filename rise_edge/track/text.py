"""Reports as Markdown for trackers that show text (TensorBoard): export's verdicts summed up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report_text(path: Path) -> str:
    """A report's Markdown: .md as written; export.json as a table of its artefacts and the INT8
    verdicts before the file itself; other JSON as written; '' for a file that is not text."""
    if path.suffix not in (".json", ".md", ".txt", ".csv"):
        return ""  # a plot: an artefact where the tracker keeps files, no text
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".json":
        return text
    try:
        data = json.loads(text)
    except ValueError:
        return code(text)
    summary = _export_summary(data) if path.name == "export.json" and isinstance(data, dict) else ""
    return summary + code(json.dumps(data, indent=2))


def _export_summary(data: dict[str, Any]) -> str:
    artefacts = data.get("artefacts") if isinstance(data.get("artefacts"), dict) else {}
    lines = ["| artefact | precision | status | reason |", "|---|---|---|---|"]
    for name, record in artefacts.items():
        if isinstance(record, dict):
            reason = " ".join(str(record.get("reason", "")).split())[:200]
            lines.append(f"| {name} | {record.get('precision', '')} | {record.get('status', '')} "
                         f"| {reason} |")
    recommended = data.get("recommended") if isinstance(data.get("recommended"), dict) else {}
    lines += ["", f"recommended INT8: {recommended.get('int8') or 'none'}", ""]
    candidates = recommended.get("candidates")
    for name, verdict in (candidates.items() if isinstance(candidates, dict) else ()):
        if isinstance(verdict, dict):
            lines.append(f"- {name}: {verdict.get('verdict', '')}")
    return "\n".join(lines) + "\n\n"


def code(text: str) -> str:
    """Shown as written: TensorBoard renders text summaries as Markdown (indented: code)."""
    return "\n".join("    " + line for line in text.splitlines())
