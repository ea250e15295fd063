"""The built-in demo, plugged into rise-edge the way any plugin is (rise_edge.plugins): it registers
its generated data set ("demo": shapes in four styles), its teacher ("rise-edge-demo-clip": a small
CLIP trained on first use) and the `rise-edge demo` command. Nothing outside this package imports it;
rise-edge finds it through the `rise_edge.plugins` entry point in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

DATASET = "demo"
TEACHER = "rise-edge-demo-clip"


def _build_world(root: Path | None) -> Path:
    from rise_edge.demo.world import default_world_spec, generate_world
    from rise_edge.files import cache_root

    return generate_world(root or cache_root(), default_world_spec())


def _build_teacher() -> Path:
    from rise_edge.demo.teacher import build_demo_teacher

    return build_demo_teacher().parent


def register() -> None:
    """Entry point: register the demo's data set, teacher and command (imports nothing heavy)."""
    from rise_edge.cli import register_command
    from rise_edge.demo.command import demo
    from rise_edge.registry import KnownDataset, register_dataset, register_teacher

    register_dataset(DATASET, KnownDataset("demo", ("cartoon", "painting", "photo", "sketch"), None,
                                           build=_build_world))
    register_teacher(TEACHER, _build_teacher)
    register_command(demo)
