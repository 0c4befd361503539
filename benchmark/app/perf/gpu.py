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
from benchmark.core.io import atomic_write_text
from benchmark.core.io import console as make_console

CONFIG = "perf/gpu.yaml"


def load_checks(path: Path | None = None) -> list[dict[str, Any]]:
    """The checks of ``configs/perf/gpu.yaml`` (or ``path``), validated."""
    path = path or recipe_dir() / CONFIG
    checks = (yaml.safe_load(path.read_text()) or {}).get("checks") or []
    for i, check in enumerate(checks):
        missing = [k for k in ("name", "command", "gpu", "cpu") if k not in check]
        if missing:
            raise ValueError(f"{path}: check {i} lacks {', '.join(missing)}.")
        if not all(isinstance(a, str) for a in check["gpu"] + check["cpu"]):
            raise ValueError(f"{path}: check {check['name']!r}: every argument must be a string (quote numbers).")
    return checks


def run_check(check: dict[str, Any], on_gpu: bool, out_dir: Path = Path(".")) -> dict[str, Any]:
    """Run one check's perf command in this process: its headlines, seconds, peak GPU memory, error.
    ``{out_dir}`` in an argument becomes ``out_dir`` (where the command's own files go)."""
    argv = [a.replace("{out_dir}", str(out_dir)) for a in (check["gpu"] if on_gpu else check["cpu"])]
    entry: dict[str, Any] = {"name": check["name"], "command": check["command"], "argv": argv,
                             "summary": check.get("summary", "")}
    command = registry.PERF_COMMANDS.get(check["command"])
    if command is None:
        entry.update(ok=False, error=f"perf command {check['command']!r} is not registered", headlines=[], seconds=0.0,
                     peak_gpu_mib=None)
        return entry
    PERF_HEADLINES.clear()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        code = command.run(argv)
        error = None if code == 0 else f"exit code {code}"
    except SystemExit as exit_:  # argparse errors
        error = f"exit {exit_.code}"
    except Exception as err:  # a failing check must not stop the others
        error = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    entry["seconds"] = round(time.perf_counter() - start, 2)
    entry["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else None
    # the goals are for the GPU sizes: the tiny CPU versions only keep the code paths alive
    entry["headlines"] = [
        {"label": h.label, "value": h.value, "unit": h.unit, "goal": h.goal if on_gpu else None,
         "higher_is_better": h.higher_is_better, "met": h.met if on_gpu else None} for h in PERF_HEADLINES
    ]
    PERF_HEADLINES.clear()
    entry["error"] = error
    entry["ok"] = error is None and all(h["met"] is not False for h in entry["headlines"])
    return entry


def _machine(on_gpu: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
        info["avx512"] = "avx512" in text
    except OSError:
        pass
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def print_table(entries: list[dict[str, Any]], machine: dict[str, Any], total: float) -> None:
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
            first = i == 0
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
    parser = argparse.ArgumentParser(prog="python -m benchmark perf gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    parser.add_argument("--cpu", action="store_true", help="the tiny CPU versions even when CUDA is present")
    parser.add_argument("--config", type=Path, default=None, help="another checks file (default configs/perf/gpu.yaml)")
    parser.add_argument("--out", type=Path, default=Path("perf_gpu.json"), help="the JSON file written")
    args = parser.parse_args(argv)
    registry.discover_tools()
    checks = load_checks(args.config)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {c["name"] for c in checks})
        if unknown:
            parser.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(c['name'] for c in checks)}")
        checks = [c for c in checks if c["name"] in wanted]
    on_gpu = torch.cuda.is_available() and not args.cpu
    if not on_gpu:
        print("[perf gpu] no CUDA device (or --cpu): the tiny CPU versions of the checks", file=sys.stderr)
    machine = _machine(on_gpu)
    start = time.perf_counter()
    entries = []
    for check in checks:
        print(f"[perf gpu] {check['name']}: perf {check['command']} {' '.join(check['gpu' if on_gpu else 'cpu'])}",
              file=sys.stderr)
        entries.append(run_check(check, on_gpu, args.out.parent))
    total = time.perf_counter() - start
    print_table(entries, machine, total)
    payload = {"command": "perf gpu", "on_gpu": on_gpu, "machine": machine, "seconds": round(total, 1),
               "checks": entries}
    atomic_write_text(args.out, json.dumps(payload, indent=1) + "\n")
    print(f"[perf gpu] wrote {args.out}", file=sys.stderr)
    return 0 if all(e["ok"] for e in entries) else 1
