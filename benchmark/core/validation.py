"""The one way to check an option: a :class:`~benchmark.core.errors.ConfigError` that names its path.

Every constructor of the project (methods, datasets, the evaluator, the figures, the suites'
settings) checks its options with these functions, so that a bad value always reads the same
(``--model.lr must be > 0; got 0.``), is reported by the command line as a user error (exit 2, no
traceback) because of its type, and is raised before any data pass. ``option`` is the path as the
command line spells it, without the dashes: ``model.lr``, ``data.samples_per_class``,
``model.mpn.heads``. A leaf module: it imports only :mod:`benchmark.core.errors`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, get_args

from benchmark.core.errors import ConfigError

__all__ = ["check_all", "check_choice", "require"]


def _flag(option: str) -> str:
    return option if option.startswith("-") else f"--{option}"


def require(ok: bool, option: str, rule: str, value: Any) -> None:
    """Raise ``ConfigError("--<option> must be <rule>; got <value>.")`` unless ``ok``.

    Args:
        ok: whether the value is acceptable.
        option: the option's path (``model.lr``).
        rule: what the value must be, completing "must be ..." (``> 0``, ``a multiple of heads``).
        value: the value given, shown with ``repr``.
    """
    if not ok:
        raise ConfigError(f"{_flag(option)} must be {rule}; got {value!r}.")


def check_all(rules: Iterable[tuple[str, Any, bool, str]], owner: str = "") -> None:
    """One ConfigError listing every broken rule, so that a user fixes them in one go.

    Args:
        rules: ``(option path, value, ok, rule)`` for each check.
        owner: who checks (a method or dataset name), put at the head of the message.
    """
    bad = [f"{_flag(option)}={value!r} (must be {rule})" for option, value, ok, rule in rules if not ok]
    if bad:
        head = f"{owner}: " if owner else ""
        raise ConfigError(f"{head}{'; '.join(bad)}. Set {'it' if len(bad) == 1 else 'them'} to a valid value.")


def check_choice(option: str, value: Any, choices: Any) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise a ConfigError naming all three.

    Args:
        option: the option's path (``model.refiner.aggregation``).
        value: the value given.
        choices: a ``Literal[...]`` type or an iterable of the allowed values.
    """
    allowed = tuple(get_args(choices)) or tuple(choices)
    if value not in allowed:
        raise ConfigError(f"{_flag(option)} must be one of {', '.join(repr(c) for c in allowed)}; got {value!r}.")
    return value
