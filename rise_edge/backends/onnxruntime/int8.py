"""INT8 for ONNX Runtime on the CPU: static QDQ quantization, and the accuracy budget.

    quant_pre_process (shape inference + graph optimisation)  ->  quantize_static (QDQ, per-channel
    int8 weights, calibrated activations; shape arithmetic never quantized)  ->  fidelity against
    FP32 on the source domains' validation images (agreement, paired accuracy drop, intervals)  ->
    first/last-layer policy by measurement  ->  while the judge (rise_edge.export.judge) says the
    budget is not met: keep the real layer that adds the most accumulated noise in FP32 (grown from
    the best model so far), re-quantize, re-measure; ship the best model tried, the all-INT8 one
    included.

Calibrated activation ranges are cached (ONNX Runtime's calibration cache) under a name keyed on the
FP32 model's sha256, the calibration set's sha256 and the method, so the budget loop re-quantizes
without re-running calibration, and a changed model, image or method never reuses stale ranges.
"""

from __future__ import annotations

import inspect
import math
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rise_edge.backends.latency import interleaved_ms
from rise_edge.backends.onnxruntime.runner import OnnxRuntimeRunner
from rise_edge.config import CALIBRATION_METHODS
from rise_edge.errors import missing_extra
from rise_edge.export.fidelity import Fidelity, FidelitySet, logits_in_batches, measure_fidelity
from rise_edge.export.judge import JUDGE_IMAGES, order_key, verdict
from rise_edge.export.onnx_graph import tensors_along_graph
from rise_edge.files import cache_key

# export.calibration_method -> onnxruntime.quantization.CalibrationMethod member name
# ONNX Runtime's names for config.CALIBRATION_METHODS.
ORT_CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
assert tuple(ORT_CALIBRATION_METHODS) == CALIBRATION_METHODS



def _ort_quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError:
        raise missing_extra("onnxruntime", "cpu", "INT8 quantization for ONNX Runtime") from None
    return quantization


@dataclass(frozen=True)
class CpuQuantSettings:
    """The INT8 flavour an export target's ONNX Runtime kernels run fast and exactly, and why
    (rise_edge.export.int8_target says what each target is).

    x86: uint8 activations (asymmetric) with symmetric per-channel int8 weights (U8S8). Measured on
    this project's Sapphire Rapids CPU with ORT 1.32 (ResNet-18, batch 1): U8S8 QDQ ~3x faster than
    FP32, S8S8 QDQ no faster than FP32. Without VNNI the weights use 7 bits (reduce_range), as ONNX
    Runtime advises: AVX2's u8*s8 multiply-add saturates int16 with 8-bit weights.
    ARM: symmetric int8 activations (S8S8), which ARM's kernels prefer.
    """

    activation_type: str      # "uint8" | "int8"
    symmetric_activations: bool
    reduce_range: bool
    per_channel: bool
    reason: str
    target: str = "x86-avx2"  # rise_edge.export.int8_target kind these settings are for

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


def cpu_quant_settings(target: str = "auto") -> CpuQuantSettings:
    """ONNX Runtime's INT8 settings for an export target (`auto`: this machine's kind)."""
    from rise_edge.export.int8_target import resolve

    kind = resolve(target)
    if kind == "arm64":
        return CpuQuantSettings("int8", True, False, True, "ARM CPU: symmetric S8S8 QDQ", kind)
    if kind == "x86-vnni":
        return CpuQuantSettings("uint8", False, False, True,
                                "x86 CPU with VNNI: U8S8 QDQ, 8-bit weights", kind)
    return CpuQuantSettings("uint8", False, True, True,
                            "x86 CPU without VNNI: U8S8 QDQ, 7-bit weights (reduce_range)", kind)


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

    def quantize(self, out_path: Path, *, exclude: Sequence[str] = ()) -> None:
        """Write a QDQ model to out_path; the real layers in `exclude` stay FP32, inputs included."""
        q = _ort_quantization()
        # ONNX Runtime's calibration cache (quantize_static's calibration_cache_path) exists from
        # 1.28 on; before it every quantization calibrates again: slower, the same model.
        can_cache = "calibration_cache_path" in inspect.signature(q.quantize_static).parameters
        cached = can_cache and self.cache_path.is_file()
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
                # Shape arithmetic is never quantized: rounding a pad or a size changes what runs.
                nodes_to_exclude=sorted(fp32_regions(self.pre_path, exclude)
                                        | shape_arithmetic_nodes(self.pre_path)) or None,
                calibrate_method=getattr(q.CalibrationMethod, ORT_CALIBRATION_METHODS[self.method]),
                extra_options={"CalibStridedMinMax": stride,
                               "ActivationSymmetric": self.settings.symmetric_activations,
                               "WeightSymmetric": True,
                               "CalibTensorRangeSymmetric": self.settings.symmetric_activations},
                **({"calibration_cache_path": str(self.cache_path if cached else new_cache)}
                   if can_cache else {}),
            )
            if not cached and new_cache.is_file():
                new_cache.replace(self.cache_path)


# Inputs that carry shapes, sizes, pads or axes rather than data: whatever computes them is shape
# arithmetic and must stay exact.
_SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Pad": (1, 2, 3), "Reshape": (1,), "Resize": (1, 2, 3), "Upsample": (1,), "Slice": (1, 2, 3, 4),
    "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2), "Unsqueeze": (1,),
    "Squeeze": (1,), "TopK": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceSum": (1,),
    "Split": (1,), "OneHot": (1,)}
_SHAPE_SOURCES = ("Shape", "Size")
# Layers with weights: the only candidates for an FP32 fallback (Concat or Clip are not layers).
REAL_LAYERS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def shape_arithmetic_nodes(path: Path) -> set[str]:
    """Names of the nodes that compute shapes, sizes or pads (graph_form's docstring says what
    quantizing them did to TF-padded students): nodes whose inputs are all derived from Shape/Size
    outputs and constants, and the constant arithmetic that feeds a shape-, pad- or axis-taking
    input. Data never flows through them, so excluding them leaves every real layer quantized."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    nodes = list(graph.node)  # ONNX graphs are topologically sorted
    constant = {t.name for t in graph.initializer}
    derived: set[str] = set()  # tensors computed from shapes (and constants) only
    marked: set[str] = set()
    for n in nodes:
        inputs = [i for i in n.input if i]
        if n.op_type in _SHAPE_SOURCES:
            derived.update(n.output)
            marked.add(n.name)
        elif all(i in constant or i in derived for i in inputs):
            if any(i in derived for i in inputs):
                derived.update(n.output)
                marked.add(n.name)
            else:  # Constant nodes and arithmetic on constants alone
                constant.update(n.output)
    producer = {o: n for n in nodes for o in n.output}
    stack = [producer[n.input[i]] for n in nodes for i in _SHAPE_INPUTS.get(n.op_type, ())
             if i < len(n.input) and n.input[i] in producer]
    while stack:  # the constant programs that feed shape-taking inputs
        n = stack.pop()
        if n.name in marked or not all(o in constant or o in derived for o in n.output):
            continue
        marked.add(n.name)
        stack += [producer[i] for i in n.input if i in producer]
    return {m for m in marked if m}


def fp32_regions(path: Path, layers: Sequence[str]) -> set[str]:
    """The nodes to leave unquantized so that each real layer in `layers` runs in FP32 on FP32
    inputs: the layer itself and the glue (Add, Relu, pooling, Flatten, ...) that feeds it, back to
    the previous real layers. Excluding the layer alone would still round its input where the glue
    before it is quantized."""
    import onnx

    if not layers:
        return set()
    nodes = list(onnx.load(str(path), load_external_data=False).graph.node)
    producer = {o: n for n in nodes for o in n.output}
    by_name = {n.name: n for n in nodes}
    region: set[str] = set()
    for name in layers:
        if name not in by_name:
            continue
        region.add(name)
        stack = [producer[i] for i in by_name[name].input[:1] if i in producer]
        while stack:
            n = stack.pop()
            if n.name in region or n.op_type in REAL_LAYERS:
                continue
            region.add(n.name)
            stack += [producer[i] for i in n.input if i in producer]
    return {r for r in region if r}


def real_layers(path: Path) -> list[str]:
    """Names of the weighted layers (Conv, Gemm, MatMul) in graph order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in REAL_LAYERS and n.name]


def _session(path: Path) -> OnnxRuntimeRunner:
    """A trial on ONNX Runtime's CPU: the backend's own runner, the session every check uses."""
    return OnnxRuntimeRunner(path, precision="int8", device="cpu")


def logits_of(path: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Logits of an ONNX file on ONNX Runtime's CPU, in batches."""
    return logits_in_batches(_session(path), images, batch)


def onnx_fidelity(reference: dict[str, np.ndarray], model: Path | Callable[[np.ndarray], np.ndarray],
                     fidelity: FidelitySet) -> Fidelity:
    """rise_edge.export.fidelity.measure_fidelity for an ONNX file (run on ONNX Runtime's CPU) or a runner."""
    return measure_fidelity(reference, model if callable(model) else _session(model), fidelity)


# ---------------------------------------------------------------------------------------------------
# Which layers hurt: error accumulated along the graph


def rank_by_accumulated_error(fp32_path: Path, int8_path: Path, images: np.ndarray,
                              input_name: str, candidates: Sequence[str]) -> list[tuple[str, float]]:
    """Rank real layers by the quantization noise each ADDS along the full INT8 graph, most first.

    Both graphs run on the same images; at every layer, the noise-to-signal ratio (NSR = 1/SQNR) of
    its output against FP32 is compared with the NSR at its data input: the difference is what that
    layer (its rounded weights and rounded input) added to the noise it received. Per-tensor errors of
    isolated layers mislead here (a ReLU6 folded into a uint8 range looks exact alone); the
    accumulated error is what separates a harmless layer from a harmful one.
    """
    import onnx

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    layers = [n for n in graph.node if n.name in set(candidates)]
    tensors = sorted({n.input[0] for n in layers} | {n.output[0] for n in layers})
    ref = tensors_along_graph(fp32_path, images, tensors, input_name)
    got = tensors_along_graph(int8_path, images, tensors, input_name)

    def nsr(name: str) -> float:
        if name == input_name or name not in ref or name not in got:
            return 0.0
        r = ref[name].astype(np.float64)
        return float(np.sum((r - got[name]) ** 2) / max(float(np.sum(r ** 2)), 1e-30))

    added = [(n.name, max(nsr(n.output[0]) - nsr(n.input[0]), 0.0)) for n in layers]
    return sorted(added, key=lambda item: -item[1])


def latency_ms(paths: dict[str, Path], image: np.ndarray, rounds: int = 3, iters: int = 15
               ) -> dict[str, float]:
    """Median batch-1 latency per model, measured in this process, the models interleaved round by
    round so a busy neighbour on a shared CPU slows all of them alike."""
    samples = interleaved_ms({name: _session(p) for name, p in paths.items()}, image, rounds, iters)
    return {name: round(statistics.median(v), 3) for name, v in samples.items()}


RANKING_IMAGES = 32        # fidelity images (balanced over source domains) used to rank layers
EDGE_NSR_SHARE = 0.10      # keep the first/last layer in FP32 when it alone adds >= 10 % of the noise


@dataclass
class Tried:
    """One INT8 model the budget step measured."""

    kept_fp32: list[str]
    fidelity: Fidelity

    def agrees(self, min_agreement: float) -> bool:
        """Every source domain's top-1 agreement with FP32 at least `min_agreement` %."""
        return verdict(self.fidelity, 0.0).worst_domain_agreement >= min_agreement

    def order(self, budget: float, min_agreement: float = 0.0) -> tuple[bool, ...]:
        """Smaller is better: rise_edge.export.judge's rule for 'best', with the models that reach
        the agreement target before those that do not, among those equally within the budget."""
        key = order_key(self.fidelity, budget, len(self.kept_fp32))
        return (key[0], not self.agrees(min_agreement), *key[1:])

    def to_record(self, budget: float) -> dict[str, Any]:
        v = verdict(self.fidelity, budget)
        return {"kept_fp32": list(self.kept_fp32), "met": v.met,
                "drop_upper95": v.upper95, "worst_drop_points": round(self.fidelity.worst_drop, 3),
                "mean_agreement": round(self.fidelity.mean_agreement, 3),
                "logit_sqnr_db": round(self.fidelity.logit_sqnr_db, 2)}


@dataclass
class BudgetResult:
    budget: float
    met: bool
    kept_fp32: list[str]
    edge_policy: dict[str, Any]
    all_int8: Fidelity                 # every real layer quantized
    final: Fidelity                    # the model shipped
    tried: list[Tried]
    ranking: list[tuple[str, float]]   # most harmful first ([] when not needed)
    reason: str
    min_agreement: float = 0.0         # the agreement target the fallbacks also worked towards

    def to_record(self) -> dict[str, Any]:
        agreement = verdict(self.final, self.budget).worst_domain_agreement
        return {"budget_points": self.budget, "met": self.met, "kept_fp32_layers": self.kept_fp32,
                "min_agreement_pct": self.min_agreement,
                "agreement_target_met": agreement >= self.min_agreement,
                "judge": verdict(self.final, self.budget).to_record(),
                "judged_on": JUDGE_IMAGES,
                "fidelity_all_int8": self.all_int8.to_record(), "fidelity": self.final.to_record(),
                "fidelity_is": ("selected: the best by the judge's rule of the models tried, on the "
                                "same judge images, so optimistic by selection when more than one "
                                "was tried" if len(self.tried) > 1 else "the only model measured"),
                "edge_policy": self.edge_policy,
                "ranking_method": "noise-to-signal ratio each real layer adds along the full INT8 "
                                  f"graph, on {RANKING_IMAGES} source images, ranked once on the model "
                                  "the fallbacks start from (re-ranking costs two graph runs per "
                                  "step and the order it found rarely changes)",
                "ranking": [{"layer": n, "added_nsr": s} for n, s in self.ranking],
                "tried": [t.to_record(self.budget) for t in self.tried], "chosen": self.reason}


def choose_edge_policy(quantizer: CpuQuantizer, reference: dict[str, np.ndarray], fidelity: FidelitySet,
                       all_int8: Fidelity, workdir: Path) -> tuple[list[str], dict[str, Any]]:
    """Measure whether the first and the last real layer should stay FP32: each is kept in FP32 alone
    and the logit noise compared with the all-INT8 model's; a layer that alone adds at least
    EDGE_NSR_SHARE of the noise stays FP32 (cheap: the stem and the classifier are a few per cent of
    the compute). Source images only."""
    layers = real_layers(quantizer.pre_path)
    if not layers:
        return [], {"layers": {}}
    base_nsr = 10 ** (-all_int8.logit_sqnr_db / 10) if math.isfinite(all_int8.logit_sqnr_db) else 0.0
    keep, record = [], {}
    for role, layer in (("first", layers[0]), ("last", layers[-1])):
        if role == "last" and layer == layers[0]:
            continue  # a one-layer model: already measured as the first
        trial = workdir / f"edge-{role}.onnx"
        quantizer.quantize(trial, exclude=[layer])
        measured = onnx_fidelity(reference, trial, fidelity)
        trial.unlink(missing_ok=True)
        nsr = 10 ** (-measured.logit_sqnr_db / 10) if math.isfinite(measured.logit_sqnr_db) else 0.0
        share = (base_nsr - nsr) / base_nsr if base_nsr > 0 else 0.0
        decision = "fp32" if share >= EDGE_NSR_SHARE and layer not in keep else "int8"
        if decision == "fp32":
            keep.append(layer)
        record[role] = {"layer": layer, "decision": decision, "noise_share": round(share, 4),
                        "logit_sqnr_db_int8": round(all_int8.logit_sqnr_db, 2),
                        "logit_sqnr_db_fp32": round(measured.logit_sqnr_db, 2),
                        "worst_drop_points_fp32": round(measured.worst_drop, 3)}
    record["rule"] = (f"FP32 when keeping the layer in FP32 removes >= {EDGE_NSR_SHARE:.0%} of the "
                      "logit noise of the all-INT8 model on source images")
    return keep, record


def quantize_within_budget(quantizer: CpuQuantizer, out_path: Path, fidelity: FidelitySet,
                           reference: dict[str, np.ndarray], budget: float, max_fallback: int,
                           workdir: Path, log: Callable[[str], None] = lambda _: None,
                           min_agreement: float = 0.0) -> BudgetResult:
    """Quantize, decide the first/last-layer policy by measurement, then, while the judge says the
    `budget` is not met or some source domain's top-1 agreement with FP32 is under
    `min_agreement` %, keep in FP32 the real layer that adds the most accumulated noise, one more
    at a time on top of the best model so far (at most `max_fallback`). Every model tried, the
    all-INT8 one included, is measured on the same judge images against the FP32 `reference`
    logits per domain; the best by the judge's rule is shipped to `out_path`, never merely the
    last. `workdir`/int8-all.onnx keeps the all-INT8 model (for the latency record).
    """
    input_name = quantizer.input_name
    everything = workdir / "int8-all.onnx"
    quantizer.quantize(everything)
    all_int8 = onnx_fidelity(reference, everything, fidelity)
    log(f"INT8 against FP32 on {sum(len(y) for _, y in fidelity.domains.values())} judge images: "
        f"drop {verdict(all_int8, budget).drop:.2f} points (95 % upper bound "
        f"{verdict(all_int8, budget).upper95:.2f}), logit SQNR {all_int8.logit_sqnr_db:.1f} dB")
    kept, edge_record = choose_edge_policy(quantizer, reference, fidelity, all_int8, workdir)
    paths = {(): everything}
    tried = [Tried([], all_int8)]  # the all-INT8 model is always a candidate
    if kept:
        edge_path = workdir / "edge.onnx"
        quantizer.quantize(edge_path, exclude=kept)
        tried.append(Tried(list(kept), onnx_fidelity(reference, edge_path, fidelity)))
        paths[tuple(kept)] = edge_path
        log(f"first/last layer policy: {', '.join(kept)} in FP32: {_judged(tried[-1].fidelity, budget)}")

    def order(t: Tried) -> tuple[bool, ...]:
        return t.order(budget, min_agreement)

    def done(t: Tried) -> bool:
        return verdict(t.fidelity, budget).met and t.agrees(min_agreement)

    best = min(tried, key=order)
    ranking: list[tuple[str, float]] = []
    if not done(best) and max_fallback > 0:
        sample = _balanced_prefix(fidelity, RANKING_IMAGES)
        ranking = rank_by_accumulated_error(quantizer.pre_path, paths[tuple(best.kept_fp32)], sample,
                                            input_name, [n for n in real_layers(quantizer.pre_path)
                                                         if n not in best.kept_fp32])
        log(f"ranked {len(ranking)} layers by the noise they add along the INT8 graph")
        for step, (layer, _) in enumerate(ranking[:max_fallback]):
            if layer in best.kept_fp32:
                continue
            exclude = [*best.kept_fp32, layer]  # grown from the best model so far, not the last
            trial_path = workdir / f"trial-{step}.onnx"
            quantizer.quantize(trial_path, exclude=exclude)
            trial = Tried(exclude, onnx_fidelity(reference, trial_path, fidelity))
            tried.append(trial)
            paths[tuple(exclude)] = trial_path
            log(f"kept {layer} in FP32: {_judged(trial.fidelity, budget)}")
            if order(trial) < order(best):
                best = trial
            if done(best):
                break
    shutil.copyfile(paths[tuple(best.kept_fp32)], out_path)
    met = verdict(best.fidelity, budget).met
    index = tried.index(best)
    reason = (f"model {index + 1} of {len(tried)} tried: "
              + ("within the budget by the judge's rule" if met else "the best by the judge's rule "
                 "of those tried (budget not met)")
              + ("" if best.agrees(min_agreement) else
                 f"; a source domain agrees with FP32 on under {min_agreement:g} % of its images")
              + (f"; {len(best.kept_fp32)} layer(s) in FP32" if best.kept_fp32 else "; all layers INT8"))
    return BudgetResult(budget, met, list(best.kept_fp32), edge_record, all_int8, best.fidelity, tried,
                        ranking, reason, min_agreement)


def _judged(fidelity: Fidelity, budget: float) -> str:
    """One log line's worth of the judge's verdict."""
    v = verdict(fidelity, budget)
    return (f"drop {v.drop:.2f} points, 95 % upper bound {v.upper95:.2f}: "
            + ("within" if v.met else "misses") + f" the {budget:g}-point budget"
            + ("" if v.certifiable else " (decided on the point drops: too few judge images for the bound)"))


def _balanced_prefix(fidelity: FidelitySet, count: int) -> np.ndarray:
    """About `count` images taken evenly from every domain of the fidelity set."""
    per = max(1, count // max(len(fidelity.domains), 1))
    return np.concatenate([x[:per] for x, _ in fidelity.domains.values()])
