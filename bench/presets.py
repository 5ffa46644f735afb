"""Every preset on the embedded default model, training-free: top1, agreement, GFLOPs, CPU img/s
and speed-up over the uncompressed model (the evaluator's paired ``speedup``).

    python bench/presets.py [--images 10000] [--model default] [--checkpoint FILE]
    python bench/presets.py --images 2000 --speedup-pairs 19 --compile --out presets_compiled
    python bench/presets.py --model deit_small_patch16_224 --plans tome-r13,evit-0.7 --images 64 --batch-size 32

Prints a Markdown table (it goes into the README) and saves bench/results/<out>.json. Efficiency is
speed-up / FLOPs ratio (1.0: every FLOP saved is time saved). ``--compile`` measures every plan and
the uncompressed model it is timed against under torch.compile (``compile_s``: compilation, apart).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import paretoken
from paretoken.evaluators.evaluate import EvalConfig, environment, evaluate
from paretoken.evaluators.speed import timing_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--checkpoint")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--speedup-pairs", type=int, default=4, help="batches timed against the uncompressed model [4]")
    parser.add_argument("--compile", action="store_true", help="measure under torch.compile")
    parser.add_argument("--plans", default=",".join(paretoken.PRESETS),
                        help="comma-separated presets, each timed against the uncompressed model [all]")
    parser.add_argument("--out", default="presets", help="NAME.json in bench/results/ [presets]")
    args = parser.parse_args()
    names = [name for name in args.plans.split(",") if name]
    unknown = [name for name in names if name not in paretoken.PRESETS]
    if unknown:
        parser.error(f"--plans: {', '.join(unknown)} unknown; valid: {', '.join(paretoken.PRESETS)}")
    config = EvalConfig(model=args.model, checkpoint=args.checkpoint, images=args.images, batch_size=args.batch_size,
                        speedup_pairs=args.speedup_pairs, compile=args.compile)
    rows = []
    print("| plan | top-1 % | agreement % | GFLOPs | CPU img/s | speed-up | efficiency | padding % | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name in [None, *names]:
        metrics = evaluate(paretoken.preset(name) if name else paretoken.Plan(), config)
        rows.append({"plan": name or "uncompressed", **metrics,
                     "efficiency": metrics["speedup"] * metrics["gflops"] / (rows[0] if rows else metrics)["gflops"]})
        print(f"| {rows[-1]['plan']} | {metrics['top1']:.2f} | {metrics['agreement']:.2f} | {metrics['gflops']:.4f} "
              f"| {metrics['img_per_s']:.0f} | {metrics['speedup']:.2f}x | {rows[-1]['efficiency']:.2f} "
              f"| {metrics['padding_pct']:.1f} | {metrics['compile_s']:.1f} |", flush=True)
    out = Path(__file__).parent / "results" / f"{args.out}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/presets.py", *sys.argv[1:]])
    out.write_text(json.dumps({"command": command, "config": vars(config),
                               "environment": environment(), "timing": timing_context(),
                               "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
