"""paretoken's ToMe against ToMe's own code, paired, on the same weights and batch.

    python bench/tome_reference.py --tome-src ~/src/ToMe [--model deit_small_patch16_224] [--r 13]
    python bench/tome_reference.py --tome-src ~/src/ToMe --device cuda --batch-size 256 --compile

``--tome-src`` is a checkout of https://github.com/facebookresearch/ToMe (not vendored: clone it
yourself; nothing is downloaded here). Two copies of the model with the same (random) weights run side
by side: one with paretoken's ``merge`` at every block (``tome-r<r>``: r tokens per block, proportional
attention), one with ``tome.patch.timm`` and ``model.r = r``. Each round times both, in alternating
order, ``--repeats`` forwards each (medians); the speed-up of paretoken over ToMe is the median over
rounds of ToMe's seconds / paretoken's. Both are also timed against the uncompressed model. The
logits of the two are compared (they differ only where ToMe's unstable sort breaks a tie of
similarities another way). ``--compile`` compiles paretoken's model (``paretoken.compile_model``) and
adds it as a third row; ToMe's own stays eager, as its users run it. CPU: fp32; GPU: fp16 autocast
(``--amp bf16``: bfloat16).
Saves bench/results/<out>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import paretoken
from paretoken.argtypes import positive_int
from paretoken.evaluators.evaluate import environment
from paretoken.evaluators.models import create_model
from paretoken.evaluators.speed import AMP_DTYPES, median_seconds, timing_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tome-src", required=True, help="a checkout of facebookresearch/ToMe")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--r", type=positive_int, default=13, help="tokens merged per block [13]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="[32 on CPU, 256 on GPU]")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time paretoken's model compiled")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="fp16", help="autocast precision on CUDA [fp16]")
    parser.add_argument("--out", default=None, help="NAME.json in bench/results/ [tome_reference_<device>]")
    args = parser.parse_args()
    amp = AMP_DTYPES[args.amp]
    sys.path.insert(0, str(Path(args.tome_src).expanduser()))
    import tome  # noqa: E402  (from --tome-src)

    device = torch.device(args.device)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 32)
    torch.manual_seed(0)
    base = create_model(args.model).eval().to(device)
    ours = paretoken.apply(copy.deepcopy(base), paretoken.Plan.from_dict(
        {"stages": [{"layer": i, "op": "merge", "r": args.r} for i in range(len(base.blocks))]}))
    theirs = copy.deepcopy(base)
    tome.patch.timm(theirs)
    theirs.r = args.r
    batch = torch.randn(batch_size, *base.pretrained_cfg["input_size"], device=device)
    models = {"uncompressed": base, "paretoken": ours, "tome": theirs}
    compile_s = None
    if args.compile:
        start = time.perf_counter()
        models["paretoken_compiled"] = paretoken.compile_model(ours)
        median_seconds(models["paretoken_compiled"], batch, repeats=1, warmup=0, amp=amp)
        compile_s = round(time.perf_counter() - start, 1)
    with torch.inference_mode():
        differ = (ours(batch) - theirs(batch)).abs().max().item()
        scale = theirs(batch).abs().max().item()

    seconds = {name: [] for name in models}
    for k in range(args.rounds):
        order = list(models) if k % 2 == 0 else list(reversed(models))
        for name in order:
            seconds[name].append(median_seconds(models[name], batch, repeats=args.repeats, amp=amp))
        print(f"round {k}: " + ", ".join(f"{n} {1e3 * s[-1]:.1f} ms" for n, s in seconds.items()), flush=True)
    rows = []
    for name, times in seconds.items():
        rows.append({"model": name, "ms": 1e3 * statistics.median(times),
                     "speedup_over_uncompressed": statistics.median(
                         b / t for b, t in zip(seconds["uncompressed"], times)),
                     "speedup_over_tome": statistics.median(o / t for o, t in zip(seconds["tome"], times))})
        print(f"{name:20s} {rows[-1]['ms']:8.1f} ms  {rows[-1]['speedup_over_uncompressed']:5.2f}x uncompressed  "
              f"{rows[-1]['speedup_over_tome']:5.3f}x ToMe's own", flush=True)
    print(f"largest logit difference, paretoken vs ToMe's own: {differ:.3g} (logits up to {scale:.3g})")
    out = Path(__file__).parent / "results" / f"{args.out or f'tome_reference_{device.type}'}.json"
    out.write_text(json.dumps({
        "command": "python bench/tome_reference.py " + " ".join(a for a in sys.argv[1:]),
        "model": args.model, "r": args.r, "batch_size": batch_size, "amp": args.amp if device.type == "cuda" else None,
        "environment": environment(args.device), "timing": timing_context(), "compile_s": compile_s,
        "largest_logit_difference": differ, "rows": rows, "seconds_rounds": seconds}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
