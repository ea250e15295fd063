"""rise-edge: domain-robust compact classifiers distilled from CLIP (RISE), exported and benchmarked for the edge.

The Python API (rise_edge.api, docs/python-api.md): `rise_edge.Run.train(recipe, overrides)` or
`rise_edge.Run.open(path)`, then `run.export()`, `run.bench()`, `run.predict(sources)`,
`run.adapt(site)`. Errors are `rise_edge.UserError`, with the commands' one-line messages.
"""

from __future__ import annotations

import importlib
from typing import Any

from rise_edge.errors import DamagedFile, UserError

__version__ = "0.1.0"
__all__ = ["DamagedFile", "Run", "UserError", "__version__"]

_API = {"Run"}


def __getattr__(name: str) -> Any:
    # The API loads on first use (PEP 562): `import rise_edge` stays as light as the command line's
    # start-up needs (torch and the backends load when a step runs).
    if name in _API:
        return getattr(importlib.import_module("rise_edge.api"), name)
    raise AttributeError(f"module 'rise_edge' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
