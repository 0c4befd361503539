"""Benchmark suites (``python -m benchmark suite``): the file format, validation before any run,
the dry run, real tiny runs (every cell a ``fit`` subprocess), resuming, Ctrl-C, the submitit
local launcher and the W&B sweep export.

The real runs use a tiny ResNet at 16 px on the official-layout CUB fixture (300 train / 300
test images), 1 epoch of 2 batches: a cell is one ``python -m benchmark fit`` subprocess, most
of whose time is the interpreter's imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from benchmark.app.cli import main
from benchmark.app.suites.fields import (
    GRID_KEYS,
    REPRODUCES_KEYS,
    RESOURCE_KEYS,
    SLURM_KEYS,
    SUITE_KEYS,
    GridSpec,
    Reproduces,
    Resources,
    SlurmSpec,
    SuiteFile,
    _parse_fields,
    _Problems,
    _resources,
    _section,
)
from benchmark.app.suites.spec import LOG, RECORD, RUN_LOCK, Cell, Suite, load_suite, shipped_suites
from benchmark.app.suites.state import argv_changes, cell_state, plan_cell
from benchmark.app.suites.validation import run_lock, validate_cells
from benchmark.core.results import flatten_config
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
    return json.loads((run / RECORD).read_text())


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
    suite = load_suite(path)
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
    shipped = shipped_suites()
    assert {"smoke", "intra_batch_table1", "dmcac_table", "context_refine_table", "cross_image_attention_table"} <= set(shipped)
    for path in shipped.values():
        assert load_suite(path).cells
    smoke = load_suite("smoke")
    assert [c.id for c in smoke.cells] == [
        "ms-synthetic-resnet_tiny_test-seed0", "ms-synthetic-resnet_tiny_test-seed1",
        "proxy_anchor-synthetic-resnet_tiny_test-seed0", "proxy_anchor-synthetic-resnet_tiny_test-seed1",
    ]
    validate_cells(smoke)  # every cell's configuration parses, as fit --print_config would


MS = "methods: [ms], datasets: [synthetic]"  # a grid of one method on the embedded default
BAD = {
    "unknown-key": ("grids: {methods: [ms]}\n", ["unknown key 'grids'", "Did you mean 'grid'"]),
    "unknown-grid-key": (f"grid: {{{MS}, seed: [0]}}\n", ["unknown key 'seed' in grid", "'seeds'"]),
    "unknown-method": ("grid: {methods: [mss], datasets: [cub]}\n", ["unknown method 'mss'", "Did you mean ms"]),
    "unknown-dataset": ("grid: {methods: [ms], datasets: [cubb]}\n", ["unknown dataset 'cubb'", "cub"]),
    "unknown-backbone": (f"grid: {{{MS}, backbones: [resnet5]}}\n", ["unknown backbone 'resnet5'", "resnet50"]),
    "unknown-option": (
        "grid: {methods: [ms, margin], datasets: [cub], backbones: [resnet50]}\ncells:\n  method=margin: {model.lrr: 1}\n",
        ["cell margin-cub-resnet50-seed0", "--model.lrr", "Did you mean --model.lr", "cells['method=margin']"],
    ),
    "unknown-trainer-option": (
        f"args: {{trainer.max_epoch: 3}}\ngrid: {{{MS}}}\n",
        ["--trainer.max_epoch", "Did you mean --trainer.max_epochs", "Set in the suite file: --trainer.max_epoch (args)"],
    ),
    "empty-list": (f"grid: {{{MS}, seeds: []}}\n", ["grid.seeds is an empty list"]),
    "duplicate-seed": (f"grid: {{{MS}, seeds: [0, 0]}}\n", ["duplicate cells", "grid.seeds lists 0"]),
    "duplicate-cell": (
        "grid:\n  - {methods: [ms], datasets: [cub]}\n  - {methods: [ms], datasets: [cub]}\n",
        ["duplicate cell ms-cub-seed0"],
    ),
    "reserved-option": (f"args: {{seed_everything: 3}}\ngrid: {{{MS}}}\n", ["--seed_everything is set by grid.seeds"]),
    "selector-matches-nothing": (f"grid: {{{MS}}}\ncells:\n  method=margin: {{model.lr: 1}}\n",
                                 ["cells['method=margin'] matches no cell"]),
    "bad-selector-axis": (f"grid: {{{MS}}}\nexclude: [methd=ms]\n", ["unknown axis 'methd'", "method"]),
    "bad-time": (f"grid: {{{MS}}}\nresources: {{time: soon}}\n", ["resources.time", "not a duration"]),
    # Cells that differ only in their resources shared one validation parse, the first cell's:
    # a wrong value in another cell's resources reached its fit.
    "resource-of-one-cell": (f"grid: {{{MS}, seeds: [0, 1]}}\ncells:\n  seed=1: {{resources: {{precision: foo}}}}\n",
                             ["ms-synthetic-seed1", "--trainer.precision", "resources.precision"]),
    "resource-twice": (f"args: {{trainer.devices: 2}}\ngrid: {{{MS}}}\nresources: {{devices: 1}}\n",
                       ["--trainer.devices is given both", "give it once"]),
    "no-grid": ("name: x\n", ["no grid: section"]),
    "not-yaml": ("grid: [methods: ms\n", ["not valid YAML"]),
    # A grid that names no method or no dataset planned a cell of fit's defaults (dmcac on the
    # synthetic data) instead of being refused.
    "empty-grid": ("grid: {}\n", ["grid is empty: every grid lists its methods: and datasets:",
                                   "e.g. grid: {methods: [ms], datasets: [cub]"]),
    "empty-grid-list": ("grid: []\n", ["grid is an empty list, so the suite has no cell",
                                        "e.g. grid: {methods: [ms], datasets: [cub]"]),
    "empty-grid-in-a-list": ("grid:\n  - {methods: [ms], datasets: [cub]}\n  - {}\n", ["grid[1] is empty"]),
    "grid-without-methods": ("grid: {datasets: [cub], seeds: [0]}\n", ["grid names no methods:", "python -m benchmark list"]),
    "grid-without-datasets": ("grid: {methods: [ms]}\n", ["grid names no datasets:", "datasets: [synthetic]"]),
    "grid-with-neither": ("grid: {seeds: [0, 1]}\n", ["grid names no methods and no datasets:"]),
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


# Values of the wrong type, refused by the suite file's schema (benchmark/app/suites/fields.py):
# each problem names its key (an entry of a list or mapping by index or key) and what to write.
# (file, fragments the message has, fragments it must not have)
BAD_TYPES = {
    "devices-zero": (f"grid: {{{MS}}}\nresources: {{devices: 0}}\n",
                     ["resources.devices = 0 is not a positive integer or 'auto'"], []),
    "negative-memory": (f"grid: {{{MS}}}\nresources: {{mem_gb: -1}}\n", ["resources.mem_gb = -1 is not a positive number"], []),
    "cell-resources": (f"grid: {{{MS}}}\ncells:\n  method=ms: {{resources: {{num_nodes: 1.5}}}}\n",
                       ["cells['method=ms'].resources.num_nodes = 1.5 is not a positive integer"], []),
    "time-not-a-duration": (f"grid: {{{MS}}}\nresources: {{time: true}}\n",
                            ["resources.time = True is not a duration", "'90m', '4h' or 'D-HH:MM:SS'"], []),
    # The slurm: section's values were not checked: they failed in submitit, after the submission started.
    "slurm-array-parallelism": (f"grid: {{{MS}}}\nslurm: {{array_parallelism: many}}\n",
                                ["slurm.array_parallelism = 'many' is not a positive integer"], []),
    "slurm-signal-delay": (f"grid: {{{MS}}}\nslurm: {{signal_delay_s: -5}}\n",
                           ["slurm.signal_delay_s = -5 is not a non-negative integer"], []),
    "slurm-additional": (f"grid: {{{MS}}}\nslurm: {{additional: [exclusive]}}\n",
                         ["slurm.additional = ['exclusive'] is not a mapping of sbatch options"], []),
    "seed-yes": (f"grid: {{{MS}, seeds: [0, yes]}}\n", ["grid.seeds[1] = True is not a non-negative integer"], []),
    "method-not-a-name": ("grid: {methods: [ms, {margin: 1}], datasets: [cub]}\n",
                          ["grid.methods[1] = {'margin': 1} is not a method name"], ["unknown method"]),
    # A list where a mapping belongs was also reported as an empty mapping.
    "variants-not-a-mapping": ("grid: {methods: ms, datasets: cub, variants: [a]}\n",
                               ["grid.variants = ['a'] is not a mapping of variant names to options"], ["is empty"]),
    "variant-not-a-mapping": (f"grid: {{{MS}, variants: {{a: 3}}}}\n",
                              ["grid.variants['a'] = 3 is not a mapping of options"], []),
    "grid-entry-not-a-mapping": (f"grid:\n  - {{{MS}}}\n  - 3\n", ["grid[1] = 3 is not a grid mapping"], []),
    "reproduces-without-row": (f"grid: {{{MS}}}\npaper: intra_batch\nreproduces: [{{cells: variant=base, table: Table 1}}]\n",
                               ["reproduces[0] names no row", "e.g. {cells: variant=base, table: Table 1, row: Ours}"], []),
    "description-not-text": (f"grid: {{{MS}}}\ndescription: [a, b]\n", ["description = ['a', 'b'] is not one line of text"], []),
}


@pytest.mark.parametrize("case", sorted(BAD_TYPES))
def test_a_value_of_the_wrong_type_is_named_with_its_key_and_the_fix(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, fragments, absent = BAD_TYPES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(f"output: {tmp_path / 'out'}\n" + text)
    assert main(["suite", "run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    for fragment in absent:
        assert fragment not in err, (fragment, err)


def test_type_problems_are_reported_with_the_others(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong value in a grid does not hide the grid's other problems, nor those of other sections."""
    path = tmp_path / "bad.yaml"
    path.write_text("grid: {methods: [mss], datasets: [synthetic], seeds: [0, yes]}\nresources: {devices: 0}\n"
                    "slurm: {array_parallelism: many}\n")
    assert main(["suite", "run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "4 problems, no cell was started" in err
    for fragment in ("unknown method 'mss'", "grid.seeds[1] = True", "resources.devices = 0", "slurm.array_parallelism"):
        assert fragment in err, (fragment, err)


def test_the_schema_reads_a_scalar_as_a_list_of_one_and_a_number_as_text(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"output: {tmp_path / 'out'}\ngrid: {{methods: ms, datasets: synthetic, seeds: 3}}\n"
                    "resources: {precision: 32, time: '90', devices: auto, mem_gb: 4}\n"
                    "slurm: {setup: source .venv/bin/activate, array_parallelism: '2'}\n")
    suite = load_suite(path)
    (cell,) = suite.cells
    assert cell.id == "ms-synthetic-seed3"
    assert cell.resources == Resources(devices="auto", precision="32", time=90.0, mem_gb=4.0)
    # Plain builtins: the resources are hashed (one job array each) and pickled into submitit jobs.
    assert [type(v) for v in (cell.resources.precision, cell.resources.time, cell.resources.mem_gb)] == [str, float, float]
    assert pickle.loads(pickle.dumps(cell.resources)) == cell.resources and hash(cell.resources)
    assert cell.argv[cell.argv.index("--trainer.precision") + 1] == "32"
    # One setup line is a list of one (submitit's slurm_setup), not a string split into characters.
    assert suite.slurm == {"setup": ["source .venv/bin/activate"], "array_parallelism": 2}
    assert type(suite.slurm["array_parallelism"]) is int


def test_the_documented_file_format_is_the_schema() -> None:
    """docs/leaderboard.md's example names every key of every section, and its values have the schema's types."""
    text = (REPO / "docs" / "leaderboard.md").read_text()
    doc = yaml.safe_load(text.split("### The file format", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0])
    assert tuple(doc) == SUITE_KEYS
    assert {key for grid in doc["grid"] for key in grid} == set(GRID_KEYS)
    assert tuple(doc["resources"]) == RESOURCE_KEYS and tuple(doc["slurm"]) == SLURM_KEYS
    assert all(tuple(entry) == REPRODUCES_KEYS for entry in doc["reproduces"])
    problems = _Problems(Path("docs/leaderboard.md"))
    _parse_fields(SuiteFile, doc, "the suite file", problems, prefix="")
    for i, grid in enumerate(doc["grid"]):
        assert _section(GridSpec, grid, f"grid[{i}]", problems) is not None
    assert _section(SlurmSpec, doc["slurm"], "slurm", problems) is not None
    assert _resources(doc["resources"], "resources", problems).time == 12 * 60
    for i, entry in enumerate(doc["reproduces"]):
        assert _section(Reproduces, entry, f"reproduces[{i}]", problems) is not None
    assert problems.items == []


def test_an_unwritable_output_folder_fails_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "s.yaml"
    path.write_text(f"output: {tmp_path / 'a_file' / 'out'}\ngrid: {{{MS}}}\n")
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
    with run_lock(out):  # what a first `suite run` holds (a second open file: flock conflicts)
        assert main(["suite", "run", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"Another `suite run` is using the output folder {out} (pid {os.getpid()} on" in err
        assert "--output DIR" in err
        assert main(["suite", "run", str(path), "--dry-run"]) == 0  # a dry run changes nothing: allowed
        capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK]  # no cell was started
    with run_lock(out):  # released with the first run: free again
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
    assert [c.id for c in load_suite(path).cells] == [BROKEN, *CELLS]
    start = time.monotonic()
    assert main(["suite", "run", str(path)]) == 1
    print(f"3-cell suite: {time.monotonic() - start:.1f} s")
    # It failed at start-up (exit 2, before fit has a status.json): the suite's record says so.
    suite = load_suite(path)
    failed = cell_state(suite, suite.cell(BROKEN))
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
        record = json.loads((run / "metrics_test.json").read_text())
        assert (record["suite"], record["cell"]) == ("tiny", cell)  # what the report filters a suite's runs by
        assert (run / "metrics.csv").is_file()  # logger: csv from the suite's args
        assert "===== exit 0" in (run / LOG).read_text()
        record = _record(run)
        assert record["attempts"][-1]["exit_code"] == 0
        assert record["attempts"][-1]["command"][1:4] == ["-m", "benchmark", "fit"]
        # One launcher path: the serial run's cell ran as a submitit job (its log beside the others'),
        # not as a fit the suite process supervised itself.
        job = record["attempts"][-1]["job_id"]
        assert job and list((out / ".submitit").glob(f"{job}_0_log.out")), record["attempts"][-1]
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
    assert set(config) == {"name", "description", "project", "program", "method", "metric", "parameters", "command"}
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
    suite = load_suite(path)
    plan = plan_cell(suite, suite.cells[0], retry_failed=False)
    assert plan.action == "resume" and plan.ckpt == run / "checkpoints" / "last.ckpt"


@pytest.mark.slow  # a real `suite run` process and its job's fit, interrupted: about 40 s on 2 cores
@pytest.mark.parametrize("launcher", ["serial", "local"])
def test_a_terminal_ctrl_c_reaches_the_fit_once_so_it_saves_instead_of_aborting(
    cub_root: Path, tmp_path: Path, launcher: str
) -> None:
    """A terminal sends Ctrl-C to its whole foreground process group. The suite's jobs must not
    get it from there as well as from the suite's relay: a fit given SIGINT twice aborts
    without saving. Here `suite run` is its own process group, and the group gets the SIGINT."""
    out = tmp_path / "out"
    path = tiny_suite(tmp_path / "long.yaml", cub_root, out, batches=2000)
    run = out / CELLS[0]
    suite_run = subprocess.Popen(  # noqa: S603 - our own interpreter
        [sys.executable, "-m", "benchmark", "suite", "run", str(path), "--launcher", launcher, "--max-parallel", "1"]
        if launcher == "local" else [sys.executable, "-m", "benchmark", "suite", "run", str(path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics_val.json").is_file() and time.monotonic() < deadline and suite_run.poll() is None:
            time.sleep(0.2)  # the pre-training evaluation is written: training comes next
        time.sleep(1.0)
        with contextlib.suppress(ProcessLookupError):  # a suite that already ended fails below
            os.killpg(suite_run.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        output, _ = suite_run.communicate(timeout=240)
    finally:
        if suite_run.poll() is None:
            os.killpg(suite_run.pid, signal.SIGKILL)
    assert suite_run.returncode == 130, output[-3000:]
    status = _status(run)
    assert status["status"] == "interrupted" and status["exit_code"] == 130, status
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert _record(run)["attempts"][-1]["exit_code"] == 130
    assert not (out / CELLS[1]).exists()  # no further cell started


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


@pytest.mark.slow  # a real fit run past its time limit: about 40 s on 2 cores
def test_a_cell_past_its_time_limit_gets_sigterm_and_is_resumable(
    cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """resources.time through the real `suite run`: the cell's job sends its fit SIGTERM once the
    limit has passed; the fit saves last.ckpt, the cell ends interrupted with the limit as its
    reason, and the next run resumes it."""
    out = tmp_path / "out"
    path = tiny_suite(tmp_path / "long.yaml", cub_root, out, batches=2000, seeds="[0]", extra="resources: {time: 25s}\n")
    code = main(["suite", "run", str(path)])
    output = capsys.readouterr().out
    assert code == 1, output[-3000:]
    run = out / CELLS[0]
    status, attempt = _status(run), _record(run)["attempts"][-1]
    assert status["status"] == "interrupted" and status["exit_code"] == 143
    assert attempt["exit_code"] == 143 and attempt["reason"] == "time limit (0:25) reached"
    assert 25 <= attempt["seconds"] < 120
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "1 interrupted" in output
    suite = load_suite(path)
    plan = plan_cell(suite, suite.cells[0], retry_failed=False)
    assert plan.action == "resume" and plan.ckpt == run / "checkpoints" / "last.ckpt"


def test_a_local_job_of_a_cell_without_a_gpu_count_sees_every_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit shows a local job only the GPUs it is given (CUDA_VISIBLE_DEVICES): a cell with
    devices: auto (the default) was given none, so its fit trained on the CPU of a GPU machine.
    Here the machine has 4 GPUs (a stand-in count): an auto cell gets all four, a devices: 2 cell
    two, and accelerator: cpu none."""
    from benchmark.app.suites import launchers

    monkeypatch.setattr(launchers, "_gpus_here", lambda: 4)
    path = tmp_path / "s.yaml"
    path.write_text(f"output: {tmp_path / 'out'}\ngrid: {{{MS}, variants: {{auto: {{}}, two: {{}}, cpu: {{}}}}}}\n"
                    "cells:\n  variant=two: {resources: {devices: 2}}\n  variant=cpu: {resources: {accelerator: cpu}}\n")
    suite = load_suite(path)
    given = {c.variant: launchers._executor(suite, "local", c.resources, tmp_path / "jobs")._executor.parameters["gpus_per_node"]
             for c in suite.cells}
    assert given == {"auto": 4, "two": 2, "cpu": 0}
    assert launchers.default_parallel([suite.cells[1]]) == 2 and launchers.default_parallel([suite.cells[0]]) == 1


def test_parallel_jobs_here_start_a_cell_only_after_the_cells_it_needs_have_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--launcher local with room for three jobs, cells x <- a <- b (each names the previous one's
    folder): a waits while x runs, and b must wait while a has not even started. b was started
    next to x (a was pending, not running), found a not completed and was reported not started."""
    from benchmark.app.suites import launchers

    path = tmp_path / "s.yaml"
    path.write_text(f"output: {tmp_path / 'out'}\ngrid: {{{MS}, variants: {{x: {{}}, "
                    "a: {data.root: '{output}/ms-synthetic-x-seed0'}, b: {data.root: '{output}/ms-synthetic-a-seed0'}}}\n")
    suite = load_suite(path)
    assert [c.needs for c in suite.cells] == [(), ("ms-synthetic-x-seed0",), ("ms-synthetic-a-seed0",)]
    started: list[tuple[str, tuple[str, ...]]] = []  # (cell, cells running when it was submitted)
    running: dict[str, int] = {}

    class Job:  # a stand-in for submitit's local job: done on its second poll, the cell completed
        def __init__(self, cell: Cell) -> None:
            self.cell, self.job_id, self.polls = cell, str(len(started)), 0

        def done(self) -> bool:
            self.polls += 1
            if self.polls == 2:
                _fake_attempt(suite, self.cell, "completed", 0)
                running.pop(self.cell.id)
            return self.polls >= 2

    def submit(executor, job, suite_, cell, retry_failed):
        started.append((cell.id, tuple(running)))
        running[cell.id] = 1
        return Job(cell)

    monkeypatch.setattr(launchers, "_submit", submit)
    monkeypatch.setattr(launchers.time, "sleep", lambda s: None)
    assert launchers.run_here(suite, suite.cells, retry_failed=False, max_parallel=3, live=False, launcher="local") == 0
    assert started == [("ms-synthetic-x-seed0", ()), ("ms-synthetic-a-seed0", ()), ("ms-synthetic-b-seed0", ())]
    assert ": not started" not in capsys.readouterr().out  # (the headline names the "not started" count)


def test_a_requeued_multi_task_job_hands_its_tasks_a_new_launch_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM keeps a requeued job's id: the other tasks must wait for task 0's new command (which
    resumes with --ckpt_path), not start the previous attempt's from the file it left."""
    from benchmark.app.suites.launchers import launch_file

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    first = launch_file(tmp_path, "123_4")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert launch_file(tmp_path, "123_4") != first and launch_file(tmp_path, "123_4").parent == tmp_path


# ---------------------------------------------------------------------------- changed options
def _fake_attempt(suite: Suite, cell: Cell, status: str | None, exit_code: int | None = None,
                  pid: int | None = None, checkpoint: bool = False) -> Path:
    """A cell's folder as one attempt of ``suite``'s arguments leaves it: suite.json, status.json
    (written by its fit; ``pid``: the fit's process) and, with ``checkpoint``, a last.ckpt."""
    run = suite.run_dir(cell)
    run.mkdir(parents=True)
    attempt = {"action": "run", "command": ["python", "-m", "benchmark", "fit", *cell.argv], "exit_code": exit_code,
               "seconds": 1.0, "reason": ""}
    (run / RECORD).write_text(json.dumps({"suite": str(suite.path), "cell": cell.id, "argv": cell.argv,
                                                 "attempts": [attempt]}))
    if status is not None:
        (run / "status.json").write_text(json.dumps({
            "status": status, "exit_code": exit_code, "reason": f"{status} here", "host": socket.gethostname(),
            "pid": pid or os.getpid()}))
    if checkpoint:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint: a resume would fail")
    return run


def test_a_cell_whose_options_changed_is_not_resumed_and_status_and_dry_run_say_what_changed(
    cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The suite file changed after its cells ran. Resuming the interrupted cell would continue its
    checkpoint under the new options while its config.yaml keeps the old ones (a result of neither):
    `suite run` and `run-cell` refuse before starting anything (exit 2, naming the options old -> new
    and the fix); `suite status` and the dry run show "changed" for the cells in every state."""
    out = tmp_path / "out"
    path = tiny_suite(tmp_path / "s.yaml", cub_root, out, seeds="[0, 1, 2]")
    old = load_suite(path)
    completed, interrupted, failed = old.cells
    _fake_attempt(old, completed, "completed", 0)
    _fake_attempt(old, interrupted, "interrupted", 143, checkpoint=True)
    _fake_attempt(old, failed, "failed", 1)
    tiny_suite(path, cub_root, out, batches=3, seeds="[0, 1, 2]")  # edited: 2 -> 3 batches per epoch
    change = "--data.batches_per_epoch 2 -> 3"

    assert main(["suite", "status", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "3 cells: 1 completed, 1 interrupted, 1 failed (3 changed)" in shown
    for cell, state in ((completed, "completed"), (interrupted, "interrupted"), (failed, "failed")):
        assert f"  {cell.id} ({state}): {change}" in shown
    assert "--restart-changed" in shown

    assert main(["suite", "run", str(path), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert f"{completed.id}: completed, changed -> skip (completed with other options: {change}" in listing
    assert (f"{interrupted.id}: interrupted, changed -> not started (not resumed: options changed: {change}; "
            "--restart-changed starts it again from scratch)") in listing
    assert f"{failed.id}: failed, changed -> not started (failed: failed here; options changed: {change})" in listing
    assert "--ckpt_path" not in listing
    assert main(["suite", "run", str(path), "--dry-run", "--restart-changed"]) == 0
    assert capsys.readouterr().out.count(f", changed -> restart (start again from scratch: options changed: {change})") == 3

    for command in (["run", str(path)], ["run-cell", str(path), "--cell", interrupted.id]):
        assert main(["suite", *command]) == 2
        message = next(line for line in capsys.readouterr().err.splitlines() if "--restart-changed" in line)
        assert f"({interrupted.id}: {change})" in message and "config.yaml keeps the old ones" in message
        assert str(out / ".attempts") in message and "restore the old values" in message
    for cell in old.cells:  # nothing was started
        assert len(_record(out / cell.id)["attempts"]) == 1 and not (out / cell.id / LOG).exists()
    # Options written in another order in the file are the same configuration.
    argv = interrupted.argv
    assert argv_changes(argv, [*argv[4:6], *argv[:4], *argv[6:]]) == []
    assert argv_changes(["--a", "1"], ["--b", "2"]) == ["--a 1 -> (not set)", "--b (not set) -> 2"]


def test_restart_changed_starts_a_changed_cell_again_from_scratch_and_keeps_the_old_attempt(
    cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    path = tiny_suite(tmp_path / "s.yaml", cub_root, out, seeds="[0]")
    old = load_suite(path)
    cell = old.cells[0]
    _fake_attempt(old, cell, "interrupted", 143, checkpoint=True)
    tiny_suite(path, cub_root, out, batches=3, seeds="[0]")
    new = load_suite(path).cells[0]
    assert main(["suite", "run", str(path), "--restart-changed"]) == 0
    run, kept = out / cell.id, out / ".attempts" / f"{cell.id}.1"
    assert flatten_config(yaml.safe_load((run / "config.yaml").read_text()))["data.batches_per_epoch"] == 3
    assert _status(run)["status"] == "completed"
    record = _record(run)
    assert record["argv"] == new.argv and [a["action"] for a in record["attempts"]] == ["run", "restart"]
    assert "--ckpt_path" not in record["attempts"][-1]["command"]  # from scratch, not from the old checkpoint
    assert _status(kept)["status"] == "interrupted" and _record(kept)["argv"] == cell.argv
    assert (kept / "checkpoints" / "last.ckpt").is_file()
    capsys.readouterr()
    assert main(["suite", "status", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "1 cell: 1 completed\n" in shown and "(changed)" not in shown and "changed since" not in shown


# ---------------------------------------------------------------------------- W&B sweeps and stage-2 cells
def test_the_sweep_names_the_metric_the_cells_are_judged_by(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """metric: the test counterpart of what the cells' checkpoints are selected by; test/R@1 when they differ."""
    refine = ("  - methods: [context_refine]\n    datasets: [cub]\n    seeds: [0]\n"
              "    args: {model.source: \"{output}/ms-cub-seed0/checkpoints/last.ckpt\"}\n")
    cases = {
        "ms": ("grid: [{methods: [ms], datasets: [cub]}]\n", "test/R@1", "maximize", "every cell's checkpoints"),
        "refine": ("grid:\n" + refine, "test/refined/R@1", "maximize", "every cell's checkpoints"),
        "both": ("grid:\n  - {methods: [ms], datasets: [cub]}\n" + refine, "test/R@1", "maximize",
                 "selected by different metrics (test/R@1, test/refined/R@1)"),
        "monitor": ("args: {checkpoint.monitor: val/MAP@R, checkpoint.mode: min}\ngrid: {methods: [ms], datasets: [cub]}\n",
                    "test/MAP@R", "minimize", "every cell's checkpoints"),
    }
    for name, (grid, metric, goal, why) in cases.items():
        path, sweep = tmp_path / f"{name}.yaml", tmp_path / f"{name}.sweep.yaml"
        path.write_text(f"output: {tmp_path / name}\nargs: {{logger: wandb}}\n" + grid)
        assert main(["suite", "export-sweep", str(path), "--out", str(sweep)]) == 0, capsys.readouterr().err
        text = sweep.read_text()
        assert yaml.safe_load(text)["metric"] == {"name": metric, "goal": goal}, name
        assert f"# metric: {metric} ({goal}): " in text and why in text, text
    capsys.readouterr()


TWO_STAGES = (STAGE1, STAGE2) = ("ms-cub-resnet50-seed0", "context_refine-cub-seed0")


def two_stage_suite(path: Path, output: Path) -> Suite:
    """Stage 2 (Context-Refine) names stage 1's checkpoint: it needs that cell."""
    path.write_text(f"""output: {output}
grid:
  - {{methods: [ms], datasets: [cub], backbones: [resnet50], seeds: [0]}}
  - methods: [context_refine]
    datasets: [cub]
    seeds: [0]
    args: {{model.source: "{{output}}/{STAGE1}/checkpoints/last.ckpt"}}
""")
    suite = load_suite(path)
    assert suite.cell(STAGE2).needs == (STAGE1,)
    return suite


def test_run_cell_of_a_cell_whose_need_failed_skips_it_records_why_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Agents run a sweep's cells at once. A stage-2 cell whose stage-1 cell failed is not started
    (its fit would fail on the missing checkpoint), is recorded as blocked with the reason, and
    exits 0: not a failure of its own (the stage-1 run carries it), and a W&B agent stops after a
    few quick non-zero exits, which would end the sweep on that machine."""
    out = tmp_path / "out"
    suite = two_stage_suite(tmp_path / "s.yaml", out)
    _fake_attempt(suite, suite.cell(STAGE1), "failed", 1)
    assert main(["suite", "run-cell", str(suite.path), "--cell", STAGE2]) == 0
    err = capsys.readouterr().err
    assert f"{STAGE2}: skipped, not started: needs {STAGE1}, which is failed (failed here)" in err
    assert "exit 0" in err and "--retry-failed" in err
    run = out / STAGE2
    assert _record(run)["blocked"]["reason"] == f"needs {STAGE1}, which is failed (failed here)"
    assert _record(run)["attempts"] == [] and "argv" not in _record(run)
    assert not (run / LOG).exists() and not (run / "status.json").exists()  # no fit was started
    assert main(["suite", "status", str(suite.path)]) == 0
    shown = capsys.readouterr().out
    assert "2 cells: 1 failed, 1 blocked" in shown and "blocked" in shown.split(STAGE2)[1].splitlines()[0]


def test_run_cell_waits_while_a_need_runs_and_gives_up_after_its_wait(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    suite = two_stage_suite(tmp_path / "s.yaml", out)
    # A need that is pending (nobody started it) past --wait-needs: not started, exit 1.
    start = time.monotonic()
    assert main(["suite", "run-cell", str(suite.path), "--cell", STAGE2, "--wait-needs", "2s"]) == 1
    assert time.monotonic() - start >= 2
    output = capsys.readouterr()
    assert f"{STAGE2}: waiting for the cells it needs: {STAGE1} (pending); up to 0:02 more" in output.out
    assert f"not started: waited 0:02 for {STAGE1} (pending), which did not complete" in output.err
    assert _record(out / STAGE2)["blocked"]["reason"] == f"waited 0:02 for {STAGE1} (pending)"
    # A need whose fit runs (its process is alive on this host), then fails: the cell waits, then is skipped.
    fit = subprocess.Popen(["sleep", "60"])
    try:
        stage1 = _fake_attempt(suite, suite.cell(STAGE1), "running", pid=fit.pid)

        def fail_later() -> None:
            time.sleep(2.5)
            _set_status(stage1, "failed", 1, reason="RuntimeError: boom")

        failer = threading.Thread(target=fail_later)
        failer.start()
        start = time.monotonic()
        assert main(["suite", "run-cell", str(suite.path), "--cell", STAGE2, "--wait-needs", "1m"]) == 0
        waited = time.monotonic() - start
        failer.join()
    finally:
        fit.kill()
        fit.wait()
    output = capsys.readouterr()
    assert f"waiting for the cells it needs: {STAGE1} (running on {socket.gethostname()} (pid {fit.pid}))" in output.out
    assert 2.5 <= waited < 30, waited
    assert f"skipped, not started: needs {STAGE1}, which is failed (RuntimeError: boom)" in output.err
    assert not (out / STAGE2 / LOG).exists()


@pytest.mark.slow  # two run-cell processes, each with a real fit, one after the other: about 60 s on 2 cores
def test_two_agents_at_once_the_stage2_cell_waits_for_its_stage1_cell_then_runs(cub_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = tmp_path / "two.yaml"
    path.write_text(
        f"name: two\noutput: {out}\n" + TINY_ARGS.format(cub=cub_root, batches=2).replace("  backbone.pretrained: false\n", "")
        .replace("  model.embedding_dim: 8\n", "")
        + "grid:\n  - methods: [ms]\n    datasets: [cub]\n    backbones: [resnet_tiny_test]\n    seeds: [0]\n"
        "    args: {backbone.pretrained: false, model.embedding_dim: 8}\n"
        "  - methods: [context_refine]\n    datasets: [cub]\n    seeds: [0]\n"
        "    args: {model.source: \"{output}/ms-cub-resnet_tiny_test-seed0/checkpoints/last.ckpt\", "
        "model.refiner.num_blocks: 2, model.refiner.num_neighbours: 3, model.inference.cache_dir: \"{output}/cache\"}\n"
    )
    stage1, stage2 = "ms-cub-resnet_tiny_test-seed0", "context_refine-cub-seed0"
    command = [sys.executable, "-m", "benchmark", "suite", "run-cell", str(path), "--wait-needs", "5m", "--cell"]
    second = subprocess.Popen([*command, stage2], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = subprocess.run([*command, stage1], cwd=REPO, capture_output=True, text=True, timeout=300)
    text = second.communicate(timeout=300)[0]
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert second.returncode == 0, text[-3000:]
    assert f"{stage2}: waiting for the cells it needs: {stage1}" in text and f"{stage2}: run;" in text
    assert _status(out / stage2)["status"] == "completed"
    assert json.loads((out / stage2 / "metrics_test.json").read_text())["source"] == str(
        out / stage1 / "checkpoints" / "last.ckpt")


# ---------------------------------------------------------------------------- reading run records
def test_status_reads_the_run_state_and_the_final_number_as_benchmark_results_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fit killed without a final status (its pid is gone on this host) is interrupted and resumes;
    the R@1 shown is the end-of-training test's, not that of a later `test --ckpt_path`."""
    out = tmp_path / "out"
    path = tmp_path / "s.yaml"
    path.write_text(f"output: {out}\ngrid: {{{MS}, seeds: [0, 1]}}\n")
    suite = load_suite(path)
    killed, tested = suite.cells
    gone = subprocess.Popen(["true"])
    gone.wait()
    _fake_attempt(suite, killed, "running", pid=gone.pid, checkpoint=True)
    run = _fake_attempt(suite, tested, "completed", 0)
    final = {"stage": "test", "global_step": 4, "role": "final", "metrics": {"R@1": 0.5}}
    later = {"stage": "test", "global_step": 4, "role": "checkpoint", "metrics": {"R@1": 0.9},
             "checkpoint": {"path": "best.ckpt", "selected_by": "best val/R@1"}}
    (run / "metrics_test.json").write_text(json.dumps({"metrics": {"R@1": 0.9}, "evaluations": [final, later]}))
    assert main(["suite", "status", str(path)]) == 0
    shown = capsys.readouterr().out
    row = next(line for line in shown.splitlines() if killed.id in line)
    assert "interrupted" in row and f"status says running, but its process (pid {gone.pid} on" in row
    row = next(line for line in shown.splitlines() if tested.id in line)
    assert "50.00" in row and "90.00" not in row
    assert main(["suite", "run", str(path), "--dry-run"]) == 0
    assert f"{killed.id}: interrupted -> resume (resume from last.ckpt)" in capsys.readouterr().out
