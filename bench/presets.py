"""Every preset on the embedded default model, training-free: top1, agreement, GFLOPs, CPU img/s
and speed-up over the uncompressed model (the evaluator's paired ``speedup``).

    python bench/presets.py [--images 10000] [--model default] [--checkpoint FILE]

Prints a Markdown table (it goes into the README) and saves bench/results/presets.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import paretoken
from paretoken.evaluators.evaluate import EvalConfig, environment, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--checkpoint")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    config = EvalConfig(model=args.model, checkpoint=args.checkpoint, images=args.images, batch_size=args.batch_size)
    rows = []
    print("| plan | top-1 % | agreement % | GFLOPs | CPU img/s | speed-up | padding % |\n|---|---|---|---|---|---|---|")
    for name in [None, *paretoken.PRESETS]:
        metrics = evaluate(paretoken.preset(name) if name else paretoken.Plan(), config)
        rows.append({"plan": name or "uncompressed", **metrics})
        print(f"| {rows[-1]['plan']} | {metrics['top1']:.2f} | {metrics['agreement']:.2f} | {metrics['gflops']:.4f} "
              f"| {metrics['img_per_s']:.0f} | {metrics['speedup']:.2f}x | {metrics['padding_pct']:.1f} |", flush=True)
    out = Path(__file__).parent / "results" / "presets.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": f"python bench/presets.py --images {args.images}", "config": vars(config),
                               "environment": environment(), "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
