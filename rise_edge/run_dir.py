"""The run directory: the hand-off between `train`, `export` and `bench`.

    <run>/recipe.yaml            the resolved recipe
    <run>/student.safetensors    the selected student (weights + metadata in the header)
    <run>/student.json           the same metadata, readable
    <run>/metrics.jsonl          one line per logged step and per evaluation
    <run>/results.json           accuracy of the selected student per domain
    <run>/resume.safetensors     training state for --resume (model, optimizer, RNG, position)
    <run>/text_embeddings/       cached teacher text embeddings (RISE)
    <run>/export/, <run>/bench/  artefacts and reports
    <run>/tensorboard/           TensorBoard event files, <run>/tracking.json: the MLflow run
                                 (experiment tracking, rise_edge.track; only when the recipe asks)

Every file is written to a temporary name and renamed, so a kill at any moment leaves either the old
or the new file, never half of one. Loading never unpickles: tensors come from safetensors, the rest
from JSON.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rise_edge.config import Recipe, recipe_from_dict
from rise_edge.data.transforms import Preprocessing
from rise_edge.errors import DamagedFile, UserError
from rise_edge.files import (Record, atomic_path, file_in_folder, is_plain_file_name,
                              parse_json_record, read_json_record,
                              read_jsonl_records, read_safetensors, write_json_atomic,
                              write_text_atomic)
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
    fix = "the training state cannot be resumed: train the run again into a new --run-dir"
    tensors, metadata = load_tensors(path, fix)
    if "rng.cpu" not in tensors or not isinstance(metadata.get("param_groups"), list):
        raise DamagedFile(f"{path} lacks the RNG state or the optimizer's parameter groups; {fix}")
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


def load_tensors(path: Path, fix: str = "it was changed or damaged after rise-edge wrote it: "
                 "make it again") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A safetensors file rise-edge wrote (rise_edge.files.read_safetensors) and its JSON metadata;
    `fix` ends the message when it is damaged."""
    tensors, header = read_safetensors(path, fix)
    if _META_KEY not in header:
        raise DamagedFile(f"{path} was not written by rise-edge (no '{_META_KEY}' metadata); {fix}")
    record = parse_json_record(header[_META_KEY], path, fix, f" (its '{_META_KEY}' header)")
    return tensors, record.data


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
    retrain = "the file was changed after training, so train the run again"
    tensors, metadata = load_tensors(weights, retrain)
    try:
        meta = StudentMeta.from_dict(metadata)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DamagedFile(f"{weights}: its header does not describe a student "
                          f"({type(exc).__name__}: {exc}); {retrain}") from None
    if not isinstance(metadata.get("recipe"), dict):
        raise DamagedFile(f"{weights}: its header holds no recipe; {retrain}")
    try:
        recipe = recipe_from_dict(metadata["recipe"], f"{weights} (recipe)")
    except UserError as exc:
        raise DamagedFile(f"{exc}; {retrain}") from None
    student = rebuild_student(meta, recipe)
    try:
        missing, unexpected = student.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor of another shape than the header's student has
        first = " ".join(str(exc).split())[:300]
        raise DamagedFile(f"{weights}: its tensors do not fit the student its header describes "
                          f"({first}); {retrain}") from None
    if missing or unexpected:
        raise DamagedFile(f"{weights} does not match student '{meta.model}': missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}; {retrain}")
    return TrainedRun(path, student.eval(), meta, recipe)


def rebuild_student(meta: StudentMeta, recipe: Recipe) -> Student:
    """The student's architecture with no pretrained weights loaded (they come from the run)."""
    from dataclasses import replace

    backbone, _ = create_backbone(replace(recipe.student, model=meta.model, pretrained="none"))
    return Student(backbone, meta.head)


ADAPT_FILE = "adapt.json"  # an adapted run's record of its parent and site (rise-edge adapt)


ADAPT_CALIBRATIONS = ("sources", "site")  # where an adapted run's INT8 is calibrated


def read_adapt_record(run_dir: Path) -> dict[str, Any] | None:
    """The child's adapt.json, every field its readers act on checked (the parent and its student's
    sha256, the site's folder, images and sha256, the method, the INT8 calibration source); None
    for a run that was trained (not adapted)."""
    path = Path(run_dir) / ADAPT_FILE
    fix = (f"delete the adapted run {Path(run_dir)} and adapt its parent again (rise-edge adapt "
           "PARENT --site DIR)")
    record = read_json_record(path, fix, missing_ok=True)
    if record is None:
        return None
    parent = record.mapping("parent")
    parent.string("run_dir", expected="the parent run directory's path")
    parent.sha256("student_sha256")
    site = record.mapping("site")
    site.string("folder", expected="the site folder's path")
    site.number("images", low=1, integer=True)
    site.sha256("sha256")
    record.string("method")
    record.string("int8_calibration", choices=ADAPT_CALIBRATIONS, optional=True)
    return record.data


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
    fix = "it records the images training used and cannot be rebuilt exactly: re-train the run"
    record = read_json_record(path, fix)
    try:
        return splits_from_record(record.data, data_root)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise DamagedFile(f"{path} is damaged ({type(exc).__name__}: {exc}); {fix}") from None


def read_export_record(run_dir: Path, *, advice: str) -> dict[str, Any]:
    """<run>/export/export.json as a dict ({} when there is none), checked field by field;
    `advice` ends the error for a damaged one."""
    path = run_dir / EXPORT_DIR / EXPORT_JSON
    if not path.is_file():
        return {}
    record = read_json_record(path, advice)
    if record.raw("schema", EXPORT_SCHEMA) != EXPORT_SCHEMA:
        raise DamagedFile(f"{path}: schema {record.raw('schema')!r} is not the export record this "
                          f"rise-edge reads (schema {EXPORT_SCHEMA}); {advice}")
    if not isinstance(record.raw("artefacts", {}), dict) or not all(
            isinstance(r, dict) for r in record.raw("artefacts", {}).values()):
        raise DamagedFile(f"{path} is not an export record (an object whose 'artefacts' maps names "
                          f"to records); it was changed by hand or damaged; {advice}")
    for name, artefact in record.records("artefacts", optional=True).items():
        _check_artefact_record(artefact, name)
    # int8_target and recommended of the wrong type are ignored where they are read (a warning
    # and a recommendation left out); the fields below are acted on, so they are checked.
    for field in ("student", "export_config", "calibration"):
        record.mapping(field, optional=True)
    student = record.mapping("student", optional=True)
    if student is not None:  # what a serving bundle ships beside the model
        student.strings("classes")
        student.strings("source_domains")
        student.string("target_domain")
        student.string("model")
        student.sha256("sha256", optional=True)
        student.mapping("preprocessing")
    config = record.mapping("export_config", optional=True)
    if config is not None:
        config.integers("batch_profile", low=1, optional=True)
    return record.data


EXPORT_SCHEMA = 1
_EXPORT_STATUSES = ("ok", "failed", "skipped", "unavailable", "stale")  # as export writes them


def _check_artefact_record(record: Record, name: str) -> None:
    """One artefact's record as export writes it: bench and the bundle act on these fields, so a
    tampered one stops with a line naming it instead of being benchmarked or shipped as it says."""
    from rise_edge.backend_table import artefacts

    record.string("status", choices=_EXPORT_STATUSES)
    record.string("format", expected="a string")
    precision = record.string("precision", expected="a string")
    known = artefacts().get(name)
    if known is not None and precision != known.precision:
        raise record.damaged("precision", f"'{known.precision}' (what {name} is)")
    # Where the file lies is checked where it is opened (artefact_file): bench reports a record
    # that points outside export/ as a 'tampered' row.
    record.string("path", optional=record.raw("status") != "ok",
                  expected=f"the artefact's file name in {EXPORT_DIR}/")
    record.sha256("sha256", optional=True)
    record.sha256("student_sha256", optional=True)
    for field in ("accuracy_budget", "judge", "stress"):
        record.mapping(field, optional=True)
    record.integers("batch_profile", low=1, optional=True)
    parts = record.mapping("files", optional=True)
    if parts is not None:
        for part in parts.data:
            if not is_plain_file_name(part):
                raise DamagedFile(f"{record.path}: {parts.name(part)} must name a file in "
                                  f"{EXPORT_DIR}/, got {part!r}; it was changed by hand or damaged; "
                                  f"{record.fix}")
            parts.sha256(part)


def artefact_file(export_dir: Path, record: dict[str, Any], name: str | None = None) -> Path:
    """The file of artefact `name` (its record), which export made inside `export_dir`; DamagedFile
    for a record whose path is missing or leads anywhere else (another folder, an absolute path)."""
    return file_in_folder(export_dir, record.get("path"), export_dir / EXPORT_JSON,
                          f"artefacts.{name}.path" if name else "an artefact's path",
                          "re-export with `rise-edge export`")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl as written; a last line cut by a kill is dropped, any other damage is
    one line naming the file and the line."""
    fix = ("move the file aside (training and resuming do not need it; collect and the curves "
           "read it)")
    return [r.data for r in read_jsonl_records(path, fix, torn_tail_ok=True)]


class MetricsLog:
    """Append-only metrics.jsonl; on resume, lines past the checkpoint's step are dropped first.
    `listeners` (the experiment trackers, rise_edge.track) get each record once its line is
    written: what they log is what the file holds."""

    def __init__(self, path: Path, keep: Callable[[dict[str, Any]], bool] | None = None,
                 listeners: Sequence[Callable[[dict[str, Any]], None]] = ()):
        self.path = path
        self.listeners = tuple(listeners)
        if keep is not None:
            kept = [r for r in read_jsonl(path) if keep(r)]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
        for listener in self.listeners:  # the record as the file holds it, read back from its line
            listener(json.loads(line))
