"""`rise-edge demo`: the whole story on the built-in demo world (registered by the demo plugin)."""

from __future__ import annotations

from pathlib import Path

import click

from rise_edge.cli import PathParam, _set_option, _user_errors


@click.command()
@click.option("--recipe", type=PathParam(), default=None,
              help="Demo recipe (default: the shipped demo recipe).")
@_set_option
@click.option("--out", type=PathParam(), default=Path("runs/demo"), show_default=True,
              help="Folder for the ERM and RISE runs and the summary.")
@_user_errors
def demo(recipe: Path | None, overrides: tuple[str, ...], out: Path) -> None:
    """The whole story on the built-in demo world: data, teacher, ERM vs RISE, export, bench."""
    from rise_edge.demo.story import run_demo

    result = run_demo(recipe, out, overrides)
    click.echo(result.table)
    click.echo(f"\ndone in {result.seconds / 60:.1f} min; runs, exports and bench reports in {out}/")
