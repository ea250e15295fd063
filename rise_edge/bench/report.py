"""The bench report in four forms: a terminal table, report.json, report.md and two PNG plots.

Everything is rendered from report.json's content alone (bench.bench_run builds it), so a report can
be re-rendered from a saved JSON: `write_report(json.loads(path.read_text()), folder)`.
Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from rise_edge.errors import UserError
from rise_edge.files import atomic_paths

REPORT_JSON, REPORT_MD = "report.json", "report.md"
PLOT_ACCURACY_LATENCY, PLOT_ACCURACY_DOMAINS = "accuracy_latency.png", "accuracy_per_domain.png"
MEASURED = ("ok", "partial")


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _accuracy_cell(row: dict[str, Any], domain: str) -> str:
    entry = row["accuracy"].get(domain)
    if not entry or entry["top1"] is None:
        return "-"
    drop = entry.get("drop_points")
    if drop is None or row["engine"] == "pytorch":
        return f"{entry['top1']:.2f}"
    return f"{entry['top1']:.2f} ({0.0 - drop:+.2f})"  # 0.0 - 0.0 prints +0.00, not -0.00


def _latency(row: dict[str, Any], batch: int) -> dict[str, Any] | None:
    return next((e for e in row["latency"] if e["batch_size"] == batch and e["status"] == "ok"), None)


def _columns(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    domains = [d["name"] for d in data["domains"]]
    batches = list(data["config"]["batch_sizes"])
    header = ["engine", "precision", "device", "status",
              *(f"{d} top-1 % (vs PyTorch)" for d in domains)]
    for b in batches:
        header += [f"b{b} p50/p90/p99 ms", f"b{b} img/s"]
    header.append("size")
    lines = []
    for row in data["rows"]:
        cells = [row["engine"], row["precision"], row["device"] or "-", row["status"],
                 *(_accuracy_cell(row, d) for d in domains)]
        for b in batches:
            entry = _latency(row, b)
            cells += ([f"{entry['p50_ms']:.2f}/{entry['p90_ms']:.2f}/{entry['p99_ms']:.2f}",
                       f"{entry['images_per_s']:.1f}"] if entry else ["-", "-"])
        cells.append(_mb(row["size_bytes"]))
        lines.append(cells)
    return header, lines


def _problems(data: dict[str, Any]) -> list[str]:
    found = []
    for row in data["rows"]:
        if row["status"] != "ok" and row["reason"]:
            found.append(f"{row['engine']}: {row['status']}: {row['reason']}")
        found += [f"{row['engine']}: warning: {w}" for w in row.get("warnings", [])]
    return found


def format_table(data: dict[str, Any]) -> str:
    """One row per engine x precision: status, accuracy per domain, p50/p90/p99, images/s, size."""
    header, lines = _columns(data)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *lines]]
    text += [f"  {p}" for p in _problems(data)]
    figure = data["preprocess"]
    if figure.get("images_per_s"):
        text.append(f"decode + preprocess (one thread): {figure['images_per_s']:.1f} images/s "
                    f"({figure['ms_per_image']:.2f} ms/image)")
    text += [f"note: {n}" for n in data.get("notes", [])]
    text += site_lines(data)
    return "\n".join(text)


def _estimate_cell(entry: dict[str, Any]) -> str:
    low, high = entry["interval"]
    kind = entry.get("interval_kind")
    if kind is None:  # a record written before each interval said what it is
        return f"{entry['estimate']:.1f} [{low:.1f}, {high:.1f}]"
    return f"{entry['estimate']:.1f} ({kind} {low:.1f}-{high:.1f})"


def _site_rows(data: dict[str, Any], errors: bool = False
               ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, its site record) of every engine that has one; with `errors`, those in error too."""
    return [(r, r["site"]) for r in data["rows"]
            if r.get("site") and (errors or "error" not in r["site"])]


def _estimate_notes(data: dict[str, Any]) -> list[str]:
    """Once per site: what each kind of interval means, and the measured errors the estimates are
    listed by (both recorded by rise_edge.site.assess)."""
    first = {}
    for _, found in _site_rows(data):
        for e in found["estimates"]:
            first.setdefault(e["method"], e)
    kinds = {e["interval_kind"]: e["interval_meaning"] for e in first.values()
             if e.get("interval_kind")}
    basis = next((f["estimates_order"] for _, f in _site_rows(data) if "estimates_order" in f), None)
    if not kinds or not basis:
        return []
    errors = ", ".join([*(f"{m} {v:.1f}" for m, v in basis["mean_abs_error"].items()),
                        *(f"{m} not measured yet" for m in basis["not_measured"])])
    where = " and ".join(basis["compared_on"]) or "each one's own groups"
    return [*(f"{kind}: {meaning}" for kind, meaning in kinds.items()),
            f"listed by measured mean absolute error on {where} (points): {errors}; every group's "
            "errors in docs/site.md"]


def site_lines(data: dict[str, Any]) -> list[str]:
    """The site's estimates for the terminal: one line per engine, then what the intervals are."""
    site = data.get("site")
    if not site:
        return []
    lines = [f"site {site['folder']}: {site['images']} unlabelled image(s); label-free ESTIMATES "
             "of top-1 %, not measurements (docs/site.md says how far to trust each)"]
    for row, found in _site_rows(data, errors=True):
        if "error" in found:
            lines.append(f"  {row['engine']:<22} {found['error']}")
            continue
        cells = ", ".join(f"{e['method']} {_estimate_cell(e)}" for e in found["estimates"])
        flag = "; looks unlike every source domain" if found["shift"]["unlike_every_source"] else ""
        lines.append(f"  {row['engine']:<22} {cells}{flag}")
    return lines + [f"  {note}" for note in _estimate_notes(data)]


# ---------------------------------------------------------------------------------------------------
# Markdown


def _md_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines]
    return out


def _machine_line(machine: dict[str, Any]) -> str:
    parts = [f"{machine['cpu']}, {machine['physical_cores']} physical / {machine['logical_cores']} "
             f"logical cores"]
    if machine.get("memory_bytes"):
        parts.append(f"{machine['memory_bytes'] / 2**30:.0f} GiB RAM")
    gpu = machine.get("gpu")
    parts.append(f"GPU {gpu['name']} (sm {gpu['capability']}, CUDA {gpu['cuda']})" if gpu else "no GPU")
    if machine.get("jetson"):
        parts.append(machine["jetson"])
    return "; ".join(parts)


def to_markdown(data: dict[str, Any], plots: Sequence[str] = ()) -> str:
    student = data["student"]
    lines = [f"# rise-edge bench: {Path(data['run_dir']).name}", "",
             f"- command: `{data['command']}`",
             f"- run: `{data['run_dir']}`; student {student['model']}, "
             f"{student['preprocessing']['input_size']} px, {len(student['classes'])} classes; "
             f"sources {', '.join(student['source_domains'])}; target {student['target_domain']}",
             f"- machine: {_machine_line(data['machine'])}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()),
             f"- created: {data['created']} ({data['seconds']:.0f} s)", ""]
    lines += ["## Summary", "", *_md_table(*_columns(data)), ""]
    problems = _problems(data)
    if problems or data.get("notes"):
        lines += [*(f"- {p}" for p in problems), *(f"- note: {n}" for n in data.get("notes", [])), ""]

    lines += ["## Accuracy per domain", ""]
    lines += [f"- **{d['name']}** ({d['role']}): {d['split']}, {d['images']} images"
              + (f" (a seeded subset of {d['available']})" if d["available"] != d["images"] else "")
              for d in data["domains"]]
    lines.append("")
    table = []
    for row in data["rows"]:
        for domain, entry in row["accuracy"].items():
            table.append([row["engine"], row["precision"], domain, entry["images"], _num(entry["top1"]),
                          _num(entry["drop_points"]),
                          _num(None if entry["agreement_with_reference"] is None
                               else 100 * entry["agreement_with_reference"])])
    lines += [*_md_table(["engine", "precision", "domain", "images", "top-1 %", "drop (points)",
                          "agrees with PyTorch %"], table), ""]

    lines += _int8_judge_section(data)
    lines += _site_section(data)
    lines += _latency_section(data)

    figure = data["preprocess"]
    lines += ["## Decode + preprocess", "",
              f"{figure['what']}: {_num(figure['images_per_s'], 1)} images/s "
              f"({_num(figure['ms_per_image'])} ms/image over {figure['images']} images).", ""]
    lines += _resources_section(data)
    if plots:
        lines += ["", "## Plots", "", *(f"![{Path(p).stem}]({Path(p).name})" for p in plots)]
    return "\n".join(lines) + "\n"


def _site_section(data: dict[str, Any]) -> list[str]:
    site = data.get("site")
    if not site:
        return []
    methods = list(dict.fromkeys(e["method"] for _, f in _site_rows(data) for e in f["estimates"]))
    teacher = site.get("teacher")
    lines = ["## Site: label-free estimates", "",
             f"{site['images']} unlabelled image(s) under `{site['folder']}` (sha256 "
             f"{site['sha256'][:16]}; {len(site['skipped_unreadable'])} unreadable skipped, "
             f"{site['ignored_not_images']} other files left out). These are ESTIMATES made without "
             "labels, calibrated on the run's " + site["calibration"] + "; how far each can be "
             "trusted is in docs/site.md.", ""]
    lines += [f"- {note}" for note in _estimate_notes(data)] + [""]
    if teacher:
        lines += [f"Teacher agreement uses {teacher['model']}, whose error on source validation is "
                  f"{teacher['source_error']:.1f} %: the bound is as wide as that.", ""]
    header = ["engine", "precision", *(f"{m} %" for m in methods), "mean confidence",
              "unlike every source"]
    body = []
    for row, found in _site_rows(data):
        by = {e["method"]: e for e in found["estimates"]}
        body.append([row["engine"], row.get("precision", ""),
                     *(_estimate_cell(by[m]) if m in by else "-" for m in methods),
                     f"{found['confidence']['mean']:.3f}",
                     "yes" if found["shift"]["unlike_every_source"] else "no"])
    lines += [*_md_table(header, body), ""]
    temperatures = [(row["engine"], e) for row, found in _site_rows(data)
                    for e in found["estimates"] if "temperature" in e]
    if temperatures:
        lines += ["ATC-TS temperature (fit on source validation): " + ", ".join(
            f"{engine} T = {e['temperature']:.3g}" + (
                "" if e.get("temperature_fitted") else f" (not fit: {e['temperature_fallback']})")
            for engine, e in temperatures) + ".", ""]
    lines += [f"- {row['engine']}: {found['error']}" for row, found in _site_rows(data, errors=True)
              if "error" in found]
    first = next((f for _, f in _site_rows(data)), None)
    if first:
        share = ", ".join(f"{c} {100 * v['share']:.1f} %" for c, v in first["predicted_classes"].items())
        lines += [f"Predicted classes ({_site_rows(data)[0][0]['engine']}): {share}.", "",
                  f"Shift check: {first['shift']['rule']}.", ""]
    return lines


def _int8_judge_section(data: dict[str, Any]) -> list[str]:
    """What export's INT8 judge said of each INT8 artefact (source validation images against FP32),
    beside the accuracy bench measured: the verdict was made before this report, never on it."""
    rows = [r for r in data["rows"] if "int8_judge" in r]
    if not rows:
        return []
    table, rule = [], ""
    for row in rows:
        v = row["int8_judge"]
        if not v.get("judged"):
            table.append([row["engine"], "-", "-", "-", "-", "-", "-", "not judged",
                          v.get("reason", ""), "-", "-", "-"])
            continue
        rule = v.get("rule", rule)
        stress = v.get("stress") or {}
        recommended = v.get("recommendation") or {}
        table.append([row["engine"], _num(v.get("budget_points")), _num(v.get("drop_points")),
                      _num(v.get("drop_upper95")), _num(v.get("agreement_pct")),
                      _num(v.get("worst_domain_agreement_pct")), v.get("images", "-"),
                      "met" if v.get("met") else "NOT met", v.get("decided_by", ""),
                      _num(stress.get("drop_points")), _num(stress.get("drop_upper95")),
                      recommended.get("verdict", "-")])
    return ["## INT8 judge (export)", "", f"Rule: {rule}." if rule else "",
            "Stress: the same images shifted (grayscale, line drawing, posterised, blurred); "
            "reported, deciding nothing yet.",
            "", *_md_table(["engine", "budget (points)", "drop", "95 % upper bound",
                            "agreement with FP32 %", "worst source domain's agreement %",
                            "judge images", "verdict", "decided by", "stress drop",
                            "stress upper bound", "recommendation (export)"], table), ""]


def _latency_section(data: dict[str, Any]) -> list[str]:
    """report.md's latency tables: every engine and batch, GPU extras, the MLPerf-style figures."""
    lines = ["## Latency", "",
             f"Pure inference of one staged batch after {data['config']['warmup']} warm-up runs; "
             f"percentiles: {data['definitions']['percentiles']}.", ""]
    table = []
    for row in data["rows"]:
        for e in row["latency"]:
            if e["status"] != "ok":
                table.append([row["engine"], row["precision"], e["batch_size"], e["status"], *["-"] * 8,
                              e.get("reason", "")])
                continue
            table.append([row["engine"], row["precision"], e["batch_size"], e["count"],
                          *(_num(e[k]) for k in ("min_ms", "mean_ms", "p50_ms", "p90_ms", "p99_ms",
                                                 "max_ms")),
                          _num(e["images_per_s"], 1), _num(1e3 * e["images_per_s"] ** -1 if
                                                           e["images_per_s"] else None, 3), e["clock"]])
    lines += [*_md_table(["engine", "precision", "batch", "runs", "min ms", "mean ms", "p50 ms", "p90 ms",
                          "p99 ms", "max ms", "images/s", "ms/image", "clock"], table), ""]
    gpu_extra = _gpu_tables(data)
    if gpu_extra:
        lines += gpu_extra
    table = [[row["engine"], row["precision"], _num(row["mlperf"]["single_stream_p90_ms"]),
              _num(row["mlperf"]["offline_images_per_s"], 1), row["mlperf"]["offline_batch_size"] or "-"]
             for row in data["rows"] if row.get("mlperf")]
    lines += ["MLPerf-style figures (" + data["definitions"]["mlperf"] + "):", "",
              *_md_table(["engine", "precision", "SingleStream p90 ms", "Offline images/s", "at batch"],
                         table), ""]
    return lines


def _resources_section(data: dict[str, Any]) -> list[str]:
    """report.md's resources table: artefact size, host and GPU memory, board power, per engine."""
    lines = ["## Resources", ""]
    table = []
    for row in data["rows"]:
        res = row.get("resources") or {}
        power = [e["power"] for e in row["latency"] if e.get("status") == "ok" and e.get("power")]
        table.append([row["engine"], row["precision"], _mb(row["size_bytes"]),
                      _mb(res.get("peak_host_rss_bytes")), _mb(res.get("host_rss_load_delta_bytes")),
                      _mb(res.get("peak_gpu_allocated_bytes")),
                      "; ".join(f"{p['mean_power_w']:.1f} W, {1e3 * p['energy_per_image_j']:.1f} mJ/image"
                                for p in power) or "-"])
    lines += _md_table(["engine", "precision", "artefact", "peak host RSS", "RSS added by loading",
                        "peak GPU (torch allocator)", "board power (tegrastats)"], table)
    scope = next((r["resources"].get("peak_host_rss_scope") for r in data["rows"] if r.get("resources")),
                 None)
    if scope:
        lines += ["", f"Peak host RSS is the process's peak {scope}, reset before each engine loads."]
    return lines


def _gpu_tables(data: dict[str, Any]) -> list[str]:
    table = []
    for row in data["rows"]:
        for e in row["latency"]:
            split = e.get("split") if e.get("status") == "ok" else None
            if split:
                table.append([row["engine"], row["precision"], e["batch_size"], split["clock"],
                              *(_num(split[k]["p50_ms"], 3) for k in ("h2d", "compute", "d2h",
                                                                      "end_to_end"))])
    graphs = []
    for row in data["rows"]:
        for e in row["latency"]:
            graph = e.get("cuda_graph") if e.get("status") == "ok" else None
            if graph:
                graphs.append([row["engine"], row["precision"], e["batch_size"], graph["status"],
                               _num(graph.get("p50_ms"), 3), _num(e["p50_ms"], 3),
                               graph.get("reason", "")])
    out = []
    if table:
        out += ["Host-to-device / compute / device-to-host per query (p50, ms):", "",
                *_md_table(["engine", "precision", "batch", "clock", "H2D", "compute", "D2H",
                            "end to end"], table), ""]
    if graphs:
        out += ["CUDA graphs (p50, ms):", "",
                *_md_table(["engine", "precision", "batch", "graph", "graph p50", "plain p50", "reason"],
                           graphs), ""]
    return out


# ---------------------------------------------------------------------------------------------------
# Plots


def _measured(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in data["rows"] if r["status"] in MEASURED and r["accuracy"]]


MIN_ACCURACY_SPAN = 5.0  # points: the accuracy axis of a panel never spans less


def plot_accuracy_latency(data: dict[str, Any], out: Path | BinaryIO) -> bool:
    """Top-1 vs p50 latency at the smallest batch size, one point per engine, one panel per domain,
    as a PNG into `out`; False (nothing written) when nothing was measured."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _measured(data)
    batch = min(data["config"]["batch_sizes"])
    domains = [d["name"] for d in data["domains"]]
    points = [(r, _latency(r, batch)) for r in rows]
    points = [(r, e) for r, e in points if e]
    if not points:
        return False
    cols = min(2, len(domains))
    nrows = (len(domains) + cols - 1) // cols
    fig = Figure(figsize=(5.5 * cols, 4.2 * nrows), constrained_layout=True)
    FigureCanvasAgg(fig)
    for i, domain in enumerate(domains):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for n, (row, entry) in enumerate(points):
            acc = row["accuracy"].get(domain, {}).get("top1")
            if acc is None:
                continue
            label = f"{row['engine']} ({row['precision']}, {row['device']})"
            ax.scatter(entry["p50_ms"], acc, s=60, color=f"C{n % 10}", label=label, zorder=3)
            ax.annotate(row["engine"], (entry["p50_ms"], acc), textcoords="offset points",
                        xytext=(6, 6 - 11 * (n % 3)), fontsize=8)  # staggered: equal points stay legible
        accs = [r["accuracy"][domain]["top1"] for r, _ in points if domain in r["accuracy"]]
        if accs and max(accs) - min(accs) < MIN_ACCURACY_SPAN:  # a tenth of a point must not look large
            middle = min(max((max(accs) + min(accs)) / 2, MIN_ACCURACY_SPAN / 2), 100 - MIN_ACCURACY_SPAN / 2)
            ax.set_ylim(middle - MIN_ACCURACY_SPAN / 2, middle + MIN_ACCURACY_SPAN / 2)
        spread = [e["p50_ms"] for _, e in points]
        if min(spread) > 0 and max(spread) / min(spread) > 10:
            ax.set_xscale("log")
        ax.set_xlabel(f"p50 latency at batch {batch} (ms)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{domain}")
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("accuracy vs latency per engine")
    fig.savefig(out, format="png", dpi=110)
    return True


def plot_accuracy_per_domain(data: dict[str, Any], out: Path | BinaryIO) -> bool:
    """Grouped bars: top-1 per domain, one bar per engine x precision, as a PNG into `out`; False
    (nothing written) when nothing was measured."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _measured(data)
    domains = [d["name"] for d in data["domains"]]
    if not rows:
        return False
    width = 0.8 / len(rows)
    fig = Figure(figsize=(max(6.0, 1.6 * len(domains) * max(1, len(rows)) / 2), 4.5),
                 constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for n, row in enumerate(rows):
        values = [row["accuracy"].get(d, {}).get("top1") or 0.0 for d in domains]
        xs = [i - 0.4 + width * (n + 0.5) for i in range(len(domains))]
        bars = ax.bar(xs, values, width, label=f"{row['engine']} ({row['precision']})", color=f"C{n % 10}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(range(len(domains)))
    roles = {d["name"]: d["role"] for d in data["domains"]}
    ax.set_xticklabels([f"{d}\n({roles[d]})" for d in domains])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    ax.set_title("accuracy per domain per engine")
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(out, format="png", dpi=110)
    return True


def write_report(data: dict[str, Any], folder: Path) -> dict[str, str]:
    """report.json, report.md and the plots into `folder`; returns {kind: file name} (also in the JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    # Checked before anything is written: a report that fails halfway must not have replaced some
    # of its files already (each file is itself written under a temporary name, then renamed).
    for name in (REPORT_JSON, REPORT_MD, PLOT_ACCURACY_LATENCY, PLOT_ACCURACY_DOMAINS):
        if (folder / name).is_dir():
            raise UserError(f"{folder / name} is a folder, where bench writes its {name}; move it "
                            "aside and run bench again (nothing was changed)")
    files = {"json": REPORT_JSON, "markdown": REPORT_MD}
    try:
        import matplotlib  # noqa: F401  (in the cpu/gpu extras, not the core install)
        have_plots = True
    except ImportError:
        have_plots = False
        data.setdefault("notes", []).append("matplotlib is not installed: no plots "
                                            "(pip install 'rise-edge[cpu]')")
    plots = {}
    if have_plots:
        for kind, name, draw in (("accuracy_latency", PLOT_ACCURACY_LATENCY, plot_accuracy_latency),
                                 ("accuracy_per_domain", PLOT_ACCURACY_DOMAINS, plot_accuracy_per_domain)):
            buffer = io.BytesIO()  # drawn in memory: the files are written together below
            if draw(data, buffer):
                files[kind] = name
                plots[name] = buffer.getvalue()
    data["files"] = files
    # All the report's files are replaced together or not at all: a failure (a full disk) leaves
    # the earlier report whole and no temporary behind.
    names = [REPORT_JSON, REPORT_MD, *plots]
    with atomic_paths(*(folder / n for n in names)) as temporaries:
        written = dict(zip(names, temporaries))
        written[REPORT_JSON].write_text(json.dumps(data, indent=2) + "\n")
        written[REPORT_MD].write_text(to_markdown(data, list(plots)))
        for name, content in plots.items():
            written[name].write_bytes(content)
    for name in (PLOT_ACCURACY_LATENCY, PLOT_ACCURACY_DOMAINS):
        if name not in plots:  # nothing measured to plot: no stale picture from an earlier bench
            (folder / name).unlink(missing_ok=True)
    return files
