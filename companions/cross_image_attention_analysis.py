"""The Cross-Image-Attention supplement's analyses as figure commands.

``gradients`` (supplement Fig. S1): trains the method and the same backbone without the
cross-attention blocks (``--model.num_blocks 0``) with identical settings, records
``log10 |dL/dE(I)|`` — the gradient of the training loss with respect to the encoder's output
feature map — during the chosen epochs, and draws one histogram per epoch (baseline blue,
ours red). The method's loss has two Multi-Similarity terms (unconditional + conditional), the
blocks-free baseline one, so larger gradients could come from the second term alone: the
default baseline (``--baseline matched``) weights its unconditional loss by the method's
total weight (2 with the defaults), so that both sides carry the same loss weight and only the
cross-attention differs; ``--baseline unconditional`` is the supplement's literal baseline.

``attention`` (supplement Figs. S2-S3): for image triples ``(I_a, I_1, I_2)`` of the
evaluation split (I_1 of I_a's class, I_2 of another class, or given by index), draws the
attention of ``phi^n(E(I_1 | I_a))`` and ``phi^n(E(I_2 | I_a))`` over the locations of
``E(I_a)`` for the chosen blocks n (heads averaged), top and bottom rows, and their squared
difference per location in the middle row.

Both take the options of ``fit`` after their own (recipe, ``--data``, ``--backbone``,
``--model.*``, ``--trainer.*``, ``--logger``); they write PNGs (and a JSON summary) to
``--out`` and log the figures to W&B when it is the logger, on the shared figure layer
(``benchmark/engine/figures/``: headless canvases, ``log_images``). The attention maps are also the
registered figure ``cross_image_attention_maps`` (``analyze cross_image_attention_maps --ckpt
PATH``: seeded test triples, three blocks spread over the model's)::

    python -m benchmark analyze cross_image_attention gradients --epochs 0,4,9 --out figs \\
        --data cub --data.root /data/cub --backbone resnet50 --trainer.max_epochs 10
    python -m benchmark analyze cross_image_attention attention --ckpt runs/<run>/checkpoints/last.ckpt \\
        --blocks 2,4,6 --num-triples 4 --out figs --data cub --data.root /data/cub

Models, data and trainers come from the run builder (:func:`benchmark.app.builder.build_cli`,
``run=False``), so a recipe, a dataset option or a model option means here what it means for
``fit``; this module only adds the recording, the choice of images and the drawing.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from benchmark.app.builder import build_cli
from benchmark.core.contracts import register_analysis, register_figure
from benchmark.engine.figures import FigureContext, FigureResult, log_images, pyplot
from methods.base import load_method

# The registered method: the default --method of both commands, and the figure's only method.
METHOD = "cross_image_attention"


# ---------------------------------------------------------------------------- shared helpers
def _split_argv(argv: list[str] | None, parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[str]]:
    """This command's options, and the rest for the fit CLI (recipe, data, model, trainer flags).

    ``--method cross_image_attention`` is added unless given: without it the builder would
    build ``fit``'s default method, which these commands cannot analyse.
    """
    import sys

    parser.allow_abbrev = False  # a fit flag must never be taken for an abbreviation of ours
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if "--method" not in rest:
        rest = ["--method", METHOD, *rest]
    return args, rest


def build(fit_args: list[str], run_dir: Path, defaults: list[str] = ()) -> Any:
    """Model, datamodule and trainer exactly as ``fit`` would build them (recipe included).

    Args:
        fit_args: the user's fit options.
        run_dir: the run directory, unless ``fit_args`` names one.
        defaults: options placed before the user's, so that the user's win.

    Returns:
        The instantiated CLI (``.model``, ``.datamodule``, ``.trainer``, ``.config``), not run.
    """

    args = [*defaults, *fit_args]
    if not any(a == "--run_dir" or a.startswith("--run_dir=") for a in args):
        args += ["--run_dir", str(run_dir)]
    return build_cli(None, args, run=False)


def _int_list(text: str) -> list[int]:
    """``"0,4,9"`` -> ``[0, 4, 9]``; exits with an ``error:`` line (as argparse would) on anything else."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise SystemExit(f"error: expected comma-separated integers, got {text!r}") from err


# ---------------------------------------------------------------------------- gradients (Fig. S1)
class FeatureGradientRecorder(L.Callback):
    """Records ``log10 |dL/dE(I)|`` (the encoder's output feature map) during chosen epochs.

    During those epochs only, a forward hook on ``encoder.features`` (the feature map's hook
    point) puts a tensor hook on its output, which captures the gradient arriving there; a
    random subsample of at most ``max_values`` elements per epoch is kept (exact zeros are
    counted, not logged).

    The hooks exist only during the chosen epochs (removed at each epoch's end), so every other
    epoch trains at full speed. The subsample uses the recorder's own random generator: taking
    it from torch's global one would change the training's random stream, and with it the
    trajectory being measured.

    Args:
        epochs: 0-based epochs to record (as Lightning counts them).
        max_values: gradient values kept per epoch, spread over its steps.
        seed: the subsample's generator seed.
    """

    def __init__(self, epochs: list[int], max_values: int = 200_000, seed: int = 0) -> None:
        self.epochs = set(epochs)
        self.max_values = max_values
        self.values: dict[int, list[torch.Tensor]] = {}
        self.zeros: dict[int, int] = {}
        self.total: dict[int, int] = {}
        self._generator = torch.Generator().manual_seed(seed)
        self._per_step = max_values
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.epochs:
            return
        # An equal share of the budget per step, so that the sample covers the whole epoch rather
        # than its first batches (an infinite loader gets a nominal 100 steps).
        steps = trainer.num_training_batches if math.isfinite(trainer.num_training_batches) else 100
        self._per_step = max(1, self.max_values // max(1, int(steps)))

        def watch(module: torch.nn.Module, inputs: Any, out: torch.Tensor) -> None:
            """Forward hook: ask for the gradient that will reach this feature map in the backward pass.

            The tensor hook fires during the backward pass and records under this epoch.
            """
            if out.requires_grad:  # no gradient flows in a no_grad forward (a validation inside the epoch)
                out.register_hook(lambda g, e=epoch: self._record(e, g))

        self._handle = pl_module.encoder.features.register_forward_hook(watch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remove the forward hook: the next epoch is recorded only if it was asked for."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record(self, epoch: int, grad: torch.Tensor) -> None:
        """Keep a random subsample of ``log10 |grad|`` for ``epoch``; exact zeros are only counted.

        Zeros have no logarithm, so they are reported as a fraction in the summary instead of
        being drawn at minus infinity.
        """
        g = grad.detach().abs().flatten().float()
        self.total[epoch] = self.total.get(epoch, 0) + g.numel()
        zero = g == 0
        self.zeros[epoch] = self.zeros.get(epoch, 0) + int(zero.sum())
        g = g[~zero]
        if g.numel() > self._per_step:
            pick = torch.randint(g.numel(), (self._per_step,), generator=self._generator).to(g.device)
            g = g[pick]
        self.values.setdefault(epoch, []).append(g.log10().cpu())

    def log10_magnitudes(self, epoch: int) -> np.ndarray:
        """Every kept ``log10 |dL/dE|`` value of ``epoch`` (empty when nothing was recorded)."""
        chunks = self.values.get(epoch, [])
        return torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.float32)


def plot_gradient_histograms(
    ours: FeatureGradientRecorder, baseline: FeatureGradientRecorder, epochs: list[int], path: Path, title: str = ""
) -> dict[str, Any]:
    """One histogram panel per epoch (baseline blue, ours red); returns the summary statistics.

    Both histograms of a panel share their bins, spanning the 0.1-99.9 percentiles of the two
    together (a few extreme values would otherwise squeeze the bulk into one bin), and are
    normalised to densities, since the two models may keep different numbers of values.

    Returns:
        Per epoch and model: median, mean, number of values and the fraction of exact zeros.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(epochs), figsize=(4.2 * len(epochs), 3.4), squeeze=False)
    summary: dict[str, Any] = {}
    for ax, epoch in zip(axes[0], epochs):
        a, b = baseline.log10_magnitudes(epoch), ours.log10_magnitudes(epoch)
        both = np.concatenate([a, b])
        if both.size == 0:
            ax.set_title(f"epoch {epoch}: no gradients recorded")
            continue
        bins = np.linspace(np.percentile(both, 0.1), np.percentile(both, 99.9), 80)
        ax.hist(a, bins=bins, density=True, color="tab:blue", alpha=0.55, label="without cross-attention")
        ax.hist(b, bins=bins, density=True, color="tab:red", alpha=0.55, label="Cross-Image-Attention")
        ax.set_title(f"epoch {epoch}")
        ax.set_xlabel(r"$\log_{10} |\partial L / \partial E(I)|$")
        summary[str(epoch)] = {
            name: {
                "median": float(np.median(v)) if v.size else None,
                "mean": float(np.mean(v)) if v.size else None,
                "values": int(v.size),
                "zero_fraction": rec.zeros.get(epoch, 0) / max(1, rec.total.get(epoch, 0)),
            }
            for name, v, rec in (("baseline", a, baseline), ("cross_image_attention", b, ours))
        }
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return summary


def gradients_main(argv: list[str] | None = None) -> int:
    """Supplement Fig. S1: gradient magnitudes at the encoder output, with vs without the blocks."""
    # (The docstring is the command's --help description, so it stays one line; the rest here.)
    # Trains the method, then the blocks-free baseline (whose loss weight, with --baseline
    # matched, is read from the method's model), each as `fit` would with the user's options,
    # each seeded with the run's seed, so both start from the same random state. Writes
    # cia_gradients.png and cia_gradients.json to --out and logs the figure when the logger is
    # W&B. Returns 0, also on the ranks other than 0 of a multi-device run, which draw nothing.
    parser = argparse.ArgumentParser(
        prog="cia-gradients", description=gradients_main.__doc__,
        epilog="Every other option goes to the fit CLI (recipe, --data, --backbone, --model.*, --trainer.*, --logger).",
    )
    parser.add_argument("--epochs", default="0", help="comma-separated epochs (0-based) to record, e.g. 0,4,9")
    parser.add_argument("--out", type=Path, default=Path("figures/cross_image_attention"), help="output folder")
    parser.add_argument("--max-values", type=int, default=200_000, help="gradient values kept per epoch and model")
    parser.add_argument("--baseline", choices=("matched", "unconditional"), default="matched",
                        help="matched: the blocks-free model's loss weighted like the method's two terms together "
                        "(default); unconditional: its loss at weight 1, as in the supplement")
    args, fit_args = _split_argv(argv, parser)
    epochs = sorted(set(_int_list(args.epochs)))  # sorted: the panels and the epoch budget follow the order
    if not epochs or epochs[0] < 0:
        raise SystemExit("error: --epochs needs epochs >= 0 (0-based, as Lightning counts them).")
    # Validation off (the figure needs training steps only) and just enough epochs for the
    # last one asked for; each can be overridden with the same fit option.
    defaults = ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                "--trainer.max_epochs", str(epochs[-1] + 1)]  # the user's flags come later and win
    recorders, trainers = {}, {}
    caption, baseline_args = "", ["--model.num_blocks", "0"]
    # The method first: the matched baseline's loss weight is read from the method's model.
    for name in ("cross_image_attention", "baseline"):
        extra = [] if name == "cross_image_attention" else baseline_args
        cli = build([*fit_args, *extra], args.out / f"run_{name}", defaults)
        if name == "cross_image_attention":
            ours = cli.model
            # Ours' total loss weight: the unconditional term plus the conditional one (which
            # only exists with blocks); the matched baseline's single term gets all of it.
            weight = float(ours.unconditional_weight) + float(ours.conditional_weight if ours.num_blocks else 0.0)
            if args.baseline == "matched":
                baseline_args = ["--model.num_blocks", "0", "--model.unconditional_weight", repr(weight)]
                caption = f"baseline: no blocks, MS loss x {weight:g} (matched to ours' {weight:g} total loss weight)"
            else:
                caption = f"baseline: no blocks, MS loss x {float(ours.unconditional_weight):g} (ours: total weight {weight:g})"
        # A user's --trainer.max_epochs can undo the default above: refuse rather than record nothing.
        if cli.trainer.max_epochs is not None and cli.trainer.max_epochs <= epochs[-1]:
            raise SystemExit(f"error: --epochs asks for epoch {epochs[-1]} but --trainer.max_epochs is {cli.trainer.max_epochs}.")
        # Seeded as fit seeds (the run's --seed_everything), again for the second model.
        L.seed_everything(int(cli.config.get("seed_everything") or 0), workers=True)
        recorder = FeatureGradientRecorder(epochs, args.max_values)
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        recorders[name], trainers[name] = recorder, cli.trainer
    if not trainers["cross_image_attention"].is_global_zero:  # one rank draws and writes
        return 0
    model = trainers["cross_image_attention"].lightning_module
    title = f"{model.backbone_config.name}, {getattr(trainers['baseline'].datamodule, 'name', '')}; {caption}"
    png = args.out / "cia_gradients.png"
    summary = plot_gradient_histograms(recorders["cross_image_attention"], recorders["baseline"], epochs, png, title)
    summary["baseline"] = {"kind": args.baseline, "caption": caption}
    (args.out / "cia_gradients.json").write_text(json.dumps(summary, indent=2))
    log_images(trainers["cross_image_attention"], [png], prefix="analysis")
    print(caption)
    for epoch, stats in summary.items():
        if epoch == "baseline":
            continue
        print(f"epoch {epoch}: median log10|dL/dE| baseline {stats['baseline']['median']:.3f}, "
              f"cross_image_attention {stats['cross_image_attention']['median']:.3f}")
    print(f"wrote {png}")
    return 0


# ---------------------------------------------------------------------------- attention maps (Figs. S2-S3)
def choose_triples(labels: np.ndarray, num: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``num`` triples (a, 1, 2) of positions: 1 shares a's class, 2 does not.

    Anchors are drawn (seeded, without repetition) among the images whose class has another
    image, so that every anchor has a positive; fewer than ``num`` triples when there are
    fewer such anchors.

    Raises:
        ValueError: no class has two images, or there is only one class.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels)
    candidates = np.flatnonzero(counts[labels] >= 2)  # anchors with a positive
    if len(candidates) == 0 or len(np.unique(labels)) < 2:
        raise ValueError("Attention triples need a class with two images and at least two classes.")
    triples = []
    for a in rng.choice(candidates, size=min(num, len(candidates)), replace=False):
        pos = np.flatnonzero((labels == labels[a]) & (np.arange(len(labels)) != a))
        neg = np.flatnonzero(labels != labels[a])
        triples.append((int(a), int(rng.choice(pos)), int(rng.choice(neg))))
    return triples


@torch.no_grad()
def attention_maps(model, images: torch.Tensor, blocks: list[int]) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """Attention of z(1|a), z(2|a) over E(I_a) for (3, C, H, W) images ordered (I_a, I_1, I_2).

    Returns (len(blocks), 2, h, w) head-averaged maps, the token grid (h, w) and the two
    conditional similarities (the method's pair similarity with I_a as the anchor).

    ``blocks`` are 1-based block numbers. The maps are those of the conditional embeddings of
    I_1 and I_2 given ``E(I_a)``: where in I_a each one looks.
    """
    model.eval()
    out = model.encode(images)
    emb = model.project(out.pooled)  # (3, D)
    _, maps = model.conditional_embeddings(emb[1:], out.tokens[:1], return_attention=True)  # (1, H, 2, N) per block
    h, w = out.hw
    picked = torch.stack([maps[n - 1][0].mean(0) for n in blocks])  # (n_blocks, 2, N); heads averaged
    sims = model.pair_scores(emb[:1].expand(2, -1), out.tokens[:1].expand(2, -1, -1), emb[1:], out.tokens[1:])
    return picked.view(len(blocks), 2, h, w).float().cpu().numpy(), (h, w), sims.float().cpu().numpy()


def plot_triple(
    images: np.ndarray, maps: np.ndarray, blocks: list[int], path: Path, labels: tuple[int, int, int],
    sims: np.ndarray, title: str = "", dpi: int = 110,
) -> None:
    """Rows: attention of z(1|a) over I_a, squared difference, attention of z(2|a); one column per block.

    The first column shows I_1, I_a and I_2 themselves; every map is laid over I_a, upsampled
    from the token grid to the image (bilinear). The title gives both conditional similarities.

    Args:
        images: (3, H, W, 3) images in [0, 1], ordered (I_a, I_1, I_2).
        maps: (len(blocks), 2, h, w) attention maps (:func:`attention_maps`).
        blocks: the 1-based block numbers, one column each.
        path: the PNG to write.
        labels: the three images' class ids.
        sims: s(1|a) and s(2|a).
    """
    plt = pyplot()
    size = images.shape[1]
    fig, axes = plt.subplots(3, len(blocks) + 1, figsize=(2.3 * (len(blocks) + 1), 7.0), squeeze=False)
    names = (f"$I_1$ (class {labels[1]})", f"$I_a$ (class {labels[0]})", f"$I_2$ (class {labels[2]})")
    for row, (img, name) in enumerate(zip((images[1], images[0], images[2]), names)):
        axes[row][0].imshow(img)
        axes[row][0].set_title(name, fontsize=9)
    for col, block in enumerate(blocks, start=1):
        top, bottom = maps[col - 1, 0], maps[col - 1, 1]
        diff = (top - bottom) ** 2
        high = float(max(top.max(), bottom.max()))  # one colour scale for both rows of a block
        for row, (m, cmap, label, vmax) in enumerate(
            ((top, "jet", f"block {block}: $I_1|I_a$", high), (diff, "magma", "squared difference", None),
             (bottom, "jet", f"block {block}: $I_2|I_a$", high))
        ):
            ax = axes[row][col]
            ax.imshow(images[0])
            # The extent stretches the h x w token grid over the image's pixels.
            ax.imshow(m, cmap=cmap, alpha=0.55, extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="bilinear",
                      vmin=0.0, vmax=vmax)
            ax.set_title(label, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}  s(1|a)={sims[0]:.3f}  s(2|a)={sims[1]:.3f}".strip(), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _parse_triples(text: str) -> list[tuple[int, int, int]]:
    """``--triples "a,1,2;a,1,2"`` -> [(a, 1, 2), ...]; exits with an ``error:`` line when malformed."""
    triples = []
    for part in text.split(";"):
        values = _int_list(part)
        if len(values) != 3:
            raise SystemExit(f"error: a triple is 'a,1,2' (three dataset positions); got {part!r}.")
        triples.append((values[0], values[1], values[2]))
    return triples


def attention_main(argv: list[str] | None = None) -> int:
    """Supplement Figs. S2-S3: cross-attention maps of chosen blocks for image triples."""
    # (The docstring is the command's --help description.) The datamodule comes from the fit
    # options; the model from --ckpt, or is trained first with those options. Triples are
    # --triples (positions in --split) or seeded ones (choose_triples). One PNG per triple goes
    # to --out, logged when the logger is W&B.
    parser = argparse.ArgumentParser(
        prog="cia-attention", description=attention_main.__doc__,
        epilog="Every other option goes to the fit CLI (recipe, --data, --backbone, --model.*, --trainer.*, --logger).",
    )
    parser.add_argument("--ckpt", type=Path, help="a trained cross_image_attention checkpoint; without it the "
                        "model is trained first with the fit options (--trainer.max_epochs)")
    parser.add_argument("--blocks", default="2,4,6", help="1-based block numbers to show")
    parser.add_argument("--triples", help="explicit triples 'a,1,2;a,1,2' (positions in the evaluated split)")
    parser.add_argument("--num-triples", type=int, default=4)
    parser.add_argument("--split", choices=("test", "val", "train"), default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("figures/cross_image_attention"), help="output folder")
    args, fit_args = _split_argv(argv, parser)
    defaults = ["--trainer.num_sanity_val_steps", "0"]
    # Built even with --ckpt: the datamodule and the trainer (its logger; training without
    # --ckpt) come from the fit options.
    cli = build(fit_args, args.out / "run_attention", defaults)
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    if args.ckpt is not None:

        model = load_method(str(args.ckpt))
    if not getattr(model, "num_blocks", 0):
        raise SystemExit("error: the model has no cross-attention blocks (num_blocks = 0).")
    blocks = _int_list(args.blocks)
    bad = [b for b in blocks if not 1 <= b <= model.num_blocks]
    if bad:
        raise SystemExit(f"error: --blocks {bad} outside 1..{model.num_blocks} (the model has {model.num_blocks} blocks).")
    # Trained only after the block numbers were checked: a typo must not cost a training run.
    if args.ckpt is None:
        print("[cia-attention] no --ckpt: training the model first with the given fit options")
        trainer.fit(model, datamodule=dm)

    model.to("cuda" if torch.cuda.is_available() else "cpu")  # drawing needs one forward per triple
    records = _split_records(model, dm, args.split)
    triples = _parse_triples(args.triples) if args.triples else choose_triples(np.asarray(records.labels), args.num_triples,
                                                                              args.seed)
    paths, _ = draw_triples(model, dm, records, args.split, triples, blocks, args.out)
    for path in paths:
        print(f"wrote {path}")
    log_images(trainer, paths, prefix="analysis")
    return 0


def _split_records(model: Any, dm: Any, split: str) -> Any:
    """The records of ``split`` (``test``, ``val`` or ``train``), images as the model expects them.

    The model's data request (what its inputs need) is applied to the datamodule first, as a
    fit does, so the images are those the model is evaluated on.
    """
    dm.apply_request(model.data_request())
    dm.setup("test")
    return {"test": dm.test_records, "val": dm.val_records, "train": dm.train_records}[split]


def draw_triples(
    model: Any, dm: Any, records: Any, split: str, triples: list[tuple[int, int, int]], blocks: list[int], out: Path,
    dpi: int = 110,
) -> tuple[list[Path], list[dict[str, Any]]]:
    """One attention figure per triple (positions in ``records``); the PNGs and what each shows.

    Images go through the evaluation transform, then are un-normalised for display.

    Returns:
        The PNG paths and, per triple, its positions, labels and both conditional similarities.

    Raises:
        SystemExit: a triple outside the split (an ``error:`` line, as for a bad option).
    """
    for t in triples:
        if max(t) >= len(records) or min(t) < 0:
            raise SystemExit(f"error: triple {t} is outside the {split} split (0..{len(records) - 1}).")
    labels = np.asarray(records.labels)
    dataset = dm.image_dataset(records, dm.eval_transform())
    # The encoder's own normalisation, undone for display: the images as the model saw them.
    norm = model.encoder.normalization
    mean, std = np.array(norm.mean)[:, None, None], np.array(norm.std)[:, None, None]
    device = next(model.parameters()).device
    paths, shown_data = [], []
    for k, (a, i1, i2) in enumerate(triples):
        images = torch.stack([dataset[a]["image"], dataset[i1]["image"], dataset[i2]["image"]]).to(device)
        maps, _, sims = attention_maps(model, images, blocks)
        shown = np.clip(images.cpu().numpy() * std + mean, 0, 1).transpose(0, 2, 3, 1)  # (3, H, W, 3)
        path = out / f"cia_attention_{split}_{k}_{a}_{i1}_{i2}.png"
        plot_triple(shown, maps, blocks, path, (int(labels[a]), int(labels[i1]), int(labels[i2])), sims,
                    title=f"{split} triple (a={a}, 1={i1}, 2={i2})", dpi=dpi)
        paths.append(path)
        shown_data.append({"triple": [a, i1, i2], "labels": [int(labels[a]), int(labels[i1]), int(labels[i2])],
                           "s(1|a)": float(sims[0]), "s(2|a)": float(sims[1])})
    return paths, shown_data


@register_figure(
    "cross_image_attention_maps",
    "attention of z(1|a), z(2|a) over I_a for seeded test triples (supplement Figs. S2-S3)",
    methods=(METHOD,), evaluation=False,
)
def attention_figure(context: FigureContext) -> FigureResult:
    """The ``attention`` command's figure from a checkpoint: ``settings.queries`` seeded triples of the
    test split (default 6; the command takes 4), up to three blocks spread over the model's."""
    model = context.model
    if not getattr(model, "num_blocks", 0):
        raise ValueError("the model has no cross-attention blocks (num_blocks = 0).")
    # A third of the way, two thirds and the last block (6 blocks: 2, 4, 6, the supplement's);
    # fewer when the model has fewer blocks.
    n = model.num_blocks
    blocks = sorted({max(1, round(n * f)) for f in (1 / 3, 2 / 3, 1.0)})
    records = _split_records(model, context.datamodule, "test")
    triples = choose_triples(np.asarray(records.labels), max(1, min(context.settings.queries, 4)), context.seed)
    paths, shown = draw_triples(model, context.datamodule, records, "test", triples, blocks, context.out_dir,
                                context.settings.dpi)
    return FigureResult(paths, {"blocks": blocks, "triples": shown})


@register_analysis("cross_image_attention", "Cross-Image-Attention supplement figures: 'gradients' (Fig. S1), 'attention' maps")
def main(argv: list[str] | None = None) -> int:
    """``gradients`` or ``attention``; the rest of the arguments as for that command.

    Returns:
        The command's exit code; without a command, the usage and 2 (0 for ``--help``).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"gradients": gradients_main, "attention": attention_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m benchmark analyze cross_image_attention {gradients,attention} [options] [fit options]\n"
              "       (add --help after the command for its options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
