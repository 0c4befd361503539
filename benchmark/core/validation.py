"""Small checks of constructor options (a leaf module: imports nothing from the project)."""

from __future__ import annotations

from typing import Any, get_args

__all__ = ["check_choice"]


def check_choice(name: str, value: Any, choices: Any) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming all three.

    Args:
        name: the option's name, as the user spells it (``retrieval``).
        value: the value given.
        choices: a ``Literal[...]`` type or an iterable of the allowed values.
    """
    allowed = tuple(get_args(choices)) or tuple(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in allowed)}; got {value!r}.")
    return value
