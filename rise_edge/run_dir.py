"""The run directory: the hand-off between `train`, `export` and `bench`.

    <run>/recipe.yaml            the resolved recipe
    <run>/student.safetensors    the selected student (weights + metadata in the header)
    <run>/student.json           the same metadata, readable
    <run>/metrics.jsonl          one line per logged step and per evaluation
    <run>/results.json           accuracy of the selected student per domain
    <run>/resume.safetensors     training state for --resume (model, optimizer, RNG, position)
    <run>/text_embeddings/       cached teacher text embeddings (RISE)
    <run>/export/, <run>/bench/  artefacts and reports

Every file is written to a temporary name and renamed, so a kill at any moment leaves either the old
or the new file, never half of one. Loading never unpickles: tensors come from safetensors, the rest
from JSON.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rise_edge.config import Recipe, recipe_from_dict
from rise_edge.data.transforms import Preprocessing
from rise_edge.errors import UserError
from rise_edge.files import atomic_path, write_json_atomic, write_text_atomic
from rise_edge.train.student import HeadSpec, Student, create_backbone

STUDENT_FILE = "student.safetensors"
RESUME_FILE = "resume.safetensors"
_META_KEY = "rise_edge"  # safetensors header key holding our JSON metadata


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """safetensors file with our JSON metadata in its header, written atomically."""
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={_META_KEY: json.dumps(metadata)})


def save_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        metadata: dict[str, Any]) -> None:
    """Model, optimizer and RNG (CPU, and every CUDA device's once CUDA is in use) in one
    safetensors file (no pickles), with JSON `metadata`."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # GPU resume is exact too
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = rng
    save_tensors(path, tensors, {**metadata, "param_groups": opt["param_groups"]})


def load_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        device: torch.device | None = None) -> dict[str, Any]:
    """Restore what save_training_state wrote (model, optimizer, CPU and CUDA RNG: the CUDA states
    when this machine has as many devices); returns its metadata."""
    tensors, metadata = load_tensors(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = (value.to(device) if device is not None
                                                      and value.dim() else value)
    optimizer.load_state_dict({"state": state, "param_groups": metadata["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([v for _, v in cuda])
    return metadata


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path} is not a readable safetensors file ({exc})") from None
    if _META_KEY not in header:
        raise UserError(f"{path} was not written by rise-edge (no '{_META_KEY}' metadata)")
    try:
        metadata = json.loads(header[_META_KEY])
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: its '{_META_KEY}' header is not valid JSON ({exc.msg} at character "
                        f"{exc.pos}); the file was changed after it was written") from None
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: its '{_META_KEY}' header is not a mapping; the file was changed "
                        "after it was written")
    return tensors, metadata


def versions() -> dict[str, str]:
    import timm

    import rise_edge

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "timm": timm.__version__, "rise_edge": rise_edge.__version__}
    try:  # open_clip has a __version__ only from 2.25 on; its distribution always has one
        from importlib.metadata import PackageNotFoundError, version
        found["open_clip"] = version("open_clip_torch")
    except PackageNotFoundError:
        pass
    return found


# Record key -> the distributions that install it (the GPU build of a package has its own name).
_INFERENCE_PACKAGES = {"numpy": ("numpy",), "onnx": ("onnx",),
                       "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
                       "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
                       "torch_tensorrt": ("torch-tensorrt",), "modelopt": ("nvidia-modelopt",),
                       "matplotlib": ("matplotlib",)}


def software_versions() -> dict[str, str]:
    """rise-edge's versions record plus every inference package present here.

    Read from the installed distributions' metadata, never by importing them: torch_tensorrt raises
    a plain Exception at import where TensorRT's libraries are missing, and a version record must
    not be what stops an export."""
    from importlib.metadata import PackageNotFoundError, version

    found = versions()
    for key, distributions in _INFERENCE_PACKAGES.items():
        for distribution in distributions:
            try:
                found[key] = version(distribution)
                break
            except PackageNotFoundError:
                continue
        else:  # JetPack's TensorRT comes from apt, with no distribution metadata: ask the module
            try:
                found[key] = str(__import__(key).__version__)
            except Exception:  # noqa: BLE001 - absent or broken: the record just lacks it
                pass
    try:
        import onnxruntime
        found["onnxruntime_providers"] = ",".join(onnxruntime.get_available_providers())
    except ImportError:
        pass
    return found


@dataclass(frozen=True)
class StudentMeta:
    """Everything needed to rebuild and use the student without the recipe's data or teacher."""

    model: str
    head: HeadSpec
    preprocessing: Preprocessing
    classes: tuple[str, ...]
    source_domains: tuple[str, ...]
    target_domain: str
    step: int
    selection: dict[str, Any]  # source-val accuracies that selected this checkpoint

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model,
                "head": {"feature_dim": self.head.feature_dim, "num_classes": self.head.num_classes,
                         "embed_dim": self.head.embed_dim, "kind": self.head.kind},
                "preprocessing": self.preprocessing.to_dict(), "classes": list(self.classes),
                "source_domains": list(self.source_domains), "target_domain": self.target_domain,
                "step": self.step, "selection": self.selection}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentMeta:
        return cls(data["model"], HeadSpec(**data["head"]),
                   Preprocessing.from_dict(data["preprocessing"]), tuple(data["classes"]),
                   tuple(data["source_domains"]), data["target_domain"], int(data["step"]),
                   dict(data.get("selection", {})))


def save_student(run_dir: Path, student: Student, meta: StudentMeta, recipe: Recipe) -> None:
    from rise_edge.config import recipe_to_dict

    metadata = {**meta.to_dict(), "recipe": recipe_to_dict(recipe), "versions": versions()}
    save_tensors(run_dir / STUDENT_FILE, student.state_dict(), metadata)
    write_json_atomic(run_dir / "student.json", metadata)


@dataclass
class TrainedRun:
    """A run directory opened for export or bench."""

    path: Path
    student: Student
    meta: StudentMeta
    recipe: Recipe


def open_run(run_dir: str | Path) -> TrainedRun:
    """Load the selected student of a run (eval mode, CPU) with its metadata and recipe."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"run directory {path} not found")
    weights = path / STUDENT_FILE
    if not weights.is_file():
        state = "training was interrupted; continue it with `rise-edge train --resume`" if (
            path / RESUME_FILE).is_file() else "it holds no trained student"
        raise UserError(f"{path} has no {STUDENT_FILE}: {state}")
    tensors, metadata = load_tensors(weights)
    try:
        meta = StudentMeta.from_dict(metadata)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{weights}: its header does not describe a student ({type(exc).__name__}: "
                        f"{exc}); the file was changed after training, so train the run again"
                        ) from None
    if not isinstance(metadata.get("recipe"), dict):
        raise UserError(f"{weights}: its header holds no recipe; the file was changed after training, "
                        "so train the run again")
    recipe = recipe_from_dict(metadata["recipe"], f"{weights} (recipe)")
    student = rebuild_student(meta, recipe)
    try:
        missing, unexpected = student.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor of another shape than the header's student has
        first = " ".join(str(exc).split())[:300]
        raise UserError(f"{weights}: its tensors do not fit the student its header describes "
                        f"({first}); the file was changed after training, so train the run again"
                        ) from None
    if missing or unexpected:
        raise UserError(f"{weights} does not match student '{meta.model}': missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}")
    return TrainedRun(path, student.eval(), meta, recipe)


def rebuild_student(meta: StudentMeta, recipe: Recipe) -> Student:
    """The student's architecture with no pretrained weights loaded (they come from the run)."""
    from dataclasses import replace

    backbone, _ = create_backbone(replace(recipe.student, model=meta.model, pretrained="none"))
    return Student(backbone, meta.head)


ADAPT_FILE = "adapt.json"  # an adapted run's record of its parent and site (rise-edge adapt)


def read_adapt_record(run_dir: Path) -> dict[str, Any] | None:
    """The child's adapt.json, or None for a run that was trained (not adapted)."""
    path = Path(run_dir) / ADAPT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("site"), dict):
            raise ValueError("not an adapt record")
        return record
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); adapt the parent again into a new folder"
                        ) from None


EXPORT_DIR = "export"  # <run>/export/: the artefacts rise-edge export makes
EXPORT_JSON = "export.json"  # their records; rise-edge bench reads them


def run_splits(run: TrainedRun, data_root: str | None = None) -> Any:
    """The DomainSplits training used, from <run>/splits.json (images it skipped stay out), with the
    data set re-rooted at `data_root` when it moved. Runs trained before the record existed rebuild
    the splits from their recipe, as training did."""
    from dataclasses import replace

    from rise_edge.data.domains import SPLITS_FILE, build_splits, splits_from_record

    path = run.path / SPLITS_FILE
    if not path.is_file():
        data = replace(run.recipe.data, root=data_root) if data_root else run.recipe.data
        return build_splits(data, check_images=data.skip_bad_images, progress=False)
    try:
        return splits_from_record(json.loads(path.read_text()), data_root)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError,
            ValueError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {exc}); it records the images "
                        "training used and cannot be rebuilt exactly: re-train the run") from None


def read_export_record(run_dir: Path, *, advice: str) -> dict[str, Any]:
    """<run>/export/export.json as a dict ({} when there is none); `advice` ends the error for bad JSON."""
    path = run_dir / EXPORT_DIR / EXPORT_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); {advice}") from None
    artefacts = data.get("artefacts", {}) if isinstance(data, dict) else None
    if not isinstance(artefacts, dict) or not all(isinstance(r, dict) for r in artefacts.values()):
        raise UserError(f"{path} is not an export record (an object whose 'artefacts' maps names to "
                        f"records); it was changed by hand or damaged; {advice}")
    if data.get("schema", EXPORT_SCHEMA) != EXPORT_SCHEMA:
        raise UserError(f"{path}: schema {data.get('schema')!r} is not the export record this "
                        f"rise-edge reads (schema {EXPORT_SCHEMA}); {advice}")
    for name, record in artefacts.items():
        _check_artefact_record(path, name, record, advice)
    return data


EXPORT_SCHEMA = 1
_EXPORT_STATUSES = ("ok", "failed", "skipped", "unavailable", "stale")  # as export writes them


def _check_artefact_record(path: Path, name: str, record: dict[str, Any], advice: str) -> None:
    """One artefact's record as export writes it: bench and the bundle act on these fields, so a
    tampered one stops with a line naming it instead of being benchmarked or shipped as it says."""
    import re

    from rise_edge.backend_table import artefacts

    def bad(field: str, expected: str) -> UserError:
        return UserError(f"{path}: artefacts.{name}.{field} must be {expected}, got "
                         f"{record.get(field)!r}; it was changed by hand or damaged; {advice}")

    if record.get("status") not in _EXPORT_STATUSES:
        raise bad("status", "one of " + ", ".join(_EXPORT_STATUSES))
    for field in ("format", "precision"):
        if not isinstance(record.get(field), str):
            raise bad(field, "a string")
    known = artefacts().get(name)
    if known is not None and record["precision"] != known.precision:
        raise bad("precision", f"'{known.precision}' (what {name} is)")
    if record["status"] == "ok" and not (isinstance(record.get("path"), str) and record["path"]):
        raise bad("path", f"the artefact's file name in {EXPORT_DIR}/")
    for field in ("sha256", "student_sha256"):
        if record.get(field) is not None and not re.fullmatch(r"[0-9a-f]{64}", str(record[field])):
            raise bad(field, "64 hexadecimal digits")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is gone too
    return lines


class MetricsLog:
    """Append-only metrics.jsonl; on resume, lines past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, keep: Callable[[dict[str, Any]], bool] | None = None):
        self.path = path
        if keep is not None:
            kept = [r for r in read_jsonl(path) if keep(r)]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
