"""Do the searched fronts hold on test images the search never saw?

    python bench/front_holdout.py        # the 12 studies of `python bench/search_quality.py --flops-images 4`
    python bench/front_holdout.py --held-out 9500   # every other test image (about 4x slower)

bench/search_quality.py measures every plan on the first 500 images of the seeded Fashion-MNIST test
order and asks whether a searched plan dominates each preset there, where one image is 0.2 top-1
points. This re-measures, for each of its studies, the presets and the searched plans on the
study's front on the next ``--held-out`` test images of the same order (``EvalConfig(skip=500)``,
disjoint from the search's), and
counts again the presets that a searched plan dominates. GFLOPs are the study's own (plans that
keep a per-image token count were counted on the search's first images). Each distinct plan is
measured once; figures go to bench/results/front_holdout.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import optuna

from paretoken.compress.plan import Plan
from paretoken.evaluators.evaluate import EvalConfig, environment, evaluate
from paretoken.results import query
from paretoken.search import study as st

RESULTS = Path(__file__).parent / "results"
TEST_IMAGES = 10_000  # Fashion-MNIST test split


def _dominated(searched: np.ndarray, presets: np.ndarray) -> int:
    """Rows of ``presets`` (top1, gflops) strictly dominated by a row of ``searched``."""
    sign = np.array([-1.0, 1.0])  # top1 is maximised
    return sum(bool(query.dominating(searched * sign, p * sign).any()) for p in presets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default="mixed-*-n60-i500-d10",
                        help="glob of study names in bench/results/search_quality/ [mixed-*-n60-i500-d10]")
    parser.add_argument("--images", type=int, default=500, help="images the searches measured (the first ones)")
    parser.add_argument("--held-out", type=int, default=2500, help="test images after those to measure on [2500]")
    args = parser.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    held_out = min(args.held_out, TEST_IMAGES - args.images)
    config = EvalConfig(images=held_out, skip=args.images, batch_size=250, speed=False, flops_images=1)
    measured: dict[str, float] = {}

    def top1(plan_dict) -> float:
        key = json.dumps(plan_dict, sort_keys=True)
        if key not in measured:
            measured[key] = evaluate(Plan.from_dict(plan_dict), config)["top1"]
        return measured[key]

    rows = []
    for path in sorted((RESULTS / "search_quality").glob(f"{args.studies}.db")):
        study = query.load_study(path.stem, f"sqlite:///{path}")
        done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.values]
        presets = [t for t in done if t.user_attrs.get("preset") not in (None, st.UNCOMPRESSED)]
        uncompressed = next(t for t in done if t.user_attrs.get("preset") == st.UNCOMPRESSED)
        searched = [t for t in done if not t.user_attrs.get("preset") and st.feasible(t)]
        points = np.array([[t.values[0], t.values[1]] for t in searched]).reshape(-1, 2)
        on_front = [t for t, keep in zip(searched, query.non_dominated(points * [-1, 1])) if keep]
        search_dominated = _dominated(points, np.array([p.values for p in presets]))
        held_front = np.array([[top1(t.user_attrs["plan"]), t.values[1]] for t in on_front]).reshape(-1, 2)
        held_presets = np.array([[top1(p.user_attrs["plan"]), p.values[1]] for p in presets])
        rows.append({
            "study": path.stem, "presets": len(presets), "front": len(on_front),
            "presets_dominated_search_images": search_dominated,
            "presets_dominated_held_out": _dominated(held_front, held_presets),
            "uncompressed_top1_held_out": top1(uncompressed.user_attrs["plan"]),
            "presets_held_out": {p.user_attrs["preset"]: {"top1": h[0], "top1_search": p.values[0], "gflops": h[1]}
                                 for p, h in zip(presets, held_presets)},
            "front_held_out": [{"trial": t.number, "plan": query.plan_label(t.user_attrs["plan"]), "top1": h[0],
                                "top1_search": t.values[0], "gflops": h[1]} for t, h in zip(on_front, held_front)],
        })
        r = rows[-1]
        print(f"{path.stem}: presets dominated {r['presets_dominated_search_images']}/{r['presets']} on the "
              f"{args.images} search images, {r['presets_dominated_held_out']}/{r['presets']} on the "
              f"{held_out} held-out ones (front of {r['front']}; {len(measured)} plans measured)", flush=True)
    out = RESULTS / "front_holdout.json"
    out.write_text(json.dumps({"command": f"python bench/front_holdout.py --held-out {args.held_out}",
                               "studies": args.studies,
                               "search_images": args.images, "held_out_images": held_out,
                               "environment": environment(), "runs": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
