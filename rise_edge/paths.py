"""Where rise-edge keeps what it builds once per machine (demo data, demo teacher, text embeddings)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$RISE_EDGE_CACHE, else ~/.cache/rise-edge."""
    return Path(os.environ.get("RISE_EDGE_CACHE", "~/.cache/rise-edge")).expanduser()
