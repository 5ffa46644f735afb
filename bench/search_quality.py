"""Search quality on the default model: hypervolume after N trials per sampler and seed, beside the presets alone.

    python bench/search_quality.py                       # 60 trials x {tpe, nsga2, gp, random} x 3 seeds
    python bench/search_quality.py --trials 30 --seeds 1 --images 200   # a quicker look
    python bench/search_quality.py --samplers tpe --seeds 2 --first-seed 4 --out search_quality_tpe_seeds45
    python bench/search_quality.py --samplers tpe --seeds 5 --ops prune,prune_fuse,merge,joint,threshold \
        --out search_quality_tpe_5ops   # mixed without the ops that joined later

Every study starts with the uncompressed model and the presets its space can express (the
``mixed`` space: 8 presets), so "presets alone" is the hypervolume of those first trials, and the
target is a searched front that dominates every preset point. Reference point (fixed): top1 of the
uncompressed model minus 10 points, its full GFLOPs; the same floor is the search's budget
(``--max-top1-drop 10``, an Optuna constraint: what a user who accepts at most a 10-point loss
passes), so the samplers learn to spend no trials below the reference. Studies go to
bench/results/search_quality/ (SQLite, one per run, resumable); figures and numbers to
bench/results/search_quality.{json,png} (``--out NAME``: NAME.{json,png}). ``--no-budget`` searches
without the budget (for comparison).

Beside the strict count, each run reports the presets that a searched plan matches within one
evaluation image (100/images top-1 points, no GFLOPs slack): on 500 images, a plan one image
short of a preset at fewer GFLOPs is not dominating it, though the measurement cannot tell them apart.
And the presets dominated by a searched plan that is not a preset made prefix-only (a preset's
stages with ``prefix_only_last``, which dominates that preset by construction: the same top-1,
fewer GFLOPs); any preset's such form is left out, not only the dominated preset's own.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from paretoken.compress.plan import plan_as_run
from paretoken.compress.presets import PRESETS
from paretoken.evaluators.evaluate import EvalConfig, environment
from paretoken.evaluators.metrics import Budgets
from paretoken.results import query
from paretoken.search import pareto, run_search
from paretoken.spaces import get_space
from paretoken.spaces.families import MixedSpace

RESULTS = Path(__file__).parent / "results"


def _beaten_presets(df: pd.DataFrame, objectives, images: int, depth: int) -> tuple[int, int, int]:
    """(presets a searched plan of ``df`` dominates, presets one is no worse than within one evaluation
    image, presets dominated by a plan that is not a preset made prefix-only) on a ``depth``-block
    model: one image is 100/images top-1 points (the resolution of the measurement); GFLOPs get no slack."""
    one_image = {"top1": 100.0 / images + 1e-4}  # + float32 rounding
    made_short = {plan_as_run({**p.plan.to_dict(), "prefix_only_last": True}, depth) for p in PRESETS.values()}

    def preset_made_short(plan) -> bool:
        return isinstance(plan, Mapping) and bool(plan.get("prefix_only_last")) and (
            plan_as_run(plan, depth) in made_short)

    return (len(query.presets_dominated(df, objectives)),
            len(query.presets_dominated(df, objectives, slack=one_image)),
            len(query.presets_dominated(df[~df["plan"].map(preset_made_short)], objectives)))


def _trials_to_dominate_all(df: pd.DataFrame, objectives) -> int | None:
    """The fewest trials (in trial-number order, the presets first) after which a searched plan
    dominates every preset, or None when the whole study never gets there. Counts COMPLETE trials,
    as the run's ``trials`` and the curves do."""
    df = df[df["state"] == "COMPLETE"].sort_values("number")
    wanted = len(query.preset_names(df))
    for k in range(1, len(df) + 1 if wanted else 0):
        if len(query.presets_dominated(df.iloc[:k], objectives)) == wanted:
            return k
    return None


def _after(trials: int | None) -> str:
    return "never all" if trials is None else f"all after {trials} trials"


def _search_seconds(study) -> float:
    """Wall seconds from the first trial's start to the last one's end (also right for a resumed study)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST .. FIRST+SEEDS-1 [0]")
    parser.add_argument("--samplers", default="tpe,nsga2,gp,random")
    parser.add_argument("--space", default="mixed")
    parser.add_argument("--ops", help="mixed only: the ops an overriding block chooses among, comma-separated "
                                      "[every op registered for mixed]")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--flops-images", type=int, default=16, help="images averaged for per-image plans' GFLOPs")
    parser.add_argument("--model", default="default")
    parser.add_argument("--checkpoint")
    parser.add_argument("--max-top1-drop", type=float, default=10.0,
                        help="budget: top-1 points lost against the uncompressed model at most "
                             "(the hypervolume's reference point is at 10)")
    parser.add_argument("--no-budget", action="store_true", help="search without the --max-top1-drop budget")
    parser.add_argument("--out", default="search_quality",
                        help="name of the figures in bench/results/: NAME.json, NAME.png [search_quality]")
    args = parser.parse_args()

    objectives = ("top1", "gflops")
    config = EvalConfig(model=args.model, checkpoint=args.checkpoint, images=args.images,
                        batch_size=min(100, args.images), speed=False,
                        flops_images=args.flops_images)
    max_top1_drop = None if args.no_budget else args.max_top1_drop
    studies = RESULTS / "search_quality"
    space = MixedSpace(ops=args.ops.split(",")) if args.ops else get_space(args.space)
    ops_tag = f"-ops{len(space.ops)}" if isinstance(space, MixedSpace) else ""  # mixed's choices grew with the registry
    rows = []
    tables: dict[str, list[pd.DataFrame]] = {s: [] for s in args.samplers.split(",")}
    for sampler in args.samplers.split(","):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            name = f"{args.space}-{sampler}-s{seed}-n{args.trials}-i{args.images}" + (
                "" if args.no_budget else f"-d{args.max_top1_drop:g}") + ops_tag
            result = run_search(name, storage=f"sqlite:///{studies / name}.db", space=space,
                                objectives=objectives, sampler=sampler, n_trials=args.trials, eval_config=config,
                                budgets=Budgets(max_top1_drop=max_top1_drop), seed=seed, log=lambda line: None)
            study = result.study
            done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
            preset_trials = [t for t in done if t.user_attrs.get("preset")]
            hv_presets = pareto.hypervolume(preset_trials, objectives, result.reference)
            table = query.trials_frame(study)
            tables[sampler].append(table)
            depth = study.user_attrs["paretoken"]["depth"]
            dominated, within, beyond = _beaten_presets(table, objectives, args.images, depth)
            n_presets = len(query.preset_names(table))
            history = []
            for k in range(1, len(done) + 1):
                history.append(pareto.hypervolume(done[:k], objectives, result.reference))
            rows.append({"sampler": sampler, "seed": seed, "trials": len(done), "failed": result.counts.failed,
                         "hypervolume": result.hypervolume, "hypervolume_presets": hv_presets,
                         "presets_dominated": dominated, "presets_within_one_image": within,
                         "presets_dominated_not_by_a_preset_made_prefix_only": beyond, "presets": n_presets,
                         "trials_to_dominate_all": _trials_to_dominate_all(table, objectives),
                         "reference": result.reference,
                         "seconds": _search_seconds(study), "history": history})
            print(f"{sampler:7s} seed {seed}: HV {result.hypervolume:.4f} (presets alone {hv_presets:.4f}); "
                  f"{dominated}/{n_presets} presets dominated ({within} within one image, {beyond} by other than a "
                  f"preset made prefix-only; "
                  f"{_after(rows[-1]['trials_to_dominate_all'])}); {len(done)} trials in "
                  f"{rows[-1]['seconds']:.0f} s", flush=True)

    summary = {}
    for sampler in args.samplers.split(","):
        hvs = [r["hypervolume"] for r in rows if r["sampler"] == sampler]
        summary[sampler] = {"mean": statistics.fmean(hvs), "std": statistics.pstdev(hvs) if len(hvs) > 1 else 0.0,
                            "presets_alone": statistics.fmean(r["hypervolume_presets"] for r in rows
                                                              if r["sampler"] == sampler),
                            "all_presets_dominated": all(r["presets_dominated"] == r["presets"] for r in rows
                                                         if r["sampler"] == sampler),
                            "all_presets_within_one_image": all(r["presets_within_one_image"] == r["presets"]
                                                                for r in rows if r["sampler"] == sampler),
                            "all_presets_dominated_not_by_a_preset_made_prefix_only": all(
                                r["presets_dominated_not_by_a_preset_made_prefix_only"] == r["presets"]
                                for r in rows if r["sampler"] == sampler),
                            "trials_to_dominate_all": [r["trials_to_dominate_all"] for r in rows
                                                       if r["sampler"] == sampler],
                            # every seed measures the same presets on the same images
                            "presets_dominated_by_union_of_seeds": _beaten_presets(
                                pd.concat(tables[sampler]), objectives, args.images, depth)[0]}
        s = summary[sampler]
        print(f"{sampler:7s} HV {s['mean']:.4f} ± {s['std']:.4f} vs presets alone {s['presets_alone']:.4f}; "
              f"every preset dominated in every seed: {s['all_presets_dominated']} "
              f"(within one image: {s['all_presets_within_one_image']}; not by a preset made prefix-only: "
              f"{s['all_presets_dominated_not_by_a_preset_made_prefix_only']}); by the union of the seeds' searches: "
              f"{s['presets_dominated_by_union_of_seeds']} of {n_presets}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.out}.json"
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
             if v is not None and v is not False and (k, v) not in (("out", "search_quality"), ("first_seed", 0))]
    out.write_text(json.dumps({"command": "python bench/search_quality.py " + " ".join(flags),
        "objectives": objectives, "space": args.space, "ops": list(getattr(space, "ops", ())), "images": args.images,
        "max_top1_drop": max_top1_drop,
        "environment": environment(),
        "summary": summary, "runs": rows}, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v)
        else str(v)) + "\n")
    print(f"saved {out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for sampler in args.samplers.split(","):
        runs = [r["history"] for r in rows if r["sampler"] == sampler]
        length = min(len(h) for h in runs)
        mean = np.mean([h[:length] for h in runs], axis=0)
        ax.plot(range(1, length + 1), mean, label=sampler)
    presets_hv = statistics.fmean(r["hypervolume_presets"] for r in rows)
    ax.axhline(presets_hv, color="black", linestyle="--", label="presets alone")
    ax.set_xlabel("trials (presets first)")
    ax.set_ylabel("hypervolume (top1 %, GFLOPs)")
    ax.set_title(f"{args.space} space, default model, {args.images} images, mean of {args.seeds} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"saved {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
