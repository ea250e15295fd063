"""Where rise-edge keeps what it builds once per machine (demo data, demo teacher, text embeddings)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """$RISE_EDGE_CACHE, else ~/.cache/rise-edge."""
    return Path(os.environ.get("RISE_EDGE_CACHE", "~/.cache/rise-edge")).expanduser()


def cache_key(**parts: Any) -> str:
    """A sha256 (hex) over named JSON-able parts, key order ignored: what cached things are named by."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
