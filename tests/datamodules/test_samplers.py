"""Training batch samplers: composition, coverage, determinism, DDP partitioning, and that a
real Lightning ``Trainer`` draws new batches every epoch (single process and DDP with gloo)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from benchmark.core.contracts import DataRequest
from datamodules.cub import CUB200
from datamodules.samplers import (
    ClassBalancedBatchSampler,
    ShuffledBatchSampler,
    batch_splits,
    combine_sampler_batches,
)
from tests.datamodules.fixtures import make_cub


def _labels(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def test_batch_composition_n_classes_times_m_samples() -> None:
    labels = _labels([6] * 10)
    sampler = ClassBalancedBatchSampler(labels, classes_per_batch=4, samples_per_class=3, seed=1)
    assert len(sampler) == 60 // 12
    for batch in sampler:
        assert len(batch) == 12
        batch_labels = labels[batch]
        classes, counts = np.unique(batch_labels, return_counts=True)
        assert len(classes) == 4 and (counts == 3).all()
        # m distinct images per class when the class has enough of them
        assert len(set(batch)) == 12


def test_epoch_visits_every_class_equally_often() -> None:
    labels = _labels([5] * 12)
    sampler = ClassBalancedBatchSampler(labels, 4, 2, batches_per_epoch=6, seed=0)
    seen = np.concatenate([np.unique(labels[b]) for b in sampler])
    classes, counts = np.unique(seen, return_counts=True)
    assert len(classes) == 12 and (counts == 2).all()  # 6 batches x 4 classes = 2 full passes


def test_one_epoch_draws_every_image_of_classes_larger_than_m() -> None:
    """Each class's images are queued, so a class visited ceil(count / m) times shows all."""
    labels = _labels([9, 7, 12, 5, 8, 6, 10, 4])  # every class has more than m = 2 images
    sampler = ClassBalancedBatchSampler(labels, 4, 2, batches_per_epoch=14, seed=3)
    drawn = np.concatenate([np.asarray(b) for b in sampler])
    # 14 batches x 4 classes = 7 visits per class = 14 images >= 12, the largest class
    assert set(drawn.tolist()) == set(range(len(labels)))


def test_small_classes_are_repeated_or_dropped() -> None:
    labels = _labels([1, 2, 8, 8, 8])
    sampler = ClassBalancedBatchSampler(labels, 2, 4, batches_per_epoch=20, seed=0)
    for batch in sampler:
        _, counts = np.unique(labels[batch], return_counts=True)
        assert (counts == 4).all()  # singleton class repeated to fill its slot
    dropped = ClassBalancedBatchSampler(labels, 2, 4, batches_per_epoch=20, seed=0, min_samples=2)
    assert 0 not in set(labels[np.concatenate(list(dropped))].tolist())
    with pytest.raises(ValueError, match="fewer than classes_per_batch"):
        ClassBalancedBatchSampler(labels, 5, 2, min_samples=3)


def test_deterministic_under_seed_and_epoch() -> None:
    labels = _labels([4] * 8)
    a = ClassBalancedBatchSampler(labels, 2, 2, seed=3)
    b = ClassBalancedBatchSampler(labels, 2, 2, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.sampler.set_epoch(1)  # the attribute Lightning reaches
    assert list(a) == list(b)
    a.set_epoch(0)
    assert list(a) != list(b)
    c = ClassBalancedBatchSampler(labels, 2, 2, seed=4)
    assert list(c) != list(ClassBalancedBatchSampler(labels, 2, 2, seed=3))


def test_a_second_pass_without_set_epoch_moves_on() -> None:
    """A plain PyTorch loop never calls set_epoch: it must not replay epoch 0 forever."""
    labels = _labels([4] * 8)
    sampler = ClassBalancedBatchSampler(labels, 2, 2, seed=3)
    first, second = list(sampler), list(sampler)
    assert first != second and sampler.epoch == 1
    sampler.set_epoch(1)  # an explicit epoch wins and is replayed exactly
    assert list(sampler) == second


def test_ddp_ranks_draw_distinct_batches_with_equal_length() -> None:
    labels = _labels([4] * 16)
    ranks = [ClassBalancedBatchSampler(labels, 2, 2, seed=0, num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 64 // (4 * 2)
    batches = [list(s) for s in ranks]
    assert all(x != y for x, y in zip(*batches))
    with pytest.raises(ValueError):
        ClassBalancedBatchSampler(labels, 2, 2, num_replicas=2, rank=2)


def test_shuffled_batches_partition_the_set_per_epoch_and_honour_the_length() -> None:
    sampler = ShuffledBatchSampler(20, 4, seed=0)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 5
    assert sorted(i for b in epoch0 for i in b) == list(range(20))  # one pass, no repeats
    assert list(sampler) != epoch0  # the next epoch reshuffles
    short = ShuffledBatchSampler(20, 4, batches_per_epoch=3, seed=0)
    assert len(list(short)) == 3
    long = ShuffledBatchSampler(20, 4, batches_per_epoch=7, seed=0)
    assert [len(b) for b in long] == [4] * 7
    ranks = [list(ShuffledBatchSampler(20, 4, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    flat = [set(i for b in r for i in b) for r in ranks]
    assert len(ranks[0]) == 2 and not flat[0] & flat[1]  # disjoint shares
    with pytest.raises(ValueError, match="fewer than one batch"):
        ShuffledBatchSampler(3, 4)


# ---------------------------------------------------------------------------- official epoch length
def official_combine_sampler_length(class_sizes: list[int], n: int, m: int, rng: np.random.Generator) -> int:
    """Batches of one epoch of the official Intra-Batch CombineSampler, by running its steps on
    index lists (combine_sampler.py, as described in ../shared/notes): pad each class to m by
    repeats, add images until its count is the next multiple of m strictly above, cut into
    chunks of m, shuffle, pad the chunk list to a multiple of n with random chunks, and cut the
    flat list into batches of n * m."""
    chunks = []
    start = 0
    for size in class_sizes:
        inds = list(range(start, start + size))
        start += size
        while len(inds) < m:
            inds.append(int(rng.choice(inds[:size])))
        extra = (len(inds) // m + 1) * m - len(inds)
        inds += rng.choice(inds, size=extra, replace=False).tolist()
        while len(inds) >= m:
            chunks.append(inds[:m])
            inds = inds[m:]
        assert not inds
    order = rng.permutation(len(chunks))
    chunks = [chunks[i] for i in order]
    if len(chunks) % n:
        chunks += [chunks[i] for i in rng.choice(len(chunks), size=n - len(chunks) % n, replace=False)]
    flat = [i for chunk in chunks for i in chunk]
    assert len(flat) % (n * m) == 0
    return len(flat) // (n * m)


# Class-size tables shaped like the four datasets' training splits (class count and size range;
# the real tables are not downloadable here), with each official recipe's n x m.
DATASET_TABLES = {
    "cub (100 classes, 41-60 images; 6 x 9)": (100, 41, 60, 6, 9),
    "cars (98 classes, 24-97; 10 x 7)": (98, 24, 97, 10, 7),
    "sop (11,318 classes, 2-12, mean 5.26 as the real 59,551 images; 15 x 6)": (11318, 2, 12, 15, 6),
    "inshop (3,997 classes, 1-16; 14 x 4)": (3997, 1, 16, 14, 4),
}


@pytest.mark.parametrize("table", list(DATASET_TABLES), ids=lambda t: t.split(" ")[0])
def test_combine_length_equals_the_official_sampler(table: str) -> None:
    classes, low, high, n, m = DATASET_TABLES[table]
    rng = np.random.default_rng(0)
    sizes = rng.integers(low, high + 1, size=classes).tolist()
    if table.startswith("sop"):  # most SOP classes are small: 2 + Binomial(10, 0.326) has the real mean
        sizes = (2 + rng.binomial(high - low, 0.326, size=classes)).tolist()
    official = official_combine_sampler_length(sizes, n, m, rng)
    assert combine_sampler_batches(np.asarray(sizes), n, m) == official
    sampler = ClassBalancedBatchSampler(_labels(sizes), n, m, epoch_length="combine")
    assert len(sampler) == official == len(list(sampler))
    one_pass = len(ClassBalancedBatchSampler(_labels(sizes), n, m))
    assert one_pass == sum(sizes) // (n * m)
    if table.startswith("sop"):  # classes of 2-12 images: about two chunks each, 2.3x one pass
        assert official / one_pass > 2.2


def test_combine_length_of_the_issue_numbers_by_hand() -> None:
    """SOP at 15 x 6: classes of 2-11 images give 2 chunks, of 12 give 3; 11,300 + 18 such classes
    -> 22,654 chunks -> ceil(22,654 / 15) = 1,511 batches (the official count)."""
    sizes = np.array([5] * 11300 + [12] * 18)
    assert combine_sampler_batches(sizes, 15, 6) == 1511
    assert combine_sampler_batches(np.array([6, 1, 7]), 2, 3) == -(-(3 + 2 + 3) // 2)  # 6 -> 3 chunks, 1 -> 2, 7 -> 3


def test_random_split_draws_numbersampler_splits_per_epoch() -> None:
    assert batch_splits(54) == [(2, 27), (3, 18), (6, 9), (9, 6), (18, 3), (27, 2)]  # the official CUB batch
    labels = _labels([30] * 40)
    sampler = ClassBalancedBatchSampler(labels, 6, 9, epoch_length="combine", random_split=True, seed=3)
    lengths = {n: combine_sampler_batches(np.full(40, 30), n, 54 // n) for n, _ in batch_splits(54)}
    assert len(sampler) == max(lengths.values())
    seen = set()
    for epoch in range(12):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        n, m = sampler.split(epoch)
        seen.add((n, m))
        assert len(batches) == lengths[n]
        for batch in batches:
            classes, counts = np.unique(labels[batch], return_counts=True)
            assert len(batch) == 54 and len(classes) == n and (counts == m).all()
    assert len(seen) >= 4  # the split changes between epochs
    rank1 = ClassBalancedBatchSampler(labels, 6, 9, epoch_length="combine", random_split=True, seed=3, num_replicas=2, rank=1)
    rank0 = ClassBalancedBatchSampler(labels, 6, 9, epoch_length="combine", random_split=True, seed=3, num_replicas=2, rank=0)
    for epoch in range(6):  # every rank draws the same split and the same number of batches
        rank0.set_epoch(epoch), rank1.set_epoch(epoch)
        assert rank0.split(epoch) == rank1.split(epoch) and len(list(rank0)) == len(list(rank1))


# ---------------------------------------------------------------------------- through a real Trainer
class IndexRecorder(L.LightningModule):
    """Records the dataset indices of every training batch; needs no images."""

    def __init__(self, sampler: str = "balanced") -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.sampler = sampler
        self.seen: list[list[int]] = []
        self.epochs: list[int] = []

    def setup(self, stage: str) -> None:
        self.trainer.datamodule.apply_request(DataRequest(load_images=False, sampler=self.sampler))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        self.epochs.append(self.current_epoch)
        return (self.weight - 1.0).pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _datamodule(root: Path, **kwargs: Any) -> CUB200:
    defaults = dict(root=str(root), image_size=16, classes_per_batch=4, samples_per_class=2, num_workers=0,
                    verify_images="none")
    return CUB200(**{**defaults, **kwargs})


def _fit(root: Path, epochs: int, run_seed: int, sampler: str = "balanced", **dm: Any) -> IndexRecorder:
    L.seed_everything(run_seed, verbose=False)
    module = IndexRecorder(sampler)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
    )
    with pytest.warns(UserWarning, match="differs from the published"):
        trainer.fit(module, datamodule=_datamodule(root, **dm))
    return module


def _by_epoch(module: IndexRecorder) -> list[list[list[int]]]:
    epochs: dict[int, list[list[int]]] = {}
    for epoch, batch in zip(module.epochs, module.seen):
        epochs.setdefault(epoch, []).append(batch)
    return [epochs[e] for e in sorted(epochs)]


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 100 training classes with 3..6 images: more than m = 2, so coverage is testable.
    return make_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=[3, 4, 5, 6] * 50, images=False).parent


@pytest.mark.parametrize("sampler", ["balanced", "shuffle"])
def test_trainer_epochs_draw_different_batches_and_cover_the_split(cub_root: Path, sampler: str) -> None:
    """Through Trainer.fit (Lightning decides when set_epoch happens): every epoch is new,
    and over a few epochs every training image is drawn."""
    module = _fit(cub_root, epochs=8, run_seed=0, sampler=sampler)
    epochs = _by_epoch(module)
    train_size = sum([3, 4, 5, 6] * 25)  # classes 1-100: 450 images
    assert len(epochs) == 8 and all(len(e) == train_size // 8 for e in epochs)  # one pass of n * m = 8
    for a in range(8):
        for b in range(a):
            assert epochs[a] != epochs[b], (a, b)
    drawn = {i for e in epochs for batch in e for i in batch}
    assert drawn == set(range(train_size))


def test_trainer_honours_batches_per_epoch(cub_root: Path) -> None:
    for sampler in ("balanced", "shuffle"):
        module = _fit(cub_root, epochs=2, run_seed=0, sampler=sampler, batches_per_epoch=3)
        assert [len(e) for e in _by_epoch(module)] == [3, 3], sampler


def test_trainer_runs_each_epochs_own_length_with_random_splits(cub_root: Path) -> None:
    """Epochs of different lengths (the split decides it) through Trainer.fit: Lightning takes
    ``len()`` (the longest) once and ends each shorter epoch when its batches run out."""
    module = _fit(cub_root, epochs=6, run_seed=0, classes_per_batch=3, samples_per_class=4, epoch_length="combine",
                  random_batch_split=True)  # fmt: skip
    sizes = np.array([3, 4, 5, 6] * 25)
    sampler = ClassBalancedBatchSampler(_labels(sizes.tolist()), 3, 4, seed=0, random_split=True)
    expected = [combine_sampler_batches(sizes, *sampler.split(e)) for e in range(6)]
    assert [len(e) for e in _by_epoch(module)] == expected and len(set(expected)) > 1
    for epoch, batches in enumerate(_by_epoch(module)):
        assert {len(b) for b in batches} == {12}, epoch


def test_trainer_seed_sets_the_batches_and_data_seed_fixes_them(cub_root: Path) -> None:
    a = _fit(cub_root, epochs=2, run_seed=1, batches_per_epoch=5)
    b = _fit(cub_root, epochs=2, run_seed=1, batches_per_epoch=5)
    c = _fit(cub_root, epochs=2, run_seed=2, batches_per_epoch=5)
    assert a.seen == b.seen and a.seen != c.seen  # --seed_everything moves the batches
    d = _fit(cub_root, epochs=2, run_seed=1, batches_per_epoch=5, seed=7)
    e = _fit(cub_root, epochs=2, run_seed=2, batches_per_epoch=5, seed=7)
    assert d.seen == e.seen != a.seen  # an explicit data seed fixes them across model seeds


def _ddp_worker(rank: int, port: int, root: str, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = IndexRecorder()
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
        default_root_dir=out_dir,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=_datamodule(Path(root), batches_per_epoch=4))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(_by_epoch(module)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_ddp_ranks_draw_different_batches_and_new_ones_each_epoch(cub_root: Path, tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(cub_root), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epochs in ranks:
        assert [len(e) for e in epochs] == [4, 4, 4]
        assert epochs[0] != epochs[1] != epochs[2] != epochs[0]  # a rank's epochs differ
    for e in range(3):
        assert all(a != b for a, b in zip(ranks[0][e], ranks[1][e]))  # ranks differ in every step
