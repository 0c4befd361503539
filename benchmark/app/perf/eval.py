"""Evaluation speed at SOP scale: the metric suite against its floor and two peer tools.

    python -m benchmark perf eval                      # 60,502 x 512, ~11,316 classes
    python -m benchmark perf eval --n 8000 --repeats 3 # smaller
    python -m benchmark perf eval --ties               # tied scores: 10k and 60,502 rows
    python -m benchmark perf eval --ties --sizes 2000  # the same, quickly

Builds a synthetic SOP-sized evaluation set (classes of 2 to 12 images in 12 super-categories,
clustered so that the metrics are neither 0 nor 1), then measures in the same run:

* the floor: one dense fp32 similarity product of all queries against the gallery, in the
  chunks the suite uses (its lower bound: the suite does this product plus its ranking);
* the metric suite without NMI (Recall@K with SOP's K, MAP@R, R-Precision, mAP@1000);
* faiss ``IndexFlatIP`` search with k = 1000, the way peer frameworks get Recall@1000;
* pytorch-metric-learning's ``AccuracyCalculator`` on the metrics it shares with the suite
  (precision_at_1, r_precision, mean_average_precision_at_r);
* NMI (faiss k-means with one cluster per class) on its own;

and prints times, ratios to the floor and peak extra memory (CPU: resident set size sampled
every 5 ms; CUDA: device memory in use). Targets on 2 CPU cores: suite within 1.2x the floor,
faster than both peers, at most 2 GiB of extra memory.

``--ties`` instead times the suite on embeddings whose scores tie massively, the output of a
collapsed or quantised model, each next to the SOP-like embeddings of the same size in the
same run (interleaved, best of ``--repeats``): all rows equal; the second half of the rows a
copy of the first; and quantised rows (the first 8 coordinates rounded to -1, 0 or 1, the
rest 0: at most 3^8 distinct rows and a few hundred distinct scores). It prints the ratio
tied / SOP-like; target: all-equal within 2x at 60,502 rows.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from benchmark.core.contracts import perf_headline, register_perf
from benchmark.core.errors import CLIError
from benchmark.core.io import console as make_console
from benchmark.engine.evaluation.metrics import default_chunk_size, nmi, retrieval_metrics
from benchmark.engine.evaluation.search import _block_size

SOP_RECALL_KS = (1, 10, 100, 1000)  # the Recall@K that papers report on SOP (and In-Shop)
TARGET_RATIO = 1.2  # the suite's time over the floor's: its ranking may add at most 20 %
TARGET_EXTRA_MIB = 2048  # peak extra memory of the suite at SOP scale
TARGET_TIE_RATIO = 2.0  # all-equal embeddings against SOP-like ones of the same size
TIE_SIZES = (10000, 60502)  # --ties: rows measured (60,502: SOP's test split)
TIE_VARIANTS = ("all-equal", "half-duplicated", "quantised")


# ---------------------------------------------------------------------------- synthetic data
def make_sop_like(
    n: int = 60502,
    dim: int = 512,
    num_classes: int | None = None,
    seed: int = 0,
    noise: float = 1.8,
    super_classes: int = 12,
    max_class_size: int = 12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (n, dim) embeddings and (n,) labels shaped like SOP's test split.

    Class sizes lie in [2, max_class_size] (mean n / num_classes); each class centre mixes a
    super-category direction with its own, and samples add isotropic noise. Rows are sorted
    by class, like SOP's list files. ``noise`` = 1.8 gives R@1 ~ 0.64, R@1000 ~ 0.999.

    Metrics of 0 or 1 would let a ranking shortcut go unnoticed (every positive first, or none
    anywhere near); a set between them makes the suite rank the way it does on real embeddings.

    Args:
        n: rows (query = gallery).
        dim: embedding dimensions.
        num_classes: classes; default ``n / 5.3466``, SOP's mean class size.
        seed: the generator's seed (the set is the same on every machine).
        noise: within-class noise, relative to the unit-norm centres.
        super_classes: super-categories (SOP has 12) whose directions the class centres share.
        max_class_size: the largest class (SOP's classes hold 2 to 12 images).

    Returns:
        ``(embeddings (n, dim) float32, labels (n,) int64)``.

    Raises:
        ValueError: ``n`` images cannot form ``num_classes`` classes of 2 to ``max_class_size``.
    """
    num_classes = num_classes or max(1, round(n / 5.3466))  # SOP: 60,502 images, 11,316 classes
    if not 2 * num_classes <= n <= max_class_size * num_classes:
        raise ValueError(f"{n} samples cannot form {num_classes} classes of 2 to {max_class_size} images.")
    g = torch.Generator().manual_seed(seed)
    sizes = torch.full((num_classes,), 2, dtype=torch.int64)
    remaining = n - 2 * num_classes
    while remaining > 0:  # spread the rest uniformly over classes that still have room
        room = (sizes < max_class_size).nonzero().flatten()
        pick = room[torch.randint(0, room.numel(), (remaining,), generator=g)]
        sizes += torch.bincount(pick, minlength=num_classes)
        # A class picked more often than it has room for gives the excess back for the next round.
        over = (sizes - max_class_size).clamp(min=0)
        sizes -= over
        remaining = int(over.sum())
    labels = torch.repeat_interleave(torch.arange(num_classes), sizes)  # (n,)
    # Sorted super-category ids: neighbouring classes share one, as SOP's list files group products.
    supers = torch.randn(super_classes, dim, generator=g)
    super_of = torch.randint(0, super_classes, (num_classes,), generator=g).sort().values
    centres = F.normalize(torch.randn(num_classes, dim, generator=g) + supers[super_of], dim=1)  # (C, dim)
    x = centres[labels] + noise / math.sqrt(dim) * torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=1), labels


def tied_variant(x: torch.Tensor, kind: str) -> torch.Tensor:
    """(n, dim) embeddings whose scores tie massively, built from the SOP-like ``x``.

    ``all-equal``: every row is ``x[0]`` (a dead head). ``half-duplicated``: the second half
    of the rows repeats the first (ties of two, mostly across classes). ``quantised``: the
    first 8 coordinates rounded to -1, 0 or 1 at +-0.43 standard deviations, the rest 0
    (at most 3^8 distinct rows, a few hundred distinct scores: large tie groups everywhere).

    The labels stay those of ``x``: the ties fall across classes, which is what a collapsed or
    quantised model produces and what makes the suite's tie rule (lower index first) matter.

    Raises:
        ValueError: an unknown ``kind`` (not one of :data:`TIE_VARIANTS`).
    """
    n, dim = x.shape
    if kind == "all-equal":
        return x[:1].expand(n, dim).clone()  # clone: a real (n, dim) tensor, not a stride-0 view
    if kind == "half-duplicated":
        out = x.clone()
        out[n // 2 :] = x[: n - n // 2]
        return out
    if kind == "quantised":
        out = torch.zeros_like(x)
        out[:, :8] = (x[:, :8] * math.sqrt(dim) / 0.86).round().clamp(-1, 1)  # x has std ~ 1 / sqrt(dim)
        return out
    raise ValueError(f"unknown tied variant {kind!r}; choose from {', '.join(TIE_VARIANTS)}.")


# ---------------------------------------------------------------------------- measurement
@dataclass
class Measurement:
    """One timed block: a row of the report.

    Attributes:
        name: what was timed, as the table shows it.
        seconds: wall time, the device synchronised before and after.
        extra_mib: peak memory above the level before the block (:class:`PeakMemory`), or None
            where it cannot be read.
        note: a line printed under the table (the metric values, the peers' agreement).
        values: the metrics the block computed (``--ties``: R@1 and MAP@R per set).
    """

    name: str
    seconds: float
    extra_mib: float | None
    note: str = ""
    values: dict[str, float] = field(default_factory=dict)


class PeakMemory:
    """Peak extra memory of a block: process RSS on CPU, device memory in use on CUDA.

    A background thread samples the level every ``interval`` seconds while the block runs; the
    extra memory is the peak minus the level before. On CUDA the level is the device's memory in
    use as the driver reports it (``mem_get_info``): every process and the caching allocator's
    reserve included, so it is what the block makes unavailable, not only what its tensors hold.
    Sampling can miss a spike shorter than the interval.
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.peak = 0
        self.extra_mib: float | None = None
        self._stop = threading.Event()

    def _used(self) -> int:
        """Bytes in use now: the device's on CUDA, the process's resident set on the CPU."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return total - free
        with open("/proc/self/statm") as f:  # fields: size, resident, shared, ... in pages
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        """The sampling thread: raise :attr:`peak` until :meth:`measure`'s block ends."""
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._used())

    @contextlib.contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        """Measure the ``with`` block; :attr:`extra_mib` is set when it ends (None where unsupported)."""
        try:
            base = self._used()
        except (OSError, RuntimeError, ValueError):  # no /proc (not Linux): no memory figure
            yield self
            return
        self.peak = base
        self._stop.clear()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self._used())  # a last sample: the block may end at its peak
            self.extra_mib = (self.peak - base) / 2**20


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously to the clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(name: str, fn: Callable[[], Any], device: torch.device, note: str = "") -> tuple[Measurement, Any]:
    """Run ``fn`` once; wall time and peak extra memory.

    Args:
        name: the row's label.
        fn: the work to time, without arguments.
        device: where it runs (synchronised before and after, and where memory is measured).
        note: a line for the report.

    Returns:
        The measurement and ``fn``'s result.
    """
    probe = PeakMemory(device)
    with probe.measure():
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        seconds = time.perf_counter() - start
    return Measurement(name, seconds, probe.extra_mib, note), result


def floor_product(x: torch.Tensor, chunk: int, block: int) -> None:
    """The suite's unavoidable work: all queries against the padded gallery, chunk by chunk.

    The suite must score every query against every gallery item in fp32 to rank exactly; this is
    that product alone, in the same (chunk, padded gallery) blocks, written into one preallocated
    buffer, so neither allocation nor ranking is timed.

    Args:
        x: (n, D) embeddings, queries and gallery alike.
        chunk: queries per product (the suite's chunk size).
        block: the suite's gallery block; the gallery is zero-padded to a multiple of it.
    """
    n = x.shape[0]
    padded = -(-n // block) * block
    gallery = x.new_zeros(padded, x.shape[1])  # (Gp, D), as the suite pads it
    gallery[:n] = x
    out = x.new_empty(min(chunk, n), padded)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        torch.mm(x[start:stop], gallery.T, out=out[: stop - start])  # (c, D) @ (D, Gp)


def faiss_knn(x: torch.Tensor, k: int) -> None:
    """faiss exact inner-product search with k neighbours (GPU index on CUDA).

    How peer frameworks compute Recall@K: the k nearest of every query by a flat (exact) index,
    then the metrics from those lists; only the search is timed here. The copy to a float32
    NumPy array on the CPU is part of it, as faiss takes its input that way.
    """
    import faiss

    xs = x.float().cpu().numpy()
    if x.is_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), xs.shape[1])
    else:
        index = faiss.IndexFlatIP(xs.shape[1])
    index.add(xs)
    index.search(xs, k)


def pml_accuracy(x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """pytorch-metric-learning's AccuracyCalculator on the metrics it shares with the suite.

    ``k="max_bin_count"``: neighbours up to the largest class size, which R-Precision and MAP@R
    need; ``ref_includes_query=True``: queries are the gallery, and each query's own row is not its
    neighbour, as in the suite.

    Returns:
        ``{"precision_at_1", "r_precision", "mean_average_precision_at_r"}`` as fractions.
    """
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count", device=x.device
    )
    return calc.get_accuracy(x, labels, x, labels, ref_includes_query=True)


# ---------------------------------------------------------------------------- report
def _library_versions() -> str:
    """torch, faiss and pytorch-metric-learning versions, for the report's header: the peers'
    times depend on them."""
    import faiss
    import pytorch_metric_learning

    return f"torch {torch.__version__}, faiss {faiss.__version__}, pytorch-metric-learning {pytorch_metric_learning.__version__}"


def print_report(rows: list[Measurement], floor: Measurement, header: list[str], footer: list[str]) -> None:
    """The report: header lines, one table of the measurements (seconds, ratio to the floor, peak
    extra memory), each measurement's note, then the verdict lines against the targets.

    Args:
        rows: the measurements, floor and suite first.
        floor: the floor the ratios are taken to (the best of the repeats).
        header: lines before the table (command, data, device, versions).
        footer: lines after it (the verdicts).
    """
    from rich.table import Table

    console = make_console()
    for line in header:
        console.print(line, highlight=False)
    table = Table(title="Evaluation performance (one run; ratios to this run's floor)")
    table.add_column("measurement")
    table.add_column("seconds", justify="right")
    table.add_column("x floor", justify="right")
    table.add_column("peak extra MiB", justify="right")
    for m in rows:
        mem = "n/a" if m.extra_mib is None else f"{m.extra_mib:,.0f}"
        table.add_row(m.name, f"{m.seconds:.2f}", f"{m.seconds / floor.seconds:.2f}", mem)
    console.print(table)
    for m in rows:
        if m.note:
            console.print(f"{m.name}: {m.note}", highlight=False)
    for line in footer:
        console.print(line, highlight=False)


def ties_main(args: argparse.Namespace, argv: list[str] | None, device: torch.device) -> int:
    """``--ties``: the suite on tied embeddings against SOP-like ones of the same size.

    Tied scores are the suite's worst case: an exact rank must order every tie (lower index
    first), and a whole gallery of equal scores is one tie. The ratio to SOP-like embeddings of
    the same size shows what ties cost over ordinary scores; the metrics are printed too, since
    all-equal embeddings must give the tie rule's values, not an error.

    Args:
        args: the parsed options (``--sizes``, ``--dim``, ``--repeats``, ``--map-at-k``,
            ``--chunk-size``, ``--seed``, ``--noise``).
        argv: the command line, for the report's first line.
        device: where the suite runs.

    Returns:
        0 (the verdict is printed, not turned into an exit code).
    """
    from rich.table import Table

    console = make_console()
    console.width = max(console.width, 100)  # the table's columns, untruncated
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    console.print(f"[bold]python -m benchmark perf eval[/bold] {' '.join(argv or [])}".rstrip(), highlight=False)
    console.print(f"device: {where}; versions: torch {torch.__version__}", highlight=False)
    table = Table(title=f"Metric suite on tied scores (best of {max(1, args.repeats)} runs; seconds, and ratio to "
                        "SOP-like embeddings of the same size)")
    for name, justify in [("rows", "right"), ("embeddings", "left"), ("seconds", "right"), ("SOP-like", "right"),
                          ("ratio", "right"), ("extra MiB", "right"), ("R@1", "right"), ("MAP@R", "right")]:
        table.add_column(name, justify=justify)
    verdict = []
    for n in args.sizes:
        # SOP's mean class size for n rows (main refuses --classes with --ties).
        x, labels = make_sop_like(n, args.dim, None, args.seed, args.noise)
        sets = {"SOP-like": x.to(device)} | {kind: tied_variant(x, kind).to(device) for kind in TIE_VARIANTS}
        labels = labels.to(device)
        best: dict[str, Measurement] = {}
        for _ in range(max(1, args.repeats)):  # interleaved, so every set sees the same machine state
            for kind, emb in sets.items():
                m, metrics = timed(
                    kind,
                    lambda emb=emb, labels=labels: retrieval_metrics(
                        emb, labels, recall_ks=SOP_RECALL_KS, map_at_k=args.map_at_k,
                        chunk_size=args.chunk_size, device=device),
                    device,
                )
                m.values = metrics
                if kind not in best or m.seconds < best[kind].seconds:
                    best[kind] = m
        base = best["SOP-like"]  # the reference of this size, measured in the same rounds
        for kind, m in best.items():
            mem = "n/a" if m.extra_mib is None else f"{m.extra_mib:,.0f}"
            ratio = m.seconds / base.seconds
            table.add_row(f"{n:,}", kind, f"{m.seconds:.2f}", f"{base.seconds:.2f}", f"{ratio:.2f}", mem,
                          f"{m.values['R@1']:.4f}", f"{m.values['MAP@R']:.4f}")
            if kind == "all-equal":
                verdict.append(f"{n:,} rows: all-equal / SOP-like = {ratio:.2f} (target <= {TARGET_TIE_RATIO})")
        del sets  # free this size's five sets (device memory) before building the next size's
    console.print(table)
    for line in verdict:
        console.print(line, highlight=False)
    return 0


@register_perf("eval", "evaluation at SOP scale: the metric suite vs its floor, faiss and PML; --ties")
def main(argv: list[str] | None = None) -> int:
    """``perf eval``: the metric suite at SOP scale against its floor and its peers (or ``--ties``).

    Args:
        argv: the options (``--help``).

    Returns:
        0; the verdicts against the targets are printed, and the suite's seconds, its ratio to the
        floor and faiss's seconds are reported as ``perf gpu`` headlines (with ``--goal-seconds``
        as the suite's goal); ``--ties`` prints its table only.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmark perf eval", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=60502, help="evaluated samples (query = gallery)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimensions")
    parser.add_argument("--classes", type=int, default=None, help="classes (default: n / 5.35, as SOP)")
    parser.add_argument("--noise", type=float, default=1.8, help="within-class noise of the synthetic set")
    parser.add_argument("--repeats", type=int, default=1, help="floor and suite are timed this often (best kept)")
    parser.add_argument("--chunk-size", type=int, default=None, help="queries per block (default: 256 MiB block)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--map-at-k", type=int, default=1000)
    parser.add_argument("--k", type=int, default=1000, help="k of the faiss peer search")
    parser.add_argument("--no-peers", action="store_true", help="skip faiss and pytorch-metric-learning")
    parser.add_argument("--no-pml", action="store_true", help="skip pytorch-metric-learning (minutes at SOP scale)")
    parser.add_argument("--no-nmi", action="store_true", help="skip NMI (k-means with one cluster per class)")
    parser.add_argument("--nmi-iters", type=int, default=20, help="k-means iterations for NMI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--goal-seconds", type=float, default=0.0, help="goal for the suite's time (perf gpu: 2 s)")
    parser.add_argument("--ties", action="store_true",
                        help="time the suite on tied embeddings (all-equal, half-duplicated, quantised) instead")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(TIE_SIZES),
                        help="with --ties: the numbers of rows to measure")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.ties:
        if args.classes is not None:
            # Each size of --sizes has its own class count (SOP's mean class size); one --classes
            # cannot fit them all, and ignoring it would time another set than the one asked for.
            raise CLIError("perf eval: --classes does not apply with --ties (each of --sizes uses SOP's mean "
                           "class size, n / 5.35); leave it out.")
        return ties_main(args, argv, device)
    start = time.perf_counter()
    x, labels = make_sop_like(args.n, args.dim, args.classes, args.seed, args.noise)
    x, labels = x.to(device), labels.to(device)
    made = time.perf_counter() - start
    # The suite's own block and chunk sizes for this gallery and ranking depth (the largest K or k of
    # mAP@k), so that the floor does the same products the suite does.
    depth = max(max(SOP_RECALL_KS), args.map_at_k)
    block = _block_size(args.n, depth)
    chunk = args.chunk_size or default_chunk_size(-(-args.n // block) * block)  # -(-a // b): ceil(a / b)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = [
        f"[bold]python -m benchmark perf eval[/bold] {' '.join(argv or [])}".rstrip(),
        f"data: {args.n:,} x {args.dim} fp32, {int(labels.max()) + 1:,} classes (built in {made:.1f}s); "
        f"device: {where}; chunk: {chunk} queries x {-(-args.n // block) * block} gallery columns",
        f"versions: {_library_versions()}",
    ]

    floors, suites = [], []
    metrics: dict[str, float] = {}
    for _ in range(max(1, args.repeats)):  # interleaved, so both see the same machine state
        floors.append(timed("floor: dense fp32 product (chunked)", lambda: floor_product(x, chunk, block), device)[0])
        m, metrics = timed(
            "metric suite without NMI",
            lambda: retrieval_metrics(x, labels, recall_ks=SOP_RECALL_KS, map_at_k=args.map_at_k,
                                      chunk_size=chunk, device=device),
            device,
        )
        suites.append(m)
    # The best of the repeats: the least disturbed by the rest of the machine.
    floor = min(floors, key=lambda m: m.seconds)
    suite = min(suites, key=lambda m: m.seconds)
    suite.note = ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )
    rows = [floor, suite]
    peers = []  # the rows of the other libraries the verdict compares the suite with

    if not args.no_peers:
        faiss_row, _ = timed(f"faiss IndexFlatIP search, k={args.k}", lambda: faiss_knn(x, args.k), device)
        rows.append(faiss_row)
        peers.append(faiss_row)
    if not args.no_peers and not args.no_pml:
        pml_row, pml = timed("pytorch-metric-learning AccuracyCalculator", lambda: pml_accuracy(x, labels), device)
        # Same definitions, independent code: their largest difference checks the suite's values.
        agree = max(
            abs(pml["precision_at_1"] - metrics["R@1"]),
            abs(pml["r_precision"] - metrics["R-Precision"]),
            abs(pml["mean_average_precision_at_r"] - metrics["MAP@R"]),
        )
        pml_row.note = (
            f"P@1 {pml['precision_at_1']:.4f}, R-Prec {pml['r_precision']:.4f}, "
            f"MAP@R {pml['mean_average_precision_at_r']:.4f} (max |diff| to suite {agree:.1e})"
        )
        rows.append(pml_row)
        peers.append(pml_row)
    if not args.no_nmi:
        nmi_row, value = timed(
            f"NMI (faiss k-means, {int(labels.max()) + 1:,} clusters, {args.nmi_iters} iters)",
            lambda: nmi(x, labels, niter=args.nmi_iters), device,
        )
        nmi_row.note = f"NMI {value:.4f}"
        rows.append(nmi_row)

    ratio = suite.seconds / floor.seconds
    verdict = [f"suite / floor = {ratio:.2f} (target <= {TARGET_RATIO})"]
    if args.repeats > 1:
        verdict[0] += f"; all repeats: floor {', '.join(f'{m.seconds:.2f}' for m in floors)} s, " + (
            f"suite {', '.join(f'{m.seconds:.2f}' for m in suites)} s"
        )
    if suite.extra_mib is not None:
        verdict.append(f"suite extra memory {suite.extra_mib:,.0f} MiB (target <= {TARGET_EXTRA_MIB:,})")
    for row in peers:  # NMI's row is not a peer: it computes another metric
        verdict.append(f"suite is {row.seconds / suite.seconds:.1f}x faster than {row.name.split(',')[0]}")
    print_report(rows, floor, header, verdict)
    where = "GPU" if device.type == "cuda" else "CPU"
    perf_headline(f"metric suite at {args.n:,} x {args.dim} ({where})", suite.seconds, "s",
                  args.goal_seconds if args.goal_seconds > 0 else None, higher_is_better=False)
    perf_headline("metric suite / matrix-product floor", ratio, "x", TARGET_RATIO, higher_is_better=False)
    for row in peers[:1]:  # faiss's search
        perf_headline(f"faiss IndexFlatIP k={args.k} ({'GPU' if _faiss_gpu() and device.type == 'cuda' else 'CPU'})",
                      row.seconds, "s", higher_is_better=False)
    return 0


def _faiss_gpu() -> bool:
    """Whether faiss can search on a GPU (a faiss-gpu build and a visible device)."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


if __name__ == "__main__":  # also runnable as a script, outside the command line
    raise SystemExit(main())
