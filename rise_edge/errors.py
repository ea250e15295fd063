"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment: printed as one message, exit status 2.

    The message says what was wrong, where, and what would be right.
    """

    exit_code = 2


def missing_extra(package: str, extra: str, purpose: str) -> UserError:
    """Error for an optional dependency that is not installed."""
    return UserError(
        f"{purpose} needs the '{package}' package, which is not installed; "
        f"install it with: pip install 'rise-edge[{extra}]'"
    )
