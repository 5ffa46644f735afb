"""paretoken: search for the best token-compression plans of Vision Transformers.

The public face::

    import paretoken
    plan = paretoken.load_plan("plan.yaml")         # or paretoken.preset("tome-r13")
    model = paretoken.apply(model, plan)            # any timm VisionTransformer
    compiled = paretoken.compile_model(model)       # torch.compile: one graph for plans without per-image stages
    gflops = paretoken.count_flops(model, images)   # fvcore, per image
    metrics = paretoken.evaluate(plan, paretoken.EvalConfig(images=500, device="auto"))  # top1, kl, ...
    result = paretoken.run_search("demo", budgets=paretoken.Budgets(max_top1_drop=2),   # an Optuna study
                                  eval_config=paretoken.EvalConfig(images=500))         # result.front
"""
import importlib

from paretoken.compress.plan import Plan, Stage, load_plan
from paretoken.errors import ParetokenError

#: Loaded on first use, so that importing paretoken (and `paretoken --help`) needs no torch.
_LAZY = {"apply": "paretoken.compress.patch", "token_counts": "paretoken.compress.patch",
         "compile_model": "paretoken.compress.compiling",
         "PRESETS": "paretoken.compress.presets", "preset": "paretoken.compress.presets",
         "EvalConfig": "paretoken.evaluators.evaluate", "evaluate": "paretoken.evaluators.evaluate",
         "Budgets": "paretoken.evaluators.metrics", "run_search": "paretoken.search"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paretoken' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def count_flops(model, images, max_images: int = 32, method: str = "count") -> float:
    """GFLOPs per image of ``model`` on ``images`` (B, C, H, W), fvcore convention, the mean over the images.

    ``method="count"``: from each image's token counts after one batched forward, exact to fvcore's
    trace of the image alone. ``"trace"``: fvcore traces; plans whose token count differs per image are
    traced one image at a time (the first ``max_images``), so batching padding is never counted.
    """
    from paretoken.compress import applied_plan
    from paretoken.evaluators.flop_model import counted_gflops
    from paretoken.evaluators.flops import count_flops as _count

    if method == "count":
        return counted_gflops(model, images)
    if method != "trace":
        raise ParetokenError(f"method: {method!r} is unknown; valid: count, trace")
    plan = applied_plan(model)
    return _count(model, images, per_image=bool(plan and plan.per_image), max_images=max_images)


__all__ = ["PRESETS", "Budgets", "EvalConfig", "ParetokenError", "Plan", "Stage", "apply", "compile_model", "count_flops",
           "evaluate", "load_plan", "preset", "run_search", "token_counts"]
