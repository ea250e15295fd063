"""rise-edge from Python: the same steps as the commands, returning the records they write.

    import rise_edge

    run = rise_edge.Run.train("demo", {"train.epochs": 2})  # -> Run (run.train_result.table())
    exported = run.export(int8=True)                       # -> ExportResult (export.json's records)
    report = run.bench(domains=["all"])                    # -> BenchReport (report.json as .data)
    for p in run.predict(["photos/"]):                     # streams, one Prediction per image
        print(p.source, p.classes[0], p.probabilities[0])
    child = run.adapt("site_images/", method="adabn")      # -> the adapted child Run

    run = rise_edge.Run.open("runs/pacs_erm_lite0")        # a run trained earlier, by either way

Training is `Run.train`, not a `rise_edge.train` function: `rise_edge.train` is the package of the
training stage (rise_edge/train/), and a function of that name would be shadowed by it.

Each method is the implementation the `rise-edge` command of the same name calls: the command only
parses its options and prints. Bad input raises `rise_edge.UserError` with the one-line message the
command prints (its `exit_code` is the command's exit status); files are written whole or not at
all, exactly as by the commands.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rise_edge.errors import UserError

if TYPE_CHECKING:  # the heavy modules load when a step runs, not on `import rise_edge`
    from rise_edge.bench.driver import BenchReport
    from rise_edge.data.transforms import Preprocessing
    from rise_edge.export.driver import ExportResult
    from rise_edge.predict import Predictions
    from rise_edge.run_dir import TrainedRun
    from rise_edge.serving.bundle import BundleResult
    from rise_edge.train.loop import TrainResult

Overrides = Mapping[str, Any] | Sequence[str]


def override_texts(overrides: Overrides | None) -> tuple[str, ...]:
    """`{"optim.lr": 0.01}` or `["optim.lr=0.01"]` as the `section.key=value` texts of `--set`.

    A Python value is written as JSON, which the recipe reader's YAML reads back as the same value
    (a string stays a string: "off" is not read as False)."""
    if overrides is None:
        return ()
    if isinstance(overrides, str):
        raise UserError(f"overrides {overrides!r}: give a mapping such as {{'optim.lr': 0.01}} or a "
                        "list of 'section.key=value' texts")
    if isinstance(overrides, Mapping):
        texts = []
        for key, value in overrides.items():
            if not isinstance(key, str):
                raise UserError(f"override key {key!r}: expected 'section.key', e.g. 'optim.lr'")
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            try:
                texts.append(f"{key}={json.dumps(value, allow_nan=True)}")
            except TypeError:
                raise UserError(f"override {key}: {type(value).__name__} is not a recipe value "
                                "(numbers, strings, booleans, lists and mappings are)") from None
        return tuple(texts)
    return tuple(str(text) for text in overrides)


def train(recipe: str | Path, overrides: Overrides | None = None, *, run_dir: str | Path | None = None,
          resume: bool = False, progress: bool = True) -> Run:
    """Train a student per `recipe` (a recipe file, or a shipped recipe's name such as "demo" or
    "pacs_erm_lite0") with `overrides` applied; the trained run, its result in `train_result`."""
    from rise_edge.config import load_recipe, resolve_recipe
    from rise_edge.train.loop import train_run

    path = resolve_recipe(recipe)
    result = train_run(load_recipe(path, override_texts(overrides)), recipe_name=path.stem,
                       run_dir=None if run_dir is None else Path(run_dir), resume=resume,
                       progress=progress)
    return Run(Path(result.run_dir), train_result=result)


@dataclass
class Run:
    """A run directory: the hand-off between train, export, bench, predict and adapt.

    `path` is all it holds; what it reads (the student, its records) is read when asked, so a Run
    always sees the folder as it is now."""

    path: Path
    train_result: TrainResult | None = field(default=None, repr=False)  # set by train()
    adapt_record: dict[str, Any] | None = field(default=None, repr=False)  # set by adapt()

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @classmethod
    def train(cls, recipe: str | Path, overrides: Overrides | None = None, *,
              run_dir: str | Path | None = None, resume: bool = False, progress: bool = True) -> Run:
        """Train a student per `recipe` (a recipe file, or a shipped recipe's name such as "demo")
        with `overrides` ({"optim.lr": 0.01} or ["optim.lr=0.01"]) applied; `rise-edge train`."""
        return train(recipe, overrides, run_dir=run_dir, resume=resume, progress=progress)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """The run in `path`, checked as export and bench check it (a folder holding a trained
        student whose header and tensors agree); UserError otherwise."""
        run = cls(Path(path))
        run.trained()
        return run

    def trained(self) -> TrainedRun:
        """The selected student (eval mode, CPU) with its metadata and recipe, read now."""
        from rise_edge.run_dir import open_run

        return open_run(self.path)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.trained().meta.classes

    @property
    def preprocessing(self) -> Preprocessing:
        """What every artefact of the run expects: square resize (no crop), the student's mean/std."""
        return self.trained().meta.preprocessing

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records, as training wrote them (checked on read)."""
        from rise_edge.run_dir import read_jsonl

        return read_jsonl(self.path / "metrics.jsonl")

    def export_record(self) -> dict[str, Any]:
        """export.json's content ({} before the first export), checked field by field."""
        from rise_edge.run_dir import read_export_record

        return read_export_record(self.path, advice=f"re-run `rise-edge export {self.path}`")

    def export(self, formats: Sequence[str] = (), *, overrides: Overrides | None = None,
               data_root: str | Path | None = None, progress: bool = True,
               **flags: Any) -> ExportResult:
        """Make the artefacts `formats` names (default: the recipe's export.formats) into
        RUN/export/; `flags` are `rise-edge export`'s options by their Python names (int8=True,
        fp16, int8_target, calibration_method, calibration_size, accuracy_budget,
        fold_preprocessing, qat="on"/"off", qat_steps), None meaning the recipe's value;
        `overrides` are export.key values. A failed or unavailable artefact is recorded, not
        raised: see the result's `failed` and each record's status."""
        from rise_edge.export.driver import export_run, resolve_export_config

        cfg = resolve_export_config(self.trained(), override_texts(overrides),
                                    formats=list(formats) or None, **flags)
        return export_run(self.path, cfg, progress=progress,
                          data_root=None if data_root is None else os.fspath(data_root))

    def bundle(self, formats: Sequence[str], *, serve: Sequence[str] = (),
               bundle_dir: str | Path | None = None, model_name: str | None = None,
               embedding: bool = False, progress: bool = True) -> BundleResult:
        """A serving bundle ("triton", "deepstream") of what export made (docs/serving.md)."""
        from rise_edge.serving import package_run

        return package_run(self.path, formats, serve=serve, bundle_dir=bundle_dir,
                           model_name=model_name, embedding=embedding, progress=progress)

    def bench(self, *, domains: Sequence[str] = (), engines: Sequence[str] = (),
              batch_sizes: Sequence[int] = (), iterations: int | None = None,
              duration_s: float | None = None, warmup: int | None = None,
              cuda_graphs: bool = False, max_images: int | None = None,
              data_root: str | Path | None = None, site: str | Path | None = None,
              skip_bad_images: bool = False, progress: bool = True,
              command: str | None = None) -> BenchReport:
        """Accuracy per domain and latency of the student and every artefact (or `engines`), written
        to RUN/bench/ and returned; `site`: label-free estimates for a folder of site images."""
        from rise_edge.bench.driver import bench_run, resolve_bench_config

        if iterations is not None and duration_s is not None:
            raise UserError("give --iterations or --duration, not both")
        if skip_bad_images and site is None:
            raise UserError("--skip-bad-images applies to --site images; give --site DIR")
        flags: dict[str, Any] = {
            "domains": tuple(domains) or None, "batch_sizes": tuple(batch_sizes) or None,
            "warmup": warmup, "max_images": max_images, "cuda_graphs": True if cuda_graphs else None,
            "engines": tuple(e.strip() for item in engines for e in item.split(",") if e.strip())
            or None}
        if iterations is not None:
            flags.update(iterations=iterations, duration_s=0.0)
        if duration_s is not None:
            flags["duration_s"] = duration_s
        cfg = resolve_bench_config(self.trained(), **flags)
        return bench_run(self.path, cfg, progress=progress, command=command,
                         data_root=None if data_root is None else os.fspath(data_root),
                         site=site, skip_bad_site=skip_bad_images)

    def predict(self, sources: Iterable[str | Path], *, artefact: str | None = None,
                top_k: int = 5, batch: int = 32, skip_bad_images: bool = False,
                frame_step: int = 1, progress: bool = False) -> Predictions:
        """Classes and probabilities for every image of `sources` (files, folders, globs, .txt
        lists of paths, videos), streamed one Prediction at a time in constant memory, by
        `artefact` (default: the recommended one) with the preprocessing it records."""
        from rise_edge.predict import predict_run

        return predict_run(self.path, sources, artefact=artefact, top_k=top_k, batch=batch,
                           skip_bad=skip_bad_images, frame_step=frame_step, progress=progress)

    def adapt(self, site: str | Path, method: str = "adabn", *, int8_calibration: str = "sources",
              child_dir: str | Path | None = None, skip_bad_images: bool = False,
              data_root: str | Path | None = None, export: bool = True, progress: bool = True,
              command: str = "") -> Run:
        """A child run adapted to the unlabelled images of `site` ("adabn", "t3a", "distill": the
        student distilled from the run's teacher on the site, or "none"),
        exported unless export=False; this run is only read. The child's adapt.json is in
        `adapt_record`, its export in `child.export_record()`."""
        from rise_edge.logs import logger
        from rise_edge.site.child import adapt_run

        if method == "none" and int8_calibration == "sources":
            raise UserError("--method none with --int8-calibration sources would copy the run "
                            "unchanged; give --method adabn|t3a, or --int8-calibration site")
        root = None if data_root is None else os.fspath(data_root)
        child_path, record = adapt_run(
            self.path, site, method, child_dir=child_dir, int8_calibration=int8_calibration,
            skip_bad=skip_bad_images, data_root=root, command=command,
            log=logger("site").info if progress else (lambda line: None))
        child = Run(Path(child_path), adapt_record=record)
        if export:
            child.export(data_root=root, progress=progress,
                         int8=True if int8_calibration == "site" else None)
        return child
