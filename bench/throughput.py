"""Throughput of DeiT-S, uncompressed vs every preset (random weights: speed does not depend on them).

    python bench/throughput.py [--device cpu|cuda] [--batch-size N] [--repeats R] [--rounds K]
    python bench/throughput.py --prefix-only-last --plans tome-r13,evit-0.7 --repeats 3

CPU: batch 64, fp32. GPU: batch 256, fp16 autocast. Prints a table and saves
bench/results/throughput_<device>.json. Efficiency = (throughput ratio) /
(FLOPs ratio): 1.0 means the FLOPs saved all turn into speed. Per-image plans
run batched with padding: their row also gives the GFLOPs the padded batch
really executes, so the cost of padding shows. The plans are timed in ``--rounds``
rounds, every plan once per round, and a plan's figures are medians over the rounds
(its speed-up paired with the uncompressed model's time in the same round), so a
machine whose speed drifts during the run (a shared VM's varies by 1.5x within
minutes) does not favour the plans timed in its fast minutes. ``--prefix-only-last`` follows each
plan with its ``prefix_only_last`` form (row ``NAME+pol``) and saves
bench/results/throughput_<device>_prefix_only_last.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import timm
import torch

import paretoken
from paretoken.evaluators.evaluate import environment
from paretoken.evaluators.flops import count_flops
from paretoken.evaluators.speed import throughput, timing_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=None, help="[64 on CPU, 256 on GPU]")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per plan and round [5]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every plan [3]")
    parser.add_argument("--plans", default=",".join(["uncompressed", *paretoken.PRESETS]),
                        help="comma-separated preset names; the uncompressed model always runs first [all]")
    parser.add_argument("--prefix-only-last", action="store_true",
                        help="also run each plan with the last block computing only the class token")
    parser.add_argument("--out", help="name of the figures in bench/results/: NAME.json "
                                      "[throughput_<device>, + _prefix_only_last with that flag]")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 64)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval().to(device)
    batch = torch.randn(batch_size, 3, 224, 224, device=device)
    flops_images = batch[:16]

    rows = []
    plans = []
    for name in ["uncompressed", *(n for n in args.plans.split(",") if n != "uncompressed")]:
        plan = paretoken.Plan() if name == "uncompressed" else paretoken.preset(name)
        plans.append((name, plan))
        if args.prefix_only_last:
            plans.append((f"{name}+pol", dataclasses.replace(plan, prefix_only_last=True)))
    for name, plan in plans:
        paretoken.apply(model, plan)
        gflops = count_flops(model, flops_images, per_image=plan.per_image)
        padded = count_flops(model, flops_images) if plan.per_image else gflops
        rows.append({"plan": name, "gflops": gflops, "padded_gflops": padded, "img_per_s_rounds": []})
    for _ in range(args.rounds):
        for (name, plan), row in zip(plans, rows):
            paretoken.apply(model, plan)
            row["img_per_s_rounds"].append(throughput(model, batch, repeats=args.repeats))
    base = rows[0]
    for row in rows:
        row["img_per_s"] = statistics.median(row["img_per_s_rounds"])
        row["speedup"] = statistics.median(p / b for p, b in zip(row["img_per_s_rounds"], base["img_per_s_rounds"]))
        row["flops_ratio"] = base["gflops"] / row["gflops"]
        row["efficiency"] = row["speedup"] / row["flops_ratio"]
        rounds = " ".join(f"{v:.1f}" for v in row["img_per_s_rounds"])
        print(f"{row['plan']:15s} {row['gflops']:6.3f} GFLOPs (padded {row['padded_gflops']:6.3f})  "
              f"{row['img_per_s']:8.1f} img/s (rounds {rounds})  speed-up {row['speedup']:5.2f}x  "
              f"FLOPs ratio {row['flops_ratio']:5.2f}x  efficiency {row['efficiency']:5.2f}", flush=True)

    suffix = "_prefix_only_last" if args.prefix_only_last else ""
    out = Path(__file__).parent / "results" / f"{args.out or f'throughput_{device.type}{suffix}'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": f"python bench/throughput.py --device {args.device} --batch-size {batch_size} "
                   f"--repeats {args.repeats} --rounds {args.rounds} --plans {args.plans}" + (" --prefix-only-last" if suffix else "")
                   + (f" --out {args.out}" if args.out else ""),
        "model": args.model, "batch_size": batch_size, "amp": device.type == "cuda",
        "environment": environment(args.device), "timing": timing_context(), "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
