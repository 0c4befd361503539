"""The recipes, installed as the package data of ``benchmark.recipes``: ``<method>/<dataset>.yaml``.

This folder stays at the top of the repository for people to read; ``pyproject.toml`` maps it
to ``benchmark.recipes`` so that a wheel carries it and ``importlib.resources`` finds it.
"""
