"""``python -m benchmark analyze dmcac loss_terms``: runs, writes its files, and its per-term
gradient norms equal a direct autograd computation on the same batch and weights."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from benchmark.app.cli import main
from companions.dmcac_analysis import summarize
from methods.dmcac import DMCAC

TINY = [
    "--backbone", "vit_tiny_test", "--backbone.pretrained", "false", "--data.num_workers", "0", "--logger", "none",
    "--trainer.enable_progress_bar", "false", "--data.classes_per_batch", "16", "--trainer.precision", "32-true",
]  # fmt: skip


def test_loss_terms_command_writes_its_files_and_matches_autograd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    captured: dict = {}
    original = DMCAC.training_loss

    def spy(self: DMCAC, batch: dict) -> dict:
        if not captured:  # the first training step: weights, batch and database before any update
            captured.update(
                options=dict(views=self.views_config, retrieval=self.retrieval_config, loss=self.loss_config,
                             classifiers=self.classifiers_config, backbone=self.backbone_config,
                             num_classes=self.num_classes, embedding_dim=self.embedding_dim,
                             image_size=self.hparams.image_size),
                state={k: v.detach().clone() for k, v in self.state_dict().items()},
                batch={k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()},
                database=self.database_embeddings.clone(), ids=self._database_ids.clone(),
            )
        return original(self, batch)

    monkeypatch.setattr(DMCAC, "training_loss", spy)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["analyze", "dmcac", "loss_terms", "--steps", "3", "--window", "1", "--out", str(out), *TINY]) == 0
    result = json.loads((out / "dmcac_loss_terms.json").read_text())
    table = (out / "dmcac_loss_terms.md").read_text()
    assert result["steps"] == 3 and [r["step"] for r in result["per_step"]] == [0, 1, 2]
    assert result["settings"]["backbone"] == "vit_tiny_test" and result["settings"]["views"] == 2  # the recipe's
    assert result["command"][:6] == ["python", "-m", "benchmark", "analyze", "dmcac", "loss_terms"]
    for term in ("ce", "frob", "cac"):
        assert f"| {term} | 1 |" in table
        start = result["summary"]["start"]["terms"][term]
        assert start["all"] == result["per_step"][0]["terms"][term]["all"] > 0  # window 1: step 0 itself
        assert result["summary"]["end"]["terms"][term]["all"] == result["per_step"][-1]["terms"][term]["all"]
    assert result["summary"]["start"]["terms"]["ce"]["ratio_all"] == 1.0
    assert not list(out.rglob("*.ckpt"))  # checkpoints are off by default

    # Recompute step 0 independently: the same weights, batch and database, one autograd.grad per term.
    monkeypatch.setattr(DMCAC, "training_loss", original)
    model = DMCAC(**captured["options"])
    model.load_state_dict(captured["state"])
    model.set_database(captured["database"], captured["ids"].numpy())
    model.train()
    terms = model.training_loss(captured["batch"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = {"ce": model.loss_config.beta_ce, "frob": model.loss_config.beta_frob, "cac": model.loss_config.beta_cac}
    for term, beta in betas.items():
        grads = torch.autograd.grad(beta * terms[term], [p for _, p in named], retain_graph=True, allow_unused=True)
        flat = [g.flatten() if g is not None else torch.zeros(p.numel()) for g, (_, p) in zip(grads, named)]
        embedding = [f for f, (name, _) in zip(flat, named) if name.startswith(("encoder.", "head."))]
        recorded = result["per_step"][0]["terms"][term]
        assert recorded["all"] == pytest.approx(torch.linalg.vector_norm(torch.cat(flat)).item(), rel=1e-5), term
        assert recorded["embedding"] == pytest.approx(torch.linalg.vector_norm(torch.cat(embedding)).item(), rel=1e-5), term
        assert recorded["value"] == pytest.approx(terms[term].item(), rel=1e-6), term


def test_summary_takes_medians_of_the_first_and_last_window() -> None:
    records = [{"step": s, "terms": {"ce": {"all": c, "embedding": c, "value": 1.0},
                                     "frob": {"all": f, "embedding": f / 2, "value": 0.1}}}
               for s, (c, f) in enumerate([(10.0, 1.0), (20.0, 3.0), (30.0, 2.0), (40.0, 8.0), (50.0, 4.0)])]
    summary = summarize(records, window=2)
    assert summary["start"]["steps"] == [0, 1] and summary["end"]["steps"] == [3, 4]
    assert summary["start"]["terms"]["frob"]["all"] == 2.0 and summary["start"]["terms"]["frob"]["ratio_all"] == 2.0 / 15.0
    assert summary["end"]["terms"]["frob"]["ratio_embedding"] == 3.0 / 45.0
