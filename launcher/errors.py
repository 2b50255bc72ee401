"""One error type for bad user input, so the entry point can print one line and exit 2."""

from __future__ import annotations


class RampError(ValueError):
    """A problem the user can fix: bad recipe, bad layout, missing checkpoint or data.

    The message is one line that names what is wrong and how to fix it.
    """


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise RampError(msg)
