"""Download (where a public URL exists), check and unpack a dataset into the reader's layout.

    python -m datamodules.prepare cub  --root DIR        # Caltech archive, MD5-checked
    python -m datamodules.prepare sop  --root DIR        # Stanford archive, MD5-checked
    python -m datamodules.prepare cars --root DIR [--source FOLDER]
    python -m datamodules.prepare inshop --root DIR --source FOLDER [--password PW]

``--source FOLDER`` uses archives already downloaded by hand (same file names as the
official ones) instead of the network: the Cars196 site is often down, and In-Shop is only
distributed through Google Drive. Archives are verified against their published MD5 where
one is known, unpacked into a temporary folder inside ``DIR`` and moved into place only once
complete, so an interrupted run never leaves a half-extracted dataset behind. ``DIR`` then
works as the datamodule's ``root`` (the default, ``$DML_BENCHMARK_DATA/<name>``, is used
when ``--root`` is omitted).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmark.core.io import default_data_root
from datamodules.cars import read_cars
from datamodules.cub import read_cub
from datamodules.inshop import read_inshop
from datamodules.records import DatasetError, DatasetRecords
from datamodules.sop import read_sop


@dataclass(frozen=True)
class Asset:
    """One official file: where to get it, its checksum, and where it goes under the root."""

    filename: str
    urls: tuple[str, ...] = ()  # empty: only available through --source
    md5: str | None = None
    dest: str | None = None  # a plain file copied to root/dest; None: an archive unpacked into root


ASSETS: dict[str, tuple[Asset, ...]] = {
    "cub": (
        Asset(
            "CUB_200_2011.tgz",
            ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",),
            "97eceeb196236b17998738112f37df78",
        ),
    ),
    "cars": (
        Asset(
            "cars_annos.mat",
            ("http://ai.stanford.edu/~jkrause/car196/cars_annos.mat",),
            "b407c6086d669747186bd1d764ff9dbc",
            dest="cars_annos.mat",
        ),
        Asset(
            "car_ims.tgz",
            ("http://ai.stanford.edu/~jkrause/car196/car_ims.tgz",),
            "d5c8f0aa497503f355e17dc7886c3f14",
        ),
    ),
    "sop": (
        Asset(
            "Stanford_Online_Products.zip",
            (
                "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                "http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
            ),
            "7f73d41a2f44250d4779881525aea32e",
        ),
    ),
    "inshop": (
        Asset("list_eval_partition.txt", dest="Eval/list_eval_partition.txt"),
        Asset("img.zip"),
    ),
}
READERS: dict[str, Callable[[Path], DatasetRecords]] = {
    "cub": read_cub,
    "cars": read_cars,
    "sop": read_sop,
    "inshop": read_inshop,
}


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _progress(name: str, done: int, total: int) -> None:
    if total:
        line = f"{done / 2**20:,.0f} / {total / 2**20:,.0f} MiB ({100 * done / total:.0f}%)"
    else:
        line = f"{done / 2**20:,.0f} MiB"
    print(f"\r  {name}: {line}", end="", file=sys.stderr, flush=True)


def download(asset: Asset, folder: Path) -> Path:
    """Fetch ``asset`` into ``folder`` (trying each URL), checking its MD5 before keeping it."""
    target = folder / asset.filename
    if target.is_file() and (asset.md5 is None or md5sum(target) == asset.md5):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    errors = []
    for url in asset.urls:
        print(f"Downloading {url}", file=sys.stderr)
        digest, done, last = hashlib.md5(), 0, 0.0
        try:
            with urllib.request.urlopen(url, timeout=60) as response, part.open("wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if time.monotonic() - last > 0.5:
                        _progress(asset.filename, done, total)
                        last = time.monotonic()
            _progress(asset.filename, done, total)
            print(file=sys.stderr)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            errors.append(f"{url}: {err}")
            part.unlink(missing_ok=True)
            continue
        if asset.md5 is not None and digest.hexdigest() != asset.md5:
            errors.append(f"{url}: MD5 {digest.hexdigest()} != published {asset.md5} (incomplete download?)")
            part.unlink(missing_ok=True)
            continue
        os.replace(part, target)
        return target
    raise DatasetError(
        f"Could not download {asset.filename}: {'; '.join(errors) or 'no public URL'}. "
        f"Get the file by hand and pass the folder holding it as --source."
    )


def from_source(asset: Asset, source: Path, verify: bool) -> Path:
    """``asset.filename`` in ``source`` or one folder below (``Eval/``, ``Img/`` as on the
    In-Shop drive), checked against its published MD5 when ``verify``."""
    found = [p for p in (source / asset.filename, *sorted(source.glob(f"*/{asset.filename}"))) if p.is_file()]
    if not found:
        raise DatasetError(
            f"--source: {asset.filename} is neither in {source} nor in a folder directly below it."
        )
    path = found[0]
    if verify and asset.md5 is not None:
        print(f"Checking MD5 of {path}", file=sys.stderr)
        found = md5sum(path)
        if found != asset.md5:
            raise DatasetError(
                f"{path}: MD5 {found} differs from the published {asset.md5}; the file is "
                "incomplete or not the official one (pass --no-verify to use it anyway)."
            )
    return path


def _extract_to(archive: Path, folder: Path, password: str | None) -> None:
    try:
        _unpack(archive, folder, password)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, RuntimeError) as err:
        raise DatasetError(
            f"Cannot unpack {archive} ({type(err).__name__}: {err}); it is truncated or corrupt, "
            "download it again (an encrypted zip needs --password)."
        ) from err


def _unpack(archive: Path, folder: Path, password: str | None) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:  # zipfile drops absolute and '..' member paths
            zf.extractall(folder, pwd=password.encode() if password else None)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                tf.extractall(folder, filter="data")
            else:  # pragma: no cover - old interpreters
                for member in tf.getmembers():
                    if member.name.startswith("/") or ".." in Path(member.name).parts:
                        raise DatasetError(f"{archive}: unsafe member path {member.name!r}")
                tf.extractall(folder)
    else:
        raise DatasetError(f"{archive} is neither a zip nor a tar archive.")


def install(root: Path, path: Path, asset: Asset, *, force: bool, password: str | None) -> None:
    """Unpack an archive (or copy a plain file) into ``root``, moving complete entries into place."""
    staging = root / f".prepare-{asset.filename}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if asset.dest is None:
            print(f"Extracting {path}", file=sys.stderr)
            _extract_to(path, staging, password)
            entries = [(entry, root / entry.name) for entry in staging.iterdir()]
        else:
            shutil.copyfile(path, staging / asset.filename)
            entries = [(staging / asset.filename, root / asset.dest)]
        for src, dst in entries:
            if dst.exists():
                if not force:
                    raise DatasetError(f"{dst} already exists; remove it or pass --force to replace it.")
                if dst.is_dir() and not dst.is_symlink():
                    shutil.rmtree(dst)
                else:
                    dst.unlink()
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare(
    name: str,
    root: Path | None = None,
    source: Path | None = None,
    *,
    verify: bool = True,
    force: bool = False,
    keep_archives: bool = False,
    password: str | None = None,
) -> DatasetRecords:
    """Put dataset ``name`` under ``root`` in its official layout and return its records."""
    if name not in ASSETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(ASSETS)}")
    root = Path(root if root is not None else default_data_root() / name).expanduser().resolve()
    reader = READERS[name]
    if not force:
        try:
            records = reader(root)
        except DatasetError:
            pass
        else:
            if all(os.path.isfile(p) for p in records.train.paths + records.test.paths):
                print(f"{name} is already prepared under {root}.", file=sys.stderr)
                return records
    offline = [asset.filename for asset in ASSETS[name] if not asset.urls]
    if source is None and offline:
        raise DatasetError(
            f"{name}: there is no public download URL for {', '.join(offline)}; fetch it by hand (see "
            "docs/datasets.md) and pass the folder holding it as --source."
        )
    root.mkdir(parents=True, exist_ok=True)
    downloads = root / ".downloads"
    try:
        for asset in ASSETS[name]:
            if source is not None:
                path = from_source(asset, Path(source).expanduser(), verify)
            else:
                path = download(asset, downloads)
            install(root, path, asset, force=force, password=password)
            if source is None and not keep_archives:
                path.unlink()
    finally:
        if downloads.is_dir() and not any(downloads.iterdir()):
            downloads.rmdir()
    records = reader(root)
    missing = [p for p in records.train.paths + records.test.paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"{name}: {len(missing)} listed image(s) are missing after unpacking, e.g. {missing[0]}."
        )
    print(f"{name} ready under {root}: {len(records.train)} train / {len(records.test)} test images.")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=sorted(ASSETS))
    parser.add_argument(
        "--root", type=Path, default=None, help="target folder (default $DML_BENCHMARK_DATA/<dataset>)"
    )
    parser.add_argument(
        "--source", type=Path, default=None, help="folder with the official files, downloaded by hand"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the MD5 check of --source files")
    parser.add_argument(
        "--force", action="store_true", help="re-install even if the dataset is already there"
    )
    parser.add_argument(
        "--keep-archives", action="store_true", help="keep downloaded archives in ROOT/.downloads"
    )
    parser.add_argument(
        "--password", default=None, help="password of an encrypted zip archive, if the authors sent one"
    )
    args = parser.parse_args(argv)
    try:
        prepare(
            args.dataset,
            args.root,
            args.source,
            verify=not args.no_verify,
            force=args.force,
            keep_archives=args.keep_archives,
            password=args.password,
        )
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
