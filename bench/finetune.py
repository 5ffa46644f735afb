"""Fine-tuning benchmark: top-1 of compressed plans on the default model before and after distillation.

Target (issue 6): a plan at no more than 65% of the uncompressed GFLOPs loses at most 0.5 top-1
points after fine-tuning. For each plan this prints GFLOPs (and % of the uncompressed model), the
uncompressed top-1, top-1 before and after fine-tuning, the loss against the uncompressed model, and
whether the target is met; the table goes to bench/results/finetune.json and .md.

    python bench/finetune.py          # evit-0.7, tome-r13, asvit (learned thresholds), DynamicViT predictors
    python bench/finetune.py --plans evit-0.5 --train-images 5000 --epochs 1     # a quick look
    python bench/finetune.py --plans my_plan.yaml --device cuda --epochs 5
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import paretoken
from paretoken.evaluators.data import load_split
from paretoken.evaluators.evaluate import environment
from paretoken.evaluators.models import create_model
from paretoken.results.finetune import FinetuneConfig, finetune

RESULTS = Path(__file__).parent / "results"
PLANS = Path(__file__).parent / "plans"
TARGET_GFLOPS_FRACTION = 0.65
TARGET_DROP = 0.5


def _plan(name: str) -> paretoken.Plan:
    return paretoken.load_plan(name) if Path(name).is_file() else paretoken.preset(name)


def _gflops(plan: paretoken.Plan, model_name: str, checkpoint: str | None, data: str | None) -> float:
    """GFLOPs per image on 16 evaluation images (untrained predictors where the checkpoint has none)."""
    model = create_model(model_name, checkpoint=checkpoint)
    images, _ = load_split(data, model, "eval", n=16, seed=0)
    paretoken.apply(model, plan, init_predictors=True)
    return paretoken.count_flops(model, images, max_images=16)


def write_table(rows: list[dict], full: float, args: argparse.Namespace) -> str:
    """Write bench/results/finetune.{md,json} for the rows so far; returns the Markdown table."""
    header = ("| plan | GFLOPs before -> after | % of full | top-1 full | before | after | drop after "
              "| agreement before -> after | steps | target |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [header] + [
        f"| {r['plan']} | {r['gflops_before']:.4f} -> {r['gflops']:.4f} | {r['gflops_pct']:.0f}% | {r['uncompressed_top1']:.2f} | "
        f"{r['before_top1']:.2f} | {r['after_top1']:.2f} | {r['drop_after']:+.2f} | "
        f"{r['before_agreement']:.1f} -> {r['after_agreement']:.1f} | {r['steps']} | "
        f"{'met' if r['target_met'] else 'NOT met'} |" for r in rows]
    env = environment(args.device)
    note = (f"\n{args.model} model, {rows[0]['train_images'] if rows else 0} training images x {args.epochs:g} epochs, "
            f"top-1 on {args.eval_images} held-out images; target: <= {TARGET_GFLOPS_FRACTION:.0%} of the "
            f"uncompressed GFLOPs ({full:.4f}) and <= {TARGET_DROP} points lost. {env['device']}, "
            f"{env['threads']} threads, torch {env['torch']}.")
    table = "\n".join(lines) + "\n" + note
    (args.out_dir / "finetune.md").write_text(table + "\n")
    (args.out_dir / "finetune.json").write_text(json.dumps({"rows": rows, "full_gflops": full, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "environment": env}, indent=2))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", nargs="+", help="preset names or plan files",
                        default=["evit-0.7", "tome-r13", "asvit", str(PLANS / "dynamicvit-predictor-0.7.yaml")])
    parser.add_argument("--model", default="default")
    parser.add_argument("--checkpoint")
    parser.add_argument("--data")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--train-images", type=int, default=None, help="[all 60,000 Fashion-MNIST train images]")
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    full = _gflops(paretoken.Plan(), args.model, args.checkpoint, args.data)
    rows = []
    for name in args.plans:
        plan = _plan(name)
        label = Path(name).stem if Path(name).is_file() else name
        gflops_before = _gflops(plan, args.model, args.checkpoint, args.data)
        config = FinetuneConfig(model=args.model, checkpoint=args.checkpoint, data=args.data, epochs=args.epochs,
                                train_images=args.train_images, eval_images=args.eval_images,
                                batch_size=args.batch_size, lr=args.lr, alpha=args.alpha, device=args.device)
        started = time.perf_counter()
        report = finetune(plan, config, out=args.out_dir / f"finetune-{label}.safetensors",
                          log=sys.stdout)
        drop = report["uncompressed_top1"] - report["after"]["top1"]
        tuned = paretoken.load_plan(report["plan"])  # learned thresholds change the plan's GFLOPs
        gflops = _gflops(tuned, args.model, report["checkpoint"], args.data)
        rows.append({
            "plan": label, "describe": tuned.describe(), "gflops_before": gflops_before,
            "gflops": gflops, "gflops_pct": 100 * gflops / full,
            "uncompressed_top1": report["uncompressed_top1"], "before_top1": report["before"]["top1"],
            "after_top1": report["after"]["top1"], "drop_after": drop,
            "before_agreement": report["before"]["agreement"], "after_agreement": report["after"]["agreement"],
            "steps": report["steps"], "train_images": report["train_images"], "eval_images": report["eval_images"],
            "seconds": time.perf_counter() - started,
            "target_met": gflops <= TARGET_GFLOPS_FRACTION * full and drop <= TARGET_DROP,
        })
        table = write_table(rows, full, args)  # after every plan, so a stopped run keeps what it measured
    print("\n" + table)

    return 0


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    sys.exit(main())
