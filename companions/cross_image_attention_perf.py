"""Memory and time of Cross-Image-Attention's all-pairs computation (blocks + loss, fwd + bwd).

For each batch size B, the B x B conditional embeddings of a batch are computed from
(B, D) unconditional embeddings and (B, N, C) spatial tokens (as a ResNet-50 gives them:
N = 7 x 7 at 224 px, C = 2048), followed by the Multi-Similarity loss and the backward pass.
The encoder is left out: its memory is the same with and without the method. Reported:

* ``saved``: bytes autograd keeps for the backward pass (every distinct saved tensor
  counted once) — what the all-pairs computation adds to a training step's memory;
* ``peak``: the peak allocation during forward + backward above the inputs
  (``torch.cuda.max_memory_allocated`` on GPU; on CPU the rise of the peak resident set
  size, measured in a fresh process per configuration);
* ``time``: one forward + backward, median of a few repetitions.

    python -m benchmark perf cia_memory --batch-sizes 64,80,100 --tokens 49

The inputs are random tensors of the real shapes (weights seeded): memory and time depend on
the shapes, not the values. docs/methods/cross_image_attention.md quotes the results.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmark.core.contracts import register_perf
from methods.cross_image_attention import (
    CrossImageAttention,
    label_masks,
    multi_similarity_loss,
    pair_similarity_matrix,
)


def _build(args: argparse.Namespace, batch: int, device: torch.device, dtype: torch.dtype):
    """The blocks and one batch's inputs: (B, D) embeddings, (B, N, C) tokens, labels.

    The inputs require gradients, as the encoder's outputs do in training, so the backward
    pass runs through them and autograd saves what a real step saves. Labels come in
    consecutive groups of ``--samples-per-class``: the P x K batches the recipes sample.
    """

    torch.manual_seed(0)
    stack = CrossImageAttention(
        args.blocks, args.dim, args.token_dim, checkpoint_blocks=args.checkpoint_blocks,
        num_heads=args.heads, mlp_ratio=args.mlp_ratio,
    ).to(device, dtype)
    emb = torch.randn(batch, args.dim, device=device, dtype=dtype, requires_grad=True)  # (B, D)
    tokens = torch.randn(batch, args.tokens, args.token_dim, device=device, dtype=dtype, requires_grad=True)
    labels = torch.arange(batch, device=device) // args.samples_per_class
    return stack, emb, tokens, labels


def _step(stack, emb: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor, mode: str) -> torch.Tensor:
    """The all-pairs forward: conditional embeddings of every ordered pair, similarities, MS loss.

    Every anchor's tokens are attended to by all B embeddings at once (the embeddings repeated
    along a new anchor axis), which is the B x B computation whose memory this command measures.
    The loss is computed in float32 whatever the blocks' dtype (``--dtype``).
    """

    z, _ = stack(emb.unsqueeze(0).expand(len(tokens), -1, -1), tokens)  # (B_a, B_1, D)
    sim = pair_similarity_matrix(z, emb, mode)  # (B, B)
    pos, neg = label_masks(labels)
    return multi_similarity_loss(sim.float(), pos, neg)


def saved_bytes(args: argparse.Namespace, batch: int, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one all-pairs step.

    A ``saved_tensors_hooks`` pack hook sees every tensor autograd keeps; tensors are counted
    by their storage, so views of one buffer count once. Parameters and inputs are left out:
    they exist whether or not the step runs. Exact and device-independent, unlike a peak.
    """
    stack, emb, tokens, labels = _build(args, batch, device, dtype)
    storages: dict[int, int] = {}
    inputs = {emb.untyped_storage().data_ptr(), tokens.untyped_storage().data_ptr()}
    for p in stack.parameters():
        inputs.add(p.untyped_storage().data_ptr())

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:  # parameters and inputs exist anyway
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _step(stack, emb, tokens, labels, args.pair_similarity)
    loss.backward()
    return sum(storages.values())


def measure(args: argparse.Namespace, batch: int) -> dict[str, float]:
    """Saved bytes, peak bytes and time of one configuration (run in this process).

    On CPU the peak is the rise of the process's peak resident set size (``ru_maxrss``), a
    high-water mark that never goes down: hence one fresh process per configuration (the
    ``--single`` runs of :func:`main`). The peak is read after the first repetition, the one
    that also pays the allocator's first allocations.

    Returns:
        ``batch``, ``pairs`` (B²), ``saved_bytes``, ``peak_bytes`` and ``time_s`` (median).
    """
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    stack, emb, tokens, labels = _build(args, batch, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # the blocks and inputs: not what the step adds
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        _step(stack, emb, tokens, labels, args.pair_similarity).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if i == 0:
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        # Freed between repetitions, so the gradients of one step do not add to the next.
        emb.grad = tokens.grad = None
        stack.zero_grad(set_to_none=True)
    saved = saved_bytes(args, batch, device, dtype)  # after the peak: the CPU peak is per process
    return {"batch": batch, "pairs": batch * batch, "saved_bytes": saved, "peak_bytes": peak,
            "time_s": statistics.median(times)}


@register_perf("cia_memory", "Cross-Image-Attention: memory and time of the all-pairs blocks + loss per batch size")
def main(argv: list[str] | None = None) -> int:
    """``perf cia_memory``: one line (or JSON line) per batch size, each measured in a new process.

    Returns:
        0. A configuration that fails (e.g. out of memory) raises ``CalledProcessError``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="64,80,100", help="comma-separated B (recipes: 80 CUB/Cars, 100 SOP/In-Shop)")
    parser.add_argument("--samples-per-class", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=49, help="spatial locations N (7x7 for ResNet-50 at 224 px)")
    parser.add_argument("--token-dim", type=int, default=2048, help="C (ResNet-50: 2048)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mlp-ratio", type=float, default=4.0)
    parser.add_argument("--pair-similarity", default="mutual", choices=("mutual", "anchor"))
    parser.add_argument("--checkpoint-blocks", action="store_true")  # the method's checkpoint_blocks option
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON line per configuration")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # internal: one config, this process
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if args.single:  # the child process: one configuration, its result as the last stdout line
        print(json.dumps(measure(args, sizes[0])))
        return 0
    print(
        f"all-pairs Cross-Image-Attention: {args.blocks} blocks, D={args.dim}, heads={args.heads}, "
        f"mlp_ratio={args.mlp_ratio}, N={args.tokens}, C={args.token_dim}, {args.dtype} on {args.device}, "
        f"pair_similarity={args.pair_similarity}, checkpoint_blocks={args.checkpoint_blocks}"
    )
    if not args.json:
        print(f"{'B':>5} {'pairs':>7} {'saved MiB':>10} {'peak MiB':>9} {'fwd+bwd s':>10}")
    # Each batch size reruns this module with the same options, one --batch-sizes value and
    # --single: a fresh process, so the CPU peak of one size cannot hide another's.
    raw = list(argv if argv is not None else sys.argv[1:])
    for batch in sizes:
        rest = [a for a in raw if not a.startswith("--batch-sizes")]
        if "--batch-sizes" in raw:  # drop the value of a separate "--batch-sizes VALUE"
            i = raw.index("--batch-sizes")
            rest = raw[:i] + raw[i + 2 :]
        # The module's own entry point (__main__ below), not `python -m benchmark perf`: no CLI start-up.
        cmd = [sys.executable, "-m", "companions.cross_image_attention_perf", *rest, "--batch-sizes", str(batch), "--single"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)  # the child's last line; anything it printed before is ignored
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{batch:>5} {row['pairs']:>7} {row['saved_bytes'] / 2**20:>10.1f} "
                  f"{row['peak_bytes'] / 2**20:>9.1f} {row['time_s']:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
