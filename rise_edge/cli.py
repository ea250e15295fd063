"""The `rise-edge` command line: each command parses, calls one library function, says where results went.

Exit status: 0 done; 1 an artefact or engine failed, or sweep collect left a damaged run out; 2 bad
input (one message on stderr, never a traceback); 3 done, but what was asked for includes artefacts
this machine cannot make; 130 interrupted.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" or sys.argv[0].endswith("rise-edge"):  # the program, not an import
    from rise_edge.startup import quiet_ctrl_c_while_starting

    quiet_ctrl_c_while_starting()

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from rise_edge.config import BATCH_MAX, CALIBRATION_METHODS, IMAGES_MAX, INT8_TARGETS, STEPS_MAX
from rise_edge.errors import UserError

EXIT_UNAVAILABLE = 3


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError (and Ctrl-C) into one line and a non-zero exit status."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except BrokenPipeError:  # `rise-edge recipes | head`: the reader left; say nothing more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except ValueError as exc:
            # os calls refuse a path holding a NUL byte with this ValueError; PathParam refuses the
            # command line's, so this one came from a recipe, a record or --set.
            if "embedded null" not in str(exc):
                raise
            click.echo("error: a path holds a NUL byte (\\0), which no file name can hold; check "
                       "the paths in the command line, the recipe and its --set options", err=True)
            sys.exit(2)
        except OSError as exc:  # a full disk, a read-only file system, a folder that is a file...
            from rise_edge.files import written_path

            path = written_path(exc)  # the file being written, never the source of a copy
            where = f" ({path})" if path else ""
            click.echo(f"error: {exc.strerror or exc}{where}; files already in place were kept (each "
                       "is written under a temporary name, then renamed)", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


class PathParam(click.Path):
    """click.Path for every path the command line takes: a path no file system can hold (a NUL
    byte, text the file system's encoding cannot write) is a usage error naming the option, one
    line, instead of a ValueError from deep inside the first os call that meets it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(path_type=Path, **kwargs)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            if "\0" in value:
                self.fail(f"{value!r} holds a NUL byte (\\0), which no file name can hold; give "
                          "the path without it", param, ctx)
            try:
                os.fsencode(value)
            except UnicodeError:
                self.fail(f"{value!r} cannot be written in this file system's encoding "
                          f"({sys.getfilesystemencoding()}); give another path", param, ctx)
        return super().convert(value, param, ctx)


# click 8.2 and later raise this for a group called with no command (it prints the help).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _PluginGroup(click.Group):
    """The command group, with the commands plugins register (the demo's among them) loaded the
    first time a command is looked up or listed."""

    def _plugins(self) -> None:
        from rise_edge.plugins import load_plugins

        try:
            load_plugins()
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._plugins()
        return super().get_command(ctx, cmd_name)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's own usage errors (an unknown command or option, a missing argument, a value out
        of range) as one line, like every other bad input: 'error: ...' and exit status 2."""
        kwargs["standalone_mode"] = False
        from rise_edge.startup import ctrl_c_raises

        ctrl_c_raises()  # from here Ctrl-C is KeyboardInterrupt, which every command handles
        try:
            return super().main(*args, **kwargs)
        except _NO_ARGS_IS_HELP as exc:  # a group given no command: its help, as click prints it
            click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message(), err=True)
            sys.exit(2)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "rise-edge"
            message = " ".join(exc.format_message().split())
            click.echo(f"error: {message} (`{where} --help` says what it takes)", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C at a prompt, or end of input
            click.echo("interrupted", err=True)
            sys.exit(130)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._plugins()
        return super().list_commands(ctx)


@click.group(cls=_PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rise-edge")
@click.option("-q", "--quiet", "quiet_all", is_flag=True,
              help="Only warnings and errors on stderr: no progress lines or bars.")
@click.option("-v", "--verbose", is_flag=True, help="Also debug messages.")
@click.option("--log-file", type=PathParam(dir_okay=False), default=None, metavar="FILE",
              help="Also append every message, time-stamped, to FILE.")
def main(quiet_all: bool, verbose: bool, log_file: Path | None) -> None:
    """Train domain-robust compact classifiers with a CLIP teacher (RISE), export them, benchmark them.

    Messages go to stderr (and --log-file), results to stdout; where stderr is not a terminal,
    progress bars become a line every 30 s ($RISE_EDGE_PROGRESS_S)."""
    import logging

    from rise_edge.logs import configure

    if quiet_all and verbose:
        raise click.UsageError("give --quiet or --verbose, not both")
    try:
        configure(logging.WARNING if quiet_all else logging.DEBUG if verbose else logging.INFO,
                  log_file)
    except OSError as exc:
        raise click.UsageError(f"--log-file {log_file}: {exc.strerror or exc}; give a file in a "
                               "folder you can write to") from None


def register_command(command: click.Command) -> None:
    """Add a plugin's command to `rise-edge` (rise_edge.plugins)."""
    if command.name in main.commands and main.commands[command.name] is not command:
        raise ValueError(f"command '{command.name}' is already registered")
    main.add_command(command)


def _data_root(overrides: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """Take `data.root=PATH` out of export/bench --set options: the one data field that may change
    after training (the data moved); the splits themselves are the ones training recorded."""
    from rise_edge.config import parse_override

    root, rest = None, []
    for text in overrides:
        key, value = parse_override(text)
        if key == "data.root":
            if not isinstance(value, str) or not value:
                raise UserError(f"--set {text}: data.root must be a folder path")
            root = value
        elif key.startswith("data."):
            raise UserError(f"--set {text}: after training only data.root can change (the data "
                            "moved); the splits are the ones training recorded")
        else:
            rest.append(text)
    return root, tuple(rest)


_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
    help="Override a recipe field, e.g. --set optim.lr=0.01 (repeatable).")


@main.command()
@click.argument("recipe", type=PathParam())
@_set_option
@click.option("--resume", is_flag=True, help="Continue the interrupted run of this recipe.")
@click.option("--run-dir", type=PathParam(), default=None,
              help="Run directory (default: <train.output_dir>/<train.run_name>).")
@_user_errors
def train(recipe: Path, overrides: tuple[str, ...], resume: bool, run_dir: Path | None) -> None:
    """Train a student on the source domains of RECIPE (a file, or a shipped recipe's name: see
    `rise-edge recipes`) and test it on the unseen target domain."""
    from rise_edge.api import train as train_api

    result = train_api(recipe, overrides, run_dir=run_dir, resume=resume).train_result
    assert result is not None  # train() always records its result
    click.echo(result.table())
    click.echo(f"run directory: {result.run_dir}")


@main.command()
@_user_errors
def recipes() -> None:
    """List the recipes that ship with rise-edge (train one by name: rise-edge train NAME)."""
    from rise_edge.config import recipe_summary, shipped_recipes

    shipped = shipped_recipes()
    width = max((len(n) for n in shipped), default=0)
    for name, path in shipped.items():
        click.echo(f"{name:<{width}}  {recipe_summary(path)}")
    click.echo(f"\n{len(shipped)} recipes in {next(iter(shipped.values())).parent if shipped else '-'}; "
               "data sets are read from data.root or $RISE_EDGE_DATA")


# -- export command --


@main.command()
@click.argument("run_dir", type=PathParam())
@click.option("--format", "formats", multiple=True, metavar="FORMAT",
              help="Artefacts to make: a backend's format (onnx, tensorrt, ...: see `rise-edge "
                   "backends`) or all; or a serving bundle of what export made: triton, deepstream "
                   "(repeatable; default: the recipe's export.formats).")
@click.option("--fp16/--no-fp16", default=None, help="Also make FP16 artefacts (GPU formats).")
@click.option("--int8/--no-int8", default=None,
              help="Also make INT8 artefacts (ONNX Runtime CPU; TensorRT Q/DQ and engine).")
@click.option("--int8-target", type=click.Choice(INT8_TARGETS), default=None,
              help="The CPU the INT8 artefacts are built for: auto (this machine's kind), x86-vnni "
                   "(8-bit weights), x86-avx2 (7-bit weights: AVX2's u8 x s8 multiply-add saturates "
                   "with 8), arm64; recorded in export.json, checked by bench.")
@click.option("--calibration-method", type=click.Choice(CALIBRATION_METHODS),
              default=None, help="How INT8 activation ranges are calibrated.")
@click.option("--calibration-size", type=click.IntRange(min=1, max=IMAGES_MAX), default=None,
              help="Calibration images, balanced over source domains and classes.")
@click.option("--budget", type=float, default=None,
              help="Largest INT8 accuracy drop (points) against FP32 before layers fall back: met "
              "when the drop's 95 % upper bound over the source validation images, and each source "
              "domain's point drop, are within it.")
@click.option("--fold-preprocessing/--no-fold-preprocessing", default=None,
              help="Also export a graph that takes uint8 NHWC camera frames.")
@click.option("--qat/--no-qat", default=None,
              help="With --int8: also fine-tune with INT8 fake quantization on the source domains "
                   "(towards the FP32 student's logits; export.qat_objective=run: the run's "
                   "objective) and export it as an explicit Q/DQ ONNX.")
@click.option("--qat-steps", type=click.IntRange(min=1, max=STEPS_MAX), default=None,
              help="Quantization-aware fine-tuning steps (default: the recipe's export.qat_steps).")
@click.option("--set", "overrides", multiple=True, metavar="export.KEY=VALUE",
              help="Override an export field, e.g. --set export.opset=17, or give the data's new "
                   "root after it moved: --set data.root=PATH (repeatable).")
@click.option("--serve", "serve", multiple=True, metavar="ARTEFACT",
              help="With --format triton/deepstream: an artefact to serve (onnx-fp32, onnx-int8, "
                   "onnx-int8-qat-cpu, tensorrt-fp32, tensorrt-fp16, tensorrt-int8; repeatable; "
                   "default: FP32, the recommended CPU INT8 and the TensorRT engines export can "
                   "build).")
@click.option("--bundle-dir", type=PathParam(), default=None,
              help="With --format triton/deepstream: where the bundle goes (default: RUN_DIR/bundle; "
                   "an earlier bundle there is replaced whole).")
@click.option("--model-name", default=None,
              help="With --format triton/deepstream: stem of the served models' names (default: the "
                   "run directory's name).")
@click.option("--embedding", is_flag=True, default=False,
              help="With --format triton: serve the classifier's input (the student's embedding) "
                   "beside the logits.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@_user_errors
def export(run_dir: Path, formats: tuple[str, ...], fp16: bool | None, int8: bool | None,
           int8_target: str | None,
           calibration_method: str | None, calibration_size: int | None, budget: float | None,
           fold_preprocessing: bool | None, qat: bool | None, qat_steps: int | None,
           overrides: tuple[str, ...], serve: tuple[str, ...], bundle_dir: Path | None,
           model_name: str | None, embedding: bool, quiet: bool) -> None:
    """Export the trained student of RUN_DIR (ONNX, INT8, TensorRT) into RUN_DIR/export/; with
    --format triton or deepstream, also lay out a serving bundle from what export made."""
    from rise_edge.backends import export_formats
    from rise_edge.serving import split_formats

    artefact_formats, bundle_formats = split_formats(formats, export_formats())
    if not bundle_formats and (serve or bundle_dir or model_name or embedding):
        raise UserError("--serve, --bundle-dir, --model-name and --embedding go with --format "
                        "triton or --format deepstream")
    unavailable: list[str] = []
    if artefact_formats or not bundle_formats:
        unavailable = _export_artefacts(
            run_dir, artefact_formats, quiet, overrides, fp16=fp16, int8=int8, int8_target=int8_target,
            calibration_method=calibration_method, calibration_size=calibration_size,
            accuracy_budget=budget, fold_preprocessing=fold_preprocessing,
            qat=None if qat is None else ("on" if qat else "off"), qat_steps=qat_steps)
    elif overrides or any(v is not None for v in (fp16, int8, int8_target, calibration_method,
                                                  calibration_size, budget, fold_preprocessing,
                                                  qat, qat_steps)):
        raise UserError("export options make artefacts, and --format triton/deepstream only "
                        "packages what export made: add the artefact's format too (e.g. --format "
                        "onnx --format triton) or export first")
    missing: dict[str, str] = {}
    if bundle_formats:
        from rise_edge.api import Run

        bundle = Run(run_dir).bundle(bundle_formats, serve=serve, bundle_dir=bundle_dir,
                                     model_name=model_name, embedding=embedding, progress=not quiet)
        click.echo(bundle.table())
        for note in bundle.notes:
            click.echo(f"note: {note}", err=True)
        click.echo(f"bundle: {bundle.path} (manifest.json; on the device: ./build_engine.sh)")
        missing = bundle.missing
    if unavailable:
        click.echo(f"note: {', '.join(unavailable)} cannot be made on this machine (reasons "
                   "above); the other artefacts are done", err=True)
    if unavailable or missing:  # scripts must notice that what they asked for was not made
        sys.exit(EXIT_UNAVAILABLE)


def _export_artefacts(run_dir: Path, formats: list[str], quiet: bool, overrides: tuple[str, ...],
                      **flags: Any) -> list[str]:
    """Run export as asked; exit 1 when an artefact failed; returns the unavailable ones."""
    from rise_edge.api import Run

    data_root, overrides = _data_root(overrides)
    result = Run(run_dir).export(formats, overrides=overrides, data_root=data_root,
                                 progress=not quiet, **flags)
    cfg = result.config
    click.echo(result.table())
    click.echo(f"artefacts and metadata: {result.path}")
    for name, judged in result.recommended.get("candidates", {}).items():
        if name in result.attempted:
            click.echo(f"{name}: {judged['verdict']}")
    overall = result.recommended.get("int8")
    if overall:
        click.echo(f"recommended INT8: {overall} (export.json's `recommended`)")
    elif result.recommended.get("candidates"):
        click.echo("no INT8 artefact is recommended (the verdicts above say why); FP32 stays the "
                   "one to ship", err=True)
    ptq = result.artefacts.get("onnx-int8", {})
    if ptq.get("status") == "ok" and not ptq["accuracy_budget"]["met"] and cfg.qat == "off":
        judged = ptq["accuracy_budget"].get("judge", {})
        click.echo(f"note: post-training INT8 misses the accuracy budget (drop 95 % upper bound "
                   f"{judged.get('drop_upper95', float('nan')):.2f} > {cfg.accuracy_budget:g} "
                   "points on the source validation images); quantization-aware "
                   f"fine-tuning usually recovers it: rise-edge export {run_dir} --int8 --qat",
                   err=True)
    if result.failed:
        click.echo(f"error: {len(result.failed)} artefact(s) failed: {', '.join(result.failed)}",
                   err=True)
        sys.exit(1)
    return [n for n in result.attempted if result.artefacts[n]["status"] == "unavailable"]


@main.command("backends")
@_user_errors
def list_backends() -> None:
    """The export backends, their artefacts, and whether this machine can make and run them."""
    from rise_edge.backend_table import backends, why_unavailable

    for backend in backends().values():
        if not backend.exportable:
            continue
        reason = backend.unavailable()
        click.echo(f"{backend.format} (bench: {backend.name}): {backend.summary}")
        click.echo(f"  {'available here' if reason is None else 'not here: ' + reason}")
        for artefact in backend.artefacts:
            why = why_unavailable(artefact.name)
            click.echo(f"  {artefact.name:<22} {artefact.precision:<5} {artefact.filename:<32} "
                       f"{'ok' if why is None else 'unavailable'}")
    click.echo("triton, deepstream: serving bundles of what export made (rise-edge export RUN "
               "--format triton; docs/serving.md)")


# -- bench command --


@main.command()
@click.argument("run_dir", type=PathParam())
@click.option("--domain", "domains", multiple=True, metavar="NAME",
              help="Domain to score (repeatable), or 'all' (default: the run's target domain).")
@click.option("--engines", multiple=True, metavar="NAME[,NAME...]",
              help="pytorch (always run: the reference), a backend (see `rise-edge backends`), or an "
                   "artefact name from export.json such as onnx-int8 (default: every artefact).")
@click.option("--batch", "batch_sizes", multiple=True, type=click.IntRange(min=1, max=BATCH_MAX),
              help="Batch size to time (repeatable; default: the recipe's bench.batch_sizes, 1 and 32).")
@click.option("--iterations", type=click.IntRange(min=1, max=STEPS_MAX), default=None,
              help="Timed runs per batch size.")
@click.option("--duration", type=click.FloatRange(min=0, max=7 * 24 * 3600, min_open=True),
              default=None,
              help="Time each batch size for this many seconds instead of a number of runs.")
@click.option("--warmup", type=click.IntRange(min=0, max=STEPS_MAX), default=None, help="Untimed runs first.")
@click.option("--cuda-graphs", is_flag=True, default=False,
              help="Also time CUDA-graph replay where the runner allows it (GPU).")
@click.option("--max-images", type=click.IntRange(min=0, max=IMAGES_MAX), default=None,
              help="Score at most this many images per domain (a seeded subset; 0: all).")
@click.option("--set", "overrides", multiple=True, metavar="data.root=PATH",
              help="The data set's new root, when it moved since training.")
@click.option("--site", type=PathParam(), default=None, metavar="DIR",
              help="A folder of unlabelled site images (any layout): label-free accuracy "
                   "estimates, predicted classes and confidence for every artefact.")
@click.option("--skip-bad-images", is_flag=True, default=False,
              help="With --site: leave unreadable site images out (listed) instead of refusing.")
@click.option("--quiet", is_flag=True, help="No progress lines or bars.")
@_user_errors
def bench(run_dir: Path, domains: tuple[str, ...], engines: tuple[str, ...],
          batch_sizes: tuple[int, ...], iterations: int | None, duration: float | None,
          warmup: int | None, cuda_graphs: bool, max_images: int | None,
          overrides: tuple[str, ...], site: Path | None, skip_bad_images: bool, quiet: bool) -> None:
    """Accuracy per domain and latency of every artefact of RUN_DIR; report in RUN_DIR/bench/.

    With --site DIR, also what each artefact would do at a site whose images have no labels:
    estimates of its accuracy there (ATC, ATC after temperature scaling, difference of
    confidences, teacher agreement), listed by their measured error, each with its sampling
    spread or bound, and a flag when the site looks unlike every source domain."""
    from rise_edge.api import Run

    data_root, rest = _data_root(overrides)
    if rest:
        raise UserError(f"--set {rest[0]}: bench takes only --set data.root=PATH; its own settings "
                        "are flags (see rise-edge bench --help)")
    report = Run(run_dir).bench(domains=domains, engines=engines, batch_sizes=batch_sizes,
                                iterations=iterations, duration_s=duration, warmup=warmup,
                                cuda_graphs=cuda_graphs, max_images=max_images, data_root=data_root,
                                site=site, skip_bad_images=skip_bad_images, progress=not quiet)
    click.echo(report.table())
    click.echo(f"report: {report.path / report.data['files']['markdown']} "
               f"(+ {', '.join(f for k, f in report.data['files'].items() if k != 'markdown')})")
    if report.failed:
        click.echo(f"error: {len(report.failed)} engine(s) failed: {', '.join(report.failed)}", err=True)
        sys.exit(1)


@main.command()
@click.argument("run_dir", type=PathParam())
@click.argument("sources", metavar="SOURCE...", nargs=-1, required=True, type=PathParam())
@click.option("--artefact", default=None, metavar="NAME",
              help="pytorch or an artefact of export.json, e.g. onnx-int8 (default: export's "
                   "recommended INT8, else onnx-fp32, else pytorch).")
@click.option("--top-k", type=click.IntRange(min=1, max=100_000), default=5, show_default=True,
              help="Classes per image, most likely first.")
@click.option("--batch", type=click.IntRange(min=1, max=BATCH_MAX), default=32, show_default=True,
              help="Images per inference call.")
@click.option("--output", type=PathParam(), default=None, metavar="FILE",
              help="Write the predictions to FILE (.csv or .jsonl: the format from its suffix), "
                   "whole or not at all, instead of stdout.")
@click.option("--format", "fmt", type=click.Choice(["terminal", "csv", "jsonl"]), default=None,
              help="Output format (default: from --output's suffix, else terminal lines).")
@click.option("--skip-bad-images", is_flag=True, default=False,
              help="Leave unreadable images out (listed at the end) instead of refusing.")
@click.option("--frame-step", type=click.IntRange(min=1, max=1_000_000), default=1,
              show_default=True, help="Videos: classify every N-th frame.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def predict(run_dir: Path, sources: tuple[Path, ...], artefact: str | None, top_k: int, batch: int,
            output: Path | None, fmt: str | None, skip_bad_images: bool, frame_step: int,
            quiet: bool) -> None:
    """Classify images with an artefact of RUN_DIR: top-k classes and probabilities per image.

    SOURCE: image files, folders (recursively), quoted glob patterns ('photos/**/*.jpg'), .txt
    lists of paths (one per line) and videos (.mp4 .avi .mov .mkv .webm, frame by frame: needs
    pip install 'rise-edge[video]'), streamed in constant memory; see docs/predict.md."""
    from rise_edge.api import Run
    from rise_edge.predict.writers import check_output, open_output, output_format

    fmt = output_format(output, fmt)
    check_output(output, run_dir)
    predictions = Run(run_dir).predict(sources, artefact=artefact, top_k=top_k, batch=batch,
                                       skip_bad_images=skip_bad_images, frame_step=frame_step,
                                       progress=not quiet)
    for warning in predictions.warnings:
        click.echo(f"warning: {warning}", err=True)
    with open_output(output, fmt, predictions.top_k) as write:
        for prediction in predictions:
            write(prediction)
    rate = predictions.images_per_s
    click.echo(f"{predictions.images} images in {predictions.seconds:.2f} s "
               f"({rate or 0:.1f} images/s) with {predictions.artefact} on {predictions.device}"
               + (f"; predictions: {output}" if output else ""), err=True)
    if predictions.skipped:
        click.echo(f"skipped {len(predictions.skipped)} unreadable image(s) (--skip-bad-images):",
                   err=True)
        for source, why in predictions.skipped[:20]:
            click.echo(f"  {source}: {why}", err=True)
        if len(predictions.skipped) > 20:
            click.echo(f"  and {len(predictions.skipped) - 20} more", err=True)


# -- adapt command --


@main.command()
@click.argument("run_dir", type=PathParam())
@click.option("--site", type=PathParam(), required=True, metavar="DIR",
              help="The folder of the site's unlabelled images (any layout).")
@click.option("--method", type=click.Choice(["adabn", "t3a", "distill", "none"]), default="adabn",
              show_default=True,
              help="adabn: BatchNorm statistics re-estimated on the site; t3a: the classifier "
                   "re-fit from the site's pseudo-prototypes; distill: the student fine-tuned "
                   "against the run's teacher on the site's images with replay of the source "
                   "images, the step chosen by agreement with the teacher on held-out site images "
                   "(KD and RISE runs; minutes); none: unchanged (with --int8-calibration site: "
                   "INT8 calibrated on the site only).")
@click.option("--int8-calibration", type=click.Choice(["sources", "site"]), default="sources",
              show_default=True, help="Calibrate the child's INT8 on the source images or the site's.")
@click.option("--run-dir", "child_dir", type=PathParam(), default=None,
              help="Where the adapted run goes (default: beside RUN_DIR, named by method and site).")
@click.option("--no-export", is_flag=True, default=False, help="Adapt only; export later.")
@click.option("--skip-bad-images", is_flag=True, default=False,
              help="Leave unreadable site images out (listed) instead of refusing.")
@click.option("--set", "overrides", multiple=True, metavar="data.root=PATH",
              help="The data set's new root, when it moved since training.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@_user_errors
def adapt(run_dir: Path, site: Path, method: str, int8_calibration: str, child_dir: Path | None,
          no_export: bool, skip_bad_images: bool, overrides: tuple[str, ...], quiet: bool) -> None:
    """Adapt RUN_DIR to a site's unlabelled images into a new child run, then export it.

    RUN_DIR is never changed. The child names its parent and the site images' hash (adapt.json);
    `rise-edge bench CHILD --site DIR` shows it beside its parent (before-adapt)."""
    import shlex

    from rise_edge.api import Run

    data_root, rest = _data_root(overrides)
    if rest:
        raise UserError(f"--set {rest[0]}: adapt takes only --set data.root=PATH")
    adapted = Run(run_dir).adapt(site, method, int8_calibration=int8_calibration,
                                 child_dir=child_dir, skip_bad_images=skip_bad_images,
                                 data_root=data_root, export=False, progress=not quiet,
                                 command=shlex.join(["rise-edge", *sys.argv[1:]]))
    child, record = adapted.path, adapted.adapt_record
    assert record is not None  # adapt() always records adapt.json's content
    before, after = (record["estimates"][k] for k in ("before", "after"))
    if before and after and "error" not in before and "error" not in after:
        click.echo("label-free estimates on the site (top-1 %; spread: sampling noise only, bound: "
                   "the teacher's error either side; docs/site.md gives each one's measured error):")
        later = {e["method"]: e for e in after["estimates"]}  # paired by name: the order is measured
        for b in before["estimates"]:
            a = later.get(b["method"])
            if a is None:
                continue
            click.echo(f"  {b['method']:<18} before {b['estimate']:5.1f} ({b['interval_kind']} "
                       f"{b['interval'][0]:.1f}-{b['interval'][1]:.1f})  after {a['estimate']:5.1f} "
                       f"({a['interval_kind']} {a['interval'][0]:.1f}-{a['interval'][1]:.1f})")
    elif before is None or after is None:
        click.echo("note: no estimates: the run's source validation images are not readable here "
                   "(--set data.root=PATH)", err=True)
    else:
        click.echo(f"note: no estimates: {(before.get('error') or after.get('error'))}", err=True)
    click.echo(f"adapted run: {child}")
    if not no_export:
        _export_artefacts(child, [], quiet, (f"data.root={data_root}",) if data_root else (),
                          int8=True if int8_calibration == "site" else None)
    click.echo(f"next: rise-edge bench {child} --site {site}")


# -- sweep commands --


class _SweepGroup(click.Group):
    """`rise-edge sweep SWEEP.yaml` runs a sweep; `rise-edge sweep collect DIR` tabulates one."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands:
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)


@main.group(cls=_SweepGroup)
def sweep() -> None:
    """Run the DomainBed protocol: every target x seed x grid point of SWEEP.yaml (rise-edge sweep
    SWEEP.yaml), then tabulate it (rise-edge sweep collect DIR)."""


@sweep.command("run", hidden=True)
@click.argument("sweep_file", metavar="SWEEP.yaml", type=PathParam())
@click.option("--launcher", type=click.Choice(["local", "submitit-local", "slurm"]), default="local",
              show_default=True, help="local: a pool of processes here; slurm: jobs through "
              "submitit; submitit-local: submitit's local executor (the SLURM code path, here).")
@click.option("--workers", type=click.IntRange(min=1, max=1024), default=1, show_default=True,
              help="Runs at once (local pool and submitit-local; SLURM's array parallelism).")
@click.option("--threads", type=click.IntRange(min=0, max=4096), default=0,
              help="CPU threads per run (default: the cores divided between the workers; 4 per "
              "SLURM job).")
@click.option("--gpus", default="", metavar="ID[,ID...]",
              help="GPUs for the local pool, one per run in turn (CUDA_VISIBLE_DEVICES).")
@click.option("--gpus-per-job", type=click.IntRange(min=0, max=64), default=None, metavar="N",
              help="--launcher slurm only: GPUs each run's job asks for (default: 1 when the sweep's "
              "recipes train on train.device auto or cuda, none when on cpu).")
@click.option("--mem", default=None, metavar="SIZE",
              help="--launcher slurm only: memory of each run's job, e.g. 32G or 500M (default: the "
              "partition's).")
@click.option("--partition", "--slurm-partition", "partition", default=None, metavar="NAME",
              help="--launcher slurm only: the SLURM partition to submit to (default: the cluster's).")
@click.option("--timeout-min", type=click.IntRange(min=1), default=24 * 60, show_default=True,
              help="Time limit per run, in minutes (submitit launchers).")
@_user_errors
def sweep_run(sweep_file: Path, launcher: str, workers: int, threads: int, gpus: str,
              gpus_per_job: int | None, mem: str | None, partition: str | None,
              timeout_min: int) -> None:
    """Run every unfinished run of SWEEP.yaml (finished runs are skipped, interrupted ones resume)."""
    from rise_edge.sweep.launch import launch, load_sweep, slurm_settings

    # The job options are checked before the sweep file: a typo costs no recipe loading.
    slurm = slurm_settings(launcher, timeout_min=timeout_min, partition=partition, mem=mem,
                           gpus_per_job=gpus_per_job)
    spec = load_sweep(sweep_file)
    result = launch(spec, sweep_file, launcher=launcher, workers=workers, threads=threads,
                    gpus=[g for g in gpus.split(",") if g], slurm=slurm,
                    log=lambda line: click.echo(line, err=True))
    click.echo(f"{len(result.finished)} run(s) done, {len(result.skipped)} already finished, "
               f"{len(result.failed)} failed, in {result.seconds / 60:.1f} min; runs in "
               f"{spec.output_dir}; tables: rise-edge sweep collect {spec.output_dir}")
    if result.failed:
        for name, where in result.failed.items():
            click.echo(f"error: {name} failed; its log: {where}", err=True)
        sys.exit(1)


@sweep.command("collect")
@click.argument("folder", metavar="DIR", type=PathParam())
@_user_errors
def sweep_collect(folder: Path) -> None:
    """Tables of a sweep's runs: per target domain and their average, mean ± SE over seeds, selected
    on training-domain validation, with the oracle beside it (results.{md,csv,json,png} in DIR)."""
    from rise_edge.sweep.collect import collect, to_markdown

    data = collect(folder)
    click.echo(to_markdown(data))
    click.echo(f"written: {folder}/results.md, results.csv, results.json, results.png")
    for name, why in data["damaged"].items():  # left out of the tables: said, and exit status 1
        click.echo(f"warning: run {name} left out of the tables: {why}", err=True)
    if data["damaged"]:
        sys.exit(1)


# -- teacher-view cache commands --


@main.group("teacher-cache")
def teacher_cache() -> None:
    """The teacher-view cache (docs/teacher-cache.md): build it for a recipe or a sweep, or say what
    it holds."""


def _cache_recipes(target: Path, overrides: tuple[str, ...]) -> list[Any]:
    """The recipes TARGET makes: a sweep file's runs (a YAML mapping with 'base'), else one recipe."""
    from rise_edge.config import load_recipe, read_yaml_file, resolve_recipe

    if target.is_file() and target.suffix in (".yaml", ".yml"):
        raw = read_yaml_file(target, "a recipe or sweep file")
        if isinstance(raw, dict) and "base" in raw:
            from rise_edge.sweep.launch import expand, load_sweep

            return [load_recipe(s.recipe, [*s.overrides, *overrides]) for s in expand(load_sweep(target))]
    return [load_recipe(resolve_recipe(target), overrides)]


def _cache_command(target: Path, overrides: tuple[str, ...], fill: bool) -> None:
    from rise_edge.train.cache_build import caches_for, describe

    records = caches_for(_cache_recipes(target, overrides), fill=fill,
                         log=lambda line: click.echo(line, err=True))
    if not records:
        raise UserError(f"{target}: no run reads a teacher-view cache (it needs teacher.cache on or "
                        "auto, teacher.cache_views > 0, and a method that distils, loss.w_kd > 0); "
                        "e.g. --set teacher.cache=auto --set teacher.cache_views=20")
    for record in records:
        click.echo(describe(record))


@teacher_cache.command("build")
@click.argument("target", metavar="RECIPE|SWEEP", type=PathParam())
@_set_option
@_user_errors
def teacher_cache_build(target: Path, overrides: tuple[str, ...]) -> None:
    """Embed every training view the runs of RECIPE or SWEEP read (only the missing ones)."""
    _cache_command(target, overrides, fill=True)


@teacher_cache.command("info")
@click.argument("target", metavar="RECIPE|SWEEP", type=PathParam())
@_set_option
@_user_errors
def teacher_cache_info(target: Path, overrides: tuple[str, ...]) -> None:
    """Where the teacher-view caches of RECIPE or SWEEP are, what they hold and what is missing."""
    _cache_command(target, overrides, fill=False)


# -- data commands --


@main.group()
def data() -> None:
    """Published data sets: download them into the data root, see which are there."""


def _root_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--root", type=PathParam(), default=None,
                        help="Data root (default: $RISE_EDGE_DATA).")(function)


def _resolve_root(root: Path | None) -> Path:
    from rise_edge.data.domains import DATA_ENV

    text = str(root) if root is not None else os.environ.get(DATA_ENV, "")
    if not text:
        raise UserError(f"no data root: give --root DIR or set {DATA_ENV} (recipes read data sets "
                        "from the same place)")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        given = "--root" if root is not None else DATA_ENV
        raise UserError(f"data root {path} ({given}) is a file, not a folder; point it at the folder "
                        "that holds (or will hold) the data sets")
    return path


@data.command("download")
@click.argument("name", metavar="NAME")
@_root_option
@click.option("--archive", "archives", multiple=True, type=PathParam(),
              help="An archive you already downloaded (by its published name, e.g. PACS.zip), used "
                   "instead of fetching it (repeatable).")
@click.option("--mirror", default=None, metavar="URL",
              help="Fetch each archive from URL/<archive name> instead of its public source.")
@click.option("--keep-archives", is_flag=True, help="Keep the downloaded archives after extracting.")
@click.option("--split-lists", "split_lists", type=PathParam(), default=None,
              metavar="PATH", help="A folder with the official split lists you already have "
              "(PACS: <domain>_{train,crossval}_kfold.txt), checked and copied instead of fetched.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_user_errors
def download(name: str, root: Path | None, archives: tuple[Path, ...], mirror: str | None,
             keep_archives: bool, split_lists: Path | None, quiet: bool) -> None:
    """Download data set NAME (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet) into the data root,
    in the layout recipes read, with its official split lists (PACS); an interrupted download
    resumes when run again."""
    from rise_edge.data.download import download_dataset

    result = download_dataset(name, _resolve_root(root), mirror=mirror, archives=archives,
                              keep_archives=keep_archives, progress=not quiet,
                              split_lists=split_lists)
    if result.already_present:
        click.echo(f"{result.dataset} is already complete in {result.path}; nothing downloaded")
    else:
        for filename, info in result.archives.items():
            origin = "published" if info["published"] else "recorded at first download"
            click.echo(f"{filename}: {info['bytes']:,} bytes, sha256 {info['sha256']} ({origin})")
        click.echo(f"{result.dataset} ready in {result.path}")
    lists = result.split_lists
    if lists and lists["how"] != "missing":  # missing: a warning below says why and what to run
        how = {"present": "already there, left as they are",
               "fetched": f"{lists.get('files')} files fetched, each matching its pinned sha256",
               "given": f"{lists.get('files')} files checked and copied from --split-lists"}
        click.echo(f"split lists in {lists['path']} ({how[str(lists['how'])]})")
    if result.after:
        click.echo(f"note: {result.after}")
    for warning in result.warnings:  # the data set is usable: exit status 0
        click.echo(f"warning: {warning}", err=True)


@data.command("list")
@_root_option
@_user_errors
def list_data(root: Path | None) -> None:
    """The data sets rise-edge knows, and whether each is complete under the data root."""
    from rise_edge.data.domains import KNOWN_DATASETS
    from rise_edge.data.download import SOURCES, missing_parts

    where = _resolve_root(root)
    for name, source in SOURCES.items():
        known = KNOWN_DATASETS[name]
        path = where / known.folder
        if not path.is_dir():
            state = f"not downloaded (rise-edge data download {name})"
        else:
            missing = missing_parts(path, known)
            state = f"incomplete: missing {', '.join(missing[:3])}" if missing else "complete"
        lists = source.split_lists
        if lists is not None:  # what the shipped recipes' data.split_lists reads
            have = all((where / lists.folder / f).is_file() for f, _ in lists.sha256)
            state += (f"; split lists in {where / lists.folder}" if have else
                      f"; split lists missing (rise-edge data download {name} fetches them)")
        click.echo(f"{name:<15} {len(known.domains)} domains  {path}: {state}")


if __name__ == "__main__":
    # Run as `python -m rise_edge.cli`, this file is `__main__`, a second copy of the module: plugins
    # register their commands on rise_edge.cli's group (the demo's included), so run that one.
    from rise_edge.cli import main as installed_main

    installed_main()
