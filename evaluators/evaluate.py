"""Evaluate one plan: accuracy against labels and the uncompressed model, FLOPs, speed.

Metrics, their units and directions: :mod:`paretoken.evaluators.metrics`.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version

import torch
import torch.nn.functional as F

from paretoken.compress import Plan, applied_plan, apply, token_counts, token_slots
from paretoken.errors import ParetokenError
from paretoken.evaluators.data import load_split
from paretoken.evaluators.flop_model import countable, flop_model
from paretoken.evaluators.flops import count_flops
from paretoken.evaluators.models import create_model
from paretoken.evaluators.speed import latency_ms, paired_speedup, timed_forward

#: How GFLOPs are measured (:attr:`EvalConfig.flops`).
FLOPS_METHODS = ("count", "trace")


@dataclass(frozen=True)
class EvalConfig:
    """What a trial is measured on. ``images``: evaluation images, after the first ``skip`` of the
    seeded test order (``skip=k`` holds them out from a search that measured on ``images=k``);
    ``batch_size``: images per timed batch; ``speedup_pairs``: how many of the plan's timed batches
    the uncompressed model also runs, next to the plan, for ``speedup`` (at least 1); ``flops``: how
    GFLOPs are measured, ``count`` (from every evaluation image's token counts, exact to fvcore:
    :mod:`~paretoken.evaluators.flop_model`) or ``trace`` (fvcore traces; a per-image plan's are the
    mean of its first ``flops_images`` images, each traced alone); ``compile``: run the plan and the
    uncompressed model it is timed against under ``torch.compile``
    (:func:`~paretoken.compress.compiling.compile_model`), their compilation timed apart
    (``compile_s``)."""

    model: str = "default"
    checkpoint: str | None = None
    data: str | None = None
    images: int = 1000
    seed: int = 0
    skip: int = 0
    device: str = "cpu"
    batch_size: int = 100
    speed: bool = True
    flops_images: int = 16
    latency_repeats: int = 10
    speedup_pairs: int = 4
    pretrained: bool = False
    flops: str = "count"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.flops not in FLOPS_METHODS:
            raise ParetokenError(f"flops: {self.flops!r} is unknown; valid: {', '.join(FLOPS_METHODS)}")
        if self.speedup_pairs < 1:
            raise ParetokenError(f"speedup_pairs: {self.speedup_pairs!r} is invalid; valid: an integer >= 1")


@dataclass
class _Bench:
    """A model with its evaluation images and the uncompressed model's outputs, built once per config."""

    model: torch.nn.Module
    images: torch.Tensor  # (n, C, H, W) on the device
    labels: torch.Tensor  # (n,)
    base_logits: torch.Tensor  # (n, classes) float32, uncompressed


_BENCHES: dict[tuple, _Bench] = {}


def device_name(name: str) -> str:
    """``name`` with ``auto`` resolved: ``cuda`` where a GPU is present, else ``cpu``."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` (cpu, cuda, cuda:N, auto) on this machine; one-line error otherwise."""
    name = device_name(name)
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise ParetokenError(f"device: {name!r} is unknown; valid: cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ParetokenError(f"device: {name!r} is not available on this machine; valid: cpu")
        if (device.index or 0) >= count:
            raise ParetokenError(f"device: {name!r} is not available on this machine; valid: cpu, "
                                 + ", ".join(f"cuda:{i}" for i in range(count)))
    return device


def checked_config(config: EvalConfig) -> EvalConfig:
    """``config`` with relative ``checkpoint`` and ``data`` paths made absolute, once its device,
    model, checkpoint and data are known to work: the model built with its weights, the number of
    images checked against the data and one image read. Otherwise the :class:`ParetokenError` that
    names the field. A search calls it before it writes to a study; its trials may run in another
    working directory (Ray Tune's)."""
    def absolute(path: str | None) -> str | None:
        return path if path is None or path == "fashion-mnist" else os.path.abspath(path)

    config = replace(config, checkpoint=absolute(config.checkpoint), data=absolute(config.data))
    resolve_device(config.device)
    model = create_model(config.model, checkpoint=config.checkpoint, pretrained=config.pretrained)
    load_split(config.data, model, "eval", n=config.images, seed=config.seed, skip=config.skip, load=1)
    return config


@dataclass
class _Pass:
    """One pass of ``model``'s plan over the evaluation images (:func:`_forward_all`)."""

    logits: torch.Tensor  # (n, classes) float32
    seconds: list[float]  # per batch
    base_seconds: list[float]  # the uncompressed model on each paired batch, in order
    padding_pct: float  # % of token slots that were padding
    peak_bytes: int  # CUDA memory a plan's forward allocates at its peak above what it starts with (max
    # over the batches); 0 on CPU
    counts: torch.Tensor  # (n, depth) tokens left after each block, per image, on the CPU


def _base_seconds(model: torch.nn.Module, batch: torch.Tensor, plan: Plan, run=None) -> float:
    """Seconds of one uncompressed forward on ``batch`` (through ``run``, ``model`` compiled, where
    given); ``model`` runs ``plan`` again afterwards."""
    apply(model, Plan())
    seconds = timed_forward(model if run is None else run, batch)[1]
    apply(model, plan)
    return seconds


def _forward_all(model, images, batch_size, paired: Sequence[int] = (), run=None) -> _Pass:
    """Run ``model``'s plan over ``images`` in batches of ``batch_size``, timing each batch (through
    ``run``, ``model`` compiled, where given). On each batch index in ``paired`` the uncompressed model
    runs too, timed next to the plan: right after it, or right before it on every second paired batch,
    so that neither always runs first."""
    plan, cuda = applied_plan(model), images.device.type == "cuda"
    run = model if run is None else run
    outs, seconds, base_seconds, all_counts, slots, padding, peak = [], [], [], [], 0, 0, 0
    for k, start in enumerate(range(0, len(images), batch_size)):
        batch = images[start:start + batch_size]
        base_first = k in paired and paired.index(k) % 2 == 1
        if base_first:
            base_seconds.append(_base_seconds(model, batch, plan, run))
        if cuda:
            torch.cuda.reset_peak_memory_stats(images.device)
            before = torch.cuda.memory_allocated(images.device)  # weights, images, the logits so far
        logits, elapsed = timed_forward(run, batch)
        if cuda:
            peak = max(peak, torch.cuda.max_memory_allocated(images.device) - before)
        outs.append(logits.float())
        seconds.append(elapsed)
        counts = token_counts(model)  # (b, depth)
        all_counts.append(counts.cpu())
        batch_slots = sum(token_slots(model))
        slots += batch_slots
        padding += batch_slots - int(counts.sum())
        if k in paired and not base_first:
            base_seconds.append(_base_seconds(model, batch, plan, run))
    return _Pass(torch.cat(outs), seconds, base_seconds, 100.0 * padding / max(slots, 1), peak, torch.cat(all_counts))


def prepare(config: EvalConfig) -> _Bench:
    """What every plan measured under ``config`` shares, built once per process: the model on its device,
    the evaluation images and the uncompressed model's logits. Its errors (a model or image that cannot
    be read, weights whose logits are not finite, out of memory in the uncompressed forward) are no
    plan's fault: every trial would meet them."""
    key = (config.model, config.checkpoint, config.pretrained, config.data, config.images, config.seed, config.skip,
           config.device, config.batch_size)
    if key not in _BENCHES:
        device = resolve_device(config.device)
        model = create_model(config.model, checkpoint=config.checkpoint, pretrained=config.pretrained).to(device)
        images, labels = load_split(config.data, model, "eval", n=config.images, seed=config.seed, skip=config.skip)
        images, labels = images.to(device), labels.to(device)
        apply(model, Plan())
        if config.flops == "count":
            flop_model(model)  # calibrated once; a model it cannot count is every trial's error
        base_logits = _forward_all(model, images, config.batch_size).logits
        if not torch.isfinite(base_logits).all():
            field, value = ("checkpoint", config.checkpoint) if config.checkpoint else ("model", config.model)
            raise ParetokenError(f"{field}: the uncompressed model's logits with {value!r} are not finite; "
                                 f"valid: weights without NaN or infinity")
        _BENCHES[key] = _Bench(model, images, labels, base_logits)
    return _BENCHES[key]


def evaluate(plan: Plan, config: EvalConfig = EvalConfig()) -> dict[str, float]:
    """Measure ``plan`` on ``config``'s model and data; returns the metrics in
    :data:`paretoken.evaluators.metrics.METRICS`."""
    return evaluate_per_image(plan, config)[0]


def evaluate_per_image(plan: Plan, config: EvalConfig = EvalConfig()) -> tuple[dict[str, float], torch.Tensor]:
    """:func:`evaluate`'s metrics and which images the plan classifies right: a (n,) bool tensor on the
    CPU, in the order of ``config``'s evaluation images (what paired comparisons of plans need)."""
    bench = prepare(config)
    model, device = bench.model, bench.images.device
    full = max(len(bench.images) // config.batch_size, 1)  # a short last batch is not timed
    timed_batches = range(1, full) or range(full)  # the first, a warm-up, only when it is the only one
    paired = timed_batches[:config.speedup_pairs] if config.speed else ()
    apply(model, plan)
    compiled, compile_s = _compiled(model, plan, bench.images, config) if config.compile else (None, math.nan)
    run = _forward_all(model, bench.images, config.batch_size, paired, compiled)
    logits, seconds = run.logits, run.seconds
    peak = run.peak_bytes / 2**20 if device.type == "cuda" else math.nan
    if not torch.isfinite(logits).all():
        raise ParetokenError(f"plan: {plan.describe()} makes the logits non-finite (the uncompressed model's "
                             f"are finite); valid: a plan that keeps them finite, e.g. fewer or milder stages")
    pred, base_pred = logits.argmax(1), bench.base_logits.argmax(1)
    kl = F.kl_div(logits.log_softmax(1), bench.base_logits.log_softmax(1), log_target=True, reduction="batchmean")
    timed = [seconds[k] for k in timed_batches]
    top1 = 100.0 * (pred == bench.labels).float().mean().item()
    metrics = {
        "top1": top1,
        "top1_drop": 100.0 * (base_pred == bench.labels).float().mean().item() - top1,
        "agreement": 100.0 * (pred == base_pred).float().mean().item(),
        "kl": max(kl.item(), 0.0),
        "gflops": _gflops(model, plan, run.counts, bench.images, config),
        "img_per_s": min(config.batch_size, len(bench.images)) / statistics.median(timed) if config.speed else math.nan,
        "latency_ms": latency_ms(model if compiled is None else compiled, bench.images[:1], config.latency_repeats) if config.speed else math.nan,
        "speedup": paired_speedup(run.base_seconds, [seconds[k] for k in paired]) if config.speed else math.nan,
        "peak_mem_mb": peak,
        "padding_pct": run.padding_pct,
        "compile_s": compile_s,
    }
    return metrics, (pred == bench.labels).cpu()


def _compiled(model, plan: Plan, images: torch.Tensor, config: EvalConfig):
    """``model`` (running ``plan``) under torch.compile, and the seconds its first forwards took: the plan
    and, where speed is measured, the uncompressed model at every batch size the pass and the latency
    run (compilation), so that no timed forward compiles. Earlier compilations are dropped first: a search compiles one plan after
    another."""
    from paretoken.compress.compiling import compile_model

    torch._dynamo.reset()
    compiled = compile_model(model)
    sizes = {min(config.batch_size, len(images)), len(images) % config.batch_size} - {0}
    if config.speed:
        sizes.add(1)
    start = time.perf_counter()
    for warm in (plan, Plan()) if config.speed else (plan,):
        apply(model, warm)
        for size in sorted(sizes):
            timed_forward(compiled, images[:size])
    apply(model, plan)
    return compiled, time.perf_counter() - start


def _gflops(model, plan: Plan, counts: torch.Tensor, images: torch.Tensor, config: EvalConfig) -> float:
    """GFLOPs per image as ``config.flops`` says: counted from ``counts`` (n, depth) for every image,
    or traced (also for a plan with an op that declares no :attr:`~paretoken.compress.ops.OpSpec.flops`)."""
    if config.flops == "count" and countable(plan):
        return flop_model(model).gflops(plan, counts)
    return count_flops(model, images[:config.flops_images], per_image=plan.per_image, max_images=config.flops_images)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def environment(device: str = "cpu") -> dict[str, str]:
    """Where figures were measured: device, CPU threads and package versions."""
    dev = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else (
        platform.processor() or platform.machine())
    return {
        "device": f"{device} ({dev})",
        "threads": str(torch.get_num_threads()),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        **{pkg: _version(pkg) for pkg in ("paretoken", "torch", "timm", "optuna", "ray", "fvcore")},
    }
