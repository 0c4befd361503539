"""Calibrate the embedded synthetic dataset: test Recall@1 without and with learning.

Generates the dataset (timed), then reports Recall@1 on the test classes (query = gallery =
all test images, self excluded, cosine similarity) for raw pixels, randomly initialised
CNNs and a small CNN trained briefly on the training classes. A good calibration has low
Recall@1 without learning and a clear rise after a short training, i.e. the metric transfers
to unseen classes. Writes a contact sheet of a few classes for visual inspection.

    python -m benchmark perf synthetic_baseline --train-steps 160

The dataset is the one ``--data synthetic`` trains on (:func:`datamodules.synthetic.generate_synthetic`,
CUB-200-2011's file layout, classes ``1..num_classes // 2`` for training and the rest for the
test), so the numbers say how hard the embedded default's retrieval task is: docs/datasets.md
quotes them. Everything here is standalone (numpy, PIL, plain torch): no datamodule, method or
trainer of the benchmark is involved, so a calibration problem cannot hide behind one.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmark.core.contracts import register_perf
from datamodules.synthetic import DATASET_DIRNAME, generate_synthetic


def recall_at_1(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out Recall@1 under cosine similarity.

    Args:
        features: ``(N, ...)`` features or images, flattened per sample.
        labels: ``(N,)`` class ids.

    Returns:
        The fraction of samples whose most similar other sample has the same class.
    """
    f = features.reshape(len(features), -1).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-12  # an all-zero row stays zero instead of NaN
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)  # a sample never retrieves itself
    return float(np.mean(labels[sim.argmax(axis=1)] == labels))


def load_cub(cub_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images as ``(N, S, S, 3)`` uint8 and their 1-based class ids, in ``images.txt`` order.

    Read through CUB-200-2011's index files (``images.txt``, ``image_class_labels.txt``): the
    synthetic dataset is written in that layout, with class ids from 1 as CUB numbers them.
    """

    def read(name: str) -> dict[int, str]:
        """``<id> <rest>`` lines of a CUB index file as {id: rest}."""
        lines = (cub_dir / name).read_text().split("\n")
        return {int(i): rest for i, rest in (line.split(" ", 1) for line in lines if line)}

    paths, labels = read("images.txt"), read("image_class_labels.txt")
    ids = sorted(paths)
    images = np.stack([np.asarray(Image.open(cub_dir / "images" / paths[i]).convert("RGB")) for i in ids])
    return images, np.array([int(labels[i]) for i in ids])


def save_contact_sheet(
    images: np.ndarray, labels: np.ndarray, path: Path, classes: int = 8, per_class: int = 8
) -> None:
    """A ``classes x per_class`` grid of the first classes' first images, upscaled 2x.

    One row per class: a glance shows whether the images of a class share their factors
    (shape, colours, texture) while their nuisances vary, i.e. whether the classes are
    learnable at all. Nearest-neighbour upscaling keeps the pixels as the network sees them.
    """
    rows = [
        np.concatenate(list(images[labels == c][:per_class]), axis=1) for c in np.unique(labels)[:classes]
    ]
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(path)


@register_perf("synthetic_baseline", "embedded synthetic dataset: generation time and Recall@1 without / with learning")
def main(argv: list[str] | None = None) -> int:
    """``perf synthetic_baseline``: generate the dataset (timed) and print its Recall@1 baselines.

    Returns:
        0; the raw-pixel baseline alone when torch is not installed.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="dataset parent directory (default: a fresh temporary one)")
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--images-per-class", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-steps",
        type=int,
        default=160,
        help="batches of 128 (160: ~2 min on 2 idle CPU cores); 0 skips",
    )
    parser.add_argument("--sheet", type=Path, default=Path("/tmp/synthetic_sheet.png"))
    args = parser.parse_args(argv)

    # A fresh folder by default, so generation is timed from scratch (an existing dataset with
    # the same manifest would be returned at once); --root reuses or keeps one.
    with tempfile.TemporaryDirectory(prefix="dml-synthetic-") as tmp:
        root = args.root or Path(tmp)
        start = time.perf_counter()
        cub = generate_synthetic(root, args.num_classes, args.images_per_class, args.image_size, args.seed)
        print(f"generate_synthetic: {time.perf_counter() - start:.1f}s -> {cub}")
        images, labels = load_cub(root / DATASET_DIRNAME)
    save_contact_sheet(images, labels, args.sheet)
    print(f"contact sheet: {args.sheet}")

    # CUB's protocol, as the datamodule applies it: the first half of the classes train, the
    # second half (never seen in training) are the retrieval test.
    is_test = labels > args.num_classes // 2
    print(f"{len(images)} images; test: {is_test.sum()} images of {len(np.unique(labels[is_test]))} classes")
    print(f"R@1 raw pixels:          {recall_at_1(images[is_test] / 255.0, labels[is_test]):.3f}")
    try:  # the CNN baselines need torch; the raw-pixel one above does not
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: skipping the CNN baselines")
        return 0
    _cnn_baselines(images, labels, is_test, args.train_steps, args.seed)
    return 0


def _cnn_baselines(
    images: np.ndarray, labels: np.ndarray, is_test: np.ndarray, train_steps: int, seed: int
) -> None:
    """Recall@1 of untrained CNNs on the test classes, then of a small CNN trained briefly.

    The untrained networks (a random ResNet-18 and the small convnet) show what architecture
    alone gives, so that the trained number's rise is due to learning. The training is a
    normalised-softmax classifier on the training classes only, so its test Recall@1 measures
    transfer to unseen classes, as deep metric learning does.

    Args:
        images: ``(N, S, S, 3)`` uint8 images.
        labels: ``(N,)`` class ids.
        is_test: ``(N,)`` mask of the test classes' images.
        train_steps: batches of 128 to train for; 0 skips the training.
        seed: seeds the networks' initialisation, the batches and the augmentations.
    """
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch import nn

    torch.manual_seed(seed)
    # ImageNet statistics, the normalisation the benchmark's datamodules apply by default.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, S, S)

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, S, S)`` -> normalised float."""
        return (batch.float() / 255.0 - mean) / std

    @torch.no_grad()
    def embed(model: nn.Module, x: torch.Tensor) -> np.ndarray:
        """``model``'s outputs for ``x`` in eval mode, 256 images at a time (bounded memory)."""
        model.eval()
        return torch.cat([model(prepare(chunk)) for chunk in x.split(256)]).numpy()

    def augment(batch: torch.Tensor) -> torch.Tensor:
        """Random horizontal flip and up-to-6-pixel translation (reflect padding)."""
        n, size = len(batch), batch.shape[-1]
        batch = torch.where((torch.rand(n) < 0.5).view(n, 1, 1, 1), batch.flip(3), batch)
        padded = F.pad(batch.float(), (6, 6, 6, 6), mode="reflect")
        offsets = torch.randint(0, 13, (n, 2)).tolist()
        return torch.stack([p[:, dy : dy + size, dx : dx + size] for p, (dx, dy) in zip(padded, offsets)])

    def convnet(widths: tuple[int, ...] = (32, 64, 128, 256)) -> nn.Sequential:
        """Four conv-BN-ReLU layers: a stride-2 stem, then 2x max-pooling after each (CPU-cheap)."""
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip((3, *widths[:-1]), widths)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2 if i == 0 else 1, padding=1, bias=False)]
            layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)] + ([nn.MaxPool2d(2)] if i else [])
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    # Every baseline is measured on the same test images: only the encoder differs.
    test_x, test_y = data[torch.from_numpy(is_test)], labels[is_test]
    resnet = torchvision.models.resnet18(weights=None)
    resnet.fc = nn.Identity()  # the pooled 512-d features, not ImageNet logits
    print(f"R@1 random resnet18:     {recall_at_1(embed(resnet, test_x), test_y):.3f}")
    print(f"R@1 random convnet:      {recall_at_1(embed(convnet(), test_x), test_y):.3f}")
    if train_steps <= 0:
        return

    # Normalised-softmax (cosine classifier) training on the training classes, cosine learning rate.
    train_x = data[torch.from_numpy(~is_test)]
    train_classes, train_y = np.unique(labels[~is_test], return_inverse=True)
    train_y = torch.from_numpy(train_y)
    # A 128-d embedding and one learnable proxy per training class; logits are scaled cosines
    # (scale 16), the usual normalised-softmax setting.
    model = nn.Sequential(convnet(), nn.Linear(256, 128))
    proxies = nn.Parameter(torch.randn(len(train_classes), 128))
    optimizer = torch.optim.AdamW([*model.parameters(), proxies], lr=3e-3, weight_decay=5e-4)
    start, step = time.perf_counter(), 0
    model.train()
    while step < train_steps:  # reshuffled epochs until the step budget is spent
        for idx in torch.randperm(len(train_x)).split(128):
            if step == train_steps:
                break
            for group in optimizer.param_groups:  # cosine decay from 3e-3 to 0 over the run
                group["lr"] = 3e-3 * 0.5 * (1.0 + math.cos(math.pi * step / train_steps))
            logits = 16.0 * F.normalize(model(prepare(augment(train_x[idx])))) @ F.normalize(proxies).T
            loss = F.cross_entropy(logits, train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    epochs = step * 128 / len(train_x)  # approximate: an epoch's last batch may be smaller
    print(
        f"trained convnet: {step} steps ({epochs:.1f} epochs) in {time.perf_counter() - start:.0f}s, loss {loss.item():.2f}"
    )
    print(f"R@1 trained convnet:     {recall_at_1(embed(model, test_x), test_y):.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
