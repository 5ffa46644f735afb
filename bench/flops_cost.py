"""What GFLOPs cost a trial: counted from token counts (``--flops count``) against fvcore traces.

    python bench/flops_cost.py [--images 500] [--model default] [--flops-images 16]

For every preset on the model, a trial as the search runs it (``evaluate``, speed measured) and its
FLOPs step alone, both ways: counted from every image's token counts (target: at most 5 % of the
trial) and traced with fvcore (a per-image plan's first ``--flops-images`` images, each alone). Also
how far the traced mean of those first images is from the counted mean of every image, and the
one-off calibration of the model. Saves bench/results/flops_cost.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import paretoken
from paretoken.compress import apply
from paretoken.evaluators.evaluate import EvalConfig, environment, evaluate, prepare
from paretoken.evaluators.flop_model import flop_model, plan_counts
from paretoken.evaluators.flops import count_flops


def _seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--model", default="default")
    parser.add_argument("--flops-images", type=int, default=16)
    args = parser.parse_args()
    config = EvalConfig(model=args.model, images=args.images, flops_images=args.flops_images)
    bench = prepare(config)
    model, images = bench.model, bench.images
    calibration_s, _ = _seconds(lambda: flop_model(copy.deepcopy(model)))  # a new object: calibrated anew
    print(f"calibration of {args.model}: {calibration_s:.2f} s (once per process)")
    rows = []
    for name in paretoken.PRESETS:
        plan = paretoken.preset(name)
        trial_s, metrics = _seconds(lambda: evaluate(plan, config))
        apply(model, plan)
        counts = plan_counts(model, images, config.batch_size)  # the trial's forward has these counts already
        count_s, counted = _seconds(lambda: flop_model(model).gflops(plan, counts))
        trace_s, traced = _seconds(lambda: count_flops(model, images[:args.flops_images], per_image=plan.per_image,
                                                       max_images=args.flops_images))
        row = {"plan": name, "per_image": plan.per_image, "trial_s": trial_s, "count_s": count_s,
               "count_share_pct": 100 * count_s / trial_s, "trace_s": trace_s,
               "trace_share_pct": 100 * trace_s / (trial_s - count_s + trace_s),
               "gflops_counted": counted, "gflops_traced": traced,
               "traced_off_pct": 100 * (traced - counted) / counted}
        assert abs(metrics["gflops"] - counted) <= 1e-9 * counted
        rows.append(row)
        print(f"{name:15s} trial {trial_s:5.2f} s  count {1000 * count_s:6.2f} ms ({row['count_share_pct']:.2f} %)  "
              f"trace {trace_s:5.2f} s ({row['trace_share_pct']:4.1f} %)  GFLOPs {counted:.6f} counted on "
              f"{len(images)}, {traced:.6f} traced on {args.flops_images} "
              f"({row['traced_off_pct']:+.2f} %)", flush=True)
    out = Path(__file__).parent / "results" / "flops_cost.json"
    out.write_text(json.dumps({
        "command": "python bench/flops_cost.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "environment": environment(), "calibration_s": calibration_s, "rows": rows}, indent=2) + "\n")
    print(f"max count share {max(r['count_share_pct'] for r in rows):.2f} % of a trial; saved {out}")


if __name__ == "__main__":
    main()
