"""`paretoken presets`, `flops`, `eval` and `slim`: one plan on one model, no study.

Importing this module is cheap; the handlers import torch and timm when they run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

from paretoken import argtypes
from paretoken.cli.flags import add_batch_size_flag, add_compile_flag, add_flops_flag, add_json_flag, add_model_flags
from paretoken.errors import ParetokenError
from paretoken.jsonvalues import json_ready
from paretoken.outputs import PLAN_SUFFIXES, check_output


def _plan_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--plan", metavar="FILE", help="plan file (YAML or JSON)")
    group.add_argument("--preset", metavar="NAME", help="a published schedule (see `paretoken presets`)")
    parser.add_argument("--prefix-only-last", action="store_true",
                        help="and let the last block compute only the prefix (class) tokens: exact, fewer GFLOPs")


def _resolve_plan(args: argparse.Namespace):
    import paretoken
    from paretoken.compress.presets import PRESETS

    if args.plan:
        if args.plan in PRESETS and not os.path.exists(args.plan):
            raise ParetokenError(f"plan: file {args.plan!r} does not exist; for the published schedule "
                                 f"pass --preset {args.plan}")
        plan = paretoken.load_plan(args.plan)
    elif args.preset:
        plan = paretoken.preset(args.preset)
    else:
        plan = paretoken.Plan()
    return dataclasses.replace(plan, prefix_only_last=True) if args.prefix_only_last else plan


def cmd_presets(args: argparse.Namespace) -> int:
    from paretoken.compress.presets import PRESETS

    if args.json:
        print(json.dumps({name: {"source": p.source, "plan": p.plan.to_dict()} for name, p in PRESETS.items()},
                         indent=2))
        return 0
    for name, p in PRESETS.items():
        print(f"{name:15s} {p.source}\n{'':15s} {p.plan.describe()}")
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    from paretoken.compress.ops import op_table

    rows = op_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['op']:12s} {row['summary']}\n{'':12s} amount: {row['amount']}; scores: {row['scores']} "
              f"(default first); per image: {row['per image']}; {row['source']}")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    import torch

    import paretoken
    from paretoken.evaluators.data import load_split
    from paretoken.evaluators.evaluate import resolve_device
    from paretoken.evaluators.models import create_model

    plan = _resolve_plan(args)
    device = resolve_device(args.device)
    model = create_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained).to(device)
    images = load_split(args.data, model, "eval", n=args.images, seed=0)[0].to(device)
    paretoken.apply(model, plan)
    gflops = paretoken.count_flops(model, images, max_images=args.images, method=args.flops)
    with torch.no_grad():
        model(images)
    counts = paretoken.token_counts(model).float()
    if args.json:
        print(json.dumps({"gflops": gflops, "tokens_per_block": counts.mean(0).tolist(), "plan": plan.to_dict()}))
        return 0
    averaged = f" (mean of {len(images)} images)" if plan.per_image else ""
    print(f"model   {args.model}\nplan    {plan.describe()}\nGFLOPs  {gflops:.3f} per image{averaged}")
    print("tokens after each block (prefix included" + (", mean over images)" if plan.per_image else ")"))
    for i, (mean, low, high) in enumerate(zip(counts.mean(0), counts.min(0).values, counts.max(0).values)):
        spread = f"  (min {low:.0f}, max {high:.0f})" if high > low else ""
        print(f"  block {i:2d}: {mean:7.1f}{spread}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from paretoken.evaluators.evaluate import EvalConfig, device_name, environment, evaluate
    from paretoken.evaluators.metrics import CATALOG, format_metric

    plan = _resolve_plan(args)
    device = device_name(args.device)
    config = EvalConfig(model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, data=args.data,
                        images=args.images, device=device, batch_size=args.batch_size, seed=args.seed,
                        skip=args.skip, flops=args.flops, compile=args.compile)
    metrics = evaluate(plan, config)
    env = environment(device)
    if args.json:
        print(json.dumps(json_ready({"plan": plan.to_dict(), "metrics": metrics, "environment": env}), allow_nan=False))
        return 0
    after = f" (after the first {args.skip})" if args.skip else ""
    print(f"model {args.model} on {args.images} images{after} of {args.data or 'fashion-mnist'}; {env['device']}, "
          f"{env['threads']} threads, batch {args.batch_size}\nplan  {plan.describe()}")
    for name, value in metrics.items():
        shown = "n/a" if math.isnan(value) else format_metric(name, float(value))
        print(f"  {name:12s} {shown:>10s}  {CATALOG[name].label}")
    return 0


def _layer_list(text: str) -> list[int]:
    """'1-11' or '2,4,6' -> block indices."""
    try:
        if "-" in text:
            first, last = (int(v) for v in text.split("-"))
            return list(range(first, last + 1))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a layer list; valid: FIRST-LAST or L1,L2,...") from None


def cmd_slim(args: argparse.Namespace) -> int:
    import paretoken
    from paretoken.compress.slim import check_layers, fit_slim
    from paretoken.evaluators.data import load_split
    from paretoken.evaluators.evaluate import resolve_device
    from paretoken.evaluators.models import create_model

    device = resolve_device(args.device)
    check_output("out", args.out, PLAN_SUFFIXES)
    model = create_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained).to(device)
    images = load_split(args.data, model, "calib", n=args.images, seed=args.seed)[0].to(device)
    check_layers(args.layers, len(model.blocks))
    print(f"choosing a Patch Slimming pyramid top-down on {len(images)} calibration images "
          f"(KL within {args.tolerance:g} nats of the uncompressed model)", flush=True)

    def gflops(patched) -> float:
        return paretoken.count_flops(patched, images[:1])

    plan = fit_slim(model, images, args.layers, tolerance=args.tolerance, log=lambda line: print(line, flush=True),
                    cost=gflops)
    plan.save(args.out)
    full = gflops(model)  # fit_slim leaves the empty plan applied
    slimmed = gflops(paretoken.apply(model, plan))
    print(f"{plan.describe()}\nGFLOPs {slimmed:.4f} per image ({full:.4f} uncompressed)\nsaved {args.out}")
    return 0


def add_plan_parsers(sub) -> None:
    """Add `presets`, `ops`, `flops`, `eval` and `slim` to the `paretoken` subcommands."""
    p = sub.add_parser("presets", help="list the published schedules and their sources")
    add_json_flag(p)
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("ops", help="list the registered token-reduction ops: amounts, scores, per image, source")
    add_json_flag(p)
    p.set_defaults(func=cmd_ops)

    p = sub.add_parser("flops", help="GFLOPs per image and tokens per block of a plan")
    add_model_flags(p)
    _plan_args(p)
    p.add_argument("--images", type=argtypes.positive_int, default=8,
                   help="images to count on (per-image plans average them) [8]")
    add_flops_flag(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("eval", help="measure a plan: top1, agreement, kl, GFLOPs, speed")
    add_model_flags(p)
    _plan_args(p)
    p.add_argument("--images", type=argtypes.positive_int, default=1000, help="evaluation images [1000]")
    add_batch_size_flag(p)
    p.add_argument("--seed", type=argtypes.seed, default=0, help="seed of the evaluation subset [0]")
    p.add_argument("--skip", type=argtypes.non_negative_int, default=0, metavar="K",
                   help="pass over the first K images of the seeded order: with K = a search's --images, "
                        "images the search never saw [0]")
    add_flops_flag(p)
    add_compile_flag(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("slim", help="choose a Patch Slimming pyramid top-down on calibration images")
    add_model_flags(p)
    p.add_argument("--layers", type=_layer_list, default=list(range(1, 12)), help="blocks with a stage [1-11]")
    p.add_argument("--tolerance", type=argtypes.positive, default=0.05,
                   help="KL budget of the whole plan, nats [0.05]")
    p.add_argument("--images", type=argtypes.positive_int, default=256, help="calibration images [256]")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="seed of the calibration subset [0]")
    p.add_argument("--out", default="slim.yaml", metavar="FILE", help="plan file to write, .yaml or .json [slim.yaml]")
    p.set_defaults(func=cmd_slim)
