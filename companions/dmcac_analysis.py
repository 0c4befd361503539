"""DMCAC analyses, run as ``python -m benchmark analyze dmcac <command> [options] [fit options]``.

``loss_terms``: how much each term of ``L = beta_frob L_frob + beta_ce L_ce + beta_cac L_cac``
drives training. Over a short run (``--steps``, 20 by default) it computes, at every training
step and before the optimizer step, the L2 norm of the gradient of each weighted term
(``beta * L_term``) with respect to the trainable parameters (``torch.autograd.grad`` per term,
keeping the graph for the step's own backward), over all trainable parameters and over the
embedding network alone (encoder and projection head: what the retrieval uses). It prints and
writes (JSON and a Markdown table) the median of each over the first and the last
``--window`` steps and its ratio to the CE term's. The run itself is an ordinary ``fit``
(recipe, ``--data``, ``--backbone``, ``--model.*``, ``--trainer.*`` as for ``fit``; validation
and checkpoints off unless asked for), so the norms are those of the trajectory training
takes::

    python -m benchmark analyze dmcac loss_terms --steps 20 --out figures/dmcac --logger none
    python -m benchmark analyze dmcac loss_terms --out figures/dmcac_paper --logger none \\
        --model.views.count 6 --model.classifiers.logit_scale 1 --model.lr 3e-5 --model.warmup_steps 0

``memory``: the memory of ``retrieval.mode full_grad`` (the database embedded with gradient at
every step) against the fixed database. It measures, on this machine, the activations autograd
keeps per image (fp32, bf16 autocast, fp32 with gradient checkpointing; the saved tensors of a
forward of two minus one image, as the method's own ``retrieval.memory_check`` does), and the
peak resident memory of one real training step (forward and backward, fp32, in a fresh process)
with and without the database in the graph at a small size; then extrapolates to a given
database and batch::

    python -m benchmark analyze dmcac memory --backbone vit_small --image-size 224 \\
        --database 590 --queries 256 --views 6 --out figures/dmcac

The figure ``dmcac_view_similarity`` (the shared figure layer, ``benchmark/engine/figures/``): for
seeded training queries, each view's ``P'`` over the union of the views' retrieved database
entries, the distributions ``L_frob`` compares, for the untrained model and the checkpoint
(each with its own database, embedded un-augmented)::

    python -m benchmark analyze dmcac_view_similarity --ckpt runs/<run>/checkpoints/last.ckpt

docs/methods/dmcac.md ("Loss scale", "Full retrieval with gradient") quotes what these measured
and the settings they were measured with.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from benchmark.app.builder import build_cli
from benchmark.core.contracts import register_analysis, register_figure
from benchmark.core.io import atomic_write_text
from benchmark.engine.figures import FigureContext, FigureResult, pyplot
from benchmark.nn.backbones import BackboneConfig
from benchmark.nn.divergences import frobenius_lower, js_divergence_matrix, similarity_log_probs
from benchmark.nn.knn_context import union_of_neighbours
from methods.dmcac import DMCAC, RetrievalConfig, ViewConfig

METHOD = "dmcac"
# The loss terms, in the order of the table's rows: CE first, the yardstick the others are divided by.
TERMS = ("ce", "frob", "cac")
EMBEDDING_PREFIXES = ("encoder.", "head.")  # the parameters that produce the embeddings


# ---------------------------------------------------------------------------- the measurement
def term_gradient_norms(model: Any, terms: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per loss term present in ``terms``: the L2 norm of ``d(beta * term)/d(theta)``.

    ``all``: over every trainable parameter; ``embedding``: over the encoder and the projection
    head only. Each term's gradient is taken with ``retain_graph=True``, so the step's own
    backward pass (on ``terms["loss"]``) still works afterwards. Parameters a term does not
    reach count as zero.

    Args:
        model: a DMCAC model in training (its ``loss_config`` gives the betas).
        terms: what ``training_loss`` returned: ``loss`` and the unweighted terms.

    Returns:
        Per term: ``all`` and ``embedding`` (the norms), ``value`` (the unweighted term) and
        ``beta``. A term that is absent, or that does not depend on the parameters this step,
        is left out.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # Weighted by the betas: each norm is then that of the term's actual share of the loss.
    betas = {"frob": model.loss_config.beta_frob, "ce": model.loss_config.beta_ce, "cac": model.loss_config.beta_cac}
    out: dict[str, dict[str, float]] = {}
    for term in TERMS:
        value = terms.get(term)
        if value is None or not value.requires_grad:
            continue
        grads = torch.autograd.grad(betas[term] * value, params, retain_graph=True, allow_unused=True)
        total = embedding = 0.0
        for (name, _), grad in zip(named, grads):
            if grad is None:
                continue
            # Squares summed in float64: millions of small values, whose float32 sum would round.
            square = float(grad.detach().double().pow(2).sum())
            total += square
            if name.startswith(EMBEDDING_PREFIXES):
                embedding += square
        out[term] = {"all": math.sqrt(total), "embedding": math.sqrt(embedding), "value": float(value.detach()),
                     "beta": float(betas[term])}
    return out


class LossTermRecorder:
    """Wraps a DMCAC's ``training_loss`` so that every training forward records its per-term norms.

    One record per call (with gradient accumulation: per micro-batch), with the optimizer step.

    The wrapper replaces the method on the instance only, so the run is otherwise the fit's
    own: same loss, same backward, same optimizer step. ``records`` holds ``{"step": global
    step, "terms": term_gradient_norms(...)}`` per training forward.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def attach(self, model: Any) -> None:
        """Wrap ``model.training_loss`` so that each training call also records its term norms."""
        original = model.training_loss

        def training_loss(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            """The model's own training loss, recorded on the way out; validation calls are not recorded."""
            terms = original(batch)
            if torch.is_grad_enabled() and terms["loss"].requires_grad:
                self.records.append({"step": int(model.global_step), "terms": term_gradient_norms(model, terms)})
            return terms

        model.training_loss = training_loss


def _median(values: list[float]) -> float | None:
    """The median, or None for no values (a term absent from the window)."""
    return statistics.median(values) if values else None


def summarize(records: list[dict[str, Any]], window: int) -> dict[str, Any]:
    """Median norm per term over the first and the last ``window`` records, and the ratio to CE.

    Medians rather than means: single steps can spike, and the question is which term drives
    training typically.

    Returns:
        ``{"start": ..., "end": ...}``, each with the steps it covers and, per term, the
        medians of ``all``, ``embedding`` and ``value`` and ``ratio_all`` / ``ratio_embedding``
        (None without a CE median to divide by).
    """
    parts = {"start": records[:window], "end": records[-window:] if records else []}
    summary: dict[str, Any] = {}
    for part, chosen in parts.items():
        terms = [t for t in TERMS if any(t in r["terms"] for r in chosen)]
        medians = {t: {scope: _median([r["terms"][t][scope] for r in chosen if t in r["terms"]])
                       for scope in ("all", "embedding", "value")} for t in terms}
        for t in terms:
            for scope in ("all", "embedding"):
                ce = medians.get("ce", {}).get(scope)
                medians[t][f"ratio_{scope}"] = medians[t][scope] / ce if ce else None
        summary[part] = {"steps": [r["step"] for r in chosen], "terms": medians}
    return summary


def _fmt(x: float | None) -> str:
    """Three significant digits, scientific notation outside [1e-3, 1e4): the norms span decades."""
    if x is None:
        return "—"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


def markdown_table(summary: dict[str, Any], betas: dict[str, float]) -> str:
    """One row per term: the median gradient norms at the start and end of the window and their ratio to CE.

    Args:
        summary: what :func:`summarize` returned.
        betas: each term's weight, shown in the table's second column.
    """
    header = ("| term | β | ‖∇‖ start | ÷ CE | ‖∇‖ end | ÷ CE | embedding ‖∇‖ start | ÷ CE | embedding ‖∇‖ end | ÷ CE "
              "| term value start → end |")
    lines = [header, "|" + "---|" * 11]
    start, end = summary["start"]["terms"], summary["end"]["terms"]
    for term in TERMS:
        if term not in start and term not in end:
            continue
        s, e = start.get(term, {}), end.get(term, {})
        cells = [term, _fmt(betas[term])]
        for scope in ("all", "embedding"):
            for part in (s, e):
                cells += [_fmt(part.get(scope)), _fmt(part.get(f"ratio_{scope}"))]
        cells.append(f"{_fmt(s.get('value'))} → {_fmt(e.get('value'))}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_model() -> str:
    """The CPU's ``model name`` (Linux), else what ``platform`` knows: recorded with the numbers."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def settings_of(model: Any, trainer: L.Trainer) -> dict[str, Any]:
    """What the norms depend on, recorded with them.

    The ratios between the terms change with the logit scale, the temperature, the number of
    views and the learning rate, so a table without these settings could not be compared with
    another run's.
    """
    return {
        "backbone": model.backbone_config.name,
        "pretrained": bool(model.backbone_config.pretrained or model.backbone_config.weights),
        "embedding_dim": model.embedding_dim,
        "image_size": getattr(trainer.datamodule, "image_size", None),
        "batch_queries": getattr(trainer.datamodule, "classes_per_batch", 0) * getattr(trainer.datamodule, "samples_per_class", 0),
        "views": model.views_config.count,
        "retrieval_mode": model.retrieval_config.mode,
        "k": model.retrieval_config.k,
        "temperature": model.retrieval_config.temperature,
        "logit_scale": model.classifiers_config.logit_scale,
        "lr": model.hparams.lr,
        "head_lr_mult": model.hparams.get("head_lr_mult"),
        "warmup_steps": model.hparams.get("warmup_steps"),
        "betas": {"frob": model.loss_config.beta_frob, "ce": model.loss_config.beta_ce, "cac": model.loss_config.beta_cac},
        "view_reduction": model.loss_config.view_reduction,
        "precision": str(trainer.precision),
        "device": str(model.device),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------- the command
def loss_terms_main(argv: list[str] | None = None) -> int:
    """Gradient norm of each DMCAC loss term (beta included) over a short training run, and its ratio to CE."""
    # (The docstring is the command's --help description.) Writes <out>/<name>.json (settings,
    # summary and every step's record) and <out>/<name>.md (the table with its title and the
    # command), atomically. Returns 0, also on the ranks other than 0 of a multi-device run,
    # which write nothing.
    parser = argparse.ArgumentParser(
        prog="dmcac-loss-terms", description=loss_terms_main.__doc__,
        epilog="Every other option goes to the fit CLI (recipe, --data, --backbone, --model.*, --trainer.*, --logger).",
    )
    parser.add_argument("--steps", type=int, default=20, help="training steps to record (default 20)")
    parser.add_argument("--window", type=int, default=None,
                        help="steps at the start and at the end whose medians are reported (default: steps // 4, >= 1)")
    parser.add_argument("--out", type=Path, default=Path("figures/dmcac"), help="output folder")
    parser.add_argument("--name", default="dmcac_loss_terms", help="file name stem of the JSON and Markdown outputs")
    parser.allow_abbrev = False  # a fit flag must never be taken for an abbreviation of ours
    raw = list(sys.argv[1:] if argv is None else argv)
    args, fit_args = parser.parse_known_args(raw)
    if args.steps < 1:
        raise SystemExit("error: --steps must be >= 1.")
    # A quarter of the steps at each end by default: the start and end windows do not overlap.
    window = args.window or max(1, args.steps // 4)
    if not 1 <= window <= args.steps:
        raise SystemExit(f"error: --window must be in [1, --steps={args.steps}].")
    if "--method" not in fit_args:  # without it the builder would build fit's default method
        fit_args = ["--method", METHOD, *fit_args]
    # max_steps decides the length: no epoch or time limit of a recipe cuts the run short.
    # Validation and checkpoints off: the command measures training steps only.
    defaults = [  # the user's flags come later and win
        "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "-1", "--trainer.max_time", "null",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--checkpoint.save_top_k", "0", "--checkpoint.last_every_n_epochs", "0",
    ]
    cli_args = [*defaults, *fit_args]
    if not any(a == "--run_dir" or a.startswith("--run_dir=") for a in cli_args):
        cli_args += ["--run_dir", str(args.out / f"run_{args.name}")]
    # Built as fit builds a run (recipe, options, seed), then trained by hand below.
    cli = build_cli(None, cli_args, run=False)
    model, trainer = cli.model, cli.trainer
    if not hasattr(model, "loss_config"):  # another --method: its loss has no such terms
        raise SystemExit(f"error: loss_terms analyses DMCAC; --method built {type(model).__name__}.")
    # Seeded as fit seeds a run, so the trajectory is the one `fit` with these options takes.
    L.seed_everything(int(cli.config.get("seed_everything") or 0), workers=True)
    recorder = LossTermRecorder()
    recorder.attach(model)
    trainer.fit(model, datamodule=cli.datamodule)
    if not trainer.is_global_zero:  # one rank writes (each rank recorded its own micro-batches)
        return 0
    if not recorder.records:
        raise SystemExit("error: no training step ran (check --trainer.max_steps / --trainer.limit_train_batches).")
    window = min(window, len(recorder.records))  # the user's trainer options may stop the run earlier
    summary = summarize(recorder.records, window)
    settings = settings_of(model, trainer)
    table = markdown_table(summary, {t: settings["betas"][t] for t in TERMS})
    # The title names the settings the ratios depend on and the steps each median covers.
    title = (f"DMCAC loss-term gradient norms: {settings['backbone']}, {settings['views']} views, k {settings['k']}, "
             f"temperature {settings['temperature']:g}, logit scale {settings['logit_scale']:g}, lr {settings['lr']:g}; "
             f"medians over steps {summary['start']['steps'][0]}-{summary['start']['steps'][-1]} (start) and "
             f"{summary['end']['steps'][0]}-{summary['end']['steps'][-1]} (end) of {len(recorder.records)}")
    # The command as typed, so the JSON says how to reproduce it.
    result = {
        "command": ["python", "-m", "benchmark", "analyze", METHOD, "loss_terms", *raw],
        "steps": len(recorder.records), "window": window, "settings": settings, "summary": summary,
        "per_step": recorder.records,
    }
    # The JSON keeps every step's norms, so other windows or statistics can be computed later.
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"{args.name}.json", args.out / f"{args.name}.md"
    atomic_write_text(json_path, json.dumps(result, indent=2))
    atomic_write_text(md_path, f"{title}\n\n{table}\n\n`{' '.join(result['command'])}` on {settings['cpu']} "
                               f"({settings['device']}, {settings['precision']})\n")
    print(title)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    return 0


# ---------------------------------------------------------------------------- full_grad memory
def _memory_model(backbone: str, image_size: int, views: int, grad_checkpointing: bool = False) -> Any:
    """A DMCAC in ``full_grad`` mode, train mode, for the memory measurements.

    Random weights (``pretrained=False``): the memory does not depend on the values, and nothing
    is downloaded. ``num_classes`` is a placeholder: the classifiers are a small part of it.
    """
    torch.manual_seed(0)
    model = DMCAC(backbone=BackboneConfig(backbone, pretrained=False, grad_checkpointing=grad_checkpointing),
                  image_size=image_size, num_classes=100, views=ViewConfig(count=views),
                  retrieval=RetrievalConfig(mode="full_grad"))
    return model.train()


def _rss_bytes() -> int:
    """The process's current resident memory (``/proc/self/statm``'s second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _step_peak(backbone: str, image_size: int, database: int, queries: int, views: int, mode: str, queue: Any) -> None:
    """In a fresh process: peak RSS growth of one fp32 training step (forward + backward).

    The peak (``ru_maxrss``) is a high-water mark of the whole process, so the step runs in a
    process that has done nothing else that large; the growth is measured from the resident
    memory just before the step (model, images and the batch already allocated). The result
    goes back through ``queue``.

    Args:
        backbone, image_size, views: the model (as :func:`_memory_model`).
        database: database images: embedded with gradient in ``full_grad``, embedded once
            without gradient (a fixed database) in ``full``.
        queries: queries per batch, each with ``views`` views.
        mode: ``full`` or ``full_grad``.
    """
    model = _memory_model(backbone, image_size, views)  # fp32, no gradient checkpointing
    # The same model for both modes: only how the database enters the step differs.
    model.retrieval_config = RetrievalConfig(mode=mode)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(database, 3, image_size, image_size, generator=g)
    if mode == "full_grad":  # the images themselves: every step embeds them with gradient
        model.set_database_images(images, torch.arange(database))
    else:
        with torch.no_grad():
            model.set_database(model.embed(images), torch.arange(database))
    # Query indices follow the database's: no query is one of the database images.
    batch = {"image": torch.randn(queries, views, 3, image_size, image_size, generator=g),
             "label": torch.arange(queries) % 100, "index": torch.arange(queries) + database}
    with torch.no_grad():
        model.embed(images[:1])  # lazy initialisation outside the measured step
    # RSS just before the step: what the model, the images and the batch already hold.
    before = _rss_bytes()
    start = time.perf_counter()
    terms = model.training_loss(batch)  # full_grad: the database is embedded inside this call
    terms["loss"].backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    queue.put({"mode": mode, "peak_growth_bytes": peak - before, "seconds": seconds})


def measure_step_peaks(backbone: str, image_size: int, database: int, queries: int, views: int) -> dict[str, Any]:
    """Peak RSS growth of one training step, ``full_grad`` and fixed ``full``, each in its own process.

    ``spawn``, not ``fork``: a fresh interpreter that shares nothing with this one (its models,
    its allocations), so each peak is that step's alone.

    Returns:
        Per mode: ``peak_growth_bytes`` and ``seconds`` (the step's wall time).
    """
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for mode in ("full", "full_grad"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_step_peak, args=(backbone, image_size, database, queries, views, mode, queue))
        proc.start()
        result = queue.get()  # before join(): a child blocked on a full queue would never exit
        proc.join()
        out[mode] = result
    return out


def memory_main(argv: list[str] | None = None) -> int:
    """Memory of full retrieval with the database in the graph (full_grad) vs the fixed database."""
    # (The docstring is the command's --help description.) Measures the activations autograd
    # keeps per image in three settings on this machine, extrapolates one step's memory to
    # --database images and --queries x --views query views, and, unless --step '', checks the
    # arithmetic against one real small step per mode. Writes <out>/<name>.json and .md.
    parser = argparse.ArgumentParser(prog="dmcac-memory", description=memory_main.__doc__)
    parser.add_argument("--backbone", default="vit_small")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--database", type=int, default=590, help="database images to extrapolate to (CUB 10 %%: ~590)")
    parser.add_argument("--queries", type=int, default=256, help="queries per batch to extrapolate to")
    parser.add_argument("--views", type=int, default=6)
    # The real step is measured at a size any machine holds; the options above are only extrapolated.
    parser.add_argument("--step", default="16,4", help="database,queries of the measured real step ('' to skip)")
    parser.add_argument("--out", type=Path, default=Path("figures/dmcac"))
    parser.add_argument("--name", default="dmcac_full_grad_memory")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    mib, gib = 2**20, 2**30
    # Per image, with the model's own probe (two images minus one, train mode), per precision.
    per_image: dict[str, int] = {}
    for label, checkpointing, context in (
        ("fp32", False, None), ("bf16 autocast", False, "bf16"), ("fp32, grad_checkpointing", True, None),
    ):
        model = _memory_model(args.backbone, args.image_size, args.views, checkpointing)
        # On CPU: autocast in bf16 keeps the activations the matrix products produce in bf16, as a
        # GPU's bf16 autocast does; the other settings run in float32.
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if context == "bf16" else torch.autocast("cpu", enabled=False)
        per_image[label] = model.activation_bytes_per_image(args.image_size, ctx)
    # The same for every precision: the parameters are float32 in all three.
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    query_images = args.queries * args.views  # every view of every query is embedded with gradient
    images_bytes = args.database * 3 * args.image_size**2 * 4  # the database images, float32, on the device
    rows = []
    # Activations of every embedded image, plus 3 x the trainable weights (their gradients and
    # AdamW's two moments); full_grad embeds the database too and holds its images.
    for label, b in per_image.items():
        fixed = b * query_images + 3 * trainable
        grad = b * (query_images + args.database) + images_bytes + 3 * trainable
        rows.append({"precision": label, "per_image_bytes": b, "fixed_bytes": fixed, "full_grad_bytes": grad})
    steps = None
    if args.step:  # a real step small enough for this machine, as a check of the arithmetic
        db, q = (int(x) for x in args.step.split(","))
        steps = {"database": db, "queries": q, "views": args.views, **measure_step_peaks(
            args.backbone, args.image_size, db, q, args.views)}
        # What the arithmetic above predicts the database adds to the measured step.
        steps["predicted_difference_bytes"] = per_image["fp32"] * db + db * 3 * args.image_size**2 * 4
    # The Markdown table: one row per setting, the extrapolated step memory fixed vs full_grad.
    lines = [
        f"| {args.backbone}, {args.image_size} px | activations per image | fixed database: {args.queries} x "
        f"{args.views} views | full_grad: + {args.database} database images |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['per_image_bytes'] / mib:.1f} MiB | {r['fixed_bytes'] / gib:.1f} GiB "
                     f"| {r['full_grad_bytes'] / gib:.1f} GiB |")
    # What the table leaves out is said under it: the reader must know what is not counted.
    text = "\n".join(lines) + (
        f"\n\n(activations x images + {3 * trainable / gib:.2f} GiB of gradients and AdamW state; full_grad also "
        f"holds the {images_bytes / gib:.2f} GiB of database images; weights and transient buffers not included)\n"
    )
    if steps is not None:
        f, g = steps["full"], steps["full_grad"]
        text += (
            f"\nMeasured step (fp32, {steps['queries']} queries x {args.views} views, database {steps['database']}): "
            f"peak RSS growth {f['peak_growth_bytes'] / mib:.0f} MiB fixed, {g['peak_growth_bytes'] / mib:.0f} MiB "
            f"full_grad: difference {(g['peak_growth_bytes'] - f['peak_growth_bytes']) / mib:.0f} MiB, predicted "
            f"{steps['predicted_difference_bytes'] / mib:.0f} MiB; step time {f['seconds']:.1f} s vs {g['seconds']:.1f} s\n"
        )
    # Activation sizes depend on the backbone's kernels and torch's version: both are recorded.
    cpu = _cpu_model()
    result = {"command": ["python", "-m", "benchmark", "analyze", METHOD, "memory", *(argv or [])], "cpu": cpu,
              "torch": torch.__version__, "backbone": args.backbone, "image_size": args.image_size,
              "database": args.database, "queries": args.queries, "views": args.views,
              "trainable_bytes": trainable, "rows": rows, "step": steps}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{args.name}.json", json.dumps(result, indent=2))
    atomic_write_text(args.out / f"{args.name}.md", text + f"\nMeasured on {cpu}, torch {torch.__version__}.\n")
    print(text)
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.md')}")
    return 0


# ---------------------------------------------------------------------------- figure: the views' similarity distributions
FIGURE_QUERIES = 2  # query images drawn (seeded)


@torch.no_grad()
def view_distributions(model: Any, datamodule: Any, images: torch.Tensor, query_ids: torch.Tensor) -> dict[str, Any]:
    """What ``L_frob`` compares for (B, A, C, H, W) views of training queries, with ``model``'s
    own database (re-embedded, un-augmented, by this model): per query the union ``S`` of its
    views' k nearest database entries (training-split indices), ``P'`` (A, T) and the pairwise
    JS divergences (A, A), and the query's ``L_frob``.

    Each model gets its own database embeddings: the untrained model compared against a
    database the trained one embedded would mix the two. ``model``'s database is replaced.

    Returns:
        ``{"queries": [...]}``, per query: ``entries`` (training-split indices of S),
        ``probabilities`` (A, T), ``js`` (A, A) and ``frob``.
    """
    model.eval()
    device = next(model.parameters()).device
    records = datamodule.train_records.subset(model.database_indices)  # row i = database_indices[i]
    loader = datamodule.eval_dataloader(records)  # the evaluation transform: no augmentation
    # Embedded with the model under study, batch by batch (the database can be thousands of images).
    rows = []
    for batch in loader:
        rows.append(model.embed(batch["image"].to(device)).float())
    model.set_database(torch.cat(rows), model.database_indices)
    # From here on the method's own steps, as in training: embed the views, retrieve each
    # view's k nearest database entries, take their union S per query, and compare the views'
    # softmax similarity distributions over S.
    views = model.embed_views(images.to(device))  # (B, A, F)
    neighbours = model.retrieve(views, query_ids.to(device))  # (B, A, k)
    union, mask = union_of_neighbours(neighbours, model.database_embeddings.shape[0])  # (B, T)
    keys = model.database_embeddings[union]  # (B, T, F)
    log_p = similarity_log_probs(views.float(), keys.float(), mask, model.retrieval_config.temperature)  # (B, A, T)
    js = js_divergence_matrix(log_p)  # (B, A, A)
    out = []
    for b in range(views.shape[0]):
        t = int(mask[b].sum())  # this query's |S|; the rest of the row is padding
        out.append({
            "entries": [int(model.database_indices[int(i)]) for i in union[b, :t]],
            "probabilities": log_p[b, :, :t].exp().cpu().numpy(),
            "js": js[b].cpu().numpy(),
            "frob": float(frobenius_lower(js[b : b + 1])[0]),
        })
    return {"queries": out}


@register_figure(
    "dmcac_view_similarity",
    "for training queries, each view's similarity distribution P' over the retrieved database entries "
    "(what L_frob compares), untrained vs trained",
    methods=(METHOD,), initial_model=True, evaluation=False,
)
def view_similarity(context: FigureContext) -> FigureResult:
    """``dmcac_view_similarity``: each view's ``P'`` for seeded training queries, untrained vs trained.

    One row per query, one column per model (the untrained start, when the figure layer kept
    it, and the checkpoint). Both models see the same query images and the same augmented
    views, so the columns differ only by the weights.
    """
    plt = pyplot()
    model, dm = context.model, context.datamodule
    # The untrained model comes from the figure layer (initial_model=True in the registration);
    # without it the figure has the checkpoint's column only.
    states = [("start (untrained)", context.initial_model), ("end (checkpoint)", model)]
    states = [(name, m) for name, m in states if m is not None]
    labels = dm.train_records.labels
    # The query / database split is deterministic (its own seed): both models get the same one.
    for _, m in states:
        m.split_training_set(labels)
    dm.apply_request(model.data_request())
    # The training transform: the query's views (crop + RandAugment) as training draws them.
    dataset = dm.image_dataset(dm.train_records, dm.train_transform())
    rng = np.random.default_rng(context.seed)
    # Training queries, as training draws them; the database is what they retrieve from.
    picked = sorted(rng.choice(model.query_indices, size=min(FIGURE_QUERIES, len(model.query_indices)), replace=False).tolist())
    with torch.random.fork_rng():  # the RandAugment views: the same for both models and every call
        torch.manual_seed(context.seed)
        images = torch.stack([dataset[i]["image"] for i in picked])
    if images.ndim == 4:  # one view per query: (B, C, H, W) -> (B, 1, C, H, W)
        images = images[:, None]
    # Training-split indices: with `database: all`, retrieve() excludes each query's own image by them.
    ids = torch.as_tensor(picked)
    results = [(name, view_distributions(m, dm, images, ids)) for name, m in states]
    views = images.shape[1]
    # Rows: queries; columns: models (untrained, checkpoint).
    fig, axes = plt.subplots(len(picked), len(results), figsize=(5.2 * len(results), 2.7 * len(picked)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    data: dict[str, Any] = {"queries": picked, "query_labels": [int(labels[i]) for i in picked], "views": views,
                            "temperature": model.retrieval_config.temperature, "k": model.retrieval_config.k, "states": {}}
    for col, (name, result) in enumerate(results):
        data["states"][name] = []
        for row, q in enumerate(picked):
            entry = result["queries"][row]
            p = entry["probabilities"]  # (A, T)
            # One order for every view's curve, so the curves can be compared point by point.
            order = np.argsort(-p[0], kind="stable")  # entries by view 0's probability
            # Entries of the query's class: where the probability mass should be after training.
            same = np.array([labels[e] == labels[q] for e in entry["entries"]])[order]
            ax = axes[row][col]
            x = np.arange(p.shape[1])
            for a in range(views):
                ax.plot(x, p[a, order], marker="o", markersize=2.5, linewidth=1.0, color=cmap(a / max(1, views - 1)),
                        label="view 0 (crop)" if a == 0 else f"view {a} (RandAugment)")
            ax.scatter(x[same], np.zeros(same.sum()), marker="^", s=30, color="#1a9850", zorder=3, clip_on=False,
                       label="same class as the query")
            ax.set_ylim(bottom=0)
            ax.set_xlabel(f"the {p.shape[1]} retrieved database entries (union over views), by view 0's P'", fontsize=7)
            ax.set_ylabel("P'", fontsize=8)
            upper = entry["js"][np.tril_indices(views, -1)]  # each pair of views once
            ax.set_title(f"{name}: query {q} (class {int(labels[q])}); JS(views) mean {upper.mean() if upper.size else 0:.4f}, "
                         f"L_frob {entry['frob']:.4f}", fontsize=7.5)
            if row == 0 and col == len(results) - 1:
                ax.legend(fontsize=6.5, frameon=False)
            data["states"][name].append({"query": q, "entries": entry["entries"], "probabilities": np.round(p, 6),
                                         "js": np.round(entry["js"], 8), "frob": entry["frob"],
                                         "same_class": [bool(labels[e] == labels[q]) for e in entry["entries"]]})
    # The temperature and k are in the title: how peaked the distributions can be depends on both.
    fig.suptitle(f"{context.method}: P' = softmax(Z_A Z_S^T / {model.retrieval_config.temperature:g}) of each view over the "
                 f"union S of the views' {model.retrieval_config.k} nearest database entries (each model's own database)",
                 fontsize=8.5)
    fig.tight_layout()
    return FigureResult([context.save(fig, "dmcac_view_similarity")], data)


@register_analysis("dmcac", "DMCAC: 'loss_terms' (each loss term's gradient norm vs CE over a short run), "
                            "'memory' (full retrieval with the database in the graph)")
def main(argv: list[str] | None = None) -> int:
    """``loss_terms`` or ``memory``; the rest of the arguments as for that command.

    Returns:
        The command's exit code; without a command, the usage and 2 (0 for ``--help``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"loss_terms": loss_terms_main, "memory": memory_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m benchmark analyze dmcac loss_terms [--steps N] [--window W] [--out DIR] [fit options]\n"
              "       python -m benchmark analyze dmcac memory [--backbone B] [--image-size S] [--database N] ...\n"
              "       (add --help after the command for its options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
