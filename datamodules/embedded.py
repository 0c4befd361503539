"""The embedded default dataset as a datamodule: generated on first use, read as CUB.

The images are produced by :mod:`datamodules.synthetic` into the official CUB-200-2011
layout under ``$DML_BENCHMARK_DATA/synthetic/``, then read by the CUB reader, so the
default run exercises the same code path as a real dataset. 200 classes: 1-100 train,
101-200 test (class-disjoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmark.core.contracts import register_dataset
from datamodules.base import RetrievalDataModule
from datamodules.cub import read_cub
from datamodules.records import DatasetRecords
from datamodules.synthetic import default_synthetic_root, generate_synthetic, synthetic_dirname

NUM_CLASSES = 200  # the CUB split (classes 1-100 train, 101-200 test) needs all 200


@register_dataset("synthetic")
class SyntheticBirds(RetrievalDataModule):
    """Embedded default: procedurally generated 'birds', 200 classes, CUB layout, runs anywhere.

    Args:
        images_per_class: images generated per class (30 by default: 3,000 train / 3,000 test).
        render_size: side of the generated images in pixels (the loaders resize to ``image_size``).
        generator_seed: seed of the generator (a different seed is a different dataset).
        root: parent folder of the generated dataset (default ``$DML_BENCHMARK_DATA/synthetic``).
        **kwargs: everything :class:`RetrievalDataModule` takes; ``image_size`` defaults to 64.
    """

    recall_ks = (1, 2, 4, 8)
    compute_nmi = True

    def __init__(
        self,
        images_per_class: int = 30,
        render_size: int = 64,
        generator_seed: int = 0,
        root: str | None = None,
        image_size: int = 64,
        classes_per_batch: int = 16,
        samples_per_class: int = 4,
        eval_batch_size: int = 500,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root or str(default_synthetic_root()),
            image_size=image_size,
            classes_per_batch=classes_per_batch,
            samples_per_class=samples_per_class,
            eval_batch_size=eval_batch_size,
            **kwargs,
        )
        self.images_per_class, self.render_size, self.generator_seed = images_per_class, render_size, generator_seed

    @property
    def dataset_dir(self) -> Path:
        return self.root / synthetic_dirname(NUM_CLASSES, self.images_per_class, self.render_size, self.generator_seed)

    def prepare_records(self) -> None:
        generate_synthetic(self.dataset_dir, NUM_CLASSES, self.images_per_class, self.render_size, self.generator_seed)

    def read_records(self, root: Path) -> DatasetRecords:
        records = read_cub(self.dataset_dir)
        records.name, records.expected_sizes = self.name, {}
        return records

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "images_per_class": self.images_per_class, "render_size": self.render_size}
