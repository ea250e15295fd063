"""The one exception type that reaches the user as a message instead of a traceback."""

from __future__ import annotations

from collections.abc import Sequence


class UserError(Exception):
    """A problem with the user's input or environment: printed as one message, exit status 2.

    The message says what was wrong, where, and what would be right.
    """

    exit_code = 2


class DamagedFile(UserError):
    """A file rise-edge wrote (a record, tensors, a list it reads as its own) that cannot be used as
    it is: damaged, changed by hand or unreadable. The message names the file and the field and says
    what fixes it. Code that works around a missing input (no teacher here, no images) still stops
    on this one: a damaged file is never silently taken for an absent one."""


def missing_extra(package: str, extra: str, purpose: str) -> UserError:
    """Error for an optional dependency that is not installed."""
    return UserError(
        f"{purpose} needs the '{package}' package, which is not installed; "
        f"install it with: pip install 'rise-edge[{extra}]'"
    )


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """'; did you mean 'X'?' for the closest of `choices` to a mistyped `word`, else ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
