"""One command for a lent GPU: every throughput check of the benchmark, one JSON file, one table.

    python -m benchmark perf gpu                    # on a GPU: the full checks (goal: < 8 minutes on one H100/H200)
    python -m benchmark perf gpu --only eval_sop    # one check
    python -m benchmark perf gpu --cpu              # the tiny CPU versions (what CI runs; also the default without CUDA)

A GPU is lent to some sessions only, for minutes, so the checks are prepared here and run as
one script. They are listed in ``configs/perf/gpu.yaml`` (installed with the recipes): each is a
registered perf command (``train``, ``eval``, ``refine``, ``reciprocal``, ...) with its arguments
on a GPU and the tiny arguments that exercise the same code paths on a CPU. The command runs
each check in this process, collects the key numbers it reports
(:func:`benchmark.core.contracts.perf_headline`, with their goals), its time, its peak GPU memory and any
error (a failing check does not stop the others), prints one table and writes one JSON file
(``--out``, default ``perf_gpu.json``). The exit code is 1 when a check failed or missed a goal.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmark.core import registry
from benchmark.core.contracts import PERF_HEADLINES, register_perf
from benchmark.core.defaults import recipe_dir
from benchmark.core.errors import ConfigError
from benchmark.core.io import atomic_write_text
from benchmark.core.io import console as make_console

#: The checks file, relative to the installed recipes (``configs/``), so a wheel carries it too.
CONFIG = "perf/gpu.yaml"


def load_checks(path: Path | None = None) -> list[dict[str, Any]]:
    """The checks of ``configs/perf/gpu.yaml`` (or ``path``), validated.

    A check is a mapping: ``name`` (what ``--only`` selects and the table shows), ``command`` (a
    registered perf command), ``gpu`` and ``cpu`` (its arguments on a GPU and in the tiny CPU
    version, as strings) and an optional ``summary``.

    Args:
        path: another checks file (``--config``); default the installed ``configs/perf/gpu.yaml``.

    Returns:
        The checks in file order (the order they run in).

    Raises:
        ConfigError: a check lacks a key or has a non-string argument (exit 2, no traceback).
    """
    path = path or recipe_dir() / CONFIG
    checks = (yaml.safe_load(path.read_text()) or {}).get("checks") or []
    for i, check in enumerate(checks):
        missing = [k for k in ("name", "command", "gpu", "cpu") if k not in check]
        if missing:
            raise ConfigError(f"{path}: check {i} lacks {', '.join(missing)}.")
        # argv must be strings, as on a command line; YAML reads an unquoted 224 as an int, hence the quotes.
        if not all(isinstance(a, str) for a in check["gpu"] + check["cpu"]):
            raise ConfigError(f"{path}: check {check['name']!r}: every argument must be a string (quote numbers).")
    return checks


def run_check(check: dict[str, Any], on_gpu: bool, out_dir: Path = Path(".")) -> dict[str, Any]:
    """Run one check's perf command in this process: its headlines, seconds, peak GPU memory, error.
    ``{out_dir}`` in an argument becomes ``out_dir`` (where the command's own files go).

    In this process rather than a subprocess: the interpreter and the CUDA context start once for
    all checks, which matters within a GPU lease of minutes.

    Args:
        check: one check of :func:`load_checks`.
        on_gpu: run the ``gpu`` arguments (and measure GPU memory), else the ``cpu`` ones.
        out_dir: the folder of the JSON file; a check's own output files go there.

    Returns:
        The check's JSON entry: ``name``, ``command``, ``argv``, ``summary``, ``seconds`` (wall
        time), ``peak_gpu_mib`` (None on the CPU), ``headlines`` (label, value, unit, goal,
        ``higher_is_better``, ``met``; goals only on a GPU), ``error`` (None, or what went wrong)
        and ``ok`` (no error and no goal missed).
    """
    argv = [a.replace("{out_dir}", str(out_dir)) for a in (check["gpu"] if on_gpu else check["cpu"])]
    entry: dict[str, Any] = {"name": check["name"], "command": check["command"], "argv": argv,
                             "summary": check.get("summary", "")}
    command = registry.PERF_COMMANDS.get(check["command"])
    if command is None:  # a typo in the checks file, or a plugin's command not installed here
        entry.update(ok=False, error=f"perf command {check['command']!r} is not registered", headlines=[], seconds=0.0,
                     peak_gpu_mib=None)
        return entry
    # The commands append their key numbers to this module-level list: cleared before and after, so
    # that a check never reports another's numbers.
    PERF_HEADLINES.clear()
    if on_gpu:
        # The peak is per check: the allocator's cache and counter are reset before each.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        code = command.run(argv)
        error = None if code == 0 else f"exit code {code}"
    except SystemExit as exit_:  # argparse errors (and a command that exits with a message)
        error = f"exit {exit_.code}"
    except Exception as err:  # a failing check must not stop the others
        error = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    entry["seconds"] = round(time.perf_counter() - start, 2)
    # Memory held by tensors at the peak; the caching allocator reserves more than this.
    entry["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else None
    # the goals are for the GPU sizes: the tiny CPU versions only keep the code paths alive
    entry["headlines"] = [
        {"label": h.label, "value": h.value, "unit": h.unit, "goal": h.goal if on_gpu else None,
         "higher_is_better": h.higher_is_better, "met": h.met if on_gpu else None} for h in PERF_HEADLINES
    ]
    PERF_HEADLINES.clear()
    entry["error"] = error
    # A missed goal fails the check; a number without a goal (met None) never does.
    entry["ok"] = error is None and all(h["met"] is not False for h in entry["headlines"])
    return entry


def _machine(on_gpu: bool) -> dict[str, Any]:
    """What the numbers were measured on: Python, torch, CPU threads, the CPU's model and whether it
    has AVX-512 (Linux: ``/proc/cpuinfo``), and on a GPU its name, memory and the CUDA version."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
        info["avx512"] = "avx512" in text
    except OSError:  # not Linux: the CPU stays unnamed
        pass
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def print_table(entries: list[dict[str, Any]], machine: dict[str, Any], total: float) -> None:
    """The console summary: one line per headline (a check without any gets one line), the goal and
    whether it was met, then the checks that failed.

    Args:
        entries: the checks' entries (:func:`run_check`).
        machine: :func:`_machine`'s description.
        total: seconds for all checks.
    """
    from rich.table import Table

    console = make_console()
    where = machine.get("gpu") or f"CPU ({machine.get('cpu', '?')}; tiny sizes)"
    console.print(f"[bold]python -m benchmark perf gpu[/bold]: {where}, torch {machine['torch']}; {total:.0f} s in all",
                  highlight=False)
    table = Table(show_lines=False)
    for col in ("check", "s", "peak GPU MiB", "number", "value", "goal", ""):
        table.add_column(col, justify="right" if col in ("s", "peak GPU MiB", "value", "goal") else "left")
    for e in entries:
        rows = e["headlines"] or [None]
        for i, h in enumerate(rows):
            first = i == 0  # the check's name, time and memory once, on its first line
            status = ("[red]error[/]" if e["error"] else "") if h is None else (
                "" if h["met"] is None else ("[green]met[/]" if h["met"] else "[red]missed[/]"))
            table.add_row(
                e["name"] if first else "", f"{e['seconds']:.1f}" if first else "",
                (f"{e['peak_gpu_mib']:,.0f}" if e["peak_gpu_mib"] is not None else "-") if first else "",
                h["label"] if h else (e["error"] or "no number reported"),
                f"{h['value']:,.3g} {h['unit']}" if h else "",
                ("" if h is None or h["goal"] is None else f"{'>=' if h['higher_is_better'] else '<='} {h['goal']:,.3g}"),
                status,
            )
    console.print(table)
    failed = [e["name"] for e in entries if e["error"]]
    if failed:
        console.print(f"[red]failed:[/] {', '.join(failed)} (tracebacks above; the JSON has the errors)", highlight=False)


@register_perf("gpu", "every throughput check in one run for a lent GPU (tiny CPU versions without one)")
def main(argv: list[str] | None = None) -> int:
    """``perf gpu``: run the checks, print the table, write the JSON file.

    Args:
        argv: ``--only NAMES``, ``--cpu``, ``--config FILE``, ``--out FILE`` (``--help`` describes them).

    Returns:
        0 when every check ran and met its goals, 1 otherwise (the JSON file is written either way).
    """
    # The module docstring is the --help text: it explains the checks and the exit code.
    parser = argparse.ArgumentParser(prog="python -m benchmark perf gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    parser.add_argument("--cpu", action="store_true", help="the tiny CPU versions even when CUDA is present")
    parser.add_argument("--config", type=Path, default=None, help="another checks file (default configs/perf/gpu.yaml)")
    parser.add_argument("--out", type=Path, default=Path("perf_gpu.json"), help="the JSON file written")
    args = parser.parse_args(argv)
    # The checks run registered perf commands: import the modules that register them (companions/).
    registry.discover_tools()
    checks = load_checks(args.config)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {c["name"] for c in checks})
        if unknown:
            parser.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(c['name'] for c in checks)}")
        checks = [c for c in checks if c["name"] in wanted]  # in the file's order, not --only's
    on_gpu = torch.cuda.is_available() and not args.cpu
    if not on_gpu:
        print("[perf gpu] no CUDA device (or --cpu): the tiny CPU versions of the checks", file=sys.stderr)
    machine = _machine(on_gpu)
    start = time.perf_counter()
    entries = []
    for check in checks:
        print(f"[perf gpu] {check['name']}: perf {check['command']} {' '.join(check['gpu' if on_gpu else 'cpu'])}",
              file=sys.stderr)
        entries.append(run_check(check, on_gpu, args.out.parent))  # check files beside the JSON
    total = time.perf_counter() - start
    print_table(entries, machine, total)
    payload = {"command": "perf gpu", "on_gpu": on_gpu, "machine": machine, "seconds": round(total, 1),
               "checks": entries}
    # Atomic: a lease that ends mid-write leaves the previous file, never half a JSON.
    atomic_write_text(args.out, json.dumps(payload, indent=1) + "\n")
    print(f"[perf gpu] wrote {args.out}", file=sys.stderr)
    return 0 if all(e["ok"] for e in entries) else 1
