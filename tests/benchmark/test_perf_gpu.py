"""``perf gpu``: the GPU checks are ready to run the minute a GPU is lent. Their CPU versions run
here end to end, and their GPU arguments are checked against the commands they go to (a typo
must not cost the few minutes of a lent GPU)."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pytest

from benchmark.app.cli import build_cli
from benchmark.app.perf import embed as perf_embed
from benchmark.app.perf import gpu as perf_gpu
from benchmark.app.perf import train as perf_train
from benchmark.core import registry


class _Parsed(Exception):
    pass


def _parse_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every argparse parser stop right after parsing (its errors still raise SystemExit)."""
    original = argparse.ArgumentParser.parse_known_args

    def parse(self, args=None, namespace=None):
        namespace, rest = original(self, args, namespace)
        raise _Parsed(namespace, rest)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse)


def test_every_gpu_check_names_a_command_and_arguments_it_accepts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    registry.discover_tools()
    checks = perf_gpu.load_checks()
    assert {c["command"] for c in checks} >= {"train", "eval", "refine", "reciprocal", "data", "embed"}
    trained = set()
    for check in checks:
        command = registry.PERF_COMMANDS[check["command"]]
        for key in ("gpu", "cpu"):
            with monkeypatch.context() as m:
                _parse_only(m)
                with pytest.raises(_Parsed) as parsed:
                    command.run(list(check[key]))
            namespace, rest = parsed.value.args
            if check["command"] not in ("train", "embed"):
                assert rest == [], (check["name"], key, rest)
                continue
            if key == "cpu":  # the CPU versions run in the next test
                continue
            # perf train and perf embed hand what they do not know to the run's command line: build it
            namespace.tiny = key == "cpu"
            run_dir = tmp_path / f"{check['name']}-{key}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if check["command"] == "train":
                    cli = build_cli("fit", perf_train._cli_args(namespace.methods, namespace, run_dir, rest), run=False)
                else:
                    cli = perf_embed._build(namespace, run_dir, None, rest)
            if key == "gpu":
                assert cli.trainer.precision == "bf16-mixed" and cli.datamodule.image_size in (224, 227)
                trained.add((check["command"], getattr(namespace, "methods", None) or namespace.method,
                             cli.model.backbone_config.name))
    assert trained >= {("train", "dmcac", "vit_small"), ("train", "intra_batch", "resnet50"), ("embed", "dmcac", "vit_small")}


def test_the_cpu_versions_run_and_write_one_json(tmp_path: Path) -> None:
    out = tmp_path / "perf_gpu.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert perf_gpu.main(["--cpu", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert not payload["on_gpu"] and payload["machine"]["torch"]
    names = [c["name"] for c in payload["checks"]]
    assert names == [c["name"] for c in perf_gpu.load_checks()]
    for check in payload["checks"]:
        assert check["error"] is None and check["ok"], check
        assert check["headlines"] and all(h["value"] == h["value"] for h in check["headlines"]), check["name"]
        assert all(h["goal"] is None for h in check["headlines"])  # goals are for the GPU sizes


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    config = tmp_path / "checks.yaml"
    config.write_text(
        "checks:\n"
        "  - {name: broken, command: eval, gpu: ['--n', '10'], cpu: ['--bogus-flag']}\n"
        "  - {name: missing, command: no_such_command, gpu: [], cpu: []}\n"
        "  - {name: fine, command: reciprocal, gpu: [], cpu: ['--num-samples', '300', '--num-classes', '60', "
        "'--reference-queries', '1']}\n"
    )
    out = tmp_path / "out.json"
    assert perf_gpu.main(["--cpu", "--config", str(config), "--out", str(out)]) == 1
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert checks["broken"]["error"] == "exit 2" and not checks["broken"]["ok"]
    assert "not registered" in checks["missing"]["error"]
    assert checks["fine"]["ok"] and checks["fine"]["headlines"]
    with pytest.raises(SystemExit):
        perf_gpu.main(["--cpu", "--config", str(config), "--only", "nope", "--out", str(out)])
