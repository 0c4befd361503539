"""Evaluation end to end: embedding a split through the framework against its parts.

    python -m benchmark perf embed                          # the README's main job (DMCAC, embedded default)
    python -m benchmark perf embed --method ms --batches 4
    python -m benchmark perf embed --workers 0,2,4          # the loop at several worker counts
    python -m benchmark perf embed --tiny                   # seconds: the code path CI runs

On small datasets the evaluation's time is the loop that embeds the split (decode, evaluation
transform, forward), not the metrics. For one method and split (the recipe on the embedded
synthetic dataset by default) this measures, in the same run, images per second of:

* **data**: the evaluation loader alone (decode + transform in its workers, batches collated);
* **forward**: the model's embedding of the same batches held in memory (eval mode, the
  trainer's precision, no gradient): the loop's ceiling;
* **loop**: ``trainer.test`` with the evaluator, the loader's workers and the forward pipelined
  (the evaluator's ``embed_seconds``), at each ``--workers`` count;

and the metrics' seconds. A loop well below both its data and its forward rate is a stall (the
loader and the model waiting on each other); a loop at the data rate is bound by decoding
(more workers, a faster decoder); at the forward rate it is as fast as the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device

from benchmark.app.builder import build_cli
from benchmark.app.perf.train import TINY, cpu_name, sync_device
from benchmark.core.contracts import perf_headline, register_perf
from benchmark.core.defaults import DEFAULT_DATA, DEFAULT_METHOD
from benchmark.core.io import atomic_write_text
from benchmark.core.io import console as make_console
from benchmark.engine.evaluation import RetrievalEvaluator


def _build(args: argparse.Namespace, run_dir: Path, workers: int | None, extra: list[str]) -> Any:
    """A ``test`` run of ``--method`` on ``--data`` as the command line builds it, not run.

    Built through the run builder so that the recipe, the evaluation transform, the precision and
    the evaluator are exactly those of ``python -m benchmark test``. Nothing is logged or drawn and
    the run folder is a scratch folder, so the measured loop does only the evaluation's work.

    Args:
        args: this command's options (``--method``, ``--data``, ``--tiny``, ``--batches``).
        run_dir: the scratch run folder.
        workers: the loader's worker count, or None for the datamodule's (the recipe's) own.
        extra: options this command does not know, passed on (``--data.root``, ``--trainer.*``).

    Returns:
        The built :class:`~benchmark.app.builder.BenchmarkCLI` (``.model``, ``.datamodule``, ``.trainer``).
    """
    argv = ["--method", args.method, "--data", args.data, "--logger", "none", "--run_dir", str(run_dir),
            "--figures", "false", "--trainer.enable_progress_bar", "false"]
    if args.tiny:
        # perf train's tiny settings without their "--data.num_workers 0": the worker count is what
        # this command varies (--workers).
        argv += [a for a in TINY if a not in ("--data.num_workers", "0")] + ["--data.eval_batch_size", "64"]
    if workers is not None:
        argv += ["--data.num_workers", str(workers)]
    if args.batches:
        argv += ["--trainer.limit_test_batches", str(args.batches), "--trainer.limit_val_batches", str(args.batches)]
    with warnings.catch_warnings():  # Lightning's advice (few workers, ...) would drown the report
        warnings.simplefilter("ignore")
        return build_cli("test", argv + extra, run=False)


def _loader(cli: Any, split: str) -> Any:
    """The evaluation loader of ``split`` (``test`` or ``val``), prepared as a test prepares it.

    The method's data request is applied first: it sets the normalisation of its encoder, so the
    batches are those the model would see in the loop.
    """
    dm, model = cli.datamodule, cli.model
    dm.prepare_data()
    dm.setup("test")
    if hasattr(dm, "apply_request"):
        dm.apply_request(model.data_request())
    return dm.test_dataloader() if split == "test" else dm.val_dataloader()


def measure_data(loader: Any, batches: int | None) -> tuple[float, list[Any]]:
    """Seconds to read the loader (first ``batches`` batches) and the batches read.

    The time includes starting the loader's workers (a fresh loader, as the loop's ``trainer.test``
    builds one too). The batches are kept to be embedded by
    :func:`measure_forward`, so that both measure the same images.

    Args:
        loader: an evaluation loader (:func:`_loader`).
        batches: how many batches to read; None or 0 for all.
    """
    out, start = [], time.perf_counter()
    for batch in loader:
        out.append(batch)
        if batches and len(out) == batches:
            break
    return time.perf_counter() - start, out


@torch.no_grad()
def measure_forward(cli: Any, batches: list[Any]) -> float:
    """Seconds of the model's embedding of ``batches`` (in memory, eval mode, trainer precision).

    The images are moved to the device before the clock starts: this is the loop's ceiling, the
    model alone, with nothing to wait for. ``model.embed`` is what the evaluation step computes.
    """
    model, trainer = cli.model, cli.trainer
    device = trainer.strategy.root_device
    model.to(device).eval()
    moved = [move_data_to_device(b["image"], device) for b in batches]
    with trainer.precision_plugin.forward_context():
        model.embed(moved[0])  # warm-up (kernel selection, allocator, lazy initialisation)
        sync_device(device)  # CUDA runs asynchronously: the clock starts once the warm-up is done
        start = time.perf_counter()
        for images in moved:
            model.embed(images)
        sync_device(device)
    return time.perf_counter() - start


def measure_loop(cli: Any, split: str = "test") -> tuple[float, float, int, str]:
    """(embedding loop seconds, metrics seconds, images, stage) of the evaluation of ``split``.

    ``trainer.test`` for ``test``, ``trainer.validate`` for ``val``: the split the data and the
    forward were measured on (the loop always evaluated test, and its rate divided val's image
    count by test's time). The times come from the evaluator's own clock: the loop is its
    ``last_embed_seconds`` (the epoch's batches, loader and forward pipelined), the metrics the
    rest of its evaluation (gathering, refinement, metrics); the images and the stage are those
    of the evaluation it kept.
    """
    trainer = cli.trainer
    evaluator = next(c for c in trainer.callbacks if isinstance(c, RetrievalEvaluator))
    # Time the evaluation, not its reporting; keep it whichever the split, for its images and stage.
    evaluator.write_results, evaluator.print_table, evaluator.keep_stages = False, False, (split,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = trainer.test if split == "test" else trainer.validate
        run(cli.model, datamodule=cli.datamodule, verbose=False)
    evaluation = evaluator.last_evaluation
    # NaN metrics seconds (0 images) if the evaluator kept no evaluation (it keeps one on global rank 0 only).
    if evaluation is None:
        return evaluator.last_embed_seconds, float("nan"), 0, split
    return (evaluator.last_embed_seconds, evaluation.seconds - evaluator.last_embed_seconds, len(evaluation.labels),
            evaluation.stage)


@register_perf("embed", "evaluation end to end: the embedding loop against the loader alone and the forward alone")
def main(argv: list[str] | None = None) -> int:
    """``perf embed``: data alone, forward alone and the loop at each worker count, in one run.

    Args:
        argv: this command's options (``--help``; the module docstring explains the measurements);
            unknown options go to the run builder.

    Returns:
        0. The rates are printed, reported as ``perf gpu`` headlines (without goals) and, with
        ``--out``, written as JSON.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmark perf embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--batches", type=int, default=0, help="evaluate the first N batches only (0: all)")
    parser.add_argument("--workers", default="", help="comma-separated loader worker counts for the loop "
                        "(default: the datamodule's)")
    parser.add_argument("--tiny", action="store_true", help="tiny encoder and images, 2 batches: the CI path")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    args, extra = parser.parse_known_args(argv)
    if args.tiny and not args.batches:
        args.batches = 2
    # None: the datamodule's own worker count (its recipe's or default).
    counts = [int(w) for w in args.workers.split(",") if w.strip()] or [None]
    if any(c is not None and c < 0 for c in counts):
        parser.error("--workers: counts must be >= 0")
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="perf-embed-") as scratch:
        # Data alone and forward alone once, on the first worker count; a fresh run per loop below,
        # so that no loop starts with another's warm workers or caches.
        base = _build(args, Path(scratch) / "base", counts[0], extra)
        data_s, batches = measure_data(_loader(base, args.split), args.batches or None)
        images = sum(len(b["label"]) for b in batches)  # every rate is over these images
        forward_s = measure_forward(base, batches)
        rows["data"] = {"seconds": data_s, "images_per_second": images / data_s,
                        "workers": base.datamodule.num_workers}
        rows["forward"] = {"seconds": forward_s, "images_per_second": images / forward_s}
        loops = []
        for count in counts:
            print(f"[perf embed] the loop with {count if count is not None else 'the default'} workers", file=sys.stderr)
            cli = _build(args, Path(scratch) / f"loop{count}", count, extra)
            embed_s, metrics_s, looped, stage = measure_loop(cli, args.split)
            loops.append({"workers": cli.datamodule.num_workers, "seconds": embed_s, "metrics_seconds": metrics_s,
                          "images": looped, "stage": stage, "images_per_second": looped / embed_s})
        rows["loop"] = loops
    precision = str(base.trainer.precision)
    console = make_console()
    console.print(f"[bold]python -m benchmark perf embed[/bold] {' '.join(argv or [])}".rstrip(), highlight=False)
    console.print(f"{cpu_name()}; {args.method} on {args.data} ({args.split} split, {images:,} images, batch "
                  f"{base.datamodule.eval_batch_size}, image size {base.datamodule.image_size}, {precision})",
                  highlight=False)
    console.print(f"  data alone     {rows['data']['images_per_second']:9,.0f} img/s  ({rows['data']['workers']} workers)",
                  highlight=False)
    console.print(f"  forward alone  {rows['forward']['images_per_second']:9,.0f} img/s", highlight=False)
    # The loop cannot beat the slower of its two stages: the best loop / this is how well they overlap.
    ceiling = min(rows["data"]["images_per_second"], rows["forward"]["images_per_second"])
    for loop in loops:
        console.print(f"  loop           {loop['images_per_second']:9,.0f} img/s  ({loop['workers']} workers; "
                      f"{loop['images_per_second'] / rows['forward']['images_per_second']:.2f}x the forward; metrics "
                      f"{loop['metrics_seconds']:.2f} s)", highlight=False)
        perf_headline(f"evaluation loop, {args.method}, {loop['workers']} workers", loop["images_per_second"], "img/s")
    perf_headline(f"evaluation forward alone, {args.method}", rows["forward"]["images_per_second"], "img/s")
    best = max(loop["images_per_second"] for loop in loops)
    console.print(f"the best loop runs at {best / ceiling:.2f}x min(data alone, forward alone)", highlight=False)
    if args.out is not None:
        payload = {"command": "perf embed", "argv": list(argv or []), "cpu": cpu_name(), "method": args.method,
                   "data": args.data, "split": args.split, "images": images, "precision": precision, **rows}
        atomic_write_text(args.out, json.dumps(payload, indent=1) + "\n")
    return 0
