"""Layer 0, the contracts every other layer may import: light, no torch at import except ``contracts``.

``errors`` (the exception types and exit codes), ``io`` (atomic writes, data roots), ``validation``
(checks that raise :class:`~benchmark.core.errors.ConfigError` with the option's path),
``contracts`` (the registries, the data request a method makes, the evaluation batch),
``registry`` (lookup by name and plugin discovery), ``results`` (the one reading of a run's
records), ``papers`` (the papers' reference numbers, ``reference/*.csv``) and ``defaults``.
"""
