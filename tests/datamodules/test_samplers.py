"""Class-balanced batch sampler: composition, coverage, determinism, DDP partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.samplers import ClassBalancedBatchSampler


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
    assert list(a) != list(b)
    c = ClassBalancedBatchSampler(labels, 2, 2, seed=4)
    assert list(c) != list(b)


def test_ddp_ranks_draw_distinct_batches_with_equal_length() -> None:
    labels = _labels([4] * 16)
    ranks = [ClassBalancedBatchSampler(labels, 2, 2, seed=0, num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 64 // (4 * 2)
    batches = [list(s) for s in ranks]
    assert all(x != y for x, y in zip(*batches))
    with pytest.raises(ValueError):
        ClassBalancedBatchSampler(labels, 2, 2, num_replicas=2, rank=2)
