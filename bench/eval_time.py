"""Wall time to evaluate one plan on 1,000 images of the default model (target: at most 10 s on 2 CPU cores).

    python bench/eval_time.py

The first evaluation also builds the cached uncompressed baseline; later ones
reuse it, as trials in a search do. Saves bench/results/eval_time.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import paretoken
from paretoken.evaluators.evaluate import EvalConfig, environment, evaluate


def main() -> None:
    config = EvalConfig(images=1000)
    rows = []
    for name in ["evit-0.7", "tome-r13", "dynamicvit-0.7", "asvit", "jmp", "slim"]:
        start = time.perf_counter()
        evaluate(paretoken.preset(name), config)
        seconds = time.perf_counter() - start
        rows.append({"plan": name, "seconds": seconds, "includes_baseline": not rows})
        print(f"{name:15s} {seconds:6.2f} s" + ("  (includes building the cached baseline)" if len(rows) == 1 else ""),
              flush=True)
    out = Path(__file__).parent / "results" / "eval_time.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python bench/eval_time.py", "images": config.images,
                               "environment": environment(), "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
