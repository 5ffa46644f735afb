"""Throughput of DeiT-S, uncompressed vs every preset (random weights: speed does not depend on them).

    python bench/throughput.py [--device cpu|cuda] [--batch-size N] [--repeats R]
    python bench/throughput.py --prefix-only-last --plans tome-r13,evit-0.7 --repeats 3

CPU: batch 64, fp32. GPU: batch 256, fp16 autocast. Prints a table and saves
bench/results/throughput_<device>.json. Efficiency = (throughput ratio) /
(FLOPs ratio): 1.0 means the FLOPs saved all turn into speed. Per-image plans
run batched with padding: their row also gives the GFLOPs the padded batch
really executes, so the cost of padding shows. ``--prefix-only-last`` follows each
plan with its ``prefix_only_last`` form (row ``NAME+pol``) and saves
bench/results/throughput_<device>_prefix_only_last.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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
    parser.add_argument("--repeats", type=int, default=5)
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
        img_per_s = throughput(model, batch, repeats=args.repeats)
        rows.append({"plan": name, "gflops": gflops, "padded_gflops": padded,
                     "img_per_s": img_per_s})
        base = rows[0]
        row = rows[-1]
        row["speedup"] = row["img_per_s"] / base["img_per_s"]
        row["flops_ratio"] = base["gflops"] / row["gflops"]
        row["efficiency"] = row["speedup"] / row["flops_ratio"]
        print(f"{row['plan']:15s} {gflops:6.3f} GFLOPs (padded {padded:6.3f})  {img_per_s:8.1f} img/s  "
              f"speed-up {row['speedup']:5.2f}x  FLOPs ratio {row['flops_ratio']:5.2f}x  "
              f"efficiency {row['efficiency']:5.2f}", flush=True)

    suffix = "_prefix_only_last" if args.prefix_only_last else ""
    out = Path(__file__).parent / "results" / f"{args.out or f'throughput_{device.type}{suffix}'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": f"python bench/throughput.py --device {args.device} --batch-size {batch_size} "
                   f"--repeats {args.repeats} --plans {args.plans}" + (" --prefix-only-last" if suffix else "")
                   + (f" --out {args.out}" if args.out else ""),
        "model": args.model, "batch_size": batch_size, "amp": device.type == "cuda",
        "environment": environment(args.device), "timing": timing_context(), "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
