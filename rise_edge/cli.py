"""The `rise-edge` command line: each command parses, calls one library function, says where results went.

Every UserError becomes one message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from rise_edge.errors import UserError


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError (and Ctrl-C) into one line and a non-zero exit status."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rise-edge")
def main() -> None:
    """Train domain-robust compact classifiers with a CLIP teacher (RISE), export them, benchmark them."""


_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
    help="Override a recipe field, e.g. --set optim.lr=0.01 (repeatable).")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_set_option
@click.option("--resume", is_flag=True, help="Continue the interrupted run of this recipe.")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: <train.output_dir>/<train.run_name>).")
@_user_errors
def train(recipe: Path, overrides: tuple[str, ...], resume: bool, run_dir: Path | None) -> None:
    """Train a student on the source domains of RECIPE and test it on the unseen target domain."""
    from rise_edge.config import load_recipe
    from rise_edge.train import train_run

    result = train_run(load_recipe(recipe, overrides), recipe_name=recipe.stem, run_dir=run_dir,
                       resume=resume)
    click.echo(result.table())
    click.echo(f"run directory: {result.run_dir}")


# -- export command --


# -- bench command --


# -- demo command --


if __name__ == "__main__":
    main()
