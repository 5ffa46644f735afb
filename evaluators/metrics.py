"""The metrics a plan is measured by: names (in table order), units and which way is better.

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
  peak_mem_mb  CUDA peak allocated memory of the evaluation pass; NaN on CPU,
               where PyTorch offers no allocator peak.
  padding_pct  % of token slots in the batched pass that were padding (per-image
               plans only; 0 otherwise): what batching per-image counts costs.
"""
from __future__ import annotations

#: Whether a larger (``maximize``) or smaller (``minimize``) value is better, per metric, in table order.
DIRECTIONS: dict[str, str] = {
    "top1": "maximize", "top1_drop": "minimize", "agreement": "maximize", "kl": "minimize",
    "gflops": "minimize", "img_per_s": "maximize", "latency_ms": "minimize", "peak_mem_mb": "minimize",
    "padding_pct": "minimize",
}
METRICS: tuple[str, ...] = tuple(DIRECTIONS)
#: For help texts: "top1, agreement, img_per_s (maximised); top1_drop, ... (minimised)".
OBJECTIVES_HELP = "; ".join(", ".join(m for m, d in DIRECTIONS.items() if d == way) + f" ({said})"
                            for way, said in (("maximize", "maximised"), ("minimize", "minimised")))

__all__ = ["DIRECTIONS", "METRICS", "OBJECTIVES_HELP"]
