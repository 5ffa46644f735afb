"""`paretoken front`, `holdout`, `export` and `finetune`: what users do with a study once it is searched.

Registered on the main parser by :func:`paretoken.cli.build_parser`. Importing this module is cheap;
the handlers import pandas, Optuna and torch when they run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from paretoken import argtypes
from paretoken.cli import flags
from paretoken.cli.flags import (add_batch_size_flag, add_budget_flags, add_device_flag, add_json_flag,
                                 add_model_flags, add_objectives_flag, add_plot_flag, add_study_flags)
from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import BOUNDS, HEADLINE, Budgets, format_metric
from paretoken.jsonvalues import json_ready
from paretoken.outputs import PLAN_SUFFIXES, PLOT_SUFFIXES, check_output
from paretoken.search.storage import redact, study_storage

if TYPE_CHECKING:
    import pandas as pd


TABLE_COLUMNS = ("number", "preset", "top1", "agreement", "kl", "gflops", "img_per_s", "speedup", "latency_ms",
                 "plan_str")


def _plain(value):
    """A table cell as JSON has it: numpy scalars as Python numbers, times as ISO strings, what is not
    a finite number as null."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return json_ready(value)


def _records(df, columns) -> list[dict]:
    return [{c: _plain(row[c]) for c in columns if c in df.columns} for _, row in df.iterrows()]


def _write_csv(df: pd.DataFrame, path: str) -> None:
    """``df`` as CSV at ``path`` (checked by :func:`check_output` before the work; its folders made)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)


def _table(df, columns) -> str:
    shown = [c for c in columns if c in df.columns and not (df[c].dtype == float and df[c].isna().all())]
    cells = [[format_metric(c, row[c]) for c in shown] for _, row in df.iterrows()]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(shown)]
    left = ("plan_str", "best_plan", "study", "verdict")
    lines = ["  ".join(c.ljust(w) if c in left else c.rjust(w) for c, w in zip(shown, widths)).rstrip()]
    for r in cells:
        lines.append("  ".join(v.ljust(w) if c in left else v.rjust(w) for c, v, w in zip(shown, r, widths)).rstrip())
    return "\n".join(lines)


def cmd_front(args: argparse.Namespace) -> int:
    from paretoken.results import query

    args.objectives = query._check_objectives(args.objectives)
    if len(args.study) > 1 and (args.plot or args.history):
        raise ParetokenError("plot: --plot and --history draw one study; valid: one --study (several compare in a "
                             "table, --csv for a file)")
    if args.plot and args.history and Path(args.plot).resolve() == Path(args.history).resolve():
        raise ParetokenError(f"history: {args.history!r} is the --plot file too; valid: another file")
    storages = [study_storage(name, args.storage) for name in args.study]
    for flag, path, suffixes in (("plot", args.plot, PLOT_SUFFIXES), ("history", args.history, PLOT_SUFFIXES),
                                 ("csv", args.csv, (".csv",))):  # before any output is written
        for storage in storages if path else ():
            check_output(flag, path, suffixes, storage)
    budgets = flags.budgets(args)
    if len(args.study) > 1:
        return _compare(args)
    df = query.load(args.study[0], args.storage)
    fr = query.front(df, args.objectives, budgets)
    reference = query.reference_point(df, args.objectives) if len(query.budget(df, feasible_only=False)) else None
    within = query.budget(df, budgets)
    hv = query.hypervolume(within, args.objectives, reference) if reference else math.nan
    if args.plot:
        from paretoken.results.plots import plot_front

        plot_front(df, args.objectives, args.plot, budgets)
    if args.history:
        from paretoken.results.plots import plot_hypervolume_history

        plot_hypervolume_history(df, args.objectives, args.history, reference)
    if args.csv:
        out = fr.drop(columns=["values"]).copy()
        out["plan"] = out["plan"].map(json.dumps)
        out["versions"] = out["versions"].map(lambda v: json.dumps(v) if v is not None else "")
        _write_csv(out, args.csv)
    states = df["state"].where(~df["interrupted"], "INTERRUPTED") if "interrupted" in df else df["state"]
    counts = states.value_counts().to_dict()
    settings = df.attrs.get("user_attrs", {}).get("paretoken") or {}
    study_budgets = Budgets(**{k: settings.get(k) for k in BOUNDS})
    stopped = int(((df["state"] == "COMPLETE") & ~df["full_fidelity"]).sum())
    if args.json:
        columns = ["number", "state", "preset", "plan", "plan_str", *query.METRICS,
                   *[c for c in df.columns if c.startswith("constraint:")], "feasible", "device", "duration_s"]
        print(json.dumps({"study": args.study[0], "storage": redact(df.attrs["storage"]),
                          "objectives": list(args.objectives),
                          "budgets": budgets.as_dict(),
                          "study_budgets": {k: v for k, v in study_budgets.as_dict().items() if v is not None},
                          "trials": {k: int(v) for k, v in counts.items()},
                          "reference": reference, "hypervolume": _plain(hv),
                          "front": _records(fr, columns)}, allow_nan=False))
        return 0
    print(f"study {args.study[0]} ({redact(df.attrs['storage'])}): {len(df)} trials, "
          + ", ".join(f"{v} {k.lower()}" for k, v in counts.items())
          + (f"; searched with {settings['space']} space" if settings.get("space") else "")
          + (f"; study budgets {study_budgets} (infeasible trials leave the front)" if str(study_budgets) else "")
          + (f"; {stopped} stopped by successive halving below the full rung (not on the front)" if stopped else ""))
    print(f"front on {', '.join(args.objectives)}" + (f" within {budgets}" if str(budgets) else "")
          + f": {len(fr)} trials" + (f"; hypervolume {hv:.4g} (reference "
                                     + ", ".join(f"{k} {v:.4g}" for k, v in reference.items()) + ")"
                                     if reference else ""))
    if len(fr):
        print(_table(fr, TABLE_COLUMNS))
    for what, path in (("csv", args.csv), ("plot", args.plot), ("hypervolume history", args.history)):
        if path:
            print(f"{what} written to {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from paretoken.results import query

    table = query.compare([(name, args.storage) for name in args.study], args.objectives, flags.budgets(args))
    if args.csv:
        _write_csv(table, args.csv)
    if args.json:
        print(json.dumps({"reference": table.attrs["reference"], "studies": _records(table, table.columns)},
                         allow_nan=False))
        return 0
    print("reference " + ", ".join(f"{k} {v:.4g}" for k, v in table.attrs["reference"].items()))
    print(_table(table, ("study", "trials", "complete", "failed", "interrupted", "front_size", "best_top1",
                         "best_gflops", "best_trial", "hypervolume", "best_plan")))
    return 0


def _challenge_cells(challenges: pd.DataFrame) -> pd.DataFrame:
    """:func:`paretoken.results.holdout.preset_challenges` with signed differences and the interval as text."""
    def signed(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:+.2f}"

    return challenges.assign(
        delta_search=challenges["delta_search"].map(signed), delta_held_out=challenges["delta_held_out"].map(signed),
        ci_95=[("-" if math.isnan(low) else f"[{signed(low)}, {signed(high)}]")
               for low, high in zip(challenges["ci_low"], challenges["ci_high"])])


def cmd_holdout(args: argparse.Namespace) -> int:
    from paretoken.evaluators.evaluate import device_name
    from paretoken.results import holdout, query

    objectives = query._check_objectives(args.objectives)
    df = query.load(args.study, args.storage)
    config = holdout.held_out_config(df.attrs["user_attrs"].get("paretoken"), args.images, device_name(args.device),
                                     args.batch_size)
    if args.plot:  # before minutes of evaluation, not after
        check_output("plot", args.plot, PLOT_SUFFIXES, study_storage(args.study, args.storage))
    rows = holdout.candidates(df, objectives)
    if rows.empty:
        raise ParetokenError(f"study: {args.study!r} has no COMPLETE trial to re-measure")
    query.reference_point(df, objectives)  # an objective the study never measured: one line, before measuring
    if not args.json:
        print(f"study {args.study}: re-measuring {rows['plan'].map(json.dumps).nunique()} plans (the searched front, "
              f"the presets, the uncompressed model) on {config.images} test images after the search's "
              f"{config.skip}", flush=True)
    held = holdout.remeasure(rows, config, log=None if args.json else lambda line: print(line, flush=True))
    figures = holdout.summary(held, objectives)
    challenges = holdout.preset_challenges(held)
    if args.plot:
        from paretoken.results.plots import plot_front

        plot_front(held, objectives, args.plot, title=f"study {args.study}: front and presets on {config.images} "
                                                       f"held-out test images")
    if args.json:
        columns = ["number", "preset", "plan", "plan_str", *[c for m in holdout.HELD_OUT_METRICS
                                                             for c in (m, f"{m}_search")], "gflops"]
        print(json.dumps({"study": args.study, "objectives": list(objectives), "held_out": held.attrs["held_out"],
                          **figures, "trials": _records(held, columns),
                          "challenges": _records(challenges, challenges.columns)}, allow_nan=False))
        return 0
    marks = {n: "search" for n in figures["front_search"]}
    for n in figures["front_held_out"]:
        marks[n] = "both" if n in marks else "held-out"
    shown = held.assign(front=held["number"].map(lambda n: marks.get(n, "-")), search_top1=held["top1_search"],
                        held_out_top1=held["top1"], held_out_agreement=held["agreement"])
    print(_table(shown, ("number", "preset", "search_top1", "held_out_top1", "held_out_agreement", "gflops", "front",
                         "plan_str")))
    n = len(figures["presets"])
    left = [name for name in figures["presets"] if name not in figures["presets_dominated_held_out"]]
    print(f"presets dominated by a searched plan: {len(figures['presets_dominated_search'])} of {n} on the "
          f"search's images, {len(figures['presets_dominated_held_out'])} of {n} on the held-out ones"
          + (f" (not there: {', '.join(left)})" if left else ""))
    print(f"\neach preset against the searched plan the search's images favour at no more GFLOPs, compared on "
          f"the {config.images} held-out images (paired; top-1 points, challenger minus preset):")
    print(_table(_challenge_cells(challenges), ("preset", "gflops", "challenger", "challenger_gflops",
                                                "delta_search", "delta_held_out", "ci_95", "verdict")))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from paretoken.compress.plan import load_plan
    from paretoken.results.export import export

    check_output("out", args.out, PLAN_SUFFIXES, study_storage(args.study, args.storage))
    path = export(args.study, args.storage, trial=args.trial, best=args.best, budgets=flags.budgets(args), out=args.out,
                  cheapest=args.cheapest)
    meta = load_plan(path).meta
    metrics = meta["metrics"]
    shown = ", ".join(f"{k} {format_metric(k, float(metrics[k]))}" for k in HEADLINE if k in metrics)
    print(f"trial {meta['provenance']['trial']} of study {args.study}: {meta['plan_str']}\n"
          f"  {shown}\n  model {meta['model']}, weights {meta['checkpoint'] or meta['weights'].get('file') or 'timm'}"
          f"\nsaved {path}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from paretoken.evaluators.evaluate import device_name
    from paretoken.results.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                            data=args.data, epochs=args.epochs, train_images=args.train_images,
                            eval_images=args.eval_images, batch_size=args.batch_size, lr=args.lr,
                            alpha=args.alpha, temperature=args.temperature, seed=args.seed,
                            device=device_name(args.device), max_steps=args.max_steps,
                            learn_thresholds=not args.fixed_thresholds, budget=args.budget,
                            budget_weight=args.budget_weight, learned_lr=args.learned_lr)
    report = finetune(args.plan, config, out=args.out, log=None if args.json else sys.stdout)
    if args.json:
        print(json.dumps(json_ready(report), allow_nan=False))
    return 0


FRONT_BUDGETS = "only trials within the budgets count (on the study's own measurements)"


def add_results_parsers(sub) -> None:
    """Add `front`, `holdout`, `export` and `finetune` to the `paretoken` subcommands."""
    p = sub.add_parser("front", help="the Pareto front of a study (table, JSON, CSV, plot)",
                       description="Non-dominated COMPLETE trials of a study on the chosen objectives, within the "
                                   "budgets; with several --study, one comparison table.")
    add_study_flags(p, several=True)
    add_objectives_flag(p)
    add_budget_flags(p, FRONT_BUDGETS)
    out = p.add_mutually_exclusive_group()
    add_json_flag(out)
    out.add_argument("--csv", metavar="FILE", help="also write the front (or the comparison) as CSV")
    add_plot_flag(p)
    add_plot_flag(p, "the hypervolume after each trial", flag="--history")
    p.set_defaults(func=cmd_front)

    p = sub.add_parser("holdout", help="re-measure a study's front on test images the search never saw",
                       description="Evaluate the searched front, the presets and the uncompressed model again on "
                                   "the next test images of the search's seeded order (disjoint from its own), and "
                                   "show which plans stay on the front there. Top-1, agreement and KL are "
                                   "re-measured; GFLOPs and speed are the study's.")
    add_study_flags(p)
    p.add_argument("--images", type=argtypes.positive_int, default=2000, help="held-out test images [2000]")
    add_objectives_flag(p)
    add_device_flag(p)
    add_batch_size_flag(p)
    add_json_flag(p)
    add_plot_flag(p, "the front on the held-out images")
    p.set_defaults(func=cmd_holdout)

    p = sub.add_parser("export", help="write a trial's plan with model, weights, metrics and provenance",
                       description="Export a plan that `paretoken.load_plan` + `paretoken.apply` rebuild anywhere.")
    add_study_flags(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=argtypes.non_negative_int, metavar="N", help="trial number")
    which.add_argument("--best", action="store_true",
                       help="the best top-1 within --max-gflops / --min-top1 / --max-top1-drop")
    which.add_argument("--cheapest", action="store_true",
                       help="the fewest GFLOPs within --min-top1 / --max-top1-drop / --max-gflops")
    add_budget_flags(p, FRONT_BUDGETS)
    p.add_argument("--out", default="plan.yaml", metavar="FILE", help="plan file, .yaml or .json [plan.yaml]")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("finetune", help="fine-tune a compressed model by distillation from the uncompressed one",
                       description="Cross-entropy + KL distillation from the uncompressed model; threshold stages "
                                   "learn their thresholds under a token budget (AS-ViT), score: predictor stages "
                                   "train DynamicViT predictors. Writes a checkpoint and plan that "
                                   "`paretoken eval --checkpoint FILE --plan FILE.yaml` measures.")
    p.add_argument("--plan", required=True, metavar="FILE", help="plan file (an export works)")
    add_model_flags(p, defaults="plan")
    p.add_argument("--epochs", type=argtypes.positive, default=1.0, help="passes over the training images [1]")
    p.add_argument("--train-images", type=argtypes.positive_int, default=None, help="training images [all of the calib split]")
    p.add_argument("--eval-images", type=argtypes.positive_int, default=1000, help="images for the before/after top-1 [1000]")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=128,
                   help="images per optimiser step and per forward of the before/after top-1 [128]")
    p.add_argument("--lr", type=argtypes.positive, default=5e-5, help="AdamW learning rate, cosine schedule [5e-5]")
    p.add_argument("--alpha", type=argtypes.non_negative, default=0.5, help="weight of the KL term; (1-alpha) on CE [0.5]")
    p.add_argument("--temperature", type=argtypes.positive, default=1.0, help="distillation temperature [1]")
    p.add_argument("--fixed-thresholds", action="store_true",
                   help="keep threshold stages' thresholds as the plan gives them (default: learn them, AS-ViT)")
    p.add_argument("--budget", type=argtypes.positive, default=None, metavar="F",
                   help="fraction of patch tokens threshold stages keep on average, 0 < F <= 1 "
                        "[what the plan's thresholds keep before fine-tuning]")
    p.add_argument("--budget-weight", type=argtypes.non_negative, default=2.0,
                   help="weight of the token budget / predictor ratio loss [2]")
    p.add_argument("--learned-lr", type=argtypes.positive, default=1e-3,
                   help="learning rate of thresholds and DynamicViT predictors [1e-3]")
    p.add_argument("--max-steps", type=argtypes.positive_int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="[0]")
    p.add_argument("--out", default="finetuned.safetensors", metavar="FILE",
                   help="checkpoint to write (NAME.safetensors); the plan is written beside it as NAME.yaml")
    add_json_flag(p)
    p.set_defaults(func=cmd_finetune)
