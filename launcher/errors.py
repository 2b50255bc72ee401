"""One error type for bad user input, so the entry point can print one line and exit 2."""

from __future__ import annotations

import dataclasses
import functools
import typing


class RampError(ValueError):
    """A problem the user can fix: bad recipe, bad layout, missing checkpoint or data.

    The message is one line that names what is wrong and how to fix it.
    """


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise RampError(msg)


def require_choice(where: str, value: object, choices: tuple[object, ...]) -> None:
    """One line ``where='x': choose one of a, b, c`` when ``value`` is not among ``choices``."""
    require(value in choices, f"{where}={value!r}: choose one of {', '.join(str(c) for c in choices)}")


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, tuple[object, ...]], ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, typing.get_args(hints[f.name]))
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is typing.Literal
    )


def check_choices(obj: object, section: str) -> None:
    """Check every ``Literal[...]``-typed field of the dataclass ``obj`` (its ``__post_init__`` calls this),
    so a choice is validated the same way whether the recipe came from YAML or was built in code."""
    for name, choices in _literal_fields(type(obj)):
        require_choice(f"{section}.{name}", getattr(obj, name), choices)
