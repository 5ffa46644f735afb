"""`paretoken search` and `paretoken spaces`: registered on the main parser by :mod:`paretoken.cli`.

Importing this module is cheap; the handlers import Optuna, torch and Ray when they run.
Each handler returns an exit code; bad input raises :class:`ParetokenError`.
"""
from __future__ import annotations

import argparse
import json

from paretoken import argtypes
from paretoken.cli import flags
from paretoken.cli.flags import (add_batch_size_flag, add_budget_flags, add_compile_flag, add_flops_flag, add_json_flag,
                                 add_model_flags, add_objectives_flag, add_plot_flag, add_study_flags)
from paretoken.outputs import PLOT_SUFFIXES, check_output
from paretoken.search.halving import PROMOTIONS
from paretoken.search.storage import MAX_HEARTBEAT_S, study_storage

SPACE_NAMES = ("tome", "evit", "dynamicvit", "asvit", "jmp", "slim", "mixed")  # kept in step with spaces.SPACES


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search", help="multi-objective search over plans (an Optuna study; resumable)",
        description="Search token-compression plans with an Optuna multi-objective study. Running the same "
                    "command again resumes the study: finished trials are kept, trials a killed run left "
                    "RUNNING are failed and re-run, and only the missing trials run.")
    add_study_flags(p)
    g = p.add_argument_group("what is measured")
    add_model_flags(g)
    g.add_argument("--images", type=argtypes.positive_int, default=500, help="evaluation images per trial [500]")
    add_batch_size_flag(g)
    g.add_argument("--min-images", type=argtypes.positive_int, default=None, metavar="M",
                   help="successive halving: measure each plan on the first M images, then promote the top "
                        "1/eta of each rung to eta times more, up to --images [off: every plan on --images]")
    g.add_argument("--eta", type=argtypes.int_in(2), default=None,
                   help="successive halving: each rung keeps the top 1/eta of its plans (needs --min-images) [4]")
    g.add_argument("--promotion", choices=PROMOTIONS, default=None,
                   help="successive halving: front: the top 1/eta of a rung and every plan no other there "
                        "dominates go on; top: the top 1/eta only, a front's plans ordered by crowding "
                        "distance (MO-ASHA) (needs --min-images) [front]")
    add_flops_flag(g)
    g.add_argument("--flops-images", type=argtypes.positive_int, default=16,
                   help="--flops trace: images whose GFLOPs are averaged for plans with per-image token counts [16]")
    g.add_argument("--no-speed", action="store_true",
                   help="skip throughput/latency timing (img_per_s, latency_ms, speedup are then not recorded)")
    add_compile_flag(g)
    g = p.add_argument_group("search")
    g.add_argument("--space", default="mixed", help=f"search space: {', '.join(SPACE_NAMES)} [mixed]")
    g.add_argument("--ops", metavar="OP,OP", help="mixed only: the ops an overriding block chooses among "
                                                   "[every op registered for mixed; `paretoken spaces` lists them]")
    add_objectives_flag(g)
    g.add_argument("--sampler", default="tpe", help="tpe, nsga2, gp or random [tpe]")
    g.add_argument("--trials", type=argtypes.non_negative_int, default=40,
                   help="target number of finished trials in the study (a resumed run runs the missing ones) [40]")
    g.add_argument("--seed", type=argtypes.seed, default=0, help="sampler seed [0]")
    g.add_argument("--no-presets", action="store_true",
                   help="do not enqueue the published schedules when the study is created")
    add_budget_flags(p, "a trial outside a budget stays in the study but is infeasible: it leaves the front, "
                        "and the sampler learns to avoid it")
    g = p.add_argument_group("backend")
    g.add_argument("--backend", default="local", choices=("local", "ray"), help="local (in process) or ray [local]")
    g.add_argument("--workers", type=argtypes.positive_int, default=None, help="concurrent Ray workers [ray: 2, local: 1]")
    g.add_argument("--ray-address", metavar="A", help="an existing Ray cluster (e.g. auto or ray://HOST:10001); "
                                                      "default: start a local Ray")
    g.add_argument("--cpus-per-trial", type=argtypes.positive, default=None, help="CPUs each Ray trial declares [1]")
    g.add_argument("--gpus-per-trial", type=argtypes.non_negative, default=None,
                   help="GPUs each Ray trial declares [1 when the device is CUDA, else 0]")
    g.add_argument("--heartbeat", type=argtypes.int_in(1, MAX_HEARTBEAT_S), default=10, metavar="S",
                   help="heartbeat of running trials, s; a trial silent for 3 heartbeats is re-run [10]")
    g = p.add_argument_group("output")
    add_plot_flag(g, "the front once the search is done")
    p.set_defaults(func=cmd_search)
    return p


def add_spaces_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("spaces", help="list the search spaces and their parameters")
    add_json_flag(p)
    p.add_argument("--presets", action="store_true", help="also show which published schedules each space expresses")
    p.set_defaults(func=cmd_spaces)
    return p


def cmd_search(args: argparse.Namespace) -> int:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation, raised on importing fvcore
        from paretoken.evaluators.evaluate import EvalConfig, device_name
        from paretoken.search import run_search

    workers = args.workers if args.workers is not None else (2 if args.backend == "ray" else 1)
    config = EvalConfig(model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, data=args.data,
                        images=args.images, batch_size=min(args.batch_size, args.images),
                        flops=args.flops, flops_images=min(args.flops_images, args.images),
                        device=device_name(args.device), speed=not args.no_speed, compile=args.compile)
    budgets = flags.budgets(args)
    if args.plot:  # before the search, not after
        check_output("plot", args.plot, PLOT_SUFFIXES, study_storage(args.study, args.storage))
    result = run_search(args.study, storage=args.storage, space=args.space, ops=args.ops, objectives=args.objectives,
                        sampler=args.sampler, n_trials=args.trials, backend=args.backend, workers=workers,
                        ray_address=args.ray_address, cpus_per_trial=args.cpus_per_trial,
                        gpus_per_trial=args.gpus_per_trial, budgets=budgets, eval_config=config, seed=args.seed,
                        presets=not args.no_presets, heartbeat_s=args.heartbeat, min_images=args.min_images,
                        eta=args.eta, promotion=args.promotion)
    if args.plot:
        from paretoken.results.plots import plot_front
        from paretoken.results.query import trials_frame

        path = plot_front(trials_frame(result.study), list(result.study.user_attrs.get("objectives")), args.plot,
                          budgets=budgets)
        print(f"front plot: {path}", flush=True)
    return 0


def cmd_spaces(args: argparse.Namespace) -> int:
    from paretoken.compress.presets import PRESETS
    from paretoken.spaces import SPACES

    listing = []
    for name, space in SPACES.items():
        entry = space.describe()
        if args.presets or args.json:
            entry["presets"] = [p for p, pr in PRESETS.items() if space.params_for(pr.plan, 12) is not None]
        listing.append(entry)
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for entry in listing:
        print(f"{entry['name']}\n  {entry['description']}")
        for param in entry["params"]:
            when = f"  (when {param['when']})" if param.get("when") else ""
            print(f"    {param['name']:16s} {param['values']:45s} {param['meaning']}{when}")
        if "presets" in entry:
            print(f"    presets: {', '.join(entry['presets']) or '(none)'}")
    print("A search runs every sampled plan with prefix_only_last (exact; the last block computes only the "
          "class token), so the spaces choose no stage for the last block (depth-1); presets run as published.")
    return 0
