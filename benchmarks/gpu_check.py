"""One prepared check for a lent CUDA GPU: run it first, commit what it prints.

    python benchmarks/gpu_check.py                 # on the GPU machine (about 5 minutes)
    python benchmarks/gpu_check.py --device cpu --quick   # the same code path on a CPU, tiny sizes

1. The GPU-marked tests (`pytest -m gpu`): passed / failed / skipped with the reasons.
2. Training throughput, images/s, ERM and RISE, ResNet-18 and EfficientNet-Lite0 students at 224 px,
   bf16 autocast and channels_last, with a random-weight ViT-B/16 teacher of the real architecture
   (no CLIP weights can be downloaded; time does not depend on weight values). Peak GPU memory.
3. The teacher-view cache: build throughput (views/s, teacher in fp16) for 2,048 generated images x
   2 views, and a cached RISE step against the same step running the teacher, per student.
4. Quantization-aware fine-tuning throughput (INT8 fake quantization) of the same students.
5. Inference latency with CUDA events (rise_edge.backends.latency.time_runner): PyTorch FP32 and FP16 at batch 1
   and 32, p50 / p90 ms and images/s, H2D / compute / D2H split.
6. A TensorRT INT8 engine of a tiny student trained here: build, batch 1 and 32 latency, and the
   INT8 judge's verdict on it (where TensorRT is importable).
7. JPEG decoding, images/s: PIL (the training loader's decoder, per worker), torchvision's
   decode_jpeg on the CPU, and decode_jpeg(device='cuda') (nvjpeg) on lists of 128 files, with its
   pixel differences from the CPU decode: whether GPU decoding would feed the GPU faster.
Each section is fenced: one that fails prints its error and the others still run. Prints one Markdown
report and writes it with a JSON copy to --out (default: $OUT if set, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
STUDENTS = ("resnet18", "tf_efficientnet_lite0")


def _fenced(name: str, report: dict[str, Any], fn: Callable[[], Any]) -> None:
    started = time.perf_counter()
    try:
        report[name] = {"result": fn(), "seconds": round(time.perf_counter() - started, 1)}
    except Exception as exc:  # a broken section must not cost the lease the others
        report[name] = {"error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(limit=4)}
    print(f"[gpu_check] {name}: {'ok' if 'result' in report[name] else report[name]['error']}",
          file=sys.stderr, flush=True)


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
    import tempfile

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


def tensorrt_int8_engine(device: torch.device, iterations: int) -> dict[str, Any]:
    """A tiny student trained here, exported as a TensorRT INT8 engine: build, latency (CUDA
    events), and the INT8 judge's verdict on it (rise_edge.export.judge), as export records it."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("tensorrt") is None or device.type != "cuda":
        return {"skipped": "TensorRT is not importable here" if device.type == "cuda"
                else "a TensorRT engine needs the CUDA device"}
    from rise_edge.backend_table import runner_for
    from rise_edge.backends.latency import TimingPlan, time_runner
    from rise_edge.config import ExportConfig, load_recipe
    from rise_edge.export.driver import export_run
    from rise_edge.train.loop import train_run

    with tempfile.TemporaryDirectory() as folder:
        root = _shapes_data(Path(folder) / "data")
        recipe = load_recipe(None, [f"data.root={root}", "data.dataset=shapes",
                                    "data.target_domain=sketch", "data.val_fraction=0.25",
                                    "student.model=test_resnet", "student.pretrained=none",
                                    "student.image_size=32", "train.steps=60", "train.batch_size=16",
                                    "train.device=cuda", "loss.method=erm"])
        run = Path(folder) / "run"
        train_run(recipe, run_dir=run, progress=False)
        started = time.perf_counter()
        result = export_run(run, ExportConfig(formats=("tensorrt",), int8=True, calibration_size=24),
                            progress=False)
        record = result.artefacts["tensorrt-int8"]
        out = {"export_seconds": round(time.perf_counter() - started, 1), "status": record["status"],
               "built_from": record.get("built_from"), "reason": record.get("reason"),
               "judge": record.get("accuracy_budget", {}).get("judge")
               or record.get("accuracy_budget", {}).get("not_judged")}
        if record["status"] == "ok":
            runner = runner_for(record, run / "export", device="cuda")
            for batch in (1, 32):
                images = np.zeros((batch, 3, 32, 32), np.float32)
                timed = time_runner(runner, images, TimingPlan(warmup=10, iterations=iterations))
                out[f"batch{batch}"] = {k: round(float(timed[k]), 3) for k in ("p50_ms", "p90_ms",
                                                                               "images_per_s")}
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


def to_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = ["# GPU check", "", f"Command: `{report['command']}`  ",
             f"Machine: {env.get('gpu') or 'no GPU'}; torch {env['torch']} (CUDA {env['cuda']}); "
             f"TensorRT {env['tensorrt']}; onnxruntime providers {env['onnxruntime_providers']}", ""]
    for name, section in report["sections"].items():
        lines += [f"## {name}", ""]
        if "error" in section:
            lines += ["FAILED: " + section["error"], "", "```", section["traceback"].strip(), "```", ""]
            continue
        result = section["result"]
        if isinstance(result, list) and result:
            keys = [k for k in result[0] if k != "split"]
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in result]
        else:
            lines += ["```", json.dumps(result, indent=1)[:3000], "```"]
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
    _fenced("QAT fine-tuning throughput (INT8 fake quantization)", sections,
            lambda: qat_throughput(device, min(batch, 64), size, max(2, steps // 2)))
    _fenced("inference latency (CUDA events on GPU)", sections,
            lambda: inference_latency(device, size, iters))
    _fenced("TensorRT INT8 engine: built, timed, judged", sections,
            lambda: tensorrt_int8_engine(device, iters))
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
