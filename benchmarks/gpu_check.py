"""One prepared check for a lent CUDA GPU: run it first, commit what it prints.

    python benchmarks/gpu_check.py                 # on the GPU machine (7 to 8 minutes, estimated)
    python benchmarks/gpu_check.py --device cpu --quick   # the same code path on a CPU, tiny sizes

1. The GPU-marked tests (`pytest -m gpu`): passed / failed / skipped with the reasons.
2. Training throughput, images/s, ERM and RISE, ResNet-18 and EfficientNet-Lite0 students at 224 px,
   bf16 autocast and channels_last, with a random-weight ViT-B/16 teacher of the real architecture
   (no CLIP weights can be downloaded; time does not depend on weight values). Peak GPU memory.
3. The teacher-view cache: build throughput (views/s, teacher in fp16) for 2,048 generated images x
   2 views, and a cached RISE step against the same step running the teacher, per student.
4. QAT on the device: a few steps of rise-edge's own fine-tuning (rise_edge.export.qat.qat_finetune,
   as export runs it) on the tiny student below, counting the device every fake-quant op
   (rise_edge.export.fake_quant) ran on; then fine-tuning throughput of the same INT8 fake
   quantization on the 224 px students.
5. Inference latency with CUDA events (rise_edge.backends.latency.time_runner): PyTorch FP32 and FP16 at batch 1
   and 32, p50 / p90 ms and images/s, H2D / compute / D2H split.
6. Torch-TensorRT FP16 (where torch_tensorrt is importable): the tiny student exported with
   ExportConfig(formats=("torch-tensorrt",), fp16=True), its precision_mode and parity records; the
   saved program loaded back and run at batch 1, 8 and 32 (the profile's range: the batch must stay
   dynamic), its largest relative difference from the FP32 PyTorch student, and its engines' layer
   precisions read back through Torch-TensorRT's get_layer_info / get_engine_layer_info where the
   engine recorded them. The report says which of the three it could establish.
7. TensorRT FP16 and INT8 engines of the tiny student (where TensorRT is importable): status,
   built_from, the parity record export wrote, the INT8 judge's verdict; each run at batch 1, 8 and
   32 (output shape checked), latency at 1 and 32.
8. bench on the tiny student's export (all domains, batch 1, a few iterations) after a CPU INT8
   export: per row engine, backend, device, status and warnings, checked against where each row
   must run (CPU INT8 graphs on the CPU provider, the TensorRT Q/DQ graph on ONNX Runtime's
   TensorRT provider where onnxruntime-gpu has it) and that a row names the provider that ran.
9. JPEG decoding, images/s: PIL (the training loader's decoder, per worker), torchvision's
   decode_jpeg on the CPU, and decode_jpeg(device='cuda') (nvjpeg) on lists of 128 files, with its
   pixel differences from the CPU decode: whether GPU decoding would feed the GPU faster.
The tiny student of 4, 6, 7 and 8 (test_resnet at 32 px on a generated shapes data set) is trained
once, on the checked device, when the first of them needs it. Each section is fenced: one that
fails prints its error and the others still run; one that cannot run here (no CUDA, no TensorRT,
no Torch-TensorRT) says "skipped: <reason>". One line per section on stderr,
"[gpu_check] <section>: ok | skipped: <reason> | <error>"; then one Markdown report on stdout, written
with a JSON copy to --out (default: $OUT if set, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
STUDENTS = ("resnet18", "tf_efficientnet_lite0")


class CheckFailed(Exception):
    """A section that ran but found something wrong: its message is the section's line, and what it
    measured (`result`) still goes into the report."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def _fenced(name: str, report: dict[str, Any], fn: Callable[[], Any]) -> None:
    started = time.perf_counter()
    try:
        report[name] = {"result": fn()}
    except CheckFailed as exc:
        report[name] = {"error": f"check failed: {exc}", "result": exc.result, "traceback": ""}
    except Exception as exc:  # a broken section must not cost the lease the others
        report[name] = {"error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(limit=4)}
    report[name]["seconds"] = round(time.perf_counter() - started, 1)
    print(f"[gpu_check] {name}: {_status_line(report[name])}", file=sys.stderr, flush=True)


def _status_line(section: dict[str, Any]) -> str:
    """ok, skipped: <reason>, or the error, in one line."""
    if "error" in section:
        return " ".join(section["error"].split())
    result = section["result"]
    if isinstance(result, dict) and set(result) == {"skipped"}:
        return f"skipped: {result['skipped']}"
    return "ok"


def gpu_tests(timeout: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    tail = done.stdout.strip().splitlines()[-25:]
    return {"command": " ".join(command[1:]), "exit_code": done.returncode, "summary": tail[-1:],
            "output_tail": tail}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_step(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Mean wall time per step after `warmup` untimed steps, the device synchronised."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def training_throughput(device: torch.device, batch: int, size: int, steps: int, teacher_name: str
                        ) -> list[dict[str, Any]]:
    from rise_edge.config import CLIP_TEMPLATES, LossConfig, StudentConfig, TeacherConfig
    from rise_edge.train.objectives import ErmObjective, RiseObjective
    from rise_edge.train.student import build_student
    from rise_edge.train.teacher import load_teacher

    torch.manual_seed(0)
    teacher = load_teacher(TeacherConfig(model=teacher_name, pretrained="none"), device)
    classes = [f"class {i}" for i in range(7)]
    text = teacher.text_embeddings(classes, CLIP_TEMPLATES, ["art painting", "cartoon", "photo"])
    text = text.to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 7, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []
    for model in STUDENTS:
        for method in ("erm", "rise"):
            cfg = StudentConfig(model=model, pretrained="none", image_size=size)
            # RISE on its default head (split); ERM on the linear one
            student, pre = build_student(cfg, "linear" if method == "erm" else "split", 7,
                                         None if method == "erm" else text.prototypes.shape[1])
            student = student.to(device).to(memory_format=torch.channels_last)
            objective = ErmObjective() if method == "erm" else RiseObjective(
                LossConfig(w_ce=0.2, w_kd=0.8, w_dist=1.0), teacher, text, pre)
            optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
            x = images.contiguous(memory_format=torch.channels_last)

            def step() -> None:
                student.train()
                with amp:
                    terms = objective(student, x, labels)
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                optimizer.step()

            step()  # the first step allocates; peak memory is read over the timed ones
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _seconds_per_step(step, steps, 2, device)
            rows.append({"student": model, "method": method, "batch": batch, "size": size,
                         "images_per_s": round(batch / seconds, 1),
                         "step_ms": round(1000 * seconds, 2),
                         "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20)
                         if device.type == "cuda" else None})
            del student, optimizer
    return rows


def teacher_cache_gpu(device: torch.device, batch: int, size: int, steps: int, teacher_name: str,
                      images: int) -> list[dict[str, Any]]:
    """The teacher-view cache on this device: its build (views/s, the teacher in its own precision,
    fp16 on CUDA) for `images` generated images x 2 views, then a RISE step of each student reading
    the cache against the same step running the teacher (images/s, same views)."""
    from PIL import Image

    from rise_edge.config import CLIP_TEMPLATES, LossConfig, StudentConfig, TeacherConfig
    from rise_edge.data.views import ViewImages, ViewSpec
    from rise_edge.train.objectives import RiseObjective
    from rise_edge.train.student import build_student
    from rise_edge.train.teacher import load_teacher
    from rise_edge.train.teacher_cache import TeacherViewCache, hash_images

    torch.manual_seed(0)
    teacher = load_teacher(TeacherConfig(model=teacher_name, pretrained="none"), device)
    text = teacher.text_embeddings([f"class {i}" for i in range(7)], CLIP_TEMPLATES, ["photo"]).to(device)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(images):  # photo-sized noise: decoding and cropping cost what real images do
            path = Path(folder) / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (size + 32, size + 32, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        samples = [(p, i % 7) for i, p in enumerate(paths)]
        for model in STUDENTS:
            student, pre = build_student(StudentConfig(model=model, pretrained="none", image_size=size),
                                         "split", 7, text.prototypes.shape[1])
            spec = ViewSpec.of(pre)
            cache = TeacherViewCache.for_teacher(Path(folder) / "cache", teacher, pre, spec, 2)
            fill = cache.fill(teacher, paths, batch=512 if device.type == "cuda" else 16,
                              workers=min(8, os.cpu_count() or 1), log=lambda line: None)
            entries = cache.lookup(hash_images(paths))
            views = ViewImages(samples, pre, spec, 0, 2)
            chosen = [views[(i % images, 0)] for i in range(batch)]
            x = torch.stack([c[0] for c in chosen]).to(device).contiguous(memory_format=torch.channels_last)
            labels = torch.tensor([c[1] for c in chosen], device=device)
            cached = torch.stack([entries.embeddings[c[2], c[3]] for c in chosen]).to(device)
            student = student.to(device).to(memory_format=torch.channels_last)
            objective = RiseObjective(LossConfig(w_ce=0.2, w_kd=0.8, w_dist=1.0), teacher, text, pre)
            optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
            amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
            row = {"student": model, "batch": batch, "size": size, "K": 2, "cache_images": images,
                   "build_views_per_s": round(fill["views"] / max(fill["seconds"], 1e-9), 1),
                   "cache_bytes": fill["bytes"]}
            for name, extra in (("on_the_fly", {}), ("cached", {"teacher_embeddings": cached})):
                def step() -> None:
                    student.train()
                    with amp:
                        terms = objective(student, x, labels, **extra)
                    optimizer.zero_grad(set_to_none=True)
                    terms["loss"].backward()
                    optimizer.step()
                row[f"{name}_images_per_s"] = round(batch / _seconds_per_step(step, steps, 2, device), 1)
            row["cached_speedup"] = round(row["cached_images_per_s"] / row["on_the_fly_images_per_s"], 2)
            rows.append(row)
            del student, optimizer
    return rows


def qat_throughput(device: torch.device, batch: int, size: int, steps: int) -> list[dict[str, Any]]:
    from rise_edge.config import StudentConfig
    from rise_edge.export.fake_quant import calibrate, quantize_model
    from rise_edge.train.student import build_student

    rows = []
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 7, (batch,), device=device)
    for model in STUDENTS:
        student, _ = build_student(StudentConfig(model=model, pretrained="none", image_size=size),
                                   "linear", 7, None)
        qat = quantize_model(student.to(device), size).to(device)
        calibrate(qat, [images])
        optimizer = torch.optim.SGD(qat.parameters(), lr=1e-4, momentum=0.9)

        def step() -> None:
            qat.train()
            loss = torch.nn.functional.cross_entropy(qat(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = _seconds_per_step(step, steps, 2, device)
        rows.append({"student": model, "batch": batch, "size": size,
                     "images_per_s": round(batch / seconds, 1)})
    return rows


class _FakeQuantCalls(TorchFunctionMode):
    """Counts the fake-quant ops that run, by op and by the device of their input: evidence that
    rise-edge's fake quantization itself ran on the device, not only the steps around it."""

    OPS = (torch.fake_quantize_per_tensor_affine, torch.fake_quantize_per_channel_affine)

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func in self.OPS:
            self.calls[f"{func.__name__} on {args[0].device.type}"] += 1
        return func(*args, **(kwargs or {}))


def qat_finetune_steps(device: torch.device, tiny: TinyRun, steps: int = 4) -> dict[str, Any]:
    """`steps` of rise-edge's own QAT fine-tuning on `device`, as export runs it
    (rise_edge.export.qat.qat_finetune: BN folded, INT8 fake quant, calibration, the FP32-distillation
    objective, the training loop's optimizer step, selection on held-out source images), with the
    device of every fake-quant op counted."""
    from rise_edge.config import ExportConfig
    from rise_edge.export.qat import qat_finetune
    from rise_edge.export.session import ExportSession
    from rise_edge.run_dir import open_run

    run = open_run(tiny.path())
    cfg = ExportConfig(int8=True, qat="on", qat_steps=steps, qat_eval_every=max(1, steps // 2),
                       calibration_size=24)
    session = ExportSession(run, cfg, lambda line: None)
    # Loaded before counting starts: the images, not the ops, are what these lines produce.
    calibration, selection = session.calibration_images, session.qat_selection
    key = {"student": session.student_sha256, "calibration": session.calibration.sha256}
    log: list[str] = []
    with tempfile.TemporaryDirectory() as state, _FakeQuantCalls() as seen:
        result = qat_finetune(run, session.splits, cfg, calibration, Path(state), key, log.append,
                              device=device, selection=selection)
    record = result.to_record()
    out = {"device": str(device), "steps": steps, "fake_quant_calls": dict(seen.calls),
           "selected_step": record["selected_step"], "selection": record["selection"],
           "history": record["history"], "wall_time_s": record["wall_time_s"], "log": log}
    elsewhere = {k: v for k, v in seen.calls.items() if not k.endswith(f" on {device.type}")}
    if not seen.calls or elsewhere:
        raise CheckFailed("rise-edge's QAT fine-tuning ran fake-quant ops "
                          + (f"off {device.type}: {elsewhere}" if elsewhere else "not at all"), out)
    if len(record["history"]) < 2:  # step 0 alone: the fine-tuning steps did not run
        raise CheckFailed("rise-edge's QAT fine-tuning recorded no step after step 0", out)
    return out


def qat_on_device(device: torch.device, batch: int, size: int, steps: int, tiny: TinyRun
                  ) -> dict[str, Any]:
    """rise-edge's QAT fine-tuning steps on the tiny student, then fake-quant fine-tuning
    throughput of the 224 px students, on `device`."""
    finetune = qat_finetune_steps(device, tiny)
    rows = qat_throughput(device, batch, size, steps)
    calls = ", ".join(f"{n} x {k}" for k, n in finetune["fake_quant_calls"].items())
    return {"established": [
        f"rise-edge's QAT fine-tuning (rise_edge.export.qat.qat_finetune) ran {finetune['steps']} "
        f"steps on {device}; its fake-quant ops ran: {calls}",
        f"fake-quant fine-tuning throughput measured for {', '.join(r['student'] for r in rows)}"],
        "fine_tuning": finetune, "throughput": rows}


def inference_latency(device: torch.device, size: int, iterations: int) -> list[dict[str, Any]]:
    from rise_edge.backends.latency import TimingPlan, time_runner
    from rise_edge.backends.pytorch import TorchRunner
    from rise_edge.config import StudentConfig
    from rise_edge.train.student import build_student

    rows = []
    plan = TimingPlan(warmup=10, iterations=iterations)
    precisions = ("fp32", "fp16") if device.type == "cuda" else ("fp32",)
    for model in STUDENTS:
        student, _ = build_student(StudentConfig(model=model, pretrained="none", image_size=size),
                                   "linear", 7, None)
        for precision in precisions:
            runner = TorchRunner(module=student, precision=precision, device=device.type)
            for batch in (1, 32):
                images = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(
                    np.float32)
                timed = time_runner(runner, images, plan)
                rows.append({"student": model, "precision": precision, "batch": batch,
                             **{k: round(float(timed[k]), 3) for k in ("p50_ms", "p90_ms",
                                                                        "images_per_s") if k in timed},
                             "clock": timed.get("clock"),
                             "split": {k: v.get("p50_ms") for k, v in timed.get("split", {}).items()
                                       if isinstance(v, dict)}})
    return rows


def _shapes_data(root: Path, per_cell: int = 12) -> Path:
    """A tiny labelled data set in the DomainBed layout (3 styles x 3 shapes), made here."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    backgrounds = {"cartoon": (250, 240, 200), "photo": (120, 110, 100), "sketch": (255, 255, 255)}
    colours = {"circle": (220, 40, 40), "square": (40, 180, 40), "triangle": (40, 60, 220)}
    for domain, background in backgrounds.items():
        for shape, colour in colours.items():
            folder = root / "shapes" / domain / shape
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_cell):
                image = Image.new("RGB", (40, 40), background)
                draw = ImageDraw.Draw(image)
                r, cx, cy = int(rng.integers(9, 15)), int(rng.integers(16, 24)), int(rng.integers(16, 24))
                box = (cx - r, cy - r, cx + r, cy + r)
                fill = None if domain == "sketch" else colour
                if shape == "circle":
                    draw.ellipse(box, fill=fill, outline=colour, width=2)
                elif shape == "square":
                    draw.rectangle(box, fill=fill, outline=colour, width=2)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill,
                                 outline=colour)
                image.save(folder / f"{n:03d}.png")
    return root


class TinyRun:
    """The tiny student the QAT, Torch-TensorRT, TensorRT and bench sections share: test_resnet at
    32 px on a generated shapes data set (_shapes_data), trained once in `folder`, on the checked
    device, when a section first asks for it."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        self.folder, self.device = folder, device
        self._path: Path | None = None
        self._failure: str | None = None
        self.seconds: float | None = None
        self.log_tail: list[str] = []  # training's last printed lines (its last evaluations)

    def path(self) -> Path:
        """The run directory. A training that failed is not tried again: each section that needs
        the run reports that failure instead of spending the lease on it once more."""
        if self._failure is not None:
            raise RuntimeError(f"the tiny run could not be trained: {self._failure}")
        if self._path is None:
            from rise_edge.config import load_recipe
            from rise_edge.train.loop import train_run

            started = time.perf_counter()
            printed = io.StringIO()
            try:
                root = _shapes_data(self.folder / "data")
                recipe = load_recipe(None, [
                    f"data.root={root}", "data.dataset=shapes", "data.target_domain=sketch",
                    "data.val_fraction=0.25", "student.model=test_resnet",
                    "student.pretrained=none", "student.image_size=32", "train.steps=60",
                    "train.batch_size=16", f"train.device={self.device.type}", "loss.method=erm"])
                # Training writes its evaluations to stdout even without a progress bar; the
                # report owns stdout, so they are kept here and their tail goes in the report.
                with contextlib.redirect_stdout(printed):
                    train_run(recipe, run_dir=self.folder / "run", progress=False)
            except Exception as exc:
                self._failure = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self.log_tail = printed.getvalue().strip().splitlines()[-3:]
            self._path, self.seconds = self.folder / "run", round(time.perf_counter() - started, 1)
        return self._path


def _cuda_skip(device: torch.device, module: str, what: str) -> str | None:
    """Why a section needing CUDA and `module` cannot run here, or None."""
    import importlib.util

    if device.type != "cuda":
        return f"{what} needs the CUDA device (this run: --device {device})"
    if importlib.util.find_spec(module) is None:
        return f"{module} is not importable here"
    return None


# Relative differences (largest |difference| over the largest |FP32 logit|) below this are FP32
# arithmetic in another summation order (~1e-6); FP16 rounds every activation to 11 bits (~1e-3).
FP32_ROUNDING = 1e-5


def _relative_difference(logits: np.ndarray, reference: np.ndarray) -> float:
    """Largest |logits - reference| over the largest |reference|: per-element ratios blow up where a
    logit is near zero."""
    return float(np.abs(logits - reference).max() / max(float(np.abs(reference).max()), 1e-12))


def _engine_layer_infos(module: torch.nn.Module) -> tuple[list[str], str]:
    """The layer information JSON of every TensorRT engine in a loaded Torch-TensorRT program, and
    where it came from. Runtime modules (TorchTensorRTModule, PythonTorchTensorRTModule) expose
    get_layer_info(); a program saved as an ExportedProgram holds the engines instead as
    torch.classes.tensorrt.Engine attributes called by tensorrt::execute_engine, whose
    get_engine_layer_info() reads the same inspector (torch_tensorrt's TRTEngine bindings)."""
    infos, where = [], set()
    for owner in module.modules():
        reader = getattr(owner, "get_layer_info", None)
        if callable(reader):
            infos.append(str(reader()))
            where.add(f"{type(owner).__name__}.get_layer_info()")
            continue
        for value in vars(owner).values():
            if isinstance(value, (torch.Tensor, torch.nn.Module, dict, list, str, int, float, bool)):
                continue
            try:
                reader = getattr(value, "get_engine_layer_info", None)
            except Exception:  # a TorchScript object answers unknown attributes with an error
                reader = None
            if callable(reader):
                infos.append(str(reader()))
                where.add(f"{type(value).__name__}.get_engine_layer_info()")
    return infos, ", ".join(sorted(where))


def _layer_precisions(infos: Sequence[str]) -> dict[str, Any]:
    """What the engines' layer information says about precision. TensorRT records each layer's
    output formats ("Row major linear FP16 format") only in engines built with
    ProfilingVerbosity.DETAILED; otherwise it lists layer names alone, where a cast layer's name
    (the explicit-typing autocast inserts them) is the only trace of a precision change."""
    import re

    dtypes: Counter[str] = Counter()
    names: list[str] = []
    detailed = 0
    for info in infos:
        for layer in json.loads(info).get("Layers", []):
            if isinstance(layer, str) and layer.lstrip().startswith("{"):
                try:  # some releases write each detailed layer as a JSON string of its own
                    layer = json.loads(layer)
                except ValueError:
                    pass
            if isinstance(layer, str):
                names.append(layer)
                continue
            detailed += 1
            for output in layer.get("Outputs", []):
                found = re.search(r"\b(FP32|FP16|BF16|Half|Float|Int8|INT8|FP8|Int32|Int64|Bool)\b",
                                  str(output.get("Format/Datatype", "")))
                dtypes[found.group(1).lower() if found else "unknown"] += 1
    casts = [n for n in names if re.search(r"cast|_to_copy", n, re.IGNORECASE)]
    return {"engines": len(infos), "layers_with_formats": detailed, "output_dtypes": dict(dtypes),
            "layers_named_only": len(names), "cast_layer_names": len(casts),
            "cast_name_examples": casts[:3]}


def torch_tensorrt_fp16(device: torch.device, tiny: TinyRun) -> dict[str, Any]:
    """The tiny student exported as a Torch-TensorRT FP16 program, then loaded back: its batch range,
    its difference from the FP32 student, and its layer precisions where the engine records them."""
    skip = _cuda_skip(device, "torch_tensorrt", "a Torch-TensorRT program")
    if skip:
        return {"skipped": skip}
    from rise_edge.backend_table import runner_for
    from rise_edge.config import ExportConfig
    from rise_edge.export.driver import export_run
    from rise_edge.run_dir import open_run

    run_dir = tiny.path()
    started = time.perf_counter()
    result = export_run(run_dir, ExportConfig(formats=("torch-tensorrt",), fp16=True), progress=False)
    record = result.artefacts["torch-tensorrt-fp16"]
    out: dict[str, Any] = {
        "export_seconds": round(time.perf_counter() - started, 1), "status": record["status"],
        "reason": record.get("reason"), "precision_mode": record.get("precision_mode"),
        "torch_tensorrt": record.get("torch_tensorrt"), "batch_profile": record.get("batch_profile"),
        "parity": record.get("parity")}
    if record["status"] != "ok":
        raise CheckFailed(f"torch-tensorrt-fp16 {record['status']}: {record.get('reason')}", out)
    run = open_run(run_dir)
    student = run.student.eval().cpu()  # the reference on the CPU: FP32 proper, no TF32
    runner = runner_for(record, run_dir / "export", device="cuda")
    rng = np.random.default_rng(0)
    problems, differences = [], []
    out["batches"] = {}
    for batch in (1, 8, 32):
        images = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        try:
            logits = runner(images)
        except Exception as exc:  # a batch outside what the saved program kept fails here
            out["batches"][batch] = {"ran": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
            problems.append(f"batch {batch} did not run")
            continue
        with torch.no_grad():
            reference = student(torch.from_numpy(images)).numpy()
        entry = {"ran": True, "shape": list(logits.shape)}
        if logits.shape != reference.shape:
            problems.append(f"batch {batch} gave {list(logits.shape)}, not {list(reference.shape)}")
        else:
            entry["max_abs_difference"] = float(np.abs(logits - reference).max())
            entry["max_relative_difference"] = _relative_difference(logits, reference)
            differences.append(entry["max_relative_difference"])
        out["batches"][batch] = entry
    try:
        infos, where = _engine_layer_infos(runner.module)
        out["layer_info_read_through"] = where or None
        out["layer_precisions"] = _layer_precisions(infos) if infos else None
    except Exception as exc:  # the inspector is optional evidence: the batches stand without it
        out["layer_precisions"] = None
        out["layer_info_error"] = f"{type(exc).__name__}: {exc}"[:400]

    established = [f"export: {record['status']}, FP16 asked for by {out['precision_mode']} "
                   f"(torch_tensorrt {out['torch_tensorrt']}); parity record: {out['parity']}"]
    ran = [b for b, e in out["batches"].items() if e.get("ran")]
    established.append(f"dynamic batch: {'established' if len(ran) == 3 else 'NOT established'}: "
                       f"the saved program ran at batch {', '.join(map(str, ran)) or 'none'} "
                       "of 1, 8, 32")
    if differences:
        worst = max(differences)
        if worst > FP32_ROUNDING:
            established.append(
                f"reduced precision: established: largest relative difference from the FP32 "
                f"student {worst:.1e}, beyond FP32 rounding (~1e-6). TF32, which TensorRT may use "
                "for FP32 layers on Ampere and later, differs about as much, so the difference "
                "alone does not tell FP16 from TF32")
        else:
            problems.append(f"the FP16 program differs from FP32 by only {worst:.1e} (FP32 rounding)")
            established.append(f"reduced precision: NOT established: largest relative difference "
                               f"{worst:.1e}, what FP32 arithmetic gives")
    else:
        established.append("reduced precision: not established: no batch gave logits to compare")
    precisions = out["layer_precisions"]
    if "layer_info_error" in out:
        established.append(f"layer precisions: not established: reading them failed: "
                           f"{out['layer_info_error']}")
    elif precisions is None:
        established.append("layer precisions: not established: the loaded program exposes neither "
                           "get_layer_info() nor an engine with get_engine_layer_info() in this "
                           "torch_tensorrt release")
    elif precisions["layers_with_formats"]:
        established.append(f"layer precisions: established: engine layer outputs by type "
                           f"{precisions['output_dtypes']}")
    else:
        established.append(
            f"layer precisions: not established: the engine records layer names only (Torch-TensorRT "
            f"builds with ProfilingVerbosity.LAYER_NAMES_ONLY unless its debugger is on); "
            f"{precisions['cast_layer_names']} of {precisions['layers_named_only']} layer names "
            "name a cast, the trace the FP16 autocast leaves")
    out = {"established": established, **out}
    if problems:
        raise CheckFailed("; ".join(problems), out)
    return out


def tensorrt_engines(device: torch.device, tiny: TinyRun, iterations: int) -> dict[str, Any]:
    """The tiny student exported as TensorRT FP16 and INT8 engines: for each, its status, how it was
    built, the parity record export wrote, the INT8 judge's verdict (rise_edge.export.judge), and
    runs at batch 1, 8 and 32 (output shape checked), timed with CUDA events at 1 and 32."""
    skip = _cuda_skip(device, "tensorrt", "a TensorRT engine")
    if skip:
        return {"skipped": skip}
    from rise_edge.backend_table import runner_for
    from rise_edge.backends.latency import TimingPlan, time_runner
    from rise_edge.bench.scoring import int8_judge
    from rise_edge.config import ExportConfig
    from rise_edge.export.driver import export_run
    from rise_edge.run_dir import open_run

    run_dir = tiny.path()
    classes = len(open_run(run_dir).meta.classes)
    started = time.perf_counter()
    result = export_run(run_dir, ExportConfig(formats=("tensorrt",), int8=True, fp16=True,
                                              calibration_size=24), progress=False)
    qdq = result.artefacts.get("onnx-int8-tensorrt", {})
    out: dict[str, Any] = {"export_seconds": round(time.perf_counter() - started, 1),
                           "qdq_graph_for_int8": {"status": qdq.get("status"),
                                                  "reason": qdq.get("reason")}}
    problems = []
    rng = np.random.default_rng(0)
    for name in ("tensorrt-fp16", "tensorrt-int8"):
        record = result.artefacts[name]
        entry: dict[str, Any] = {"status": record["status"], "built_from": record.get("built_from"),
                                 "reason": record.get("reason"), "parity": record.get("parity")}
        if name == "tensorrt-int8":
            entry["judge"] = int8_judge(record)
        out[name] = entry
        if record["status"] != "ok":
            problems.append(f"{name} {record['status']}: {record.get('reason')}")
            continue
        runner = runner_for(record, run_dir / "export", device="cuda")
        for batch in (1, 8, 32):
            images = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
            try:
                shape = list(runner(images).shape)
            except Exception as exc:  # one batch failing must not hide the others
                entry[f"batch{batch}"] = {"ran": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
                problems.append(f"{name} failed at batch {batch}")
                continue
            entry[f"batch{batch}"] = {"ran": True, "shape": shape}
            if shape != [batch, classes]:
                problems.append(f"{name} gave {shape} at batch {batch}, not {[batch, classes]}")
            elif batch in (1, 32):
                timed = time_runner(runner, images, TimingPlan(warmup=10, iterations=iterations))
                entry[f"batch{batch}"].update({k: round(float(timed[k]), 3)
                                               for k in ("p50_ms", "p90_ms", "images_per_s")})
        del runner
    established = [f"onnx-int8-tensorrt (the Q/DQ graph an INT8 engine is built from where "
                   f"nvidia-modelopt is installed): {qdq.get('status')}"
                   + (f": {qdq['reason']}" if qdq.get("reason") else "")]
    for name in ("tensorrt-fp16", "tensorrt-int8"):
        entry = out[name]
        ran = [str(b) for b in (1, 8, 32) if entry.get(f"batch{b}", {}).get("ran")]
        established.append(f"{name}: {entry['status']}"
                           + (f", built from {entry['built_from']}" if entry.get("built_from") else "")
                           + (f", ran at batch {', '.join(ran)} of 1, 8, 32" if entry["status"] == "ok"
                              else ""))
    judge = out["tensorrt-int8"]["judge"]
    established.append(
        f"INT8 judge: budget {'met' if judge.get('met') else 'NOT met'}, drop "
        f"{judge.get('drop_points')} points (95 % upper bound {judge.get('drop_upper95')})"
        if judge.get("judged") else f"INT8 judge: not judged: {judge.get('reason')}")
    out = {"established": established, **out}
    if problems:
        raise CheckFailed("; ".join(problems), out)
    return out


def _expected_placement(row: dict[str, Any], ort_providers: Sequence[str]) -> tuple[str, str] | None:
    """(backend, device) a bench row must report on this machine, from its artefact's target and
    what is installed: CPU INT8 graphs on the CPU provider; the TensorRT Q/DQ graph on ONNX
    Runtime's TensorRT provider where it can start, else on the CPU computed as written; other
    graphs on the CUDA provider where it can start; engines on CUDA. None: no expectation."""
    cuda = torch.cuda.is_available()
    if row["format"] == "pytorch":
        return ("pytorch", "cuda" if cuda else "cpu")
    if row["format"] == "onnx":
        if str(row.get("target", "")).endswith("-cpu"):
            return ("onnxruntime", "cpu")
        if row.get("target") == "tensorrt":
            return (("onnxruntime-trt", "cuda") if cuda and "TensorrtExecutionProvider" in ort_providers
                    else ("onnxruntime (Q/DQ as written)", "cpu"))
        return (("onnxruntime-cuda", "cuda") if cuda and "CUDAExecutionProvider" in ort_providers
                else ("onnxruntime", "cpu"))
    if row["format"] in ("tensorrt", "torch-tensorrt"):
        return (row["format"], "cuda")
    return None


def bench_devices(tiny: TinyRun) -> dict[str, Any]:
    """rise-edge bench on the tiny student after a CPU INT8 export (the engines of the sections
    before stay in its export.json): every row's engine, backend, device, status and warnings,
    checked against where it must run, and that a row asked for one provider names the one that ran."""
    from rise_edge.bench.driver import bench_run
    from rise_edge.config import BenchConfig, ExportConfig
    from rise_edge.export.driver import export_run

    try:
        import onnxruntime
        providers = list(onnxruntime.get_available_providers())
    except ImportError:
        providers = []
    run_dir = tiny.path()
    exported = export_run(run_dir, ExportConfig(formats=("onnx",), int8=True, calibration_size=24),
                          progress=False)
    report = bench_run(run_dir, BenchConfig(domains=("all",), batch_sizes=(1,), warmup=2,
                                            iterations=5, max_images=16), progress=False)
    rows, problems, established = [], [], []
    for row in report.rows:
        rows.append({k: row.get(k) for k in ("engine", "backend", "device", "status", "target")}
                    | {"warnings": " | ".join(row.get("warnings", [])) or None,
                       "reason": row.get("reason") or None})
        if row["status"] == "not-exported":  # its export's failure is its own section's line
            established.append(f"{row['engine']}: not benched, {row.get('reason')}")
            continue
        if row["status"] not in ("ok", "partial"):
            problems.append(f"{row['engine']} {row['status']}: {row.get('reason')}")
            continue
        expected = _expected_placement(row, providers)
        got = (row["backend"], row["device"])
        fell_back = any(w.startswith("asked ONNX Runtime for") for w in row.get("warnings", []))
        if expected is None or got == expected:
            established.append(f"{row['engine']}: ran on {row['backend']} ({row['device']})"
                               + (", as it must here" if expected else ""))
        elif fell_back:  # the provider could not start here; the row says so, as it must
            established.append(f"{row['engine']}: expected {expected[0]} ({expected[1]}); the "
                               f"provider could not start and the row records the one that ran, "
                               f"{row['backend']} ({row['device']})")
        else:
            problems.append(f"{row['engine']} ran on {row['backend']} ({row['device']}), expected "
                            f"{expected[0]} ({expected[1]})")
    engines = {r["engine"] for r in report.rows}
    for name, what in (("onnx-int8", "the CPU INT8 graph"),
                       ("onnx-int8-tensorrt", "the TensorRT Q/DQ graph")):
        if name not in engines:
            record = exported.artefacts.get(name)
            established.append(f"{name} ({what}): not benched: " + (
                f"export.json says {record['status']}: {record.get('reason')}" if record else
                "not in this run's export.json (the TensorRT section makes it, where "
                "nvidia-modelopt is installed)"))
    out = {"established": established, "onnxruntime_providers": providers, "rows": rows}
    if "onnx-int8" not in engines:
        problems.append("the CPU INT8 graph (onnx-int8) was not benched")
    if problems:
        raise CheckFailed("; ".join(problems), out)
    return out


def _jpegs(count: int, size: int) -> list[bytes]:
    """`count` distinct JPEG files of `size` px, in memory: smooth colour fields with detail, so
    that they compress like photos (pure noise would not)."""
    import io

    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    files = []
    for _ in range(count):
        blocks = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(blocks).resize((size, size), Image.BICUBIC)
        image = image.filter(ImageFilter.DETAIL)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def jpeg_decoding(device: torch.device, count: int, size: int, batch: int = 128
                  ) -> list[dict[str, Any]]:
    """Images/s decoding the same JPEG files: PIL (what the training loader's workers use, per
    worker), torchvision.io.decode_jpeg on the CPU, and on CUDA decode_jpeg(device='cuda') (nvjpeg)
    on lists of `batch` files, synchronised; with its pixel differences from the CPU decode (the
    worst image's mean and the largest)."""
    import io
    import warnings

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    files = _jpegs(count, size)
    tensors = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    rows = []

    def timed(name: str, decode: Callable[[], Any]) -> Any:
        decode()  # warm-up: nvjpeg's handles, the allocator
        _sync(device)
        start = time.perf_counter()
        out = decode()
        _sync(device)
        rows.append({"decoder": name, "images": count, "size": size,
                     "images_per_s": round(count / (time.perf_counter() - start), 1)})
        return out

    def pil() -> None:
        for f in files:
            with Image.open(io.BytesIO(f)) as image:
                image.convert("RGB").load()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated
        timed("PIL, one thread", pil)
        cpu = timed("torchvision decode_jpeg, CPU",
                    lambda: decode_jpeg(tensors, mode=ImageReadMode.RGB))
        if device.type == "cuda":
            gpu = timed(f"torchvision decode_jpeg, nvjpeg (lists of {batch})", lambda: [
                image for i in range(0, count, batch)
                for image in decode_jpeg(tensors[i:i + batch], mode=ImageReadMode.RGB,
                                         device=device)])
            if any(g.shape != c.shape for g, c in zip(gpu, cpu)):
                raise AssertionError("nvjpeg and the CPU decoder gave images of different shapes")
            diffs = [(g.cpu().float() - c.float()).abs() for g, c in zip(gpu, cpu)]
            rows[-1]["mean_abs_diff_vs_cpu"] = round(max(float(d.mean()) for d in diffs), 3)
            rows[-1]["max_abs_diff_vs_cpu"] = int(max(float(d.max()) for d in diffs))
    return rows


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    keys = [k for k in rows[0] if k != "split"]
    return (["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            + ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in rows])


def _render(result: Any) -> list[str]:
    """A section's result: rows as a table; a dict as its `established` sentences (what the check
    could and could not establish), its tables, and the rest as JSON."""
    if _is_rows(result):
        return _table(result)
    if not isinstance(result, dict):
        return ["```", json.dumps(result, indent=1, default=str)[:6000], "```"]
    lines = [f"- {sentence}" for sentence in result.get("established", [])]
    rest = {k: v for k, v in result.items() if k != "established" and not _is_rows(v)}
    if rest:
        lines += ["", "```", json.dumps(rest, indent=1, default=str)[:6000], "```"]
    for key, value in result.items():
        if _is_rows(value):
            lines += ["", f"{key}:", "", *_table(value)]
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = ["# GPU check", "", f"Command: `{report['command']}`  ",
             f"Machine: {env.get('gpu') or 'no GPU'}; torch {env['torch']} (CUDA {env['cuda']}); "
             f"TensorRT {env['tensorrt']}; onnxruntime providers {env['onnxruntime_providers']}", ""]
    tiny = report.get("tiny_run", {})
    if tiny.get("training_s") is not None:
        lines += [f"The tiny student (test_resnet, 32 px) trained in {tiny['training_s']} s (counted "
                  f"in the first section that used it); training's last line: "
                  f"{tiny['log_tail'][-1] if tiny['log_tail'] else '-'}", ""]
    for name, section in report["sections"].items():
        lines += [f"## {name}", ""]
        status = _status_line(section)
        if "error" in section:
            lines += ["FAILED: " + section["error"], ""]
            if section.get("traceback"):
                lines += ["```", section["traceback"].strip(), "```", ""]
        elif status != "ok":  # skipped: the reason is the whole result
            lines += [status]
        if "result" in section and ("error" in section or status == "ok"):
            lines += _render(section["result"])
        lines += ["", f"({section['seconds']} s)", ""]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "gpu": None, "tensorrt": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    try:
        import tensorrt
        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = "not installed"
    try:
        import onnxruntime
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = "not installed"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run of the code path)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ["OUT"]) if os.environ.get("OUT") else
                        REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on the GPU machine, or pass "
                         "--device cpu --quick to try the code path")
    device = torch.device(args.device)
    batch, size, steps, iters = (4, 64, 2, 5) if args.quick else (128, 224, 20, 200)
    teacher = "ViT-B-32" if args.quick else "ViT-B-16"
    report: dict[str, Any] = {"command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]),
                              "environment": environment(), "sections": {}}
    sections = report["sections"]
    if not args.skip_tests:
        _fenced("GPU-marked tests", sections, lambda: gpu_tests(timeout=240))
    _fenced("training throughput (bf16 autocast, channels_last)", sections,
            lambda: training_throughput(device, batch, size, steps, teacher))
    _fenced("teacher-view cache: build, and a cached RISE step against on the fly", sections,
            lambda: teacher_cache_gpu(device, batch, size, steps, teacher, 16 if args.quick else 2048))
    with tempfile.TemporaryDirectory() as folder:
        tiny = TinyRun(Path(folder), device)
        _fenced("QAT on the device: rise-edge's fine-tuning steps and fake-quant throughput",
                sections, lambda: qat_on_device(device, min(batch, 64), size, max(2, steps // 2),
                                                tiny))
        _fenced("inference latency (CUDA events on GPU)", sections,
                lambda: inference_latency(device, size, iters))
        _fenced("Torch-TensorRT FP16 program: batch 1/8/32, difference from FP32, layer precisions",
                sections, lambda: torch_tensorrt_fp16(device, tiny))
        _fenced("TensorRT FP16 and INT8 engines: built, parity, judged, batch 1/8/32", sections,
                lambda: tensorrt_engines(device, tiny, iters))
        _fenced("bench on the tiny run: backend, device and provider per row", sections,
                lambda: bench_devices(tiny))
        report["tiny_run"] = {"training_s": tiny.seconds, "log_tail": tiny.log_tail}
    _fenced("JPEG decoding: PIL vs torchvision on the CPU vs nvjpeg", sections,
            lambda: jpeg_decoding(device, 32 if args.quick else 1024, size))
    text = to_markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check" if not args.quick else "gpu_check_quick"
    (args.out / f"{stem}.md").write_text(text + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
