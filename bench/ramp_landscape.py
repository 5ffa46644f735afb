"""Every pure ToMe ramp of the mixed space on the search's images: which ones dominate a preset?

    python bench/ramp_landscape.py                      # r_first 12..24, r_first + r_last >= 22, vs tome-r16
    python bench/ramp_landscape.py --min-r-first 0 --min-sum 0   # the whole 25 x 25 grid (~50 min on 2 cores)
    python bench/ramp_landscape.py --images 1000 --held-out 4000 --out ramp_landscape_i1000

bench/search_quality.py asks whether a 60-trial search finds a plan that dominates every preset on
the first 500 seeded test images. The preset it misses, when it misses one, is tome-r16. This maps
the two-parameter base of the mixed space (``r_first``, ``r_last``, no overrides) on those same
images, to show how many ramps dominate the preset and whether they form a region a sampler can
learn or isolated points that one or two images decide. Ramps outside the default window merge too
little to reach the preset's GFLOPs. With ``--held-out N`` each dominating ramp is measured again
against the preset on the next N test images (disjoint from the scan's): paired difference in top-1
points with its 95 % interval. Figures go to bench/results/OUT.{json,png} (``--out``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import optuna

import paretoken
from paretoken.evaluators.evaluate import EvalConfig, environment, evaluate, evaluate_per_image
from paretoken.results import query
from paretoken.results.holdout import Z_95, paired_difference
from paretoken.spaces.families import R_RAMP_MAX, MixedSpace

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="evaluation images, as the search's [500]")
    parser.add_argument("--preset", default="tome-r16", help="the preset to compare with [tome-r16]")
    parser.add_argument("--min-r-first", type=int, default=12, help="smallest r_first measured [12]")
    parser.add_argument("--min-sum", type=int, default=22, help="smallest r_first + r_last measured [22]")
    parser.add_argument("--flops-images", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=0,
                        help="re-measure the dominating ramps and the preset on this many unseen test images [0]")
    parser.add_argument("--out", default="ramp_landscape", help="results name under bench/results [ramp_landscape]")
    args = parser.parse_args()

    config = EvalConfig(images=args.images, batch_size=min(100, args.images), speed=False,
                        flops_images=args.flops_images)
    preset = evaluate(paretoken.preset(args.preset), config)
    sign = np.array([-1.0, 1.0])  # (top1, gflops) as minimisation
    target = np.array([preset["top1"], preset["gflops"]]) * sign
    one_image = np.array([100.0 / args.images + 1e-4, 0.0])  # + float32 rounding, no GFLOPs slack
    rows = []
    for first in range(args.min_r_first, R_RAMP_MAX + 1):
        for last in range(max(0, args.min_sum - first), R_RAMP_MAX + 1):
            m = evaluate(ramp(first, last), config)
            point = np.array([[m["top1"], m["gflops"]]]) * sign
            rows.append({"r_first": first, "r_last": last, "top1": m["top1"], "gflops": m["gflops"],
                         "dominates": bool(query.dominating(point, target)[0]),
                         "within_one_image": bool(query.dominating(point, target, one_image)[0])})
        print(f"r_first {first}: {sum(r['dominates'] for r in rows)} ramps dominate {args.preset} so far",
              flush=True)

    cheaper = [r for r in rows if r["gflops"] <= preset["gflops"]]
    summary = {"ramps": len(rows), "at_or_under_preset_gflops": len(cheaper),
               "dominate": [(r["r_first"], r["r_last"]) for r in rows if r["dominates"]],
               "within_one_image": sum(r["within_one_image"] for r in rows)}
    print(f"{args.preset}: top1 {preset['top1']:.2f} % at {preset['gflops']:.4f} GFLOPs on {args.images} images; "
          f"{len(summary['dominate'])} of {len(rows)} ramps dominate it ({summary['within_one_image']} within one "
          f"image): {summary['dominate']}; {len(cheaper)} ramps are at or under its GFLOPs")
    if args.held_out:
        summary["held_out"] = held_out(args, paretoken.preset(args.preset), [r for r in rows if r["dominates"]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.out}.json"
    out.write_text(json.dumps({
        "command": f"python bench/ramp_landscape.py --images {args.images} --preset {args.preset} "
                   f"--min-r-first {args.min_r_first} --min-sum {args.min_sum} --flops-images {args.flops_images}"
                   f" --held-out {args.held_out} --out {args.out}",
        "environment": environment(), "preset": {"name": args.preset, "top1": preset["top1"],
                                                 "gflops": preset["gflops"]},
        "summary": summary, "ramps": rows}, indent=1) + "\n")
    print(f"saved {out}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.full((R_RAMP_MAX + 1, R_RAMP_MAX + 1), np.nan)
    for r in cheaper:
        grid[r["r_last"], r["r_first"]] = r["top1"]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=preset["top1"] - 4, vmax=preset["top1"] + 0.4)
    fig.colorbar(image, label=f"top-1 % on {args.images} images")
    for r in rows:
        if r["dominates"]:
            ax.plot(r["r_first"], r["r_last"], marker="*", color="red", markersize=12)
    ax.set_xlabel("r_first (tokens merged in block 0)")
    ax.set_ylabel("r_last (tokens merged in block 11)")
    ax.set_title(f"pure ToMe ramps at or under {args.preset}'s GFLOPs; * dominates it", fontsize=10)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"saved {out.with_suffix('.png')}")


def ramp(r_first: int, r_last: int) -> paretoken.Plan:
    """The mixed space's pure ToMe ramp from ``r_first`` tokens merged in block 0 to ``r_last`` in the last."""
    return MixedSpace().sample(optuna.trial.FixedTrial({"r_first": r_first, "r_last": r_last, "overrides": 0}))


def held_out(args: argparse.Namespace, preset: paretoken.Plan, dominating: list[dict]) -> dict:
    """The preset and each dominating ramp on the ``args.held_out`` test images after the scan's:
    top-1 % each, and each ramp's paired difference from the preset (points, 95 % interval)."""
    config = EvalConfig(images=args.held_out, skip=args.images, batch_size=min(100, args.held_out), speed=False,
                        flops_images=args.flops_images)
    base, base_correct = evaluate_per_image(preset, config)
    out = {"images": args.held_out, "skip": args.images, "preset_top1": base["top1"], "ramps": []}
    for r in dominating:
        m, correct = evaluate_per_image(ramp(r["r_first"], r["r_last"]), config)
        diff, se = paired_difference(correct.numpy(), base_correct.numpy())
        low, high = diff - Z_95 * se, diff + Z_95 * se
        out["ramps"].append({"r_first": r["r_first"], "r_last": r["r_last"], "top1": m["top1"], "minus_preset": diff,
                             "interval95": [low, high]})
        print(f"held out ({args.held_out} images): ramp {r['r_first']}->{r['r_last']} {m['top1']:.2f} % against "
              f"{args.preset} {base['top1']:.2f} %: {diff:+.2f} [{low:+.2f}, {high:+.2f}]", flush=True)
    return out


if __name__ == "__main__":
    main()
