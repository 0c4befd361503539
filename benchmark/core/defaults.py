"""What the command line offers before anything heavy is imported: the installed recipes, the default
``--method`` / ``--data`` (configs/defaults.yaml: the README's main job) and the usage text.

A light module (yaml and the standard library): ``python -m benchmark --help`` prints from it
without importing torch or Lightning.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import yaml


def recipe_dir() -> Path:
    """The installed recipes (``configs/`` of the repository, packaged as ``benchmark.recipes``)."""
    return Path(str(importlib.resources.files("benchmark.recipes")))


CONFIG_DIR = recipe_dir()
# --method / --data when not given (the README's main job), from the recipes, not the code.
_DEFAULTS = yaml.safe_load((CONFIG_DIR / "defaults.yaml").read_text())
DEFAULT_METHOD: str = _DEFAULTS["method"]
DEFAULT_DATA: str = _DEFAULTS["data"]

USAGE = """usage: python -m benchmark <command> [options]

commands:
  fit          train a method (evaluates before and after), e.g.
               python -m benchmark fit --method {method} --backbone vit_small
  validate     evaluate a checkpoint on the validation split (--ckpt_path)
  test         evaluate a checkpoint on the test split (--ckpt_path)
  list         registered methods, backbones and datasets
  status       run directories and their states (running, completed, interrupted, failed, killed)
  leaderboard  results of local runs (runs/*/metrics_test.json) next to the papers' numbers
  suite        a grid of fit runs as one command: suite run|status|export-sweep FILE (suite --help)
  perf NAME    performance benchmarks (python -m benchmark perf --help)
  analyze NAME figure-writing analyses, e.g. analyze cross_image_attention gradients

fit/validate/test options (plus every LightningCLI option, see `fit --help`):
  --method NAME        method to train (default: {method})
  --backbone NAME      encoder preset; --backbone.pretrained false, --backbone.weights PATH
  --data NAME          dataset (default: {data}, generated on first use)
  --data.root PATH     where the dataset lives
  --config FILE        YAML recipe (repeatable); without it configs/<method>/<data>.yaml is used
  --recipe none|PATH   switch the automatic recipe off, or name one
  --logger NAME        wandb (default; offline unless logged in), csv, tensorboard, none
  --run_dir PATH       where this run writes (default: runs/<method>-<data>-<time>)
  --plugin MODULE      import a module that registers more methods/datasets (repeatable)
  --evaluation.*       evaluation settings (recall_ks, nmi, map_at_k, backend ...)
  --figures false      no figures in runs/<run>/figures/ after the test (--figures.* sets them)
A method's own options: python -m benchmark fit --method NAME --print_config (or --help).
"""
