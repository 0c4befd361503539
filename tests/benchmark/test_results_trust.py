"""Issue #25, "results you can trust": each case through the real command line (``benchmark.app.cli.main``),
on runs a tiny fit wrote, checked against the runs' own records.

1. only completed runs count; the others are listed apart (``--include-incomplete`` shows them, labelled);
2. two runs of one setting with the same seed are refused, naming both;
3. (tests/benchmark/test_leaderboard.py) runs that differ in any option are separate rows; here: every
   constructor option of every method and dataset is part of the comparison key;
4. a later ``test`` of a test-selected checkpoint never replaces the final number; it is test-best;
5. a checkpoint is evaluated with the settings it was trained with, or refused;
6. a resume drops what was recorded after the checkpoint, removes stale temporaries; a killed run is "killed";
7. a checkpoint with a corrupted byte is refused before use;
9. a ViT image size off the patch grid is refused;
10. a run shorter than asked records the steps it trained and is marked, never pooled with complete runs.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import shutil
import socket
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from benchmark.app.cli import main
from benchmark.core import registry
from benchmark.core.results import DERIVED, comparison_config
from tests.benchmark.test_run_lifecycle import _args
from tests.datamodules import fixtures

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=3).parent


def _fit(cub: Path, run: Path, *extra: str, seed: int = 0, epochs: int = 2, method: str = "ms") -> int:
    return main(["fit", *_args(cub, method=method), "--data.batches_per_epoch", "2", "--trainer.max_epochs", str(epochs),
                 "--seed_everything", str(seed), "--logger", "none", "--run_dir", str(run), *extra])  # fmt: skip


@pytest.fixture(scope="module")
def grid(cub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two completed runs of one setting, seeds 0 and 1."""
    root = tmp_path_factory.mktemp("grid")
    for seed in (0, 1):
        assert _fit(cub, root / f"ms-s{seed}", seed=seed) == 0
    return root


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _board(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[list[dict[str, str]], str]:
    capsys.readouterr()
    assert main(["leaderboard", *args, "--format", "csv"]) == 0
    out = capsys.readouterr()
    return list(csv.DictReader(io.StringIO(out.out))), out.err


def _final(run: Path, metric: str = "NMI") -> float:
    entries = [e for e in _json(run / "metrics_test.json")["evaluations"] if e.get("role") == "final"]
    return entries[-1]["metrics"][metric]


# ---------------------------------------------------------------------------- 1. completed runs only
def test_only_completed_runs_count_and_the_others_are_listed_apart(grid: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    for name in ("ms-s0", "ms-s1"):
        shutil.copytree(grid / name, tmp_path / name)
    states = {"ms-s2": ("interrupted", 143), "ms-s3": ("failed", 1), "ms-s4": ("running", None)}
    for seed, (name, (state, code)) in enumerate(states.items(), start=2):
        shutil.copytree(grid / "ms-s0", tmp_path / name)
        for record in ("metrics_test.json", "metrics_val.json"):  # another seed's records
            data = _json(tmp_path / name / record)
            data["seed"] = seed
            (tmp_path / name / record).write_text(json.dumps(data))
        status = _json(tmp_path / name / "status.json")
        status.update(status=state, exit_code=code, pid=2**22 + 17, host=socket.gethostname())  # a pid that is gone
        (tmp_path / name / "status.json").write_text(json.dumps(status))
    rows, err = _board(capsys, "--runs", str(tmp_path))
    assert len(rows) == 1 and rows[0]["n_seeds"] == "2" and rows[0]["seeds"] == "0;1"
    expected = statistics_mean([_final(tmp_path / n, "NMI") for n in ("ms-s0", "ms-s1")])
    assert float(rows[0]["NMI_mean"]) == pytest.approx(100 * expected, abs=1e-4)
    assert "Not counted: 3 run(s)" in err
    for name, state in (("ms-s2", "interrupted"), ("ms-s3", "failed"), ("ms-s4", "killed")):
        assert any(name in line and state in line for line in err.splitlines()), (name, state, err)
    rows, _ = _board(capsys, "--runs", str(tmp_path), "--include-incomplete")
    apart = [r for r in rows if r["incomplete"]]
    assert [r["n_seeds"] for r in rows if not r["incomplete"]] == ["2"]
    assert sorted(r["incomplete"] for r in apart) == ["failed, interrupted, killed"]
    # `status` reports the dead process as killed, not running for ever.
    capsys.readouterr()
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert any("ms-s4" in line and "killed" in line for line in out.splitlines())
    assert "5 run(s) in" in out
    # --state: the title counts the runs shown (it said 5 over a table of 1).
    assert main(["status", str(tmp_path), "--state", "failed"]) == 0
    out = capsys.readouterr().out
    assert "1 run(s) failed in" in out and "(of 5)" in out and "ms-s3" in out and "ms-s0" not in out


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------------------- 2. duplicate seeds
def test_two_runs_of_one_setting_with_the_same_seed_are_refused(grid: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    for name in ("ms-s0", "ms-s1"):
        shutil.copytree(grid / name, tmp_path / name)
    shutil.copytree(grid / "ms-s0", tmp_path / "ms-s0-again")
    capsys.readouterr()
    assert main(["leaderboard", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ms-s0" in err and "ms-s0-again" in err and "same seed (0)" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- 3. every option in the key
def _constructor_options(cls: type) -> set[str]:
    names = set()
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                names.add(p.name)
    return names


@pytest.mark.parametrize("method", sorted(registry.METHODS) or ["ms"])
def test_every_constructor_option_is_part_of_the_comparison_key(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A new option of a method or dataset is recorded and compared automatically: this fails if one is
    dropped from the key (other than the declared per-run, derived and bookkeeping ones)."""
    registry.discover()
    capsys.readouterr()
    assert main(["fit", "--method", method, "--data", "synthetic", "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    cls = registry.get_method(method)
    key = comparison_config(config, cls.per_run_options)
    data_cls = registry.get_dataset("synthetic")
    bookkeeping = {"root", "num_workers", "verify_images", "eval_batch_size", "seed"}  # results.BOOKKEEPING / SEEDS
    for section, klass, skip in (("model", cls, set(cls.per_run_options) | {n.split(".", 1)[1] for n in DERIVED if "." in n}),
                                 ("data", data_cls, bookkeeping)):  # fmt: skip
        missing = [name for name in sorted(_constructor_options(klass) - skip)
                   if not any(k == f"{section}.{name}" or k.startswith(f"{section}.{name}.") for k in key)]  # fmt: skip
        assert not missing, f"{section} options of {klass.__name__} not in the comparison key: {missing}"


# ---------------------------------------------------------------------------- 4. test-selected checkpoints
def test_a_later_test_of_the_best_checkpoint_never_replaces_the_final_number(cub: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = tmp_path / "run"
    assert _fit(cub, run, epochs=3) == 0
    final = _json(run / "metrics_test.json")
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    assert main(["test", "--ckpt_path", str(best), "--trainer.enable_progress_bar", "false"]) == 0
    record = _json(run / "metrics_test.json")
    later = record["evaluations"][-1]
    assert later["role"] == "checkpoint" and later["selected_on"] == "test"  # the paper protocol validates on test
    assert record["metrics"] == final["metrics"]  # the headline stays the end of training
    rows, _ = _board(capsys, "--runs", str(tmp_path), "--metric", "NMI")
    assert float(rows[0]["NMI_mean"]) == pytest.approx(100 * _final(run), abs=1e-4)
    assert later["metrics"]["NMI"] != _final(run)  # the two evaluations differ: the test can tell them apart
    rows, _ = _board(capsys, "--runs", str(tmp_path), "--metric", "NMI", "--select", "test-best")
    # test-best: the evaluation best by the run's selection metric (R@1; ties to the earliest), its NMI there.
    candidates = [e for e in _json(run / "metrics_val.json")["evaluations"] if e["global_step"] > 0] + [later]
    best = candidates[0]
    for e in candidates[1:]:
        best = e if e["metrics"]["R@1"] > best["metrics"]["R@1"] else best
    assert float(rows[0]["NMI_mean"]) == pytest.approx(100 * best["metrics"]["NMI"], abs=1e-4)
    assert "optimistic" in rows[0]["select"]


# ---------------------------------------------------------------------------- 5. the checkpoint's own settings
def test_a_checkpoint_is_evaluated_with_its_own_settings_or_refused(cub: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    assert _fit(cub, a, epochs=1) == 0
    assert _fit(cub, b, "--model.lr", "0.001", epochs=1, method="proxy_anchor") == 0
    before = (a / "metrics_test.json").read_text()
    last = a / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["test", "--ckpt_path", str(last), "--config", str(b / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert "trained with other settings" in err and "model.class_path" in err and "Traceback" not in err
    assert (a / "metrics_test.json").read_text() == before  # nothing appended to run a
    # Without the run's config.yaml, the configuration stored in the checkpoint is used: the same result.
    (a / "config.yaml").unlink()
    assert main(["test", "--ckpt_path", str(last), "--trainer.enable_progress_bar", "false"]) == 0
    record = _json(a / "metrics_test.json")
    assert record["evaluations"][-1]["metrics"] == record["evaluations"][0]["metrics"]
    assert record["evaluations"][-1]["role"] == "checkpoint" and record["method"] == "ms"
    # A checkpoint that carries no configuration (written before it was stored) and no config.yaml: its data
    # settings are unknown: refused, not evaluated under the default recipe.
    state = torch.load(last, map_location="cpu", weights_only=False)
    state.pop("benchmark_config")
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    capsys.readouterr()
    assert main(["test", "--ckpt_path", str(old)]) == 2
    assert "does not carry its run's configuration" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 6. kill -9 and resume
def test_a_resume_drops_the_lost_weights_records_and_stale_temporaries(cub: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = tmp_path / "run"
    assert _fit(cub, run, epochs=1) == 0
    epoch1 = tmp_path / "epoch1.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", epoch1)
    last = run / "checkpoints" / "last.ckpt"
    assert _fit(cub, run, "--ckpt_path", str(last), epochs=2) == 0
    assert [e["global_step"] for e in _json(run / "metrics_val.json")["evaluations"]] == [0, 2, 4]
    # As after a kill -9 between the validation at step 4 and its checkpoint: last.ckpt is still epoch 1's,
    # a half-written checkpoint lies beside it, and the status says running (its process is gone).
    shutil.copy(epoch1, last)
    stale = run / "checkpoints" / ".last.ckpt.4194321.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    status = _json(run / "status.json")
    status.update(status="running", exit_code=None, pid=2**22 + 17, host=socket.gethostname())
    (run / "status.json").write_text(json.dumps(status))
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    assert "killed" in capsys.readouterr().out
    assert _fit(cub, run, "--ckpt_path", str(last), epochs=2) == 0
    val = _json(run / "metrics_val.json")["evaluations"]
    assert [e["global_step"] for e in val] == [0, 2, 4]  # one validation per step: the lost one is gone
    test = _json(run / "metrics_test.json")["evaluations"]
    assert [(e["global_step"], e["role"]) for e in test] == [(2, "final"), (4, "final")]
    assert not stale.exists() and "dropped" in capsys.readouterr().err
    assert _json(run / "status.json")["status"] == "completed"


# ---------------------------------------------------------------------------- 7. corrupted checkpoints
def _corrupt_a_tensor_byte(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(member.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        offset = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_a_checkpoint_with_a_corrupted_byte_is_refused(cub: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = tmp_path / "run"
    assert _fit(cub, run, epochs=1) == 0
    last = run / "checkpoints" / "last.ckpt"
    _corrupt_a_tensor_byte(last)
    torch.load(last, map_location="cpu", weights_only=False)  # torch itself loads it without a word
    for command in (["test", "--ckpt_path", str(last)], ["fit", *_args(cub), "--ckpt_path", str(last), "--logger", "none"]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err
        assert str(last) in err and "CRC" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- 9. ViT patch grid
def test_a_vit_image_size_off_the_patch_grid_is_refused(cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    args = [a if a != "resnet_tiny_test" else "vit_tiny_test" for a in _args(cub)]
    code = main(["fit", *args, "--data.image_size", "20", "--logger", "none", "--run_dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "not a multiple of the patch size 8" in err and "--data.image_size 24 or 16" in err
    assert not (tmp_path / "run").exists()  # refused before any work


# ---------------------------------------------------------------------------- 10. shorter than asked
def test_runs_shorter_than_asked_record_their_steps_and_stand_apart(grid: Path, cub: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    for name in ("ms-s0", "ms-s1"):
        shutil.copytree(grid / name, tmp_path / name)
    assert _fit(cub, tmp_path / "zero", epochs=0, seed=2) == 0
    zero = _json(tmp_path / "zero" / "metrics_test.json")
    assert zero["steps_trained"] == 0 and zero["evaluations"][-1]["global_step"] == 0 and "0 steps" in zero["short"]
    # Cut short by the time budget: 0.6 s a step, 1 s of training, 50 steps asked for.
    code = _fit(cub, tmp_path / "timed", "--plugin", "tests.benchmark.plugin_methods", "--model.marker",
                str(tmp_path / "m"), "--model.marker_step", "0", "--model.sleep_s", "0.6", "--data.batches_per_epoch",
                "50", "--trainer.max_time", "00:00:00:01", seed=3, epochs=1, method="step_marker")  # fmt: skip
    assert code == 0
    timed = _json(tmp_path / "timed" / "metrics_test.json")
    assert timed["steps_trained"] < timed["steps_planned"] == 50 and "(max_time)" in timed["short"]
    rows, _ = _board(capsys, "--runs", str(tmp_path))
    by_steps = {(r["method"], r["steps"]): r for r in rows}
    assert by_steps[("ms", "4")]["n_seeds"] == "2" and by_steps[("ms", "4")]["short"] == ""
    assert by_steps[("ms", "0")]["n_seeds"] == "1" and "0 steps" in by_steps[("ms", "0")]["short"]
    assert "max_time" in by_steps[("step_marker", str(timed["steps_trained"]))]["short"]


# ---------------------------------------------------------------------------- errors, not tracebacks
def test_bad_results_files_are_skipped_with_a_warning_naming_them(grid: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    for name in ("ms-s0", "ms-s1"):
        shutil.copytree(grid / name, tmp_path / name)
    for name, text in (("not-json", "{ this is not json"), ("a-list", "[1, 2]"),
                       ("wrong-shape", json.dumps({"evaluations": [{"metrics": {"R@1": "high"}}]}))):  # fmt: skip
        shutil.copytree(grid / "ms-s0", tmp_path / name)
        (tmp_path / name / "metrics_test.json").write_text(text)
    rows, err = _board(capsys, "--runs", str(tmp_path))
    assert len(rows) == 1 and rows[0]["n_seeds"] == "2"  # the good runs still make the table
    for name, what in (("not-json", "not valid JSON"), ("a-list", "expected a JSON object"), ("wrong-shape", "non-numeric")):
        assert any(f"skipped {name}" in line and what in line for line in err.splitlines()), (name, err)


def test_bad_output_and_sources_are_one_paragraph_with_exit_2(grid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import benchmark.app.leaderboard as lb

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder is needed")
    cases = [
        (["leaderboard", "--runs", str(grid), "--format", "md", "--out", str(blocked / "board.md")], "Cannot write --out"),
        (["leaderboard", "--runs", str(grid), "--format", "md", "--out", str(tmp_path)], "is a folder"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    monkeypatch.setattr(lb, "wandb_logged_in", lambda: False)
    assert main(["leaderboard", "--wandb", "me/dml"]) == 2
    err = capsys.readouterr().err
    assert "needs a login" in err and "wandb login" in err and "Traceback" not in err


def test_bad_config_files_name_the_file_and_line(cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tab, listed = tmp_path / "tab.yaml", tmp_path / "list.yaml"
    tab.write_text("trainer:\n  max_epochs: 1\n\tlog_every_n_steps: 5\n")
    listed.write_text("- trainer\n- model\n")
    for path, message in ((tab, f"{tab}, line 3, column 1"), (listed, "the top level is a list")):
        capsys.readouterr()
        assert main(["fit", *_args(cub), "--config", str(path), "--logger", "none", "--run_dir", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert "holds a tab" in main_err(["fit", "--config", str(tab)], capsys)


def main_err(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    main(argv)
    return capsys.readouterr().err


def test_one_image_per_class_with_a_pair_loss_is_refused(cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert _fit(cub, tmp_path / "run", "--data.samples_per_class", "1", "--data.classes_per_batch", "8") == 2
    err = capsys.readouterr().err
    assert "--data.samples_per_class 1" in err and "pairs" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    # A proxy loss learns from one image per class: accepted.
    assert _fit(cub, tmp_path / "proxy", "--data.samples_per_class", "1", "--data.classes_per_batch", "8",
                method="proxy_anchor", epochs=1) == 0  # fmt: skip


def test_an_invalid_mplbackend_is_one_paragraph_with_exit_2(tmp_path: Path) -> None:
    """matplotlib raises on import with an invalid MPLBACKEND, and every command imports it (through
    torchmetrics): the entry point says what is wrong before that import. A real subprocess: in this
    process matplotlib is already imported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MPLBACKEND": "nonsense"}
    proc = subprocess.run([sys.executable, "-m", "benchmark", "status", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "MPLBACKEND='nonsense' is not a matplotlib backend" in proc.stderr
    assert "Traceback" not in proc.stderr
    env["MPLBACKEND"] = "Agg"
    assert subprocess.run([sys.executable, "-m", "benchmark", "status", str(tmp_path)], env=env, capture_output=True,
                          timeout=120).returncode == 0  # fmt: skip
