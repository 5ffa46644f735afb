"""Search throughput: trials per hour with the local backend and with 1 and 2 Ray workers on this machine.

    python bench/search_scaling.py                 # 24 trials per configuration, random sampler
    python bench/search_scaling.py --trials 12 --images 200 --device cuda   # on a GPU machine

Each configuration runs a fresh study (random sampler, no presets, so every configuration evaluates
comparable plans) and is timed from the first trial to the last, Ray start-up excluded (printed
apart). Saves bench/results/search_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from paretoken.evaluators.evaluate import EvalConfig, environment
from paretoken.search import run_search

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--flops-images", type=int, default=16, help="images averaged for per-image plans' GFLOPs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--space", default="mixed")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    gpu = args.device.startswith("cuda")
    config = EvalConfig(images=args.images, batch_size=min(100, args.images), speed=False,
                        flops_images=args.flops_images, device=args.device)
    setups = [("local", 1, float(cpus)), ("ray", 1, float(cpus)), ("ray", 2, max(1.0, cpus / 2))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, workers, cpus_per_trial in setups:
            stamps: list[float] = []

            def log(line: str) -> None:
                if line.startswith("trial "):
                    stamps.append(time.perf_counter())

            start = time.perf_counter()
            name = f"scale-{backend}-{workers}"
            result = run_search(name, storage=f"sqlite:///{tmp}/{name}.db", space=args.space, sampler="random",
                                n_trials=args.trials + 1, backend=backend, workers=workers,
                                cpus_per_trial=cpus_per_trial if backend == "ray" else None,
                                gpus_per_trial=(1.0 / workers if gpu else 0.0) if backend == "ray" else None,
                                eval_config=config, presets=False, seed=0, log=log)
            # from the first finished trial (models loaded, baseline cached) to the last
            span = stamps[-1] - stamps[0]
            per_hour = (len(stamps) - 1) / span * 3600 if span > 0 else float("nan")
            rows.append({"backend": backend, "workers": workers, "cpus_per_trial": cpus_per_trial,
                         "trials": len(stamps), "seconds_first_to_last": span, "trials_per_hour": per_hour,
                         "startup_s": stamps[0] - start, "complete": result.counts.complete})
            print(f"{backend:5s} x{workers} ({cpus_per_trial:g} CPU/trial): {per_hour:7.0f} trials/h "
                  f"({len(stamps) - 1} trials in {span:.1f} s after a {stamps[0] - start:.1f} s start)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "search_scaling.json"
    out.write_text(json.dumps({"command": "python bench/search_scaling.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "environment": environment(args.device), "rows": rows},
        indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
