"""Throughput of DeiT-S, uncompressed vs every preset (random weights: speed does not depend on them).

    python bench/throughput.py [--device cpu|cuda] [--batch-size N] [--repeats R] [--rounds K]
    python bench/throughput.py --prefix-only-last --plans tome-r13,evit-0.7 --repeats 3 --rounds 3

CPU: batch 64, fp32. GPU: batch 256, fp16 autocast (``--amp bf16``: bfloat16). ``--model default`` times the embedded model
(28-pixel images). Prints a table and saves
bench/results/throughput_<device>.json. Efficiency = (throughput ratio) /
(FLOPs ratio): 1.0 means the FLOPs saved all turn into speed. Per-image plans
run batched with padding: their row also gives the GFLOPs the padded batch
really executes, so the cost of padding shows. The machine's speed may drift during
the run (a shared VM's moved by 1.5x within minutes), so each plan is timed right
after the uncompressed model and right before it again, its speed-up in a round is
its throughput over the mean of those two, and its figures are the medians over
``--rounds`` rounds, in a shuffled order each round. ``--prefix-only-last`` follows each
plan with its ``prefix_only_last`` form (row ``NAME+pol``, with its speed-up over the
plan timed just before it) and saves
bench/results/throughput_<device>_prefix_only_last.json. ``--compile`` times every plan (and the
uncompressed model) under torch.compile (``paretoken.compile_model``: one graph for plans without
per-image stages), each compiled by one untimed forward first (its ``compile_s``), and saves
bench/results/throughput_<device>_compiled.json; the eager figures of a run without it are the
other half of the comparison.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

import torch

import paretoken
from paretoken.argtypes import positive_int
from paretoken.evaluators.evaluate import environment
from paretoken.evaluators.flops import count_flops
from paretoken.evaluators.models import create_model
from paretoken.evaluators.speed import AMP_DTYPES, autocast, throughput, timing_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=None, help="[64 on CPU, 256 on GPU]")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed forwards per plan and round [5]")
    parser.add_argument("--rounds", type=positive_int, default=3, help="rounds over every plan [3]")
    parser.add_argument("--plans", default=",".join(["uncompressed", *paretoken.PRESETS]),
                        help="comma-separated preset names; the uncompressed model always runs first [all]")
    parser.add_argument("--prefix-only-last", action="store_true",
                        help="also run each plan with the last block computing only the class token")
    parser.add_argument("--compile", action="store_true", help="time every plan compiled (torch.compile)")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="fp16", help="autocast precision on CUDA [fp16]")
    parser.add_argument("--out", help="name of the figures in bench/results/: NAME.json "
                                      "[throughput_<device>, + _prefix_only_last with that flag]")
    args = parser.parse_args()
    amp = AMP_DTYPES[args.amp]
    device = torch.device(args.device)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 64)
    torch.manual_seed(0)
    model = create_model(args.model).eval().to(device)
    batch = torch.randn(batch_size, *model.pretrained_cfg["input_size"], device=device)
    flops_images = batch[:16]

    named = [("uncompressed", paretoken.Plan())] + [(n, paretoken.preset(n)) for n in args.plans.split(",")
                                                     if n != "uncompressed"]
    groups = []  # timed together, right after a timing of the uncompressed model and right before the next
    for name, plan in named:
        pol = [(f"{name}+pol", dataclasses.replace(plan, prefix_only_last=True))] if args.prefix_only_last else []
        groups.append(pol if name == "uncompressed" else [(name, plan), *pol])
    rows = {}
    for name, plan in [named[0], *(member for group in groups for member in group)]:
        paretoken.apply(model, plan)
        gflops = count_flops(model, flops_images, per_image=plan.per_image)
        padded = count_flops(model, flops_images) if plan.per_image else gflops
        rows[name] = {"plan": name, "gflops": gflops, "padded_gflops": padded, "img_per_s_rounds": [],
                      "speedup_rounds": []}

    compiled = {}  # plan -> its compiled model, compiled once by an untimed forward
    if args.compile:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(rows))
        for name, plan in [named[0], *(member for group in groups for member in group)]:
            paretoken.apply(model, plan)
            compiled[plan] = paretoken.compile_model(model)
            start = time.perf_counter()
            with torch.inference_mode(), autocast(device, amp):
                compiled[plan](batch)
            rows[name]["compile_s"] = round(time.perf_counter() - start, 1)
            print(f"{name:17s} compiled in {rows[name]['compile_s']} s", flush=True)

    def timed(plan: paretoken.Plan) -> float:
        paretoken.apply(model, plan)
        return throughput(compiled.get(plan, model), batch, repeats=args.repeats, amp=amp)

    started, order_rng, round_starts = time.perf_counter(), random.Random(0), []
    base = rows["uncompressed"]
    for _ in range(args.rounds):
        round_starts.append(round(time.perf_counter() - started, 1))
        before = timed(named[0][1])
        base["img_per_s_rounds"].append(before)
        for group in order_rng.sample(groups, len(groups)):
            figures = [(name, timed(plan)) for name, plan in group]
            after = timed(named[0][1])
            base["img_per_s_rounds"].append(after)
            for i, (name, img_per_s) in enumerate(figures):
                rows[name]["img_per_s_rounds"].append(img_per_s)
                rows[name]["speedup_rounds"].append(img_per_s / ((before + after) / 2))
                if i:  # a +pol form: also against its plan, the group's first, timed just before it
                    rows[name].setdefault("speedup_over_plan_rounds", []).append(img_per_s / figures[0][1])
            before = after
    base["speedup_rounds"] = [1.0]
    for row in rows.values():
        row["img_per_s"] = statistics.median(row["img_per_s_rounds"])
        row["speedup"] = statistics.median(row["speedup_rounds"])
        row["flops_ratio"] = base["gflops"] / row["gflops"]
        row["efficiency"] = row["speedup"] / row["flops_ratio"]
        over = row.get("speedup_over_plan_rounds")
        if over:
            row["speedup_over_plan"] = statistics.median(over)
        spread = f"{min(row['speedup_rounds']):.2f}-{max(row['speedup_rounds']):.2f}"
        print(f"{row['plan']:17s} {row['gflops']:6.3f} GFLOPs (padded {row['padded_gflops']:6.3f})  "
              f"{row['img_per_s']:6.1f} img/s  speed-up {row['speedup']:5.2f}x (rounds {spread})  "
              f"FLOPs ratio {row['flops_ratio']:5.2f}x  efficiency {row['efficiency']:5.2f}"
              + (f"  over the plan {row['speedup_over_plan']:5.3f}x" if over else ""), flush=True)
    seconds = time.perf_counter() - started

    suffix = ("_prefix_only_last" if args.prefix_only_last else "") + ("_compiled" if args.compile else "")
    out = Path(__file__).parent / "results" / f"{args.out or f'throughput_{device.type}{suffix}'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": f"python bench/throughput.py --device {args.device} --batch-size {batch_size} "
                   f"--repeats {args.repeats} --rounds {args.rounds} --plans {args.plans} --model {args.model}"
                   + (" --prefix-only-last" if args.prefix_only_last else "") + (" --compile" if args.compile else "")
                   + f" --amp {args.amp}" + (f" --out {args.out}" if args.out else ""),
        "model": args.model, "batch_size": batch_size, "amp": args.amp if device.type == "cuda" else None,
        "environment": environment(args.device), "timing": timing_context(), "seconds": round(seconds, 1),
        "round_starts_s": round_starts, "rows": list(rows.values())}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
