"""Benchmark suites (``python -m benchmark suite``): the file format, validation before any run,
the dry run, real tiny runs (every cell a ``fit`` subprocess), resuming, Ctrl-C, the submitit
local launcher and the W&B sweep export.

The real runs use a tiny ResNet at 16 px on the official-layout CUB fixture (300 train / 300
test images), 1 epoch of 2 batches: a cell is one ``python -m benchmark fit`` subprocess, most
of whose time is the interpreter's imports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from benchmark import suites
from benchmark.cli import main
from tests.datamodules import fixtures

REPO = Path(__file__).resolve().parents[2]
CELLS = ("ms-cub-resnet_tiny_test-seed0", "ms-cub-resnet_tiny_test-seed1")

TINY_ARGS = """\
args:
  data.root: {cub}
  recipe: none
  backbone.pretrained: false
  model.embedding_dim: 8
  data.image_size: 16
  data.classes_per_batch: 4
  data.samples_per_class: 2
  data.batches_per_epoch: {batches}
  data.num_workers: 0
  data.eval_batch_size: 128
  data.verify_images: none
  trainer.max_epochs: 1
  trainer.enable_progress_bar: false
  trainer.precision: 32-true
  logger: csv
"""


def tiny_suite(path: Path, cub: Path, output: Path, batches: int = 2, seeds: str = "[0, 1]", extra: str = "") -> Path:
    path.write_text(
        f"name: tiny\noutput: {output}\n" + TINY_ARGS.format(cub=cub, batches=batches)
        + f"grid:\n  methods: [ms]\n  datasets: [cub]\n  backbones: [resnet_tiny_test]\n  seeds: {seeds}\n" + extra
    )
    return path


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixtures.make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=3).parent


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def _record(run: Path) -> dict:
    return json.loads((run / suites.RECORD).read_text())


def _set_status(run: Path, status: str, exit_code: int, **extra: str) -> None:
    payload = {**_status(run), "status": status, "exit_code": exit_code, **extra}
    (run / "status.json").write_text(json.dumps(payload))


# ---------------------------------------------------------------------------- the file format
def test_the_grid_expands_into_cells_with_variants_options_overrides_and_resources(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"""
output: {tmp_path / 'out'}
args: {{trainer.max_epochs: 3, logger: none}}
grid:
  - methods: [ms, margin]
    datasets: [cub, cars]
    backbones: [resnet50]
    seeds: [0, 1]
    variants:
      base: {{}}
      small: {{model.embedding_dim: 128}}
  - methods: [intra_batch]
    datasets: [cub]
    seeds: [0]
    options: {{model.mpn.layers: [1, 2], model.mpn.heads: [2, 4]}}
  - methods: [context_refine]
    datasets: [cub]
    seeds: [1]
    args: {{model.source: "{{output}}/ms-{{dataset}}-resnet50-base-seed{{seed}}/checkpoints/last.ckpt"}}
cells:
  method=margin: {{model.lr: 0.001}}
  method=margin,dataset=cars: {{model.lr: 0.002, resources: {{time: 2h}}}}
  dataset=cub: {{data.root: /data/CUB_200_2011}}
exclude: [{{method: margin, variant: small}}]
resources: {{devices: 2, precision: bf16-mixed, time: 90}}
""")
    suite = suites.load_suite(path)
    ids = [c.id for c in suite.cells]
    assert len(ids) == 8 + 4 + 4 + 1 and len(set(ids)) == len(ids)
    assert "ms-cub-resnet50-small-seed1" in ids and "margin-cars-resnet50-small-seed0" not in ids
    assert "intra_batch-cub-layers2_heads4-seed0" in ids
    # The stage-2 cell names a stage-1 cell's folder: it needs it and comes after it.
    refine = suite.cell("context_refine-cub-seed1")
    assert refine.needs == ("ms-cub-resnet50-base-seed1",)
    assert ids.index("context_refine-cub-seed1") > ids.index("ms-cub-resnet50-base-seed1")
    assert f"{suite.output}/ms-cub-resnet50-base-seed1/checkpoints/last.ckpt" in refine.argv
    margin = suite.cell("margin-cars-resnet50-base-seed0")
    argv = margin.argv
    assert argv[:6] == ["--method", "margin", "--data", "cars", "--backbone", "resnet50"]
    assert argv[argv.index("--model.lr") + 1] == "0.002"  # the more specific override, later in the file
    assert argv[argv.index("--trainer.devices") + 1] == "2" and argv[argv.index("--trainer.precision") + 1] == "bf16-mixed"
    assert argv[-2:] == ["--seed_everything", "0"] and "--data.root" not in argv
    assert margin.resources.time == 120 and suite.cell("margin-cub-resnet50-base-seed0").resources.time == 90
    small = suite.cell("ms-cub-resnet50-small-seed1").argv
    assert small[small.index("--model.embedding_dim") + 1] == "128" and "/data/CUB_200_2011" in small
    assert suite.cell("ms-cub-resnet50-small-seed1").group("s") == "s/cub/ms/resnet50/small"  # WANDB_RUN_GROUP: seeds together
    assert suite.run_dir(margin) == (tmp_path / "out" / "margin-cars-resnet50-base-seed0").resolve()


def test_every_shipped_suite_loads_and_the_smoke_suite_is_tiny() -> None:
    shipped = suites.shipped_suites()
    assert {"smoke", "intra_batch_table1", "dmcac_table", "context_refine_table", "cross_image_attention_table"} <= set(shipped)
    for path in shipped.values():
        assert suites.load_suite(path).cells
    smoke = suites.load_suite("smoke")
    assert [c.id for c in smoke.cells] == [
        "ms-synthetic-resnet_tiny_test-seed0", "ms-synthetic-resnet_tiny_test-seed1",
        "proxy_anchor-synthetic-resnet_tiny_test-seed0", "proxy_anchor-synthetic-resnet_tiny_test-seed1",
    ]
    suites.validate_cells(smoke)  # every cell's configuration parses, as fit --print_config would


BAD = {
    "unknown-key": ("grids: {methods: [ms]}\n", ["unknown key 'grids'", "Did you mean 'grid'"]),
    "unknown-grid-key": ("grid: {methods: [ms], seed: [0]}\n", ["unknown key 'seed' in grid", "'seeds'"]),
    "unknown-method": ("grid: {methods: [mss], datasets: [cub]}\n", ["unknown method 'mss'", "Did you mean ms"]),
    "unknown-dataset": ("grid: {methods: [ms], datasets: [cubb]}\n", ["unknown dataset 'cubb'", "cub"]),
    "unknown-backbone": ("grid: {methods: [ms], backbones: [resnet5]}\n", ["unknown backbone 'resnet5'", "resnet50"]),
    "unknown-option": (
        "grid: {methods: [ms, margin], datasets: [cub], backbones: [resnet50]}\ncells:\n  method=margin: {model.lrr: 1}\n",
        ["cell margin-cub-resnet50-seed0", "--model.lrr", "Did you mean --model.lr", "cells['method=margin']"],
    ),
    "unknown-trainer-option": (
        "args: {trainer.max_epoch: 3}\ngrid: {methods: [ms]}\n",
        ["--trainer.max_epoch", "Did you mean --trainer.max_epochs", "Set in the suite file: --trainer.max_epoch (args)"],
    ),
    "empty-list": ("grid: {methods: [ms], seeds: []}\n", ["grid.seeds is an empty list"]),
    "duplicate-seed": ("grid: {methods: [ms], seeds: [0, 0]}\n", ["duplicate cells", "grid.seeds lists 0"]),
    "duplicate-cell": (
        "grid:\n  - {methods: [ms], datasets: [cub]}\n  - {methods: [ms], datasets: [cub]}\n",
        ["duplicate cell ms-cub-seed0"],
    ),
    "reserved-option": ("args: {seed_everything: 3}\ngrid: {methods: [ms]}\n", ["--seed_everything is set by grid.seeds"]),
    "selector-matches-nothing": ("grid: {methods: [ms]}\ncells:\n  method=margin: {model.lr: 1}\n",
                                 ["cells['method=margin'] matches no cell"]),
    "bad-selector-axis": ("grid: {methods: [ms]}\nexclude: [methd=ms]\n", ["unknown axis 'methd'", "method"]),
    "bad-time": ("grid: {methods: [ms]}\nresources: {time: soon}\n", ["resources.time", "not a duration"]),
    "resource-twice": ("args: {trainer.devices: 2}\ngrid: {methods: [ms]}\nresources: {devices: 1}\n",
                       ["--trainer.devices is given both", "give it once"]),
    "no-grid": ("name: x\n", ["no grid: section"]),
    "not-yaml": ("grid: [methods: ms\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_suite_fails_before_any_run_naming_the_cause_and_the_fix(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, fragments = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(f"output: {tmp_path / 'out'}\n" + text)
    assert main(["suite", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not any((tmp_path / "out").glob("*/status.json"))  # nothing ran


def test_several_problems_are_reported_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("grid: {methods: [mss], datasets: [cubb], seeds: [0, 0]}\nresources: {gpus: 1}\n")
    assert main(["suite", "run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "4 problems, no cell was started" in err
    for fragment in ("unknown method 'mss'", "unknown dataset 'cubb'", "grid.seeds lists 0", "unknown key 'gpus'"):
        assert fragment in err


def test_an_unwritable_output_folder_fails_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "s.yaml"
    path.write_text(f"output: {tmp_path / 'a_file' / 'out'}\ngrid: {{methods: [ms]}}\n")
    for extra in ([], ["--dry-run"]):
        assert main(["suite", "run", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert "Cannot write into the suite's output folder" in err and "--output DIR" in err


def test_a_second_run_of_the_same_output_folder_is_refused_while_the_first_holds_it(
    cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs of one suite would both start its pending cells (a fit says it is running only
    once its interpreter is up): the second is refused before it plans anything, naming the first."""
    out = tmp_path / "out"
    path = tiny_suite(tmp_path / "s.yaml", cub_root, out)
    out.mkdir()
    with suites.run_lock(out):  # what a first `suite run` holds (a second open file: flock conflicts)
        assert main(["suite", "run", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"Another `suite run` is using the output folder {out} (pid {os.getpid()} on" in err
        assert "--output DIR" in err
        assert main(["suite", "run", str(path), "--dry-run"]) == 0  # a dry run changes nothing: allowed
        capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == [suites.RUN_LOCK]  # no cell was started
    with suites.run_lock(out):  # released with the first run: free again
        pass


def test_unknown_commands_cells_and_files_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["suite", "rnu", "smoke"]) == 2
    assert "Unknown suite command 'rnu'. Did you mean run?" in capsys.readouterr().err
    assert main(["suite", "run", str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "shipped suites: " in err and "smoke" in err
    assert main(["suite", "run-cell", "smoke", "--cell", "ms-synthetic-resnet_tiny_test-seed9"]) == 2
    assert "no cell 'ms-synthetic-resnet_tiny_test-seed9'. Did you mean ms-synthetic-resnet_tiny_test-seed" in capsys.readouterr().err
    assert main(["suite", "run", "smoke", "--only", "dataset=cub"]) == 2
    assert "matches no cell" in capsys.readouterr().err
    assert main(["suite"]) == 0 and "export-sweep" in capsys.readouterr().out


# ---------------------------------------------------------------------------- dry run
def test_dry_run_lists_every_cell_with_its_exact_command_and_runs_nothing(
    cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    path = tiny_suite(tmp_path / "s.yaml", cub_root, out)
    assert main(["suite", "run", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "2 cells" in text
    for i, cell in enumerate(CELLS):
        assert f"[{i + 1}/2] {cell}: pending -> run" in text
        command = next(line.strip() for line in text.splitlines() if f"--run_dir {out / cell}" in line)
        assert command.startswith(f"{sys.executable} -m benchmark fit --method ms --data cub --backbone resnet_tiny_test")
        assert f"--seed_everything {i} --run_dir {out / cell}" in command and "--data.root" in command
    assert not out.exists()


# ---------------------------------------------------------------------------- real runs
BROKEN = "ms-cub-resnet_tiny_test-broken-seed0"


@pytest.fixture(scope="module")
def ran_suite(cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-cell suite run through the CLI (each cell a fit subprocess): (suite file, output).

    A third cell, whose dataset folder does not exist, fails first: the others still run."""
    tmp = tmp_path_factory.mktemp("suite")
    out = tmp / "out"
    broken = (f"  - {{methods: [ms], datasets: [cub], backbones: [resnet_tiny_test], seeds: [0],\n"
              f"     variants: {{broken: {{data.root: {tmp / 'absent'}}}}}}}\n")
    path = tiny_suite(tmp / "tiny.yaml", cub_root, out)
    text = path.read_text().replace("grid:\n  methods", "grid:\n  - methods").replace("\n  datasets", "\n    datasets")
    text = text.replace("\n  backbones", "\n    backbones").replace("\n  seeds", "\n    seeds")
    path.write_text(text.replace("grid:\n", "grid:\n" + broken, 1))
    assert [c.id for c in suites.load_suite(path).cells] == [BROKEN, *CELLS]
    start = time.monotonic()
    assert main(["suite", "run", str(path)]) == 1
    print(f"3-cell suite: {time.monotonic() - start:.1f} s")
    # It failed at start-up (exit 2, before fit has a status.json): the suite's record says so.
    suite = suites.load_suite(path)
    failed = suites.cell_state(suite, suite.cell(BROKEN))
    assert failed.state == "failed" and failed.exit_code == 2
    assert failed.reason.startswith("error: CUB-200-2011: expected directory") and str(tmp / "absent") in failed.reason
    tiny_suite(path, cub_root, out)  # the rest of the tests use the two good cells
    return path, out


def test_a_suite_runs_every_cell_as_its_own_fit_in_a_deterministic_folder(
    ran_suite: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = ran_suite
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([BROKEN, *CELLS])
    for i, cell in enumerate(CELLS):
        run = out / cell
        assert _status(run)["status"] == "completed"
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics_test.json").is_file()
        assert (run / "metrics.csv").is_file()  # logger: csv from the suite's args
        assert "===== exit 0" in (run / suites.LOG).read_text()
        record = _record(run)
        assert record["attempts"][-1]["exit_code"] == 0
        assert record["attempts"][-1]["command"][1:4] == ["-m", "benchmark", "fit"]
        assert yaml.safe_load((run / "config.yaml").read_text())["seed_everything"] == i
    assert main(["suite", "status", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "2 cells: 2 completed" in shown and all(cell in shown for cell in CELLS)


@pytest.mark.slow  # ~33 s of fit subprocesses; the grid run and a failed cell's record stay in the default run
def test_rerunning_skips_completed_resumes_interrupted_and_retries_failed_on_request(
    ran_suite: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = ran_suite
    interrupted, failed = (out / cell for cell in CELLS)
    last = interrupted / "checkpoints" / "last.ckpt"
    _set_status(interrupted, "interrupted", 143, reason="stopped by SIGTERM", checkpoint=str(last))
    _set_status(failed, "failed", 1, reason="RuntimeError: boom")
    capsys.readouterr()
    assert main(["suite", "run", str(path), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert f"{CELLS[0]}: interrupted -> resume" in listing and f"--ckpt_path {last}" in listing
    assert f"{CELLS[1]}: failed -> not started" in listing

    assert main(["suite", "run", str(path)]) == 1  # the failed cell is reported, not run
    report = capsys.readouterr().out
    assert "RuntimeError: boom" in report and "--retry-failed" in report
    assert _status(interrupted)["status"] == "completed"
    attempts = _record(interrupted)["attempts"]
    assert len(attempts) == 2 and attempts[-1]["action"] == "resume"
    assert attempts[-1]["command"][-2:] == ["--ckpt_path", str(last)]
    assert len(_record(failed)["attempts"]) == 1 and _status(failed)["status"] == "failed"

    assert main(["suite", "status", str(path)]) == 0
    assert "1 completed, 1 failed" in capsys.readouterr().out

    assert main(["suite", "run", str(path), "--retry-failed"]) == 0
    assert _status(failed)["status"] == "completed"
    kept = out / ".attempts" / f"{CELLS[1]}.1"
    assert json.loads((kept / "status.json").read_text())["status"] == "failed"  # the failed attempt is kept
    assert [a["action"] for a in _record(failed)["attempts"]] == ["run", "retry"]

    capsys.readouterr()
    assert main(["suite", "run", str(path)]) == 0
    assert "2 completed (skipped), 0 to run" in capsys.readouterr().out


@pytest.mark.slow  # executes the agent's command line: one more fit subprocess
def test_the_wandb_sweep_export_and_the_command_its_agent_runs(
    ran_suite: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    path, out = ran_suite
    sweep_file = tmp_path / "sweep.yaml"
    assert main(["suite", "export-sweep", str(path), "--out", str(sweep_file)]) == 0
    config = yaml.safe_load(sweep_file.read_text())
    assert config["method"] == "grid" and config["program"] == str(path)
    assert config["parameters"] == {"cell": {"values": list(CELLS)}}
    assert set(config) == {"name", "description", "project", "program", "method", "parameters", "command"}
    assert config["command"][0] == "${env}" and "${args}" in config["command"] and "${program}" in config["command"]

    # The agent's command for one run, built as wandb's agent builds it (wandb_agent.Agent._command_run).
    run = out / CELLS[0]
    _set_status(run, "interrupted", 143, reason="stopped by SIGTERM", checkpoint=str(run / "checkpoints" / "last.ckpt"))
    sweep_vars = sweep_utils.create_sweep_command_args({"args": {"cell": {"value": CELLS[0]}}})
    sweep_vars.update(interpreter=[sys.executable], program=[config["program"]], env=["/usr/bin/env"])
    command = []
    for chunk in sweep_utils.create_sweep_command(config["command"]):
        chunk = str(chunk)
        command += (sweep_vars.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    assert command[:8] == ["/usr/bin/env", sys.executable, "-m", "benchmark", "suite", "run-cell", str(path), f"--cell={CELLS[0]}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"{CELLS[0]}: resume" in done.stdout and _status(run)["status"] == "completed"
    assert _record(run)["attempts"][-1]["action"] == "resume"


@pytest.mark.slow  # two interpreters (the submitit job, then its fit): about 30 s on 2 cores
def test_the_submitit_local_launcher_runs_a_cell_as_a_job(
    ran_suite: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = ran_suite
    run = out / CELLS[1]
    _set_status(run, "failed", 1, reason="RuntimeError: boom")
    code = main(["suite", "run", str(path), "--launcher", "local", "--retry-failed", "--only", "seed=1"])
    report = capsys.readouterr().out
    assert code == 0, report
    assert _status(run)["status"] == "completed" and _record(run)["attempts"][-1]["action"] == "retry"
    jobs = json.loads((out / ".submitit" / "jobs.json").read_text())
    assert [j["cell"] for j in jobs] == [CELLS[1]]
    assert list((out / ".submitit").glob(f"{jobs[0]['job_id']}_*_log.out"))


@pytest.mark.slow  # signals: a real fit subprocess interrupted (signal handling itself is tested in test_run_lifecycle)
def test_ctrl_c_stops_the_running_cell_resumably_and_exits_130(
    cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C reaches the suite (here: SIGINT to this process, where `suite run` runs in the
    main thread); the suite forwards it once to the running fit, which saves last.ckpt."""
    out = tmp_path / "out"
    path = tiny_suite(tmp_path / "long.yaml", cub_root, out, batches=2000)
    run = out / CELLS[0]

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 240
        while not (run / "metrics_val.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)  # the pre-training evaluation is written: training comes next
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    code = main(["suite", "run", str(path)])
    presser.join()
    output = capsys.readouterr()
    assert code == 130, output.out[-3000:]
    assert "Ctrl-C" in output.err and "1 interrupted, 1 pending" in output.out
    status = _status(run)
    assert status["status"] == "interrupted" and status["exit_code"] == 130
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not (out / CELLS[1]).exists()  # no further cell started
    suite = suites.load_suite(path)
    plan = suites.plan_cell(suite, suite.cells[0], retry_failed=False)
    assert plan.action == "resume" and plan.ckpt == run / "checkpoints" / "last.ckpt"


def test_the_slurm_launcher_submits_one_job_array_per_stage_with_the_suites_resources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SLURM's commands are stand-ins here (no cluster): sbatch keeps the script it is given."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nn=$(ls {scripts} | wc -l)\ncp "$1" {scripts}/$n.sh\n'
                                    'echo "Submitted batch job $((4242 + n))"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "squeue").write_text(f"#!/bin/sh\ncat {tmp_path / 'queue'} 2>/dev/null\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    path = tmp_path / "s.yaml"
    path.write_text(f"""
output: {tmp_path / 'out'}
grid:
  - {{methods: [ms], datasets: [cub], backbones: [resnet50], seeds: [0, 1]}}
  - methods: [context_refine]
    datasets: [cub]
    seeds: [0]
    args: {{model.source: "{{output}}/ms-cub-resnet50-seed{{seed}}/checkpoints/last.ckpt"}}
resources: {{devices: 4, num_nodes: 2, time: 2h, cpus_per_task: 8, mem_gb: 64}}
slurm: {{partition: gpu, account: acc, array_parallelism: 8, setup: ["source .venv/bin/activate"]}}
""")
    monkeypatch.setenv("PATH", f"{tmp_path / 'nowhere'}")
    assert main(["suite", "run", str(path), "--launcher", "slurm"]) == 2
    assert "needs SLURM's sbatch" in capsys.readouterr().err
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert main(["suite", "run", str(path), "--launcher", "slurm"]) == 0
    first, second = (scripts / "0.sh").read_text(), (scripts / "1.sh").read_text()
    for line in ("--array=0-1%2", "--partition=gpu", "--account=acc", "--time=120", "--nodes=2", "--gpus-per-node=4",
                 "--ntasks-per-node=4", "--cpus-per-task=8", "--mem=64GB", "--signal=USR2@120", "--job-name=suite-s"):
        assert f"#SBATCH {line}\n" in first, line
    assert "source .venv/bin/activate" in first and "-m submitit.core._submit" in first
    assert "#SBATCH --dependency=afterok:4242\n" in second  # stage 2 (Context-Refine) after its stage-1 array
    jobs = {j["cell"]: j["job_id"] for j in json.loads((tmp_path / "out" / ".submitit" / "jobs.json").read_text())}
    assert jobs == {"ms-cub-resnet50-seed0": "4242_0", "ms-cub-resnet50-seed1": "4242_1", "context_refine-cub-seed0": "4243"}
    # While SLURM holds a cell's job, neither status nor a second submission loses track of it.
    (tmp_path / "queue").write_text("4242_1 RUNNING\n4243 PENDING\n")
    capsys.readouterr()
    assert main(["suite", "status", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "job 4242_1 running" in shown and "submitted as job 4242_0" in shown
    assert main(["suite", "run", str(path), "--launcher", "slurm"]) == 0
    assert "context_refine-cub-seed0: already submitted (job 4243 pending)" in capsys.readouterr().out
    assert len(list(scripts.iterdir())) == 3  # only ms-cub-resnet50-seed0 again


@pytest.mark.slow  # a real fit subprocess run past its time limit
def test_a_cell_past_its_time_limit_gets_sigterm_and_is_resumable(tmp_path: Path) -> None:
    """resources.time: the serial runner sends SIGTERM to the fit's process group (here a stand-in process)."""
    path = tmp_path / "s.yaml"
    path.write_text(f"output: {tmp_path / 'out'}\ngrid: {{methods: [ms]}}\nresources: {{time: 1m}}\n")
    suite = suites.load_suite(path)
    cell = suite.cells[0]
    run = suites.CellRun(suite, cell, suites.Plan("run", suites.CellState("pending")))
    run.proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        run.started = time.monotonic() - 30
        run.check_time_limit()
        assert run.proc.poll() is None and not run.signals  # 30 s < 1 min
        run.started = time.monotonic() - 61
        run.check_time_limit()
        assert run.proc.wait(timeout=10) == -signal.SIGTERM
        assert run.signals == [signal.SIGTERM] and run.reason == "time limit (1:00) reached"
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
