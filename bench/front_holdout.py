"""Do the searched fronts hold on test images the search never saw?

    python bench/front_holdout.py        # the 12 studies of `python bench/search_quality.py --flops-images 4`
    python bench/front_holdout.py --held-out 9500   # every other test image (about 4x slower)

bench/search_quality.py measures every plan on the first 500 images of the seeded Fashion-MNIST test
order and asks whether a searched plan dominates each preset there, where one image is 0.2 top-1
points. This re-measures, for each of its studies, the presets and the searched plans on the
study's front on the next ``--held-out`` test images of the same order, disjoint from the
search's (:mod:`paretoken.results.holdout`, what ``paretoken holdout`` does for one study), and
counts again the presets that a searched plan dominates. It also pits each preset against the
searched plan its study would pick for it (the most top-1 on the search's images at no more GFLOPs,
:func:`~paretoken.results.holdout.preset_challenges`) and says whether the held-out difference is
beyond the noise (paired 95 % interval). GFLOPs are the study's own (plans that keep a per-image
token count were counted on the search's first images). Each distinct plan is measured once over
all the studies; figures go to bench/results/front_holdout.json (``--out NAME``: NAME.json).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
import pandas as pd

from paretoken.evaluators.evaluate import environment
from paretoken.jsonvalues import json_ready
from paretoken.results import holdout, query
from paretoken.search.record import UNCOMPRESSED

RESULTS = Path(__file__).parent / "results"
TEST_IMAGES = 10_000  # Fashion-MNIST test split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default="mixed-*-n60-i500-d10",
                        help="glob of study names in bench/results/search_quality/ [mixed-*-n60-i500-d10]")
    parser.add_argument("--held-out", type=int, default=2500, help="test images after the search's to measure on [2500]")
    parser.add_argument("--out", default="front_holdout", help="results file name under bench/results/ [front_holdout]")
    args = parser.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tables = []
    for path in sorted((RESULTS / "search_quality").glob(f"{args.studies}.db")):
        df = query.load(path.stem, f"sqlite:///{path}")
        tables.append(holdout.candidates(df).assign(study=path.stem))
    settings = df.attrs["user_attrs"]["paretoken"]  # every study of the bench measures the same images
    images = settings["measurement"]["images"]
    config = holdout.held_out_config(settings, min(args.held_out, TEST_IMAGES - images), batch_size=250)
    held = holdout.remeasure(pd.concat(tables), config, log=lambda line: print(line, flush=True))

    rows = []
    for name, table in held.groupby("study", sort=True):
        figures = holdout.summary(table)
        challenges = holdout.preset_challenges(table)
        presets = table[table["preset"].isin(figures["presets"])]
        searched = table[table["preset"].isna()]
        base = table.loc[table["preset"] == UNCOMPRESSED].iloc[0]
        reference = {"top1": float(base["top1"]) - 10.0, "gflops": float(base["gflops"])}  # the search's convention
        rows.append({
            "study": name, "presets": len(presets), "front": len(searched),
            "presets_dominated_search_images": len(figures["presets_dominated_search"]),
            "presets_dominated_held_out": len(figures["presets_dominated_held_out"]),
            "uncompressed_top1_held_out": float(base["top1"]),
            "hypervolume_held_out": query.hypervolume(table, ("top1", "gflops"), reference),
            "hypervolume_presets_held_out": query.hypervolume(presets, ("top1", "gflops"), reference),
            "presets_held_out": {p.preset: {"top1": p.top1, "top1_search": p.top1_search, "gflops": p.gflops}
                                 for p in presets.itertuples()},
            "front_held_out": [{"trial": t.number, "plan": t.plan_str, "top1": t.top1, "top1_search": t.top1_search,
                                "gflops": t.gflops} for t in searched.itertuples()],
            "verdicts": challenges["verdict"].value_counts().to_dict(),
            "challenges": json_ready(challenges.to_dict("records")),
        })
        r = rows[-1]
        print(f"{name}: held-out HV {r['hypervolume_held_out']:.4f} (presets {r['hypervolume_presets_held_out']:.4f}); "
              f"presets dominated {r['presets_dominated_search_images']}/{r['presets']} on the "
              f"{images} search images, {r['presets_dominated_held_out']}/{r['presets']} on the "
              f"{config.images} held-out ones (front of {r['front']}); against its challenger: "
              + ", ".join(f"{c.preset} {c.delta_held_out:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}]"
                          for c in challenges.itertuples() if c.challenger is not None), flush=True)
    out = RESULTS / f"{args.out}.json"
    out.write_text(json.dumps({"command": f"python bench/front_holdout.py --studies '{args.studies}' --held-out {args.held_out} --out {args.out}",
                               "studies": args.studies,
                               "search_images": images, "held_out_images": config.images,
                               "environment": environment(), "runs": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
