"""EViT's fused token two ways, training-free on the embedded default model.

    python bench/evit_fuse.py [--images 3000]

``prune_fuse`` (paretoken) fuses the dropped tokens into their class-attention-weighted
*average* and gives the fused token the patch count it stands for, so proportional attention
(ToMe's log-size bias) weights it as those patches. EViT's code fuses them into the
attention-weighted *sum* (weights summing to the dropped attention mass) and treats the result
as one token. EViT trains with its fusing; paretoken's plans are applied training-free. This
bench measures both, and the two halves of the difference, on the EViT presets and one early
schedule. Each variant is registered as an op of its own (the op registry's use), so the plans
run it as they would run ``prune_fuse``. Prints a table and saves bench/results/evit_fuse.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import paretoken
from paretoken.compress import ops, tokens
from paretoken.compress.ops.prune_fuse import prune_fuse as shipped_prune_fuse
from paretoken.evaluators.evaluate import EvalConfig, environment, evaluate


def fuse(weighted_average: bool, carries_patch_count: bool):
    """A ``prune_fuse`` variant (same signature and top-k as :func:`~paretoken.compress.ops.prune_fuse.prune_fuse`)."""
    def prune_fuse(x, size, score, prefix: int, keep: float | None = None, r: int | None = None):
        k = tokens.count_to_keep(tokens.patch_counts(size, prefix), keep, r)
        kept = tokens.topk_mask(score, size, prefix, k)
        dropped = (~kept) & (size > 0)
        w = score.float().clamp(min=0) * dropped
        if weighted_average:
            w = w / w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
        fused = torch.einsum("bn,bnc->bc", w.to(x.dtype), x)[:, None]
        patches = (size * dropped).sum(dim=1, keepdim=True)
        fused_size = patches if carries_patch_count else (patches > 0).to(size.dtype)
        return tokens.compact(torch.cat([x, fused], dim=1), torch.cat([size, fused_size], dim=1),
                              torch.cat([kept, patches > 0], dim=1))
    return prune_fuse


VARIANTS = {  # name: the fusing function
    "paretoken (average, patch count)": shipped_prune_fuse,
    "EViT (sum, one token)": fuse(weighted_average=False, carries_patch_count=False),
    "average, one token": fuse(weighted_average=True, carries_patch_count=False),
    "sum, patch count": fuse(weighted_average=False, carries_patch_count=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    args = parser.parse_args()
    config = EvalConfig(images=args.images, speed=False, flops_images=4)
    plans = {name: paretoken.preset(name) for name in ("evit-0.7", "evit-0.5")}
    plans["prune_fuse(keep=0.6)@1,3,5,7"] = paretoken.Plan.from_dict(
        {"stages": [{"layer": layer, "op": "prune_fuse", "keep": 0.6} for layer in (1, 3, 5, 7)]})
    rows = []
    print("| fused token | plan | top-1 % | agreement % | GFLOPs |\n|---|---|---|---|---|")
    for k, (variant, function) in enumerate(VARIANTS.items()):
        op = ops.register(dataclasses.replace(
            ops.get_op("prune_fuse"), name=f"prune_fuse_variant{k}",
            reduce=lambda x, size, info, prefix, f=function, **amounts: f(x, size, info["score"], prefix, **amounts)))
        try:
            for name, plan in plans.items():
                stages = tuple(dataclasses.replace(s, op=op.name) for s in plan.stages)
                metrics = evaluate(dataclasses.replace(plan, stages=stages), config)
                rows.append({"variant": variant, "plan": name, **metrics})
                print(f"| {variant} | {name} | {metrics['top1']:.2f} | {metrics['agreement']:.2f} "
                      f"| {metrics['gflops']:.4f} |", flush=True)
        finally:
            ops.unregister(op.name)
    out = Path(__file__).parent / "results" / "evit_fuse.json"
    out.write_text(json.dumps({"command": f"python bench/evit_fuse.py --images {args.images}", "config": vars(config),
                               "environment": environment(), "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
