"""Context-Refine speed: refined embeddings per second, and the neighbour search of an SOP-sized set.

The paper (section 4.7) reports 13,000 refined embeddings per second on a TitanXP for the
default model (d = 512, k = 8, T = 8 blocks, about 12 M parameters) and 3.5 s for the
pairwise similarities of an SOP test split (60,502 x 512). This command measures, on this
machine's CPU (``--threads``) and on the GPU when there is one, three ways to refine:

* ``set``: what evaluation runs (:meth:`ContextRefiner.refine_set` with its defaults; on CPU
  the sparse path: SDDMM scores, ``embedding_bag`` mixing, fused oneDNN products);
* ``gather``: the same set computation with gathered (c, k, d) contexts (the GPU path);
* ``per-pair``: :meth:`ContextRefiner.forward` on explicitly gathered contexts, which
  projects every (sample, neighbour) pair: k times the work, as training does;

and the time to build k-nearest-neighbour lists of an SOP-sized set against itself (self
excluded). Every timing is the median of ``--repeats`` runs after a warm-up. The machine's
matrix-product throughput at the same moment is printed too (the CPU here is shared, and the
set path is bounded by its 6 d x d products per sample and block: 2 * 12.6 M multiply-adds).

    python -m benchmark perf refine                  # d 512, k 8, T 8, 2 CPU threads, SOP-sized kNN
    python -m benchmark perf refine --knn-size 20000 --dtypes bfloat16

The refiner is built from random weights: its speed does not depend on what it learned. The
key numbers are also recorded as headlines (``perf_headline``), which ``perf gpu`` collects.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmark.core.contracts import perf_headline, register_perf
from benchmark.nn.knn_context import knn_search
from benchmark.nn.neighbours import faiss_available
from methods.context_refine import ContextRefiner

PAPER_RATE = 13_000  # refined embeddings per second, TitanXP (paper, section 4.7)
PAPER_KNN_S = 3.5  # seconds for an SOP split's similarities, TitanXP
PAPER_PARAMS = 12e6  # "about 12 M parameters" for the default model (section 4.7)
# --dtypes: the compute dtypes refine_set accepts (float32, or bfloat16 products: AMX on CPU).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    """Wait for the GPU's queued work: CUDA kernels run asynchronously, so a timer read without
    it would measure the launches, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (after ``warmup`` untimed calls).

    The warm-up absorbs one-time costs (allocator growth, oneDNN / cuBLAS kernel selection);
    the median, not the mean, because a shared machine only ever adds time to a run.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def distinct_neighbours(num: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(num, k) random neighbour lists, distinct within a row and never the row itself.

    Random, not nearest: the refiner's cost does not depend on which rows form a context, and
    building real k-NN lists for the timed set would time the search too (measured apart,
    :func:`measure_knn`). Each row takes increasing offsets from itself, every step at least 1
    and their sum below ``num``, so the rows modulo ``num`` are distinct and never the row.
    """
    steps = torch.randint(1, max(2, num // (k + 1)), (num, k), generator=generator)  # (num, k) >= 1
    return (torch.arange(num)[:, None] + steps.cumsum(dim=1)) % num  # increasing offsets < num


def gemm_rate(device: torch.device, dtype: torch.dtype, rows: int = 8192, dim: int = 512) -> float:
    """GFLOP/s of a (rows, dim) @ (dim, dim) product now: the ceiling of the set path.

    The set path is 6 such products per sample and block, so this rate, measured in the same
    minute as the refiner, says how close to the machine's limit the refiner runs, whatever
    else the (shared) machine is doing.
    """
    x = torch.randn(rows, dim, device=device).to(dtype)
    w = torch.randn(dim, dim, device=device).to(dtype)
    seconds = _time(lambda: x @ w, device, repeats=5, warmup=2)
    return 2 * rows * dim * dim / seconds / 1e9


def measure_rates(
    refiner: ContextRefiner,
    device: torch.device,
    num: int,
    k: int,
    dtype: torch.dtype,
    repeats: int,
    batch_size: int,
) -> dict[str, float]:
    """Refined embeddings per second of the set, gather and per-pair paths.

    Args:
        refiner: the model (moved to ``device``, put in eval mode).
        device: where to run.
        num: samples refined per timed run of the set path; the set is also the bank.
        k: neighbours per context.
        dtype: compute dtype; bfloat16 runs the per-pair path under autocast.
        repeats: timed runs per path (median).
        batch_size: samples per forward of the per-pair path.

    Returns:
        Rates by path: ``set``, ``gather`` and ``per-pair``.
    """
    refiner = refiner.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    e0 = F.normalize(torch.randn(num, refiner.dim, generator=gen), dim=-1).to(device)  # (N, d)
    # The set is its own bank, as at evaluation where a split's samples are each other's context.
    neighbours = distinct_neighbours(num, k, gen).to(device)  # (N, k) rows of e0
    autocast = dtype != torch.float32  # the per-pair forward has no dtype argument: autocast instead
    small = max(batch_size, num // 4)  # the slower paths time a quarter of the set

    def per_pair() -> None:
        """The training-time computation: each pair projected on its own, batch by batch."""
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            for a in range(0, small, batch_size):
                idx = slice(a, min(a + batch_size, small))
                refiner(e0[idx], e0[neighbours[idx]])  # (b, d), (b, k, d)

    return {
        "set": num / _time(lambda: refiner.refine_set(e0, e0, neighbours, dtype=dtype), device, repeats),
        # fast=False: the gathered (c, k, d) contexts, which the sparse CPU path avoids.
        "gather": small
        / _time(
            lambda: refiner.refine_set(e0[:small], e0, neighbours[:small], dtype=dtype, fast=False),
            device,
            repeats,
        ),
        "per-pair": small / _time(per_pair, device, repeats),
    }


def measure_knn(size: int, dim: int, k: int, device: torch.device, backend: str) -> float:
    """Seconds to find the k nearest neighbours (self excluded) of ``size`` rows among themselves.

    Timed once without warm-up: at SOP size one search takes seconds, and evaluation runs it
    once per split. ``backend``: ``torch`` (the exact chunked search,
    :func:`benchmark.nn.neighbours.exact_knn`) or ``faiss``.
    """
    gen = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(size, dim, generator=gen), dim=-1).to(device)  # (N, d)
    rows = torch.arange(size, device=device)
    return _time(lambda: knn_search(x, x, k, exclude=rows, backend=backend), device, repeats=1, warmup=0)


@register_perf("refine", "Context-Refine: refined embeddings per second and the kNN search of an SOP-sized set")
def main(argv: list[str] | None = None) -> int:
    """``perf refine``: print the refinement rates per device and dtype, and the k-NN search times.

    Returns:
        0; the verdict against ``--target`` is printed, not the exit code.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmark perf refine", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dim", type=int, default=512, help="embedding size d")
    parser.add_argument("--neighbours", type=int, default=8, help="k, neighbours per context")
    parser.add_argument("--blocks", type=int, default=8, help="T, cross-attention blocks")
    parser.add_argument(
        "--num", type=int, default=16384, help="embeddings refined per timed run of the set path"
    )
    parser.add_argument("--batch-size", type=int, default=1024, help="batch of the per-pair path")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--goal-rate", type=float, default=0.0, help="goal on a GPU, refined embeddings/s (perf gpu: 1e6)")
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads (the target is stated for 2 cores)"
    )
    parser.add_argument(
        "--devices", default="cpu,cuda", help="comma-separated: cpu, cuda (skipped when absent)"
    )
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    parser.add_argument(
        "--knn-size", type=int, default=60502, help="rows of the neighbour-search set (SOP test: 60,502)"
    )
    parser.add_argument(
        "--knn-backends", default="torch", help="comma-separated: torch, faiss (slow on CPU); empty skips"
    )
    parser.add_argument(
        "--target", type=float, default=PAPER_RATE, help="embeddings/s the CPU set path should reach"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)  # the CPU rates are per thread budget, stated in the output
    torch.manual_seed(0)
    refiner = ContextRefiner(args.dim, args.blocks)  # one head (the constructor default), as printed below
    params = sum(p.numel() for p in refiner.parameters())
    # The load average is printed with the rates: on a shared machine it explains slow numbers.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(
        f"Context-Refine CA: d={args.dim}, k={args.neighbours}, T={args.blocks}, 1 head; "
        f"{params:,} parameters ({params / 1e6:.1f} M; paper: about {PAPER_PARAMS / 1e6:.0f} M)"
    )
    print(f"CPU: {os.cpu_count()} cores visible, {args.threads} threads used, load average {load}")
    # A missing GPU is skipped with a line, not an error: the default asks for both devices.
    devices = []
    for name in (d.strip() for d in args.devices.split(",") if d.strip()):
        if name == "cuda" and not torch.cuda.is_available():
            print("cuda: no GPU here, skipped")
            continue
        devices.append(torch.device(name))
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:  # refused before anything is timed: a typo would otherwise cost the float32 runs first
        parser.error(f"unknown dtype(s) {unknown}; choose from {', '.join(DTYPES)}")

    flops = 2 * params  # multiply-adds of one refined embedding on the set path, x 2
    print(f"\nrefined embeddings per second (set path: N={args.num}; paper: {PAPER_RATE:,} on a TitanXP)")
    header = f"{'device':<26} {'dtype':<9} {'set':>9} {'gather':>9} {'per-pair':>9}   {'GEMM GFLOP/s':>12} {'GEMM bound':>10}"
    print(header)
    cpu_best = 0.0
    for device in devices:
        label = (
            f"cpu ({args.threads} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
        )
        for name in dtypes:
            rates = measure_rates(
                refiner, device, args.num, args.neighbours, DTYPES[name], args.repeats, args.batch_size
            )
            ceiling = gemm_rate(device, DTYPES[name], dim=args.dim)
            if device.type == "cpu":  # the target is stated for the CPU set path, the best dtype
                cpu_best = max(cpu_best, rates["set"])
            # One CPU headline (the last dtype asked for), every GPU one; the goal applies on a GPU only.
            if name == dtypes[-1] or device.type == "cuda":
                perf_headline(f"Context-Refine refined embeddings/s ({device.type}, {name})", rates["set"], "1/s",
                              args.goal_rate if device.type == "cuda" and args.goal_rate > 0 else None)
            # "GEMM bound": the embeddings/s the set path would reach at the GEMM rate alone.
            print(
                f"{label:<26} {name:<9} {rates['set']:>9,.0f} {rates['gather']:>9,.0f} {rates['per-pair']:>9,.0f}"
                f"   {ceiling:>12,.0f} {ceiling * 1e9 / flops:>10,.0f}"
            )
    if any(d.type == "cpu" for d in devices):
        verdict = "meets" if cpu_best >= args.target else "misses"
        print(f"CPU set path, best: {cpu_best:,.0f}/s; {verdict} the target of {args.target:,.0f}/s")

    # The paper's second number: the neighbour lists of an SOP-sized split (--knn-backends "" skips).
    backends = [b.strip() for b in args.knn_backends.split(",") if b.strip()]
    if backends and args.knn_size > 0:
        print(
            f"\nneighbour lists: {args.knn_size:,} x {args.dim} against itself, k={args.neighbours}, "
            f"self excluded (paper: {PAPER_KNN_S} s on a TitanXP)"
        )
        for device in devices:
            for backend in backends:
                where = f"cpu ({args.threads} threads)" if device.type == "cpu" else device.type
                if backend == "faiss" and not faiss_available():  # an optional dependency
                    print(f"{where:<26} faiss: not installed, skipped")
                    continue
                seconds = measure_knn(args.knn_size, args.dim, args.neighbours, device, backend)
                perf_headline(f"Context-Refine kNN lists of {args.knn_size:,} ({device.type}, {backend})", seconds, "s",
                              higher_is_better=False)
                print(f"{where:<26} {backend:<9} {seconds:9.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
