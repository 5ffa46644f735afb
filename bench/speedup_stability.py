"""How steady the two speed metrics are: ``img_per_s`` against ``speedup``, for plans measured again and
again over minutes and on "workers" of different speed (torch CPU threads).

    python bench/speedup_stability.py [--plans uncompressed,tome-r13,evit-0.7] [--threads 2,1] [--repeats 10]
                                      [--images 1000]

Each round evaluates every plan once per thread count, on the default model (the uncompressed
model's cached logits are built once, in the first round's first thread count). Per plan and thread
count it prints the median of each metric, its range and its coefficient of variation over the
rounds (std / mean, %); per plan, how far the medians of the thread counts are apart (largest over
smallest). Saves
bench/results/speedup_stability.json with every measurement. The uncompressed model's ``speedup``
would be exactly 1 without noise: its spread is the metric's noise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import paretoken
from paretoken.argtypes import positive_int
from paretoken.evaluators.evaluate import EvalConfig, environment, evaluate

METRICS = ("img_per_s", "speedup")


def _cv(values: list[float]) -> float:
    """Coefficient of variation, % (population std over mean)."""
    return 100.0 * statistics.pstdev(values) / statistics.fmean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", default="uncompressed,tome-r13,evit-0.7",
                        help="comma-separated preset names or uncompressed [uncompressed,tome-r13,evit-0.7]")
    parser.add_argument("--threads", default="2,1", help="comma-separated torch CPU thread counts [2,1]")
    parser.add_argument("--repeats", type=positive_int, default=10, help="rounds over every plan [10]")
    parser.add_argument("--images", type=positive_int, default=1000, help="evaluation images [1000]")
    args = parser.parse_args()
    names, threads = args.plans.split(","), [int(t) for t in args.threads.split(",")]
    config = EvalConfig(images=args.images, latency_repeats=1)
    started, measured = time.perf_counter(), []
    for round_ in range(args.repeats):
        for count in threads:
            torch.set_num_threads(count)
            for name in names:
                metrics = evaluate(paretoken.Plan() if name == "uncompressed" else paretoken.preset(name), config)
                measured.append({"round": round_, "threads": count, "plan": name,
                                 "at_s": round(time.perf_counter() - started, 1),
                                 **{m: metrics[m] for m in METRICS}})
        print(f"round {round_ + 1}/{args.repeats} done at {time.perf_counter() - started:.0f} s", flush=True)

    summary = []
    for name in names:
        medians = {}
        for count in threads:
            rows = [r for r in measured if r["plan"] == name and r["threads"] == count]
            figures = {m: {"median": statistics.median(r[m] for r in rows), "cv_pct": _cv([r[m] for r in rows]),
                           "min": min(r[m] for r in rows), "max": max(r[m] for r in rows)} for m in METRICS}
            medians[count] = figures
            summary.append({"plan": name, "threads": count, **figures})
            print(f"{name:12s} {count} threads  " + "  ".join(
                f"{m} {f['median']:8.2f} ({f['min']:.2f}-{f['max']:.2f}, cv {f['cv_pct']:4.1f} %)"
                for m, f in figures.items()), flush=True)
        spread = {m: max(f[m]["median"] for f in medians.values()) / min(f[m]["median"] for f in medians.values())
                  for m in METRICS}
        summary.append({"plan": name, "threads": "largest/smallest median", **spread})
        print(f"{name:12s} medians across thread counts, largest/smallest: "
              + "  ".join(f"{m} {v:.2f}x" for m, v in spread.items()), flush=True)
    out = Path(__file__).parent / "results" / "speedup_stability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": f"python bench/speedup_stability.py --plans {args.plans} --threads {args.threads} "
                   f"--repeats {args.repeats} --images {args.images}",
        "environment": {**environment(), "threads": args.threads}, "seconds": round(time.perf_counter() - started, 1),
        "summary": summary, "measured": measured}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
