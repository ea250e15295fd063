"""`rise-edge export RUN --format triton|deepstream`: a serving bundle from what export made.

    <bundle>/manifest.json        every file's sha256, the run, classes, preprocessing, export's
                                  versions, the INT8 verdict, what to record on the device
    <bundle>/SHA256SUMS           the same hashes for `sha256sum -c` on the device
    <bundle>/labels.txt           class names, one a line
    <bundle>/build_engine.sh      builds every engine below on the device (TensorRT 8.x/10.x/11.x)
    <bundle>/engines.tsv          what it builds: name, graph, engine path, precision, shapes
    <bundle>/engines/             the graphs TensorRT engines are built from
    <bundle>/triton/              the model repository (rise_edge.serving.triton)
    <bundle>/deepstream/          nvinfer config, label file, graph, pipeline (rise_edge.serving.deepstream)

The bundle is laid out in a .work- folder beside its place and moved there whole once complete, so
an earlier bundle is replaced only by a finished one (and only one whose manifest says rise-edge
made it). Only files that export made, judged and recorded go in; nothing is re-exported here.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import rise_edge.serving.deepstream as deepstream
import rise_edge.serving.graphs as graphs
import rise_edge.serving.selection as selection
import rise_edge.serving.triton as triton
from rise_edge.logs import stage_lines
from rise_edge.errors import UserError
from rise_edge.files import (check_destination, file_sha256, path_relation, write_failure,
                             write_text_atomic)
from rise_edge.serving.manifest import (check_replaceable, replace_whole, stale_work_folders,
                                        write_manifest)

SERVING_FORMATS = ("triton", "deepstream")
BUNDLE_DIR = "bundle"  # default place: <run>/bundle/
ENGINES_TSV = "engines.tsv"
BUILD_SCRIPT = "build_engine.sh"
INPUT_NAME, LOGITS_NAME = "images", "logits"  # what export names the graph's I/O
Log = Callable[[str], None]
RECORD_ON_DEVICE = [
    "the power mode: sudo nvpmodel -q (latency and power change with it)",
    "whether clocks are locked: sudo jetson_clocks --show (run sudo jetson_clocks before timing)",
    "the TensorRT version: build_engine.sh prints it and writes it to device-record.txt",
    "JetPack / L4T release: cat /etc/nv_tegra_release",
    "for each engine: logs/<engine>.build.txt (flags, DLA core, layers that fell back to the GPU)",
]


@dataclass
class BundleResult:
    """What a bundle holds: its folder, the served artefacts (model or engine names), and the
    artefacts asked for that the exporting machine could not make (name -> reason)."""

    path: Path
    models: list[dict[str, Any]] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [("served", "runtime", "precision", "where")]
        rows += [(m["artefact"], m["runtime"], m["precision"], m["where"]) for m in self.models]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3]
                         for r in rows)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def model_base_name(run: Path, given: str | None) -> str:
    """A Triton model-name stem: letters, digits, '_' and '-' only."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", given or run.resolve().name).strip("_")
    if not name:
        if given is None:  # the default: the run directory's name, which no option gave
            raise UserError(f"the run directory's name '{run.resolve().name}' has no letters or "
                            "digits (A-Z, 0-9) to name the served models by, as Triton names "
                            "folders; give --model-name NAME")
        raise UserError(f"--model-name '{given}' has no letters or digits (A-Z, 0-9); Triton names "
                        "folders by it")
    return name


def check_class_names(classes: Sequence[str], formats: Sequence[str]) -> None:
    """Every class name a label file each of `formats` can carry, checked before anything is
    written: a name that breaks a label file's rule would label logits with the wrong classes."""
    rules = {"triton": (f"Triton's {triton.LABELS_FILE}", triton.label_problem),
             "deepstream": (f"DeepStream's {deepstream.LABELS_FILE}", deepstream.label_problem)}
    for fmt in formats:
        for index, name in enumerate(classes):
            problem = rules[fmt][1](name)
            if problem:
                raise UserError(f"--format {fmt}: class {index} of the run, {name!r}, {problem}; "
                                f"nothing was written: rename that class folder in the data set "
                                f"and train again to serve it through {rules[fmt][0]}")


def _check_target(run: Path, target: Path, given: bool) -> None:
    """The bundle's place, before anything is written: never the run itself or a folder holding it
    (replacing the bundle would delete it), nor inside export/, whose files the bundle reads; and
    a folder there already only when it is a bundle rise-edge made."""
    from rise_edge.run_dir import EXPORT_DIR

    option = "--bundle-dir" if given else None
    fix = (f"choose a folder apart from the run and its {EXPORT_DIR}/, or leave --bundle-dir out "
           f"for its default place {run / BUNDLE_DIR}")
    check_destination(target, run, command="a serving bundle", writes="the bundle",
                      reads="the run", given=option, fix=fix, allow=("inside",))
    check_destination(target, run / EXPORT_DIR, command="a serving bundle", writes="the bundle",
                      reads="the run's export folder", given=option, fix=fix)
    check_replaceable(target, given)  # a folder that is not ours is never touched


def package_run(run_dir: str | Path, formats: Sequence[str], *, serve: Sequence[str] = (),
                bundle_dir: str | Path | None = None, model_name: str | None = None,
                embedding: bool = False, progress: bool = True) -> BundleResult:
    """Lay out a serving bundle for `formats` (SERVING_FORMATS) from RUN_DIR's export.

    serve: export artefacts to serve (selection.SERVABLE); default: selection.default_names.
    embedding: also serve the classifier's input beside the logits (z for the rise head, the
    backbone feature h for linear and split heads; Triton models only: nvinfer's
    classifier parser would read a second output as a second classifier).
    """
    from rise_edge.files import run_lock
    from rise_edge.run_dir import EXPORT_DIR, EXPORT_JSON, STUDENT_FILE, read_export_record

    run = Path(run_dir)
    unknown = [f for f in formats if f not in SERVING_FORMATS]
    if unknown or not formats:
        raise UserError(f"bundle formats are {', '.join(SERVING_FORMATS)}; got "
                        f"{', '.join(unknown) or 'none'}")
    if not (run / STUDENT_FILE).is_file():
        raise UserError(f"{run} is not a trained run directory (no {STUDENT_FILE})")
    target = Path(bundle_dir) if bundle_dir is not None else run / BUNDLE_DIR
    _check_target(run, target, bundle_dir is not None)
    selection.check_names(serve)
    with run_lock(run, f"export --format {','.join(formats)}"):
        document = read_export_record(run, advice="export the run again")
        records = document.get("artefacts", {})
        if not records:
            raise UserError(f"{run} has no export yet: run rise-edge export {run} first (add --int8 "
                            "for INT8, --format tensorrt for TensorRT's Q/DQ graph)")
        from rise_edge.export.recommend import recommended_int8

        recommended = recommended_int8(document)
        names = list(dict.fromkeys(serve)) or selection.default_names(records, formats, recommended)
        if "deepstream" in formats and not any(n in selection.ENGINE_SERVED for n in names):
            raise UserError("DeepStream runs TensorRT engines: add --serve tensorrt-fp16 (or "
                            "tensorrt-int8, tensorrt-fp32)")
        student_sha = file_sha256(run / STUDENT_FILE)
        served, missing = selection.choose(names, run / EXPORT_DIR, records, student_sha, run)
        if "deepstream" in formats and not any(s.runtime == "tensorrt" for s in served):
            raise UserError(f"DeepStream needs a TensorRT engine, and none can be served: "
                            f"{'; '.join(missing.values())}")
        if not served:
            raise UserError(f"nothing to serve: {'; '.join(missing.values())}")
        check_class_names(document["student"]["classes"], formats)
        base = model_base_name(run, model_name)
        # A place inside the run is the run lock's already (which removes what a kill left there);
        # a place outside it gets a lock of its own.
        command = None if path_relation(target, run) == "inside" else \
            f"export --format {','.join(formats)}"
        result = _write_bundle(target, bundle_dir is not None, command,
                               lambda staging: _lay_out(
                                   staging, run, run / EXPORT_DIR / EXPORT_JSON, document, formats,
                                   served, missing, recommended, base, embedding, progress))
    result.path = target
    return result


def _write_bundle(target: Path, given: bool, command: str | None,
                  lay_out: Callable[[Path], BundleResult]) -> BundleResult:
    """Lay the bundle out in a work folder beside `target` and put it there whole. With `command`,
    holding the bundle folder's own lock (two runs may name one --bundle-dir) and removing first
    the work folders a killed bundle of this place left, as no live process owns them then."""
    from rise_edge.files import run_lock

    with run_lock(target, command, noun="bundle folder", clean=False) if command else \
            contextlib.nullcontext():
        for stale in stale_work_folders(target) if command else ():
            shutil.rmtree(stale, ignore_errors=True)
        staging = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".work-{target.name}-", dir=target.parent))
            result = lay_out(staging)
            replace_whole(staging, target, given)
        except OSError as exc:
            elsewhere = "choose another --bundle-dir" if given else "give --bundle-dir DIR"
            raise UserError(write_failure(exc, "the bundle", target, staging, elsewhere)) from None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    return result


def _lay_out(root: Path, run: Path, export_json: Path, document: dict[str, Any],
             formats: Sequence[str],
             served: list[selection.Served], missing: dict[str, str], recommended: str | None,
             base: str, embedding: bool, progress: bool) -> BundleResult:
    log = stage_lines("serving", "bundle", progress)

    student = document["student"]
    classes, pre = list(student["classes"]), student["preprocessing"]
    profile = tuple(document.get("export_config", {}).get("batch_profile", (1, 8, 32)))
    result = BundleResult(root, missing=dict(missing))
    write_text_atomic(root / "labels.txt", triton.labels_text(classes))
    sources = _engine_sources(root, served, embedding, log)
    engines: list[list[str]] = []
    if "triton" in formats:
        for s in served:
            result.models.append(_triton_model(root, s, base, classes, profile, embedding, sources,
                                               engines, log))
    if "deepstream" in formats:
        result.models.append(_deepstream(root, served, pre, classes, profile, base, engines, log))
    _write_build_script(root, engines)
    for name, reason in missing.items():
        result.notes.append(f"{name} left out: {reason}")
    write_manifest(root, {
        "created": _now(), "formats": list(formats),
        "run": {"path": str(run.resolve()), "student_sha256": student["sha256"],
                "model": student["model"], "classes": classes,
                "source_domains": student["source_domains"],
                "target_domain": student["target_domain"]},
        "preprocessing": pre,
        "export": {"versions": document.get("versions", {}),
                   "export_config": document.get("export_config", {}),
                   "export_json_sha256": file_sha256(export_json)},
        "int8": selection.int8_verdict(document["artefacts"], recommended),
        "served": result.models, "left_out": missing,
        "on_device": {"build": f"./{BUILD_SCRIPT} (Jetson DLA: --dla 0, and --allow-gpu-fallback "
                               "to let unsupported layers run on the GPU, reported per engine)",
                      "record": RECORD_ON_DEVICE},
        "bundler": {"rise_edge": _version()},
    })
    log(f"bundle laid out: {len(result.models)} model(s)")
    return result


def _version() -> str:
    import rise_edge

    return rise_edge.__version__


def _copy_graph(src: Path, dst: Path, embedding: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if embedding:
        graphs.add_embedding_output(src, dst, LOGITS_NAME)
    else:
        shutil.copyfile(src, dst)


def _engine_sources(root: Path, served: list[selection.Served], embedding: bool, log: Log
                    ) -> dict[str, Path]:
    """engines/<graph>.onnx for each export artefact an engine is built from (bundle-relative)."""
    out: dict[str, Path] = {}
    for s in served:
        if s.runtime == "tensorrt" and s.source not in out:
            rel = Path("engines") / ("model.fp32.onnx" if s.source == "onnx-fp32"
                                     else "model.int8-qdq.onnx")
            _copy_graph(s.source_path, root / rel, embedding)
            log(f"{rel}: from {s.source_path.name}")
            out[s.source] = rel
    return out


def _chw(spec: graphs.TensorSpec) -> str:
    return "x".join(str(d) for d in spec.dims[1:])


def _triton_model(root: Path, s: selection.Served, base: str, classes: list[str],
                  profile: tuple[int, ...], embedding: bool, sources: dict[str, Path],
                  engines: list[list[str]], log: Log) -> dict[str, Any]:
    kind = {"onnx-fp32": "fp32", "onnx-int8": "int8", "onnx-int8-qat-cpu": "int8_qat"}
    name = (f"{base}_onnx_{kind[s.name]}" if s.runtime == "onnx" else f"{base}_trt_{s.precision}")
    folder = root / "triton" / name
    version = folder / triton.VERSION
    version.mkdir(parents=True)
    if s.runtime == "onnx":
        graph = version / "model.onnx"
        _copy_graph(s.source_path, graph, embedding)
        instance = "KIND_CPU" if s.precision == "int8" else "KIND_AUTO"  # CPU Q/DQ placement
    else:
        graph = root / sources[s.source]
        instance = "KIND_GPU"
    inputs, outputs = graphs.io_signature(graph)
    model = triton.TritonModel(name, s.runtime, tuple(inputs), tuple(outputs),
                               (int(profile[0]), int(profile[1]), int(profile[2])), instance)
    write_text_atomic(folder / "config.pbtxt", triton.config_pbtxt(model, LOGITS_NAME))
    write_text_atomic(folder / triton.LABELS_FILE, triton.labels_text(classes))
    where = f"triton/{name}/{triton.VERSION}/{model.filename}"
    if s.runtime == "tensorrt":
        engines.append([f"triton-{name}", sources[s.source].as_posix(), where, s.precision,
                        inputs[0].name, _chw(inputs[0]), *map(str, profile), "0"])
    log(f"triton/{name}: {model.platform}, {s.precision}")
    return {"artefact": s.name, "runtime": s.runtime, "precision": s.precision,
            "where": where + ("" if s.runtime == "onnx" else " (build_engine.sh)"),
            "triton_model": name, "from": s.source, "from_sha256": s.source_sha256}


def _deepstream(root: Path, served: list[selection.Served], pre: dict[str, Any],
                classes: list[str], profile: tuple[int, ...], base: str,
                engines: list[list[str]], log: Log) -> dict[str, Any]:
    """The nvinfer classifier on the fastest engine served (INT8, else FP16, else FP32)."""
    by_precision = {s.precision: s for s in served if s.runtime == "tensorrt"}
    s = next(by_precision[p] for p in selection.ENGINE_PRECISION_ORDER if p in by_precision)
    folder = root / "deepstream"
    folder.mkdir()
    onnx_file, engine_file = f"model.{s.precision}.onnx", f"model.{s.precision}.engine"
    # From export's own file, never the embedding variant: a second output would be read by
    # nvinfer's classifier parser as a second classifier.
    graphs.fold_for_deepstream(s.source_path, folder / onnx_file, pre["mean"], pre["std"],
                               INPUT_NAME, LOGITS_NAME)
    size = int(pre["input_size"])
    properties = deepstream.nvinfer_properties(
        onnx_file=onnx_file, engine_file=engine_file, precision=s.precision, input_size=size,
        interpolation=pre.get("interpolation", "bilinear"), classifier_name=base)
    note = [f"rise-edge bundle: {s.name} from {s.source} ({s.source_sha256[:12]}), classifier on "
            "whole frames.",
            f"The graph normalises 0..255 RGB itself (mean {pre['mean']}, std {pre['std']}), so "
            "net-scale-factor=1 and offsets=0 are exact.",
            "Build the engine on this device first: ../build_engine.sh"]
    write_text_atomic(folder / deepstream.CONFIG_FILE,
                      deepstream.nvinfer_config_text(properties, note))
    write_text_atomic(folder / deepstream.LABELS_FILE, deepstream.labels_text(classes))
    script = folder / deepstream.PIPELINE_FILE
    write_text_atomic(script, deepstream.pipeline_script(deepstream.CONFIG_FILE, engine_file))
    script.chmod(0o755)
    high = int(profile[2])
    engines.append(["deepstream", f"deepstream/{onnx_file}", f"deepstream/{engine_file}",
                    s.precision, graphs.PIXELS_NAME, f"3x{size}x{size}", "1", "1", str(high), "1"])
    log(f"deepstream/{deepstream.CONFIG_FILE}: network-mode {properties['network-mode']} "
        f"({s.precision})")
    return {"artefact": s.name, "runtime": "deepstream", "precision": s.precision,
            "where": f"deepstream/{deepstream.CONFIG_FILE}", "from": s.source,
            "from_sha256": s.source_sha256}


def _write_build_script(root: Path, engines: list[list[str]]) -> None:
    header = "# name\tonnx\tengine\tprecision\tinput\tCxHxW\tbatch_min\tbatch_opt\tbatch_max\tdla\n"
    write_text_atomic(root / ENGINES_TSV, header + "".join("\t".join(e) + "\n" for e in engines))
    script = root / BUILD_SCRIPT
    script.write_text(resources.files("rise_edge.serving").joinpath(BUILD_SCRIPT).read_text())
    script.chmod(0o755)
