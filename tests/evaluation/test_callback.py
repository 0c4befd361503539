"""The evaluation callback in a single-process Trainer: collection, refine hook, logs, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from benchmark.engine.evaluation import RetrievalEvaluator, nmi, ranked_list_metrics, retrieval_metrics
from tests.evaluation.toy import ToyDataModule, ToyMethod, negatives_first_lists, toy_split


def _trainer(tmp_path: Path, callback: RetrievalEvaluator, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[callback], default_root_dir=str(tmp_path),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kwargs,
    )


def _expected(split: dict, recall_ks=(1, 2, 4), with_nmi: bool = True) -> dict[str, float]:
    out = retrieval_metrics(split["embeddings"], split["labels"], split["is_query"], split["is_gallery"], recall_ks=recall_ks)
    if with_nmi:
        out["NMI"] = nmi(split["embeddings"], split["labels"])
    return out


def test_test_metrics_logged_written_and_printed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    split = toy_split()
    callback = RetrievalEvaluator()
    trainer = _trainer(tmp_path, callback)
    trainer.validate(ToyMethod(), datamodule=ToyDataModule(split), verbose=False)
    (result,) = trainer.test(ToyMethod(), datamodule=ToyDataModule(split), verbose=False)
    expected = _expected(split)  # recall_ks and NMI come from the datamodule's attributes
    assert {k: v for k, v in callback.last_metrics.items()} == {f"test/{k}": v for k, v in expected.items()}
    for name, value in expected.items():
        assert result[f"test/{name}"] == pytest.approx(value, rel=1e-6)  # the logger keeps float32
    assert "test/refined/R@1" not in result  # the toy's refine returned None
    assert "embeddings" in capsys.readouterr().out  # the rich table

    record = json.loads((tmp_path / "metrics_test.json").read_text())
    assert record["metrics"] == pytest.approx(expected)
    assert (record["stage"], record["split"], record["dataset"], record["method"]) == ("test", "test", "toy", "toy")
    assert record["recall_ks"] == [1, 2, 4] and record["nmi"] is True
    assert set(record["versions"]) >= {"torch", "lightning", "timm", "faiss", "pytorch_metric_learning", "numpy", "python"}
    assert [e["stage"] for e in record["evaluations"]] == ["test"]
    val = json.loads((tmp_path / "metrics_val.json").read_text())
    assert val["metrics"] == pytest.approx(expected)  # same split, same embeddings


def test_every_evaluation_is_kept_in_the_json(tmp_path: Path) -> None:
    split = toy_split()
    trainer = _trainer(tmp_path, RetrievalEvaluator(nmi=False), max_epochs=2, num_sanity_val_steps=2)
    trainer.validate(ToyMethod(), datamodule=ToyDataModule(split), verbose=False)  # "before training"
    trainer.fit(ToyMethod(), datamodule=ToyDataModule(split))  # two validations, sanity check ignored
    record = json.loads((tmp_path / "metrics_val.json").read_text())
    steps = [(e["epoch"], e["global_step"]) for e in record["evaluations"]]
    assert steps == [(0, 0), (0, 6), (1, 12)]
    assert all("NMI" not in e["metrics"] for e in record["evaluations"])


def test_constructor_arguments_override_the_datamodule(tmp_path: Path) -> None:
    split = toy_split()
    callback = RetrievalEvaluator(recall_ks=[1, 3], nmi=False, map_at_k=5, print_table=False)
    (result,) = _trainer(tmp_path, callback).test(ToyMethod(), datamodule=ToyDataModule(split), verbose=False)
    assert {"test/R@1", "test/R@3", "test/mAP@5"} <= set(result)
    assert "test/NMI" not in result and "test/R@2" not in result


def test_refine_hook_reports_both_plain_and_refined(tmp_path: Path) -> None:
    split = toy_split()
    method = ToyMethod(oracle=split["labels"], refine_mode="both")
    callback = RetrievalEvaluator(refine_on_validation=False, print_table=False)
    trainer = _trainer(tmp_path, callback)
    (val,) = trainer.validate(method, datamodule=ToyDataModule(split), verbose=False)
    assert method.refine_calls == [] and "val/refined/R@1" not in val
    (result,) = trainer.test(method, datamodule=ToyDataModule(split), verbose=False)
    n = split["labels"].numel()
    assert method.refine_calls == [n]  # called once, with every sample
    metrics = callback.last_metrics
    plain = _expected(split)
    for name, value in plain.items():
        assert metrics[f"test/{name}"] == value
    # One-hot of the true grouping: every positive ties at the top, perfect retrieval.
    for name in ("R@1", "R@2", "R@4", "MAP@R", "R-Precision", "mAP@1000"):
        assert metrics[f"test/refined/{name}"] == pytest.approx(1.0)
    assert metrics["test/refined/NMI"] == pytest.approx(1.0)
    # Negatives first: no hit within R for any query; mAP@1000 from the list by hand.
    lists = negatives_first_lists(split["labels"], split["is_query"], split["is_gallery"])
    level3 = ranked_list_metrics(lists, split["labels"], split["is_query"], split["is_gallery"], recall_ks=(1, 2, 4))
    for name in ("R@1", "R@2", "R@4", "MAP@R", "R-Precision"):
        assert metrics[f"test/refined/level3/{name}"] == 0.0
    # Query q has M negatives then R positives: AP@1000 = mean over i of i / (M + i).
    per_query = []
    for q in split["is_query"].nonzero().flatten().tolist():
        same = split["labels"] == split["labels"][q]
        r = int(same.sum()) - 1
        m = n - 1 - r
        per_query.append(sum(i / (m + i) for i in range(1, r + 1)) / r)
    assert metrics["test/refined/level3/mAP@1000"] == pytest.approx(sum(per_query) / len(per_query), abs=1e-12)
    assert level3["mAP@1000"] == metrics["test/refined/level3/mAP@1000"]
    assert "test/refined/level3/NMI" not in metrics  # no embeddings to cluster
    assert result["test/refined/level3/R@1"] == 0.0


def test_bad_step_output_gives_a_clear_error(tmp_path: Path) -> None:
    class NoDict(ToyMethod):
        def test_step(self, batch, batch_idx):
            return batch["x"]

    with pytest.raises(TypeError, match="test_step must return a dict with keys"):
        _trainer(tmp_path, RetrievalEvaluator()).test(NoDict(), datamodule=ToyDataModule(toy_split()), verbose=False)


def test_bad_refine_output_gives_a_clear_error(tmp_path: Path) -> None:
    class BadRefine(ToyMethod):
        def refine(self, embeddings, is_query, is_gallery):
            return {"": embeddings[:-1]}

    with pytest.raises(ValueError, match=r"refine\(\)\[''\] has shape"):
        _trainer(tmp_path, RetrievalEvaluator(nmi=False)).test(
            BadRefine(), datamodule=ToyDataModule(toy_split()), verbose=False
        )


def test_empty_split_gives_a_clear_error(tmp_path: Path) -> None:
    class NoQueries(ToyMethod):
        def test_step(self, batch, batch_idx):
            out = self._eval_step(batch)
            out["is_query"] = torch.zeros_like(out["is_query"])
            return out

    with pytest.raises(ValueError, match="No sample is flagged as a query"):
        _trainer(tmp_path, RetrievalEvaluator(nmi=False)).test(
            NoQueries(), datamodule=ToyDataModule(toy_split()), verbose=False
        )
    # No batch at all reaches the callback (e.g. a rank-local filter dropped everything).
    trainer = _trainer(tmp_path, callback := RetrievalEvaluator(nmi=False))
    callback.on_test_epoch_start(trainer, ToyMethod())
    with pytest.raises(ValueError, match="split is empty"):
        callback.on_test_epoch_end(trainer, ToyMethod())
