"""Fixed-seed tiny fits of every built-in method, to check that a refactoring changes no number.

    python tools/tiny_fits.py before.json          # on the commit before the change
    python tools/tiny_fits.py after.json           # after it
    python tools/tiny_fits.py --compare before.json after.json   # "identical" per method, else exit 1

Each method fits 2 epochs of 2 batches on the embedded synthetic dataset (16-32 px, random tiny
backbones, float32, seed 0) in a subprocess of the checkout it is run from; the metrics of every
evaluation (validation and test, their steps and roles) are kept, timings and paths dropped. Runs
of one CPU are byte-identical; compare runs made on the same machine. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# method -> backbone: the ViT method on the tiny ViT, the others on the tiny ResNet.
METHODS = {
    "ms": "resnet_tiny_test", "margin": "resnet_tiny_test", "proxy_anchor": "resnet_tiny_test",
    "intra_batch": "resnet_tiny_test", "cross_image_attention": "resnet_tiny_test",
    "dmcac": "vit_tiny_test", "context_refine": "resnet_tiny_test",
}
COMMON = ["--backbone.pretrained", "false", "--data.images_per_class", "4", "--data.render_size", "32",
          "--data.batches_per_epoch", "2", "--data.num_workers", "0", "--trainer.max_epochs", "2",
          "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
          "--seed_everything", "0", "--figures", "false", "--logger", "none"]
# Keys whose values differ between runs without the numbers differing.
VOLATILE = ("time", "seconds", "duration", "started", "finished", "date", "pid", "host", "_s", "run_dir", "path",
            "version")


def _clean(value: object) -> object:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not any(t in k.lower() for t in VOLATILE)}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def fit_all(target: Path) -> int:
    """Fit every method and write their records to ``target``; 1 if a fit failed."""
    out: dict[str, object] = {}
    for method, backbone in METHODS.items():
        size = "32" if backbone == "vit_tiny_test" else "16"  # the tiny ViT's patch 8 needs a grid
        with tempfile.TemporaryDirectory() as run:
            args = [sys.executable, "-m", "benchmark", "fit", "--method", method, "--backbone", backbone,
                    "--data", "synthetic", "--data.image_size", size, *COMMON, "--run_dir", run]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.getcwd()}
            done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=os.getcwd())
            if done.returncode:
                print(f"{method}: failed\n{done.stderr[-1500:]}", file=sys.stderr)
                out[method] = {"error": done.returncode}
                continue
            out[method] = {f.name: _clean(json.loads(f.read_text())) for f in sorted(Path(run).glob("metrics_*.json"))}
            print(f"{method}: done", file=sys.stderr)
    target.write_text(json.dumps(out, indent=1, sort_keys=True))
    return int(any("error" in v for v in out.values() if isinstance(v, dict)))


def _numbers(record: dict) -> dict[str, object]:
    """The metrics of a method's records: each file's headline and every evaluation's."""
    kept: dict[str, object] = {}
    for name, content in record.items():
        if not isinstance(content, dict):
            kept[name] = content
            continue
        kept[f"{name}:metrics"] = content.get("metrics")
        for i, e in enumerate(content.get("evaluations", [])):
            kept[f"{name}:{i}"] = {k: e.get(k) for k in ("metrics", "global_step", "epoch", "role", "selected_on")}
    return kept


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differing = 0
    for method in sorted(set(a) | set(b)):
        same = json.dumps(_numbers(a.get(method, {})), sort_keys=True) == json.dumps(_numbers(b.get(method, {})), sort_keys=True)
        print(f"{method:24s} {'identical' if same else 'DIFFERENT'}")
        differing += not same
    return int(differing > 0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"] and len(sys.argv) == 4:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(fit_all(Path(sys.argv[1])))
