"""INT8 for ONNX Runtime on the CPU: static QDQ quantization, and the accuracy budget.

    quant_pre_process (shape inference + graph optimisation)  ->  quantize_static (QDQ, per-channel
    int8 weights, calibrated activations)  ->  accuracy on every SOURCE domain's validation split,
    FP32 vs INT8  ->  while the drop on some source domain exceeds the budget: keep the most sensitive
    remaining layer in FP32 (`nodes_to_exclude`), re-quantize, re-measure.

Calibrated activation ranges are cached (ONNX Runtime's calibration cache) under a name keyed on the
FP32 model's sha256, the calibration set's sha256 and the method, so the budget loop re-quantizes
without re-running calibration, and a changed model, image or method never reuses stale ranges.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rise_edge.errors import missing_extra
from rise_edge.latency import interleaved_ms
from rise_edge.paths import cache_key

# export.calibration_method -> onnxruntime.quantization.CalibrationMethod member name
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

SENSITIVITY_IMAGES = 16  # calibration images used to rank layer sensitivity (cheap, and enough to rank)


def _ort_quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError:
        raise missing_extra("onnxruntime", "cpu", "INT8 quantization for ONNX Runtime") from None
    return quantization


@dataclass(frozen=True)
class CpuQuantSettings:
    """Which INT8 flavour this CPU's ONNX Runtime kernels run fastest, and why.

    x86: uint8 activations (asymmetric) with symmetric per-channel int8 weights (U8S8). Measured on
    this project's Sapphire Rapids CPU with ORT 1.32 (ResNet-18, batch 1): U8S8 QDQ ~3x faster than
    FP32, S8S8 QDQ no faster than FP32. Without VNNI the weights use 7 bits (reduce_range), as ONNX
    Runtime advises, to avoid the saturation of the AVX2 u8*s8 multiply-add.
    ARM: symmetric int8 activations (S8S8), which ARM's kernels prefer.
    """

    activation_type: str      # "uint8" | "int8"
    symmetric_activations: bool
    reduce_range: bool
    per_channel: bool
    reason: str

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_quant_settings() -> CpuQuantSettings:
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return CpuQuantSettings("int8", True, False, True, "ARM CPU: symmetric S8S8 QDQ")
    vnni = bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return CpuQuantSettings("uint8", False, not vnni, True,
                            "x86 CPU " + ("with VNNI: U8S8 QDQ" if vnni else
                                          "without VNNI: U8S8 QDQ, 7-bit weights (reduce_range)"))


class _BatchReader:
    """Batches of an in-memory (N, 3, H, W) array; `set_range` lets ONNX Runtime calibrate in strides
    (each stride's activations are reduced, then dropped, so memory stays bounded)."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int):
        self.input_name, self.images, self.batch = input_name, images, batch
        self.set_range(0, len(self))

    def set_range(self, start_index: int, end_index: int) -> None:
        self._iter: Iterator[dict[str, np.ndarray]] = iter(
            {self.input_name: self.images[i * self.batch:(i + 1) * self.batch]}
            for i in range(start_index, min(end_index, len(self))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch)


def _reader(input_name: str, images: np.ndarray, batch: int) -> Any:
    q = _ort_quantization()
    reader = _BatchReader(input_name, images, batch)

    class Reader(q.CalibrationDataReader):  # the documented base class, for isinstance checks
        def get_next(self) -> dict[str, np.ndarray] | None:
            return reader.get_next()

        def set_range(self, start_index: int, end_index: int) -> None:
            reader.set_range(start_index, end_index)

        def __len__(self) -> int:
            return len(reader)

    return Reader()


def _stride(batches: int, most: int) -> int:
    """The largest divisor of `batches` not above `most` (ONNX Runtime wants strides that divide)."""
    return max(d for d in range(1, min(batches, most) + 1) if batches % d == 0)


def preprocess(fp32_path: Path, out_path: Path) -> None:
    """ONNX Runtime's recommended pre-quantization pass (symbolic shapes, graph optimisation)."""
    _ort_quantization().quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=False)


@dataclass
class CpuQuantizer:
    """Quantizes one pre-processed FP32 model repeatedly (different exclusions), calibrating once."""

    pre_path: Path
    input_name: str
    calibration: np.ndarray       # (N, 3, H, W) calibration images
    method: str                   # minmax | entropy | percentile
    settings: CpuQuantSettings
    cache_dir: Path
    model_sha256: str
    calibration_sha256: str

    @property
    def cache_path(self) -> Path:
        key = cache_key(model=self.model_sha256, calibration=self.calibration_sha256,
                        method=self.method, symmetric=self.settings.symmetric_activations,
                        tool="onnxruntime-ranges")
        return self.cache_dir / f"ort-ranges-{key[:24]}.json"

    def quantize(self, out_path: Path, *, exclude: Sequence[str] = (),
                 only: Sequence[str] | None = None) -> None:
        """Write a QDQ model to out_path; `exclude` stays FP32; `only` (if given) alone is quantized."""
        q = _ort_quantization()
        cached = self.cache_path.is_file()
        # The histogram calibrators (entropy, percentile) stack every batch's activations into one
        # array, so their batches must be equal: one image each. Calibrating in strides bounds the
        # activations held at once (ResNet-18 at 224 px: ~20 MB per image).
        batch = 16 if self.method == "minmax" else 1
        batches = -(-len(self.calibration) // batch)
        stride = _stride(batches, 4 if batch > 1 else 64)
        with tempfile.TemporaryDirectory(dir=self.cache_dir, prefix=".ranges.") as tmp:
            # ORT writes the cache itself; give it a temporary name so a kill never leaves half of one.
            new_cache = Path(tmp) / "ranges.json"
            q.quantize_static(
                str(self.pre_path), str(out_path),
                calibration_data_reader=None if cached else _reader(
                    self.input_name, self.calibration, batch),
                quant_format=q.QuantFormat.QDQ,
                per_channel=self.settings.per_channel,
                reduce_range=self.settings.reduce_range,
                activation_type=getattr(q.QuantType, "QUInt8" if self.settings.activation_type == "uint8"
                                        else "QInt8"),
                weight_type=q.QuantType.QInt8,
                nodes_to_exclude=list(exclude) or None,
                nodes_to_quantize=list(only) if only else None,
                calibrate_method=getattr(q.CalibrationMethod, CALIBRATION_METHODS[self.method]),
                extra_options={"CalibStridedMinMax": stride,
                               "ActivationSymmetric": self.settings.symmetric_activations,
                               "WeightSymmetric": True,
                               "CalibTensorRangeSymmetric": self.settings.symmetric_activations},
                calibration_cache_path=str(self.cache_path if cached else new_cache),
            )
            if not cached and new_cache.is_file():
                new_cache.replace(self.cache_path)


def quantized_nodes(int8_path: Path) -> list[str]:
    """Names of the compute nodes the quantizer wrapped in Q/DQ (candidates for FP32 fallback), in
    graph order: every non-Q/DQ node with an input that comes out of a DequantizeLinear."""
    import onnx

    graph = onnx.load(str(int8_path)).graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.name
            and any(i in dq_outputs for i in n.input)]


def _session(path: Path) -> Any:
    from rise_edge.engines import OnnxRuntimeRunner
    return OnnxRuntimeRunner(path, device="cpu")


def logits_of(path: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    runner = _session(path)
    return np.concatenate([runner(images[i:i + batch]) for i in range(0, len(images), batch)])


def accuracy_per_domain(path: Path, domains: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Top-1 accuracy in percent per domain; `domains` maps name -> (images, labels)."""
    runner = _session(path)
    result = {}
    for name, (images, labels) in domains.items():
        logits = np.concatenate([runner(images[i:i + 32]) for i in range(0, len(images), 32)])
        result[name] = round(100.0 * float((logits.argmax(1) == labels).mean()), 3)
    return result


def rank_sensitivity(quantizer: CpuQuantizer, candidates: Sequence[str], images: np.ndarray,
                     workdir: Path) -> list[tuple[str, float]]:
    """Rank layers by how much quantizing each ALONE moves the logits: for every candidate node,
    quantize only that node (calibrated ranges come from the cache, so this costs one graph rewrite
    and one inference over `images`), and take the mean squared logit difference against the FP32
    model on a handful of calibration images. Most harmful first.

    One-at-a-time isolates each layer's own quantization error (per-layer activation comparisons of
    the fully quantized model would mix in the error accumulated upstream), and it needs no labels.
    """
    reference = logits_of(quantizer.pre_path, images)
    scores = []
    for i, node in enumerate(candidates):
        single = workdir / f"single-{i}.onnx"
        quantizer.quantize(single, only=[node])
        mse = float(np.mean((logits_of(single, images) - reference) ** 2))
        single.unlink(missing_ok=True)
        scores.append((node, mse))
    return sorted(scores, key=lambda s: -s[1])


def latency_ms(paths: dict[str, Path], image: np.ndarray, rounds: int = 3, iters: int = 15
               ) -> dict[str, float]:
    """Median batch-1 latency per model, measured in this process, the models interleaved round by
    round so a busy neighbour on a shared CPU slows all of them alike."""
    samples = interleaved_ms({name: _session(p) for name, p in paths.items()}, image, rounds, iters)
    return {name: round(statistics.median(v), 3) for name, v in samples.items()}


@dataclass
class BudgetResult:
    accuracy_fp32: dict[str, float]
    accuracy_int8: dict[str, float]            # before any fallback
    accuracy_final: dict[str, float]           # after the budget step
    kept_fp32: list[str]
    sensitivity: list[tuple[str, float]]       # ranked, most harmful first ([] when not needed)
    budget: float
    met: bool
    steps: list[dict[str, Any]]

    def to_record(self) -> dict[str, Any]:
        drop = {d: round(self.accuracy_fp32[d] - self.accuracy_final[d], 3) for d in self.accuracy_fp32}
        return {"budget_points": self.budget, "met": self.met, "kept_fp32_layers": self.kept_fp32,
                "accuracy_fp32": self.accuracy_fp32, "accuracy_int8_before_fallback": self.accuracy_int8,
                "accuracy_int8": self.accuracy_final, "drop_points": drop,
                "sensitivity_method": "quantize one layer alone; MSE of logits vs FP32 on "
                                      f"{SENSITIVITY_IMAGES} calibration images",
                "sensitivity": [{"layer": n, "logit_mse": s} for n, s in self.sensitivity],
                "steps": self.steps}


def _worst_drop(fp32: dict[str, float], int8: dict[str, float]) -> float:
    return max(fp32[d] - int8[d] for d in fp32)


def quantize_within_budget(quantizer: CpuQuantizer, out_path: Path,
                           source_val: dict[str, tuple[np.ndarray, np.ndarray]], budget: float,
                           max_fallback: int, workdir: Path,
                           log: Callable[[str], None] = lambda _: None) -> BudgetResult:
    """Quantize everything, then keep the most sensitive layers in FP32, one at a time, until the
    INT8 accuracy drop on every source domain is within `budget` points or `max_fallback` layers are
    kept. `out_path` ends up holding the last model tried; `workdir`/int8-all.onnx the model with every
    layer quantized. Source domains only: the target plays no part.
    """
    fp32 = accuracy_per_domain(quantizer.pre_path, source_val)
    everything = workdir / "int8-all.onnx"  # kept for the latency comparison
    quantizer.quantize(everything)
    shutil.copyfile(everything, out_path)
    first = accuracy_per_domain(out_path, source_val)
    current, kept, ranking, steps = first, [], [], []
    log(f"INT8 accuracy drop (worst source domain): {_worst_drop(fp32, first):.2f} points")
    if _worst_drop(fp32, current) > budget and max_fallback > 0:
        candidates = quantized_nodes(out_path)
        calibration = quantizer.calibration[:SENSITIVITY_IMAGES]
        log(f"ranking {len(candidates)} quantized layers by sensitivity")
        ranking = rank_sensitivity(quantizer, candidates, calibration, workdir)
        for layer, _ in ranking[:max_fallback]:
            kept.append(layer)
            quantizer.quantize(out_path, exclude=kept)
            current = accuracy_per_domain(out_path, source_val)
            worst = _worst_drop(fp32, current)
            steps.append({"kept": layer, "worst_drop_points": round(worst, 3)})
            log(f"kept {layer} in FP32: worst drop {worst:.2f} points")
            if worst <= budget:
                break
    return BudgetResult(fp32, first, current, kept, ranking, budget,
                        _worst_drop(fp32, current) <= budget, steps)
