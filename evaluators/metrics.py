"""The metrics a plan is measured by: names (in table order), units, which way is better
(:data:`CATALOG`), and the budgets that bound them.

Torch-free, so that reading a study never imports torch.

  top1         % of evaluation images whose top-1 class is the label.
  top1_drop    points of top-1 lost against the uncompressed model on the same
               images (uncompressed top1 minus top1; negative when it gains).
  agreement    % of images whose top-1 equals the uncompressed model's.
  kl           mean KL(uncompressed || compressed) of the class distributions, nats.
  gflops       fvcore GFLOPs per image (one multiply-add = one FLOP); per-image
               plans average over up to ``flops_images`` images run alone.
  img_per_s    images per second at ``batch_size``: median over the timed
               batches of the evaluation pass, the first batch a warm-up;
               model only (images are preloaded tensors); AMP and
               ``torch.cuda.synchronize`` on GPU.
  latency_ms   batch-1 latency, median of ``latency_repeats`` after warm-up.
  speedup      times faster than the uncompressed model on the same worker: on
               up to ``speedup_pairs`` (4) of img_per_s's timed batches the
               uncompressed model runs the same batch right after the plan
               (right before it on every second one); the median of the
               per-batch ratios. It moves far less than img_per_s with a
               worker's speed (bench/speedup_stability.py: 1.00-1.07x against
               1.55-1.67x between 1 and 2 threads), and a drift of speed
               cancels within each pair. With a single batch its one pair
               includes the plan's first, cold forward, as img_per_s does.
  peak_mem_mb  CUDA memory a forward of the plan in the evaluation pass allocates
               at its peak on top of what is allocated before it (weights,
               preloaded images, the logits of the batches before): the
               activations at ``batch_size``, MiB, the largest over the batches;
               NaN on CPU, where PyTorch offers no allocator peak.
  padding_pct  % of token slots in the batched pass that were padding (per-image
               plans only; 0 otherwise): what batching per-image counts costs.
  compile_s    with ``compile`` (torch.compile), the seconds the first forwards
               took, of the plan and of the uncompressed model it is timed
               against, at each batch size timed: compilation, kept out of every
               timed figure; NaN without it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from paretoken.errors import ParetokenError


@dataclasses.dataclass(frozen=True)
class Metric:
    """How a metric reads: ``direction`` ("maximize" when larger is better, else "minimize"),
    ``title`` (what it is, in words), ``unit``, and the ``decimals`` tables print (None: four
    significant digits, for a metric whose values span orders of magnitude)."""
    direction: str
    title: str
    unit: str
    decimals: int | None

    @property
    def label(self) -> str:
        """``"throughput (images/s)"``: for plot axes."""
        return f"{self.title} ({self.unit})"


#: Every metric, in table order (the module docstring says how each is measured).
CATALOG: dict[str, Metric] = {
    "top1": Metric("maximize", "top-1", "%", 2),
    "top1_drop": Metric("minimize", "top-1 lost", "points", 2),
    "agreement": Metric("maximize", "agreement with uncompressed", "%", 2),
    "kl": Metric("minimize", "KL to uncompressed", "nats", None),
    "gflops": Metric("minimize", "compute", "GFLOPs/image", 4),
    "img_per_s": Metric("maximize", "throughput", "images/s", 0),
    "latency_ms": Metric("minimize", "latency", "ms, batch 1", 2),
    "speedup": Metric("maximize", "speed-up over uncompressed", "x", 2),
    "peak_mem_mb": Metric("minimize", "peak memory", "MiB, CUDA only", 2),
    "padding_pct": Metric("minimize", "padding", "% of token slots", 2),
    "compile_s": Metric("minimize", "compile time", "s", 1),
}
#: Whether a larger (``maximize``) or smaller (``minimize``) value is better, per metric, in table order.
DIRECTIONS: dict[str, str] = {name: metric.direction for name, metric in CATALOG.items()}
METRICS: tuple[str, ...] = tuple(CATALOG)
#: The metrics a one-line summary of a plan shows (the search's front table, ``paretoken export``).
HEADLINE: tuple[str, ...] = ("top1", "agreement", "gflops", "img_per_s", "speedup")
#: For help texts: "top1, agreement, img_per_s (maximised); top1_drop, ... (minimised)".
OBJECTIVES_HELP = "; ".join(", ".join(m for m, d in DIRECTIONS.items() if d == way) + f" ({said})"
                            for way, said in (("maximize", "maximised"), ("minimize", "minimised")))


def format_metric(column: str, value: Any) -> str:
    """A metric or table cell as printed: a metric, or a column named after one (``best_top1``,
    ``held_out_agreement``), to its :data:`CATALOG` decimals; ``-`` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if not isinstance(value, float):
        return str(value)
    metric = next((m for name, m in CATALOG.items() if column == name or column.endswith("_" + name)), None)
    if metric is None or metric.decimals is None:
        return f"{value:.4g}"
    return f"{value:.{metric.decimals}f}"


#: Each budget bounds one metric: budget name -> (metric, "<=" or ">=").
BOUNDS: dict[str, tuple[str, str]] = {"max_gflops": ("gflops", "<="), "min_top1": ("top1", ">="),
                                      "max_top1_drop": ("top1_drop", "<=")}


@dataclasses.dataclass(frozen=True)
class Budgets:
    """Bounds a plan must keep; None: no bound.

    max_gflops: GFLOPs per image at most. min_top1: top-1 % at least. max_top1_drop: top-1 points
    lost against the uncompressed model on the same images at most.
    """
    max_gflops: float | None = None
    min_top1: float | None = None
    max_top1_drop: float | None = None

    def bounds(self) -> list[tuple[str, str, str, float]]:
        """(budget, metric, "<=" or ">=", value) for each budget that is set."""
        return [(name, metric, op, getattr(self, name)) for name, (metric, op) in BOUNDS.items()
                if getattr(self, name) is not None]

    def constraints(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna constraint values (``trial.set_constraint``): <= 0 within a budget, else by how much
        over. ``metrics`` may hold numbers or columns (a DataFrame: one value per row)."""
        return {name: metrics[metric] - value if op == "<=" else value - metrics[metric]
                for name, metric, op, value in self.bounds()}

    def labels(self) -> dict[str, str]:
        """``{"max_gflops": "gflops <= 0.1", ...}`` for each budget that is set."""
        return {name: f"{metric} {op} {value:g}" for name, metric, op, value in self.bounds()}

    def check(self) -> Budgets:
        """``self``, or the one-line error naming the flag of a budget no plan could sensibly have."""
        if self.max_gflops is not None and not 0 < self.max_gflops < math.inf:
            raise ParetokenError(f"max-gflops: {self.max_gflops!r} is invalid; valid: a finite number > 0")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 100:
            raise ParetokenError(f"min-top1: {self.min_top1!r} is invalid; valid: 0..100 (%)")
        if self.max_top1_drop is not None and not 0 <= self.max_top1_drop <= 100:
            raise ParetokenError(f"max-top1-drop: {self.max_top1_drop!r} is invalid; valid: 0..100 (points)")
        return self

    def as_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        """``gflops <= 0.1, top1 >= 80``; empty without budgets."""
        return ", ".join(self.labels().values())


__all__ = ["BOUNDS", "CATALOG", "DIRECTIONS", "HEADLINE", "METRICS", "OBJECTIVES_HELP", "Budgets", "Metric",
           "format_metric"]
