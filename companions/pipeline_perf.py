"""Input-pipeline speed: images per second per loader worker, per decoder, at real image sizes.

    python -m benchmark perf data                       # CUB, Cars, SOP, In-Shop sizes
    python -m benchmark perf data --sizes cub 800x600   # named sizes or WIDTHxHEIGHT
    python -m benchmark perf data --tiny                # a few small images, seconds (CI)

Writes JPEG fixtures at each dataset's typical image size (smooth gradients, shapes, mild
noise, quality 90, 4:2:0 chroma: pure noise would decode unrealistically slowly) and times,
in one process with one torch thread (what a DataLoader worker has), with the files in the
page cache:

* decode only, and decode + the datamodule's own transforms: training RandomResizedCrop 224
  (+ flip + normalise, the default), DMCAC's ``resize_random`` crop (resize 256, random 224),
  evaluation (resize 256, centre crop 224), and RandomResizedCrop 227 (ResNet-50's size);
* for each decoder path: ``pil`` (PIL images, the transforms on PIL), ``torchvision``
  (``torchvision.io.decode_image`` on the CPU, the transforms on uint8 tensors), ``nvjpeg``
  (``decode_jpeg(device='cuda')``, the transforms on the GPU; only with CUDA) and
  ``cached+pil`` / ``cached+torchvision``: a copy of every image resized once so that its
  short side is ``--cache-size`` (JPEG quality 95), decoded instead of the original;

interleaved image by image over ``--repeats`` (each image's best kept), as ratios to ``pil`` in the same run (machines are
noisy). It also checks that each path gives the same images as ``pil`` (decoded pixels and the
normalised evaluation tensors) and prints how many CPU workers feed a ViT-S/16 at 224 px at
3,000 img/s and a ResNet-50 at 227 px at 2,500 img/s (typical H100 training rates), assuming
one core per worker and linear scaling on this CPU.

The JSON (``--out``) holds: ``command``, ``cpu`` (model, avx512 flags, cores),
``load_average``, ``versions``, ``images``, ``repeats``, ``cache_size``, ``cuda`` (device name
or "no CUDA"), ``transforms`` (name -> description), ``targets`` (model -> image size and
img/s), and ``sizes``: one entry per image size with ``name``, ``width``, ``height``,
``jpeg_kib`` (mean file size), ``rate`` (path -> transform -> images/s per worker),
``ratio`` (the same divided by ``pil``'s), ``agreement`` (path -> max / mean absolute
difference to ``pil``: decoded pixels in levels, evaluation tensors in normalised units),
``cache`` (one-time seconds per image, KiB per cached image) and ``workers`` (model -> path ->
CPU workers needed).

docs/performance.md ("Input pipeline") quotes a run of it; its measurements are why
``--data.decoder torchvision`` is the default and why the cached copy is not offered.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter, features

from benchmark.core.contracts import perf_headline, register_perf
from benchmark.core.io import atomic_write_text
from benchmark.core.io import console as make_console
from datamodules.base import RetrievalDataModule, decode_pil, decode_tensor
from datamodules.transforms import AugmentConfig

# Typical image sizes (width x height) of the four datasets' JPEGs. CUB-200-2011: mostly
# 500 px on the long side (500x375 the commonest); Cars196: ~700x480 on average (very
# variable); SOP: at most 640 px on the long side (640x480 typical); In-Shop: 256x256.
DATASET_SIZES: dict[str, tuple[int, int]] = {
    "cub": (500, 375),
    "cars": (700, 480),
    "sop": (640, 480),
    "inshop": (256, 256),
}
# Model, training image size, images/s of one H100 training step (what the workers must feed).
TARGETS: tuple[tuple[str, int, int], ...] = (("ViT-S/16", 224, 3000), ("ResNet-50", 227, 2500))
# The report's columns: transform name -> what it does (built by build_transforms).
TRANSFORMS: dict[str, str] = {
    "decode": "decode only",
    "train224": "RandomResizedCrop 224 + flip + normalise (default training)",
    "resize_random224": "resize 256 + random crop 224 + flip + normalise (DMCAC)",
    "eval224": "resize 256 + centre crop 224 + normalise (evaluation)",
    "train227": "RandomResizedCrop 227 + flip + normalise (ResNet-50 recipes)",
}
# The paths that run in CPU loader workers: the ones a worker count applies to (nvjpeg decodes on the GPU).
CPU_PATHS = ("pil", "torchvision", "cached+pil", "cached+torchvision")


# ---------------------------------------------------------------------------- fixtures
def natural_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: a colour gradient, a dozen blurred shapes and mild sensor noise.

    Its entropy (and so its decode time) is close to a real photo's at the same size; pure
    noise would be several times slower to decode, a flat colour several times faster.

    Args:
        width, height: the image size in pixels.
        seed: fixes the content, so every run times the same files.
        quality: JPEG quality (90 for the fixtures; PIL's default 4:2:0 chroma subsampling).

    Returns:
        The encoded JPEG.
    """
    rng = np.random.default_rng(seed)
    # A linear colour gradient across the image: the smooth background most photos have.
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1, c2 = rng.uniform(0, 255, (3, 3))
    base = (x / width)[..., None] * (c1 - c0) + (y / height)[..., None] * (c2 - c0) + c0  # (H, W, 3)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):  # edges and flat regions, as objects give a photo
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(8, min(width, height) / 3)
        box = [cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r]
        fill = tuple(int(v) for v in rng.uniform(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(2))  # soft edges: a lens, not vector graphics
    # Mild sensor noise (std 4 levels): the fine detail that makes a photo's JPEG cost what it does.
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 4, (height, width, 3))  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def resize_copy(src: Path, dst: Path, short_side: int) -> None:
    """Write ``src`` with its short side resized to ``short_side`` (bicubic, antialiased) as a
    quality-95 JPEG at ``dst``; an image already that small is copied unchanged."""
    with Image.open(src) as im:
        image = im.convert("RGB")
    w, h = image.size  # the cache keeps the aspect ratio: the short side becomes short_side
    if min(w, h) <= short_side:  # never upscale: the copy is the original (In-Shop's 256x256)
        dst.write_bytes(src.read_bytes())
        return
    scale = short_side / min(w, h)
    # max(): rounding must not take the short side below short_side.
    size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
    image.resize(size, Image.BICUBIC).save(dst, format="JPEG", quality=95)


# ---------------------------------------------------------------------------- machine
def cpu_description() -> dict[str, Any]:
    """CPU model, its avx512 flags (empty: none) and core count, from /proc/cpuinfo.

    Recorded with the rates because they depend on the CPU: libjpeg-turbo's and the resize
    kernels' speed follow the SIMD the CPU offers. Off Linux, ``platform.processor()`` and no
    flags.
    """
    model, flags = platform.processor() or "unknown", ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
        found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = found.group(1) if found else ""
    except OSError:
        pass
    avx512 = sorted({f for f in flags.split() if f.startswith("avx512")})
    return {"model": model, "avx512": avx512, "cores": os.cpu_count()}


def versions() -> dict[str, str]:
    """The versions the rates depend on: torch, torchvision, Pillow and Pillow's libjpeg.

    ``(turbo)`` marks a libjpeg-turbo build, much faster than the reference libjpeg, so a
    Pillow without it makes ``pil`` look slow for a reason unrelated to the code.
    """
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "pillow_libjpeg": f"{features.version('jpg')}{' (turbo)' if features.check_feature('libjpeg_turbo') else ''}",
    }


# ---------------------------------------------------------------------------- measurement
def build_transforms(root: Path) -> dict[str, Callable[[Any], Any]]:
    """The datamodule's own transforms (default normalisation: ImageNet, bicubic), by name.

    Built by :class:`~datamodules.base.RetrievalDataModule` itself, so the timed transforms are
    exactly those training and evaluation run; each takes a PIL image or a uint8 tensor,
    whichever the decoder gives. ``root`` only has to exist: no dataset is read.
    """
    # num_workers=0: only the datamodule's transform builders are used, no loader starts.
    dm = lambda size, **augment: RetrievalDataModule(  # noqa: E731
        root=str(root), image_size=size, num_workers=0, augment=AugmentConfig(**augment)
    )
    return {
        "decode": lambda image: image,
        "train224": dm(224).train_transform(),
        "resize_random224": dm(224, crop="resize_random").train_transform(),
        "eval224": dm(224).eval_transform(),
        "train227": dm(227).train_transform(),
    }


def _nvjpeg_decoder() -> Callable[[str], torch.Tensor]:
    """A decoder on the GPU: the file's bytes read on the CPU, decoded by nvJPEG into CUDA memory.

    One image at a time on one stream, like a worker's call; batched decoding would be faster,
    so the rate is a lower bound of what the GPU path gives.
    """
    from torchvision.io import decode_jpeg

    def decode(path: str) -> torch.Tensor:
        with open(path, "rb") as f:
            # bytearray: frombuffer warns on a read-only buffer such as bytes.
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)  # (bytes,)
        return decode_jpeg(data, device="cuda")  # (3, H, W) uint8 on the GPU

    return decode


def time_one(decode: Callable[[str], Any], transform: Callable[[Any], Any], path: str, seed: int, cuda: bool) -> float:
    """Seconds to decode and transform one file (the random crop fixed by ``seed``).

    Seeded per image, so every path crops the same region of an image: random crops of
    different sizes cost different resize times, which would otherwise add noise between
    paths. ``cuda``: wait for the GPU before reading the clock.
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    transform(decode(path))
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def agreement(
    decode: Callable[[str], Any], originals: list[str], files: list[str], eval_tf: Callable[[Any], Any]
) -> dict[str, float]:
    """Max / mean |difference| of ``decode`` on ``files`` to PIL on ``originals``: decoded pixels
    (levels; only where the sizes match, i.e. not for resized copies) and normalised evaluation
    tensors.

    Args:
        decode: the path's decoder.
        originals: the original files, decoded by PIL as the reference.
        files: the files the path reads (the originals, or their cached copies), in the same order.
        eval_tf: the evaluation transform, applied to both sides.

    Returns:
        ``pixels_max`` / ``pixels_mean`` (NaN when no size matched: a resized copy) and
        ``eval_max`` / ``eval_mean``, the differences after the evaluation transform, in
        normalised units (one level is about 0.017).
    """
    pix_max = pix_sum = ev_max = ev_sum = 0.0
    pix_n = ev_n = 0
    for orig, other in zip(originals, files):
        ref = decode_pil(orig)
        img = decode(other)
        a = np.asarray(ref, dtype=np.int16)  # (H, W, 3); int16 so that differences do not wrap around
        b = (img.cpu().permute(1, 2, 0).numpy() if isinstance(img, torch.Tensor) else np.asarray(img)).astype(np.int16)
        if a.shape == b.shape:
            d = np.abs(a - b)
            pix_max, pix_sum, pix_n = max(pix_max, float(d.max())), pix_sum + float(d.sum()), pix_n + d.size
        # The evaluation tensors always compare (same 224 crop), even for a resized copy:
        # what the model would see differently.
        e = (eval_tf(ref) - eval_tf(img).cpu()).abs()  # (3, 224, 224)
        ev_max, ev_sum, ev_n = max(ev_max, float(e.max())), ev_sum + float(e.sum()), ev_n + e.numel()
    return {
        "pixels_max": pix_max if pix_n else float("nan"),
        "pixels_mean": pix_sum / pix_n if pix_n else float("nan"),
        "eval_max": ev_max,
        "eval_mean": ev_sum / max(1, ev_n),
    }


def measure_size(
    name: str, width: int, height: int, args: argparse.Namespace, tmp: Path, cuda: bool
) -> dict[str, Any]:
    """Fixtures, cache, timings, agreement and workers needed for one image size.

    Args:
        name, width, height: the size's label and its pixels.
        args: the command's options (``images``, ``repeats``, ``cache_size``).
        tmp: a scratch folder for the fixtures and their cached copies.
        cuda: also time the ``nvjpeg`` path.

    Returns:
        One entry of the JSON's ``sizes`` (see the module docstring).
    """
    # The fixtures are written fresh per run; the timed reads then hit the page cache, as a
    # training epoch after the first does.
    folder, cached = tmp / name / "original", tmp / name / f"cached{args.cache_size}"
    folder.mkdir(parents=True)
    cached.mkdir(parents=True)
    originals = []
    for i in range(args.images):
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(natural_jpeg(width, height, seed=1000 * width + i))  # distinct, the same every run
        originals.append(str(path))
    copies = [str(cached / Path(p).name) for p in originals]
    start = time.perf_counter()
    for src, dst in zip(originals, copies):
        resize_copy(Path(src), Path(dst), args.cache_size)
    cache_seconds = (time.perf_counter() - start) / len(originals)  # the one-time cost per image

    transforms = build_transforms(tmp)
    # Path name -> (decoder, the files it reads): the cached paths read the copies.
    paths: dict[str, tuple[Callable[[str], Any], list[str]]] = {
        "pil": (decode_pil, originals),
        "torchvision": (decode_tensor, originals),
        "cached+pil": (decode_pil, copies),
        "cached+torchvision": (decode_tensor, copies),
    }
    if cuda:
        paths["nvjpeg"] = (_nvjpeg_decoder(), originals)
        for path in originals[:2]:  # warm-up: the CUDA context and nvJPEG handles
            time_one(paths["nvjpeg"][0], transforms["train224"], path, 0, cuda)
    # Interleaved image by image, so that every path sees the same machine state; each image's
    # best of the repeats is kept (a busy machine only ever adds time).
    best = {p: {t: np.full(len(originals), math.inf) for t in transforms} for p in paths}
    # The innermost loop runs every path on one image before the next image: a burst of load
    # from elsewhere then slows all paths alike instead of one path's whole pass.
    for _ in range(max(1, args.repeats)):
        for tname, tf in transforms.items():
            for i in range(len(originals)):
                for pname, (decode, files) in paths.items():
                    seconds = time_one(decode, tf, files[i], i, cuda and pname == "nvjpeg")
                    best[pname][tname][i] = min(best[pname][tname][i], seconds)
    # Images per second of one worker: images over the sum of their best times.
    rate = {p: {t: len(originals) / float(s.sum()) for t, s in ts.items()} for p, ts in best.items()}
    # Ratios to pil in the same run: comparable across machines and loads, unlike the rates.
    ratio = {p: {t: r / rate["pil"][t] for t, r in ts.items()} for p, ts in rate.items()}
    eval_tf = transforms["eval224"]
    # pil is the reference the others are held to, so it is not compared with itself.
    agree = {
        p: agreement(decode, originals, files, eval_tf)
        for p, (decode, files) in paths.items()
        if p != "pil"
    }
    # Workers to feed each target: its img/s over one worker's training-transform rate at the
    # model's size, rounded up (one core per worker, linear scaling assumed).
    workers = {
        f"{model} {size} px at {target:,} img/s": {
            p: math.ceil(target / rate[p][f"train{size}"]) for p in paths if p != "nvjpeg"
        }
        for model, size, target in TARGETS
    }
    return {
        "name": name,
        "width": width,
        "height": height,
        "jpeg_kib": float(np.mean([os.path.getsize(p) for p in originals]) / 1024),
        "rate": rate,
        "ratio": ratio,
        "agreement": agree,
        "cache": {
            "short_side": args.cache_size,
            "seconds_per_image": cache_seconds,
            "kib_per_image": float(np.mean([os.path.getsize(p) for p in copies]) / 1024),
        },
        "workers": workers,
    }


def parse_size(text: str) -> tuple[str, int, int]:
    """``cub`` (a dataset's typical size) or ``WIDTHxHEIGHT``.

    Returns:
        (label, width, height); the label is the dataset's name or the text as given.

    Raises:
        argparse.ArgumentTypeError: anything else (argparse reports it as a usage error).
    """
    if text in DATASET_SIZES:
        return (text, *DATASET_SIZES[text])
    found = re.fullmatch(r"(\d+)x(\d+)", text)
    if not found or min(int(found.group(1)), int(found.group(2))) < 1:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: use one of {', '.join(DATASET_SIZES)} or WIDTHxHEIGHT (e.g. 800x600)"
        )
    return text, int(found.group(1)), int(found.group(2))


# ---------------------------------------------------------------------------- report
def print_report(result: dict[str, Any]) -> None:
    """Print the result as tables: one per size (rates with their ratio to ``pil``, and whether
    each path gives the same images), then the CPU workers each target needs.

    The header carries what the rates depend on (CPU, load, versions), so a pasted report can
    be compared with another machine's only when those match.
    """
    from rich.table import Table

    console = make_console()
    cpu = result["cpu"]
    console.print(f"[bold]python -m benchmark perf data[/bold] {result['command']}".rstrip(), highlight=False)
    console.print(
        f"CPU: {cpu['model']} ({cpu['cores']} cores; avx512: {', '.join(cpu['avx512']) or 'none'}); "
        f"load average {', '.join(f'{x:.2f}' for x in result['load_average'])}; one torch thread per worker; "
        f"CUDA: {result['cuda']}",
        highlight=False,
    )
    console.print(f"versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}", highlight=False)
    console.print(f"{result['images']} images per size, best of {result['repeats']}; transforms: "
                  + "; ".join(f"{k} = {v}" for k, v in TRANSFORMS.items()), highlight=False)
    for size in result["sizes"]:
        table = Table(title=f"{size['name']}: {size['width']}x{size['height']} JPEG q90, {size['jpeg_kib']:.0f} KiB "
                      "- images/s per worker (ratio to pil)")
        table.add_column("path")
        for t in TRANSFORMS:
            table.add_column(t, justify="right")
        table.add_column("same images? pixels max / mean; eval max / mean", justify="right")
        for p, rates in size["rate"].items():
            agree = size["agreement"].get(p)
            if agree is None:  # pil itself
                same = "reference"
            else:
                # A resized copy has no pixel-for-pixel counterpart: only the eval tensors compare.
                pixels = "resized" if math.isnan(agree["pixels_max"]) else (
                    f"{agree['pixels_max']:.0f} / {agree['pixels_mean']:.3f}"
                )
                same = f"{pixels}; {agree['eval_max']:.3f} / {agree['eval_mean']:.4f}"
            table.add_row(p, *(f"{rates[t]:,.0f} ({size['ratio'][p][t]:.2f}x)" for t in TRANSFORMS), same)
        console.print(table)
        # The cache's price: paid once per image, then every epoch reads the smaller copy.
        c = size["cache"]
        console.print(
            f"cache: short side {c['short_side']}, one-time {1000 * c['seconds_per_image']:.1f} ms per image "
            f"(decode + resize + encode + write), {c['kib_per_image']:.0f} KiB per image",
            highlight=False,
        )
    # CPU paths only: nvjpeg decodes on the GPU, where a worker count means nothing.
    table = Table(title="CPU workers needed (one core each, this CPU) to feed a GPU's training rate")
    table.add_column("size")
    table.add_column("model, rate")
    for p in CPU_PATHS:
        table.add_column(p, justify="right")
    for size in result["sizes"]:
        for target, by_path in size["workers"].items():
            table.add_row(size["name"], target, *(str(by_path[p]) for p in CPU_PATHS))
    console.print(table)
    if result["cuda"] == "no CUDA":
        console.print("nvjpeg: no CUDA (decode_jpeg(device='cuda') not measured)", highlight=False)


@register_perf("data", "input pipeline: decode + transform images/s per worker (PIL, torchvision, nvJPEG, cached)")
def main(argv: list[str] | None = None) -> int:
    """``perf data``: measure every size, print the report, write the JSON (``--out``).

    Returns:
        0. Headlines for ``perf gpu``: the decode + train224 rate per worker of ``torchvision``
        (and ``nvjpeg`` with CUDA) and the workers each target needs with ``torchvision``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmark perf data", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=None,
                        help=f"image sizes: {', '.join(DATASET_SIZES)} or WIDTHxHEIGHT (default: all four datasets)")
    parser.add_argument("--images", type=int, default=48, help="fixture images per size")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per path (interleaved image by image; each image's best kept)")
    parser.add_argument("--cache-size", type=int, default=256, help="short side of the cached pre-resized copy")
    parser.add_argument("--tiny", action="store_true", help="3 images of 96x72, one pass: seconds (what CI runs)")
    parser.add_argument("--out", type=Path, default=Path("perf_data.json"), help="the JSON result")
    args = parser.parse_args(argv)
    if args.tiny:  # a smoke test of the whole command in seconds: numbers are not meaningful
        args.sizes, args.images, args.repeats = args.sizes or [("tiny", 96, 72)], min(args.images, 3), 1
    sizes = args.sizes or [(n, *wh) for n, wh in DATASET_SIZES.items()]
    if args.images < 1 or args.cache_size < 1:  # checked after --tiny, which only lowers them
        parser.error("--images and --cache-size must be >= 1")

    cuda = torch.cuda.is_available()
    threads = torch.get_num_threads()  # restored afterwards: the caller's process keeps its setting
    torch.set_num_threads(1)  # a DataLoader worker runs with one thread
    try:
        with tempfile.TemporaryDirectory(prefix="dml-perf-data-") as tmp:
            measured = [measure_size(n, w, h, args, Path(tmp), cuda) for n, w, h in sizes]
    finally:
        torch.set_num_threads(threads)
    result = {
        "command": " ".join(argv or []),
        "cpu": cpu_description(),
        "load_average": list(os.getloadavg()),
        "versions": versions(),
        "images": args.images,
        "repeats": args.repeats,
        "cache_size": args.cache_size,
        "cuda": torch.cuda.get_device_name() if cuda else "no CUDA",
        "transforms": TRANSFORMS,
        "targets": {model: {"image_size": size, "images_per_second": rate} for model, size, rate in TARGETS},
        "sizes": measured,
    }
    print_report(result)
    # Headlines: the default decoder (and the GPU's, where measured) and the workers it needs.
    for size in measured:
        for path in ("torchvision", "nvjpeg"):
            if path in size["rate"]:
                perf_headline(f"decode + train224 per worker, {path}, {size['name']} ({size['width']}x{size['height']})",
                              size["rate"][path]["train224"], "img/s")
        for target, by_path in size["workers"].items():
            perf_headline(f"CPU workers for {target}, torchvision, {size['name']}", by_path["torchvision"], "workers",
                          higher_is_better=False)
    atomic_write_text(args.out, json.dumps(result, indent=2))  # an interrupted run leaves no half file
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
