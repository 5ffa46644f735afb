"""Successive halving against single fidelity, at equal wall-clock, judged on held-out images.

    python bench/multifidelity.py                     # 5 seeds x 10 min each way on the default model
    python bench/multifidelity.py --minutes 3 --seeds 2 --out multifidelity_3min

Each seed runs two searches of the same ``--minutes`` (``paretoken search``, stopped with Ctrl-C, as
a user would): single fidelity on ``--images`` evaluation images, and successive halving from
``--min-images`` to ``--images`` with ``--eta`` and ``--promotion``. Both measure speed (``speedup``) as the main job
does; halving only at the full rung. It then counts the plans screened (COMPLETE trials at any
rung) and the full-fidelity trials, and re-measures each study's full-fidelity front and presets
on the ``--held-out`` test images after the search's (``paretoken holdout``'s machinery):
hypervolume and presets dominated there. Targets (issue 30): at least 3x the plans screened,
held-out hypervolume at least single fidelity's in every seed, every preset dominated held out
in at least 4 of 5 seeds. Beside the held-out hypervolumes it reports a 95 % interval of their
difference (halving minus single fidelity), a paired bootstrap over the held-out images: both arms'
re-measured plans re-scored on the same resamples. Studies ``<out>-sf-s<seed>`` and ``<out>-sh-s<seed>`` in
bench/results/multifidelity/, figures in bench/results/<out>.json. ``--side-by-side`` runs a seed's
two searches at the same time, one CPU thread each (``OMP_NUM_THREADS=1``), so that any other load on
the machine falls on both alike and the bench takes half the time. ``--held-out-only`` runs no search:
it re-measures the studies an earlier run of the same ``--out`` left, into
bench/results/<out>_held_out_<held-out images>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from paretoken.evaluators.evaluate import environment
from paretoken.results import holdout, query
from paretoken.search import record
from paretoken.search.halving import PROMOTIONS
from paretoken.search.record import UNCOMPRESSED

RESULTS = Path(__file__).parent / "results"
TEST_IMAGES = 10_000  # Fashion-MNIST test split


def _start(name: str, storage: str, args: argparse.Namespace, seed: int, halving: bool, threads: int | None):
    """Start one search (``threads``: CPU threads of its torch, None for torch's default); returns the process."""
    cmd = [sys.executable, "-m", "paretoken.cli", "search", "--study", name, "--storage", storage,
           "--trials", "100000", "--images", str(args.images), "--seed", str(seed),
           "--max-top1-drop", str(args.max_top1_drop), "--model", args.model, "--device", "cpu"]
    if halving:
        cmd += ["--min-images", str(args.min_images), "--eta", str(args.eta), "--promotion", args.promotion]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    log = open(RESULTS / "multifidelity" / f"{name}.log", "w")
    # Ctrl-C as from a terminal, also where this runs as a background job (SIGINT ignored, and a search
    # started so keeps ignoring it)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _run_for(procs: list, seconds: float) -> float:
    """Let ``procs`` run for ``seconds`` of wall-clock, then Ctrl-C them; returns the seconds they ran."""
    start = time.monotonic()
    for proc in procs:
        try:
            proc.wait(max(seconds - (time.monotonic() - start), 0))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        proc.wait(300)
    return time.monotonic() - start


def _figures(name: str, storage: str) -> tuple[dict, pd.DataFrame]:
    """Plans screened and full-fidelity trials of a study, and its rows worth re-measuring held out."""
    study = optuna.load_study(study_name=name, storage=storage)
    full = record.full_images(record.settings_of(study.user_attrs))
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    at_full = [t for t in done if record.is_full_fidelity(t.user_attrs, full)]
    df = query.load(name, storage)
    return {"study": name, "plans_screened": len(done), "full_fidelity_trials": len(at_full)}, \
        holdout.candidates(df).assign(study=name)


def _held_out_hypervolume(table: pd.DataFrame, max_top1_drop: float, images: np.ndarray | None = None) -> float:
    """Hypervolume of one study's re-measured rows (:func:`holdout.remeasure`) in (top1, gflops), against
    the uncompressed model's held-out top1 minus ``max_top1_drop`` and its GFLOPs; ``images``: indices
    into the held-out images to score on (a resample, repeats allowed), all of them when None."""
    if images is not None:
        table = table.assign(top1=[100.0 * correct[images].mean() for correct in table["correct"]])
    base = table.loc[table["preset"] == UNCOMPRESSED].iloc[0]
    reference = {"top1": float(base["top1"]) - max_top1_drop, "gflops": float(base["gflops"])}
    return query.hypervolume(table, ("top1", "gflops"), reference)


def _difference_interval(halving: pd.DataFrame, single: pd.DataFrame, max_top1_drop: float,
                         resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of held-out hypervolume, halving minus single fidelity: both
    studies' re-measured rows scored on the same resamples of the held-out images (paired)."""
    rng = np.random.default_rng(seed)
    n = len(halving["correct"].iloc[0])
    differences = []
    for _ in range(resamples):
        images = rng.integers(0, n, n)
        differences.append(_held_out_hypervolume(halving, max_top1_drop, images)
                           - _held_out_hypervolume(single, max_top1_drop, images))
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock of each search [10]")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=2000, help="full-fidelity evaluation images [2000]")
    parser.add_argument("--min-images", type=int, default=125, help="successive halving's first rung [125]")
    parser.add_argument("--eta", type=int, default=4)
    parser.add_argument("--promotion", choices=PROMOTIONS, default=PROMOTIONS[0],
                        help=f"successive halving's promotion rule [{PROMOTIONS[0]}]")
    parser.add_argument("--held-out", type=int, default=2000, help="test images after the search's [2000]")
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-top1-drop", type=float, default=10.0)
    parser.add_argument("--side-by-side", action="store_true",
                        help="run a seed's two searches at the same time, one CPU thread each")
    parser.add_argument("--out", default="multifidelity")
    parser.add_argument("--held-out-only", action="store_true",
                        help="run no search: re-measure the studies an earlier run of --out left")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (RESULTS / "multifidelity").mkdir(parents=True, exist_ok=True)

    seeds = range(args.first_seed, args.first_seed + args.seeds)
    paths = {(seed, halving): RESULTS / "multifidelity" / f"{args.out}-{'sh' if halving else 'sf'}-s{seed}.db"
             for seed in seeds for halving in (False, True)}
    existing = [str(path) for path in paths.values() if path.exists()]
    missing = [str(path) for path in paths.values() if not path.exists()]
    if args.held_out_only and missing:
        parser.error(f"--held-out-only: {', '.join(missing)} do not exist; valid: the --out of an earlier run")
    if existing and not args.held_out_only:  # a search of that name would resume it; checked before any seed runs
        parser.error(f"--out: {', '.join(existing)} exist; remove them or choose another --out")

    runs, tables = [], []
    for seed in seeds:
        arms = [(paths[seed, halving].stem, f"sqlite:///{paths[seed, halving]}", halving) for halving in (False, True)]
        if args.held_out_only:
            seconds = [None, None]
        elif args.side_by_side:  # both at once, a thread each: whatever else loads the machine loads both
            procs = [_start(name, storage, args, seed, halving, 1) for name, storage, halving in arms]
            seconds = [_run_for(procs, 60 * args.minutes)] * 2
        else:
            seconds = [_run_for([_start(name, storage, args, seed, halving, None)], 60 * args.minutes)
                       for name, storage, halving in arms]
        for (name, storage, halving), ran in zip(arms, seconds):
            figures, table = _figures(name, storage)
            runs.append({"seed": seed, "halving": halving, "seconds": ran, **figures})
            tables.append(table)
            print(f"{name}: {'' if ran is None else f'{ran:.0f} s, '}{figures['plans_screened']} plans screened, "
                  f"{figures['full_fidelity_trials']} at full fidelity", flush=True)

    settings = query.load(runs[0]["study"], f"sqlite:///{RESULTS / 'multifidelity' / runs[0]['study']}.db"
                          ).attrs["user_attrs"]["paretoken"]
    config = holdout.held_out_config(settings, min(args.held_out, TEST_IMAGES - args.images), batch_size=250)
    held = holdout.remeasure(pd.concat(tables), config, log=lambda line: print(line, flush=True))
    for run in runs:
        table = held[held["study"] == run["study"]]
        figures = holdout.summary(table)
        run.update({"presets": len(figures["presets"]),
                    "presets_dominated_held_out": len(figures["presets_dominated_held_out"]),
                    "presets_not_dominated_held_out": sorted(set(figures["presets"])
                                                             - set(figures["presets_dominated_held_out"])),
                    "hypervolume_held_out": _held_out_hypervolume(table, args.max_top1_drop)})
        print(f"{run['study']}: held-out HV {run['hypervolume_held_out']:.4f}, presets dominated held out "
              f"{run['presets_dominated_held_out']}/{run['presets']}", flush=True)
    by_seed = {}
    for run in runs:
        by_seed.setdefault(run["seed"], {})["sh" if run["halving"] else "sf"] = run
    for seed, arms in by_seed.items():
        low, high = _difference_interval(*(held[held["study"] == arms[arm]["study"]] for arm in ("sh", "sf")),
                                         args.max_top1_drop, seed=seed)
        arms["sh"]["hypervolume_difference_95"] = [low, high]
        print(f"seed {seed}: held-out HV halving - single {arms['sh']['hypervolume_held_out'] - arms['sf']['hypervolume_held_out']:+.4f}"
              f", 95 % interval [{low:+.4f}, {high:+.4f}]", flush=True)
    verdict = {
        "screened_ratio": [s["sh"]["plans_screened"] / max(s["sf"]["plans_screened"], 1) for s in by_seed.values()],
        "hv_at_least_single_fidelity": [s["sh"]["hypervolume_held_out"] >= s["sf"]["hypervolume_held_out"]
                                        for s in by_seed.values()],
        "hv_not_below_single_fidelity_beyond_noise": [s["sh"]["hypervolume_difference_95"][1] >= 0
                                                      for s in by_seed.values()],
        "seeds_every_preset_dominated_held_out": sum(
            s["sh"]["presets_dominated_held_out"] == s["sh"]["presets"] for s in by_seed.values()),
    }
    print(json.dumps(verdict))
    out = RESULTS / (f"{args.out}_held_out_{config.images}.json" if args.held_out_only else f"{args.out}.json")
    out.write_text(json.dumps({"command": "python bench/multifidelity.py " + " ".join(sys.argv[1:]),
                               "held_out_images": config.images, "environment": environment(),
                               "runs": runs, "verdict": verdict}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
