"""Real timing of a model's forward: warm-up, device synchronisation, AMP on GPU, medians.

Only the model is timed: inputs are tensors already on the device. Speed-ups pair some of a plan's
timings with one of the base model on the same batch right next to it, so a drift of speed cancels.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext

import torch


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_host_memory_kept: bool | None = None  # None: not tried yet in this process


def keep_host_memory() -> bool:
    """Make glibc's malloc serve every block from its heap and never give freed memory back to the system
    (``mallopt``: M_MMAP_MAX 0, M_TRIM_THRESHOLD its maximum), once per process; returns whether it could
    (False without glibc). :func:`timed_forward` calls it before timing on the CPU.

    By default glibc maps large blocks afresh and trims the heap, so a forward that frees and allocates
    megabytes per block pays a page fault for each new page it touches. On the 2-core VM the uncompressed
    default model took about 110,000 minor faults per batch of 100, a fifth of its time, and its plans
    few or none, so speed-ups depended on the allocator's state and varied between processes
    (docs/benchmarks.md). With the heap kept, forwards after the first take none and a timing measures
    the computation; the process keeps the heap of its largest forward."""
    global _host_memory_kept
    if _host_memory_kept is None:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        _host_memory_kept = bool(mallopt and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _host_memory_kept


#: The autocast precisions a GPU forward may be timed in (``--amp`` of the benchmarks).
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, dtype: torch.dtype = torch.float16):
    """Autocast to ``dtype`` on CUDA (fp16 unless told: how a ViT is deployed there); nothing on CPU."""
    return torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_forward(model: torch.nn.Module, images: torch.Tensor,
                  amp: torch.dtype = torch.float16) -> tuple[torch.Tensor, float]:
    """Logits of one forward on ``images`` (B, C, H, W) and its wall time in seconds (``amp``: the
    autocast precision on CUDA)."""
    device = images.device
    if device.type == "cpu":
        keep_host_memory()
    synchronize(device)
    start = time.perf_counter()
    with autocast(device, amp):
        logits = model(images)
    synchronize(device)
    return logits, time.perf_counter() - start


def median_seconds(model: torch.nn.Module, images: torch.Tensor, repeats: int = 5, warmup: int = 2,
                   amp: torch.dtype = torch.float16) -> float:
    """Median wall time in seconds of ``repeats`` forwards on ``images``, after ``warmup`` untimed ones."""
    times = [timed_forward(model, images, amp)[1] for _ in range(warmup + repeats)]
    return statistics.median(times[warmup:])


def throughput(model: torch.nn.Module, batch: torch.Tensor, repeats: int = 5, warmup: int = 2,
               amp: torch.dtype = torch.float16) -> float:
    """Images per second at the batch size of ``batch`` (B, C, H, W)."""
    return batch.shape[0] / median_seconds(model, batch, repeats, warmup, amp)


def latency_ms(model: torch.nn.Module, image: torch.Tensor, repeats: int = 10, warmup: int = 2) -> float:
    """Batch-1 latency in milliseconds of ``image`` (1, C, H, W)."""
    return 1e3 * median_seconds(model, image, repeats, warmup)


def paired_speedup(base_seconds: Sequence[float], plan_seconds: Sequence[float]) -> float:
    """How many times faster a plan runs than the base model: the median over pairs of timings of one
    batch, the base's right next to the plan's, of base seconds / plan seconds. Each pair is timed
    within a second or so, so a drift of the machine's speed cancels, and one outlier pair moves the
    median little."""
    return statistics.median(b / p for b, p in zip(base_seconds, plan_seconds, strict=True))


def timing_context() -> dict[str, int | str]:
    """The settings a timing depends on, recorded beside every figure."""
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "memory_format": "contiguous (NCHW)", "torch": torch.__version__,
            "host_memory": "kept (glibc heap only, never trimmed)" if _host_memory_kept else "allocator default"}
