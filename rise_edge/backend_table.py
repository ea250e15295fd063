"""The backend registry: one entry per deployable format, saying everything export and bench need.

A backend declares
  - its format (`rise-edge export --format X`; the "format" of its records in export.json) and its
    bench name (`rise-edge bench --engines NAME`, with aliases);
  - its artefacts (name, precision, file, what each needs first, and the function that makes it from
    an ExportSession), and which of them an export config asks for (`plan`);
  - its runner (path -> images -> logits), the device it runs on, and why this machine cannot make or
    run its artefacts (one sentence), or None when it can.

export, bench, the command line and the latency clocks read this table; nothing else lists formats.

Words, one meaning each: a *backend* is a format with its runner (this table); an *artefact* is one
file export made (export.json); a *runner* is a loaded artefact that maps images to logits; an
*engine* is a row of bench's report, the PyTorch reference or one artefact run by its backend
(`bench --engines` picks rows); a *TensorRT engine* is the serialized file TensorRT builds.
Adding a backend is one module that defines `BACKEND` plus its name in BUILT_IN (or, from outside
rise-edge, a `rise_edge.plugins` entry point calling `register_backend`).

The table sits in the core, below every stage: the export driver and bench find makers and runners
here without importing rise_edge.backends, whose modules import the export stage's session, graph
forms and judge. Built-in backends are loaded by name when the table is first read, as plugins are.
rise_edge.backends re-exports these names.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rise_edge.errors import UserError

if TYPE_CHECKING:
    from rise_edge.backends.base import Runner
    from rise_edge.config import ExportConfig
    from rise_edge.export.session import ExportSession

# Built-in backends in table order (bench rows and export.json follow it).
BUILT_IN = ("pytorch", "onnxruntime", "tensorrt", "torch_tensorrt", "openvino")


@dataclass(frozen=True)
class Artefact:
    """One file export can make. `make(session, tmp)` writes it to `tmp` and returns its record."""

    name: str                  # export.json key, also a bench row name
    runs_on: str               # format of the backend whose runner loads it
    precision: str
    filename: str
    target: str                # what it is meant to run on, in words
    make: Callable[[ExportSession, Path], dict[str, Any]]
    needs: tuple[str, ...] = ()
    # Why this machine cannot MAKE it when the backend could run it (e.g. a missing quantizer).
    unavailable: Callable[[], str | None] | None = None


@dataclass(frozen=True)
class Backend:
    format: str                # export --format name, export.json "format" of its artefacts
    name: str                  # bench name (the engine column)
    summary: str
    runner: Callable[..., Runner]               # (path, *, precision, device) -> Runner
    devices: tuple[str, ...]                    # devices its runner takes (`device=`), the first the
                                                # default; one device: the runner takes no `device`
    unavailable: Callable[[], str | None]       # why it cannot make or run artefacts here, or None
    artefacts: tuple[Artefact, ...] = ()
    plan: Callable[[ExportConfig], list[str]] = field(default=lambda cfg: [])
    aliases: tuple[str, ...] = ()
    exportable: bool = True    # False for the PyTorch reference


_BACKENDS: dict[str, Backend] = {}
_ARTEFACTS: dict[str, Artefact] = {}
_loaded = False


def register_backend(backend: Backend) -> Backend:
    """Add a backend (and its artefacts) to the table; a format or artefact name taken is an error."""
    if backend.format in _BACKENDS:
        raise ValueError(f"backend format '{backend.format}' is already registered")
    taken = [a.name for a in backend.artefacts if a.name in _ARTEFACTS]
    if taken:
        raise ValueError(f"artefact name(s) {', '.join(taken)} already registered")
    _BACKENDS[backend.format] = backend
    for artefact in backend.artefacts:
        _ARTEFACTS[artefact.name] = artefact
    return backend


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILT_IN:
        register_backend(importlib.import_module(f"rise_edge.backends.{module}").BACKEND)
    from rise_edge.plugins import load_plugins
    load_plugins()


def backends() -> dict[str, Backend]:
    """format -> Backend, in table order."""
    _load()
    return dict(_BACKENDS)


def artefacts() -> dict[str, Artefact]:
    """artefact name -> Artefact, in table order."""
    _load()
    return dict(_ARTEFACTS)


def export_formats() -> list[str]:
    """What `rise-edge export --format` accepts (besides 'all')."""
    return [f for f, b in backends().items() if b.exportable]


def backend_for_engine(name: str) -> Backend | None:
    """The backend a bench --engines word names (its bench name, format or an alias), or None."""
    word = name.strip().lower()
    for backend in backends().values():
        if word in (backend.name, backend.format, *backend.aliases):
            return backend
    return None


def why_unavailable(artefact: str) -> str | None:
    """Why `artefact` cannot be made on this machine (one sentence), or None."""
    spec = artefacts()[artefact]
    backend = backends()[spec.runs_on]
    own = spec.unavailable() if spec.unavailable else None
    return own if own is not None else (backend.unavailable() if backend.exportable else None)


def runner_for(record: dict[str, Any], base: str | Path, *, device: str = "auto") -> Runner:
    """The runner for one export.json artefact record (its "path" is relative to `base`)."""
    fmt = record["format"]
    backend = backends().get(fmt)
    if backend is None:
        raise UserError(f"no runner for artefact format '{fmt}'; known: {', '.join(backends())}")
    kwargs: dict[str, Any] = {"precision": record.get("precision", "fp32")}
    if len(backend.devices) > 1:  # the runner chooses among its devices; the others have one
        kwargs["device"] = device if device in backend.devices else backend.devices[0]
    from rise_edge.files import file_in_folder

    # Only a file inside the export folder is ever opened, whatever the record says.
    return backend.runner(file_in_folder(Path(base), record.get("path"), Path(base) / "export.json",
                                         "an artefact's path", "re-export with `rise-edge export`"),
                          **kwargs)


def plan_formats(formats: Sequence[str]) -> list[str]:
    """Export formats as asked ('all' expands), checked against the table (with a suggestion)."""
    known = export_formats()
    chosen = set(known) if "all" in formats else set(formats)
    unknown = sorted(chosen - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*known, "all"], n=1)
        raise UserError(f"unknown export format '{unknown[0]}'"
                        + (f"; did you mean '{close[0]}'?" if close else "")
                        + f"; formats: {', '.join(known)}, all")
    return [f for f in known if f in chosen]
