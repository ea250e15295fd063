"""What every artefact maker shares: the ONNX graph export, its metadata, and the export session
(the run, the export config, and the data loaded lazily, once: calibration, fidelity and parity
images, the PyTorch reference logits)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rise_edge.config import ExportConfig, recipe_to_dict
from rise_edge.errors import UserError
from rise_edge.export.calibration import (CalibrationSet, balanced_val_samples, load_images,
                                          select_calibration_set, select_fidelity_samples,
                                          select_qat_selection_samples)
from rise_edge.export.fidelity import FidelitySet
from rise_edge.export.onnx_graph import fold_constants
from rise_edge.files import file_sha256
from rise_edge.run_dir import EXPORT_DIR, STUDENT_FILE, TrainedRun, run_splits

INPUT_NAME, OUTPUT_NAME = "images", "logits"
# ONNX metadata_props keys written here and read back by the runners.
META_PREFIX = "rise_edge."
PARITY_IMAGES = 32  # source-val images for ONNX / engine vs PyTorch checks


class FoldedPreprocessing(nn.Module):
    """uint8 (N, S, S, 3) camera pixels -> cast, scale to [0, 1], normalise, to NCHW -> student logits."""

    def __init__(self, student: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.student = student
        std_t, mean_t = torch.tensor(std).view(1, 3, 1, 1), torch.tensor(mean).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", mean_t / std_t)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale - self.shift
        return self.student(images)


def export_graph(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> str:
    """Write `module` as ONNX with a dynamic batch axis; returns the exporter used.

    Constant sub-graphs are folded afterwards (onnx_graph.fold_constants), so pads and quantized
    weights are initializers, not arithmetic. The legacy TorchScript exporter (dynamo=False) comes first, deliberately: for timm CNNs on CPU it
    exports in a fraction of a second where the torch.export-based one takes seconds (0.1 s vs 3.5 s
    for test_resnet, 0.5 s vs 4.3 s for ResNet-18, torch 2.14), and it emits GlobalAveragePool +
    Flatten, which ONNX Runtime's quantizer and TensorRT both handle as pooling, where the dynamo
    exporter writes ReduceMean + Reshape. Both match PyTorch to ~1e-7. The dynamo exporter is the
    fallback when the legacy one fails (ops it cannot trace) or is gone from a future torch.
    """
    module = module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
        fold_constants(path)
        return "torchscript"
    except Exception as legacy_error:  # the exporter raises many types; try the other one
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                  external_data=False, optimize=True)
        except Exception as dynamo_error:
            def first_line(error: Exception) -> str:  # the exporters append whole graph dumps
                return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise UserError(f"ONNX export failed with both exporters: legacy: "
                            f"{first_line(legacy_error)}; dynamo: {first_line(dynamo_error)}") from None
        fold_constants(path)
        return "dynamo"


# Metadata key (rise_edge.*) naming the runtime a Q/DQ graph's placement was made for: a graph
# placed for TensorRT runs on the CPU with its Q/DQ computed as written (the ONNX Runtime runner).
PLACED_FOR = "placed_for"


def placed_for(path: Path) -> str | None:
    """The runtime an ONNX file's Q/DQ placement was made for, from its metadata (None: not said)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    value = next((p.value for p in model.metadata_props if p.key == META_PREFIX + PLACED_FOR), None)
    return json.loads(value) if value is not None else None


def stamp_metadata(path: Path, values: dict[str, Any]) -> None:
    """Set rise_edge.* metadata_props (JSON values) on an ONNX file, in place, and check the model."""
    import onnx

    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, json.dumps(value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


# ---------------------------------------------------------------------------------------------------
# The export session: what every artefact maker shares (data loaded lazily, once)


class ExportSession:
    def __init__(self, run: TrainedRun, cfg: ExportConfig, log: Callable[[str], None],
                 data_root: str | None = None):
        self.run, self.cfg, self.log, self.data_root = run, cfg, log, data_root
        self.dir = run.path / EXPORT_DIR
        self.student_sha256 = file_sha256(run.path / STUDENT_FILE)
        self.pre = run.meta.preprocessing
        self._cache: dict[str, Any] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.previous_calibration: dict[str, Any] = {}

    def path_of(self, name: str) -> Path:
        from rise_edge.backend_table import artefacts

        return self.dir / artefacts()[name].filename

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def splits(self) -> Any:
        """The splits training recorded (images it skipped stay out), re-rooted when data moved."""
        return self._once("splits", lambda: run_splits(self.run, self.data_root))

    @property
    def calibration(self) -> CalibrationSet:
        """The source training images that set the INT8 ranges; for a run adapted with
        `--int8-calibration site`, its site's images instead (rise_edge.site.child)."""
        from rise_edge.export.calibration import site_calibration_set
        from rise_edge.run_dir import read_adapt_record

        def choose() -> CalibrationSet:
            adapted = read_adapt_record(self.run.path)
            if adapted is not None and adapted.get("int8_calibration") == "site":
                return site_calibration_set(adapted, self.cfg.calibration_size,
                                        self.cfg.calibration_seed)
            return select_calibration_set(self.splits, self.cfg.calibration_size,
                                          self.cfg.calibration_seed, self.cfg.calibration_shifted)
        return self._once("calibration", choose)

    @property
    def calibration_images(self) -> np.ndarray:
        def load() -> np.ndarray:
            shifted = len(self.calibration.shifted_indices())
            self.log(f"loading {len(self.calibration.files)} calibration images"
                     + (f" ({shifted} of them shifted)" if shifted else ""))
            return self.calibration.load(self.pre)
        return self._once("calibration_images", load)

    @property
    def fidelity_samples(self) -> dict[str, list[tuple[str, int]]]:
        """The judge's images: source validation images (rise_edge.export.calibration)."""
        return self._once("fidelity_samples", lambda: select_fidelity_samples(
            self.splits, self.cfg.fidelity_images, self.cfg.calibration_seed))

    @property
    def fidelity(self) -> FidelitySet:
        """Source images on which INT8 is judged against FP32 (never the target domain)."""
        def load() -> FidelitySet:
            chosen = self.fidelity_samples
            self.log(f"loading {sum(len(v) for v in chosen.values())} source validation images to "
                     "judge INT8 on")
            return FidelitySet({d: (load_images([p for p, _ in v], self.pre),
                                    np.array([y for _, y in v])) for d, v in chosen.items()})
        return self._once("fidelity", load)

    @property
    def stress(self) -> FidelitySet:
        """The judge's images under the stress set's shifts (rise_edge.export.stress)."""
        from rise_edge.export.stress import load_stressed

        def load() -> FidelitySet:
            chosen = self.fidelity_samples
            return FidelitySet({d: (load_stressed([p for p, _ in v], self.pre),
                                    np.array([y for _, y in v])) for d, v in chosen.items()})
        return self._once("stress", load)

    @property
    def qat_selection(self) -> dict[str, list[tuple[str, int]]]:
        """The training images QAT selects its step on (and does not train on)."""
        return self._once("qat_selection", lambda: select_qat_selection_samples(
            self.splits, self.cfg.fidelity_images, set(self.calibration.files),
            self.cfg.calibration_seed))

    def image_sets_record(self) -> dict[str, Any]:
        """What each INT8 decision was made on, for export.json: counts, what one image is worth,
        and a hash of each list (the lists are disjoint: tested)."""
        import hashlib

        def described(sets: dict[str, list[tuple[str, int]]], role: str) -> dict[str, Any]:
            files = sorted(os.path.relpath(p, self.splits.dataset_dir) for v in sets.values()
                           for p, _ in v)
            return {"role": role, "per_domain": {d: len(v) for d, v in sets.items()},
                    "points_per_image": {d: round(100 / max(len(v), 1), 4) for d, v in sets.items()},
                    "sha256": hashlib.sha256("\n".join(files).encode()).hexdigest()}

        return {"judge": described(self.fidelity_samples, "source validation images every INT8 "
                                   "candidate is judged on"),
                "qat_selection": described(self.qat_selection, "training images outside the "
                                           "calibration set that QAT selects its step on and "
                                           "does not train on"),
                "calibration": {"role": "source training images that set the INT8 ranges",
                                "size": len(self.calibration.files),
                                "sha256": self.calibration.sha256}}

    @property
    def parity_images(self) -> np.ndarray:
        return self._once("parity", lambda: load_images(
            [p for p, _ in balanced_val_samples(self.splits, PARITY_IMAGES)], self.pre))

    def data_reachable(self) -> bool:
        try:
            self.calibration
        except UserError:
            return False
        return True

    def device_calibration(self) -> tuple[np.ndarray, str]:
        """Calibration images and their set's sha256: from the data set when it is here, else from
        the calibration-<sha>.npy an earlier export (on the workstation) left beside the ONNX."""
        if self.data_reachable():
            return self.calibration_images, self.calibration.sha256
        sha = self.previous_calibration.get("sha256", "")
        path = self.dir / f"calibration-{sha[:16]}.npy"
        if not sha or not path.is_file():
            self.calibration  # raises the data set's own UserError, which says what is missing
        return np.load(path).astype(np.float32), sha

    def reference_logits(self) -> np.ndarray:
        from rise_edge.backend_table import backends

        # The PyTorch backend's own runner, found in the table: export never imports a backend.
        reference = backends()["pytorch"].runner
        return self._once("reference", lambda: reference(module=self.run.student, device="cpu")(
            self.parity_images))

    def metadata(self, precision: str, input_kind: str) -> dict[str, Any]:
        meta = self.run.meta
        return {"classes": list(meta.classes), "input_size": self.pre.input_size,
                "mean": list(self.pre.mean), "std": list(self.pre.std),
                "interpolation": self.pre.interpolation, "source_domains": list(meta.source_domains),
                "target_domain": meta.target_domain, "model": meta.model, "precision": precision,
                "input": input_kind, "student_sha256": self.student_sha256,
                "recipe": recipe_to_dict(self.run.recipe)}

    def check_parity(self, candidate: Callable[[np.ndarray], np.ndarray], what: str,
                     tolerance: float | None, *, needs_data: bool = True) -> dict[str, Any]:
        """Max |logit difference| and top-1 agreement vs PyTorch on real source-val images;
        a UserError past `tolerance` (None: record only, as for reduced precisions). With
        needs_data=False (engines built on a device without the data set) a missing data set is
        recorded as 'not checked' instead of failing the artefact."""
        if not needs_data and not self.data_reachable():
            return {"checked": False, "reason": "the data set is not reachable on this machine"}
        reference = self.reference_logits()
        logits = candidate(self.parity_images)
        diff = float(np.abs(logits - reference).max())
        agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
        record = {"images": len(reference), "max_abs_logit_diff": diff,
                  "top1_agreement": round(agreement, 4), "tolerance": tolerance}
        if tolerance is not None and not diff <= tolerance:
            raise UserError(f"{what} disagrees with PyTorch: max |logit difference| {diff:.3g} > "
                            f"export.parity_tolerance {tolerance:g} on {len(reference)} source-val "
                            f"images (top-1 agreement {agreement:.1%}); the artefact was not written")
        return record
