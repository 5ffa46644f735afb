"""paretoken: search for the best token-compression plans of Vision Transformers.

The public face::

    import paretoken
    plan = paretoken.load_plan("plan.yaml")         # or paretoken.preset("tome-r13")
    model = paretoken.apply(model, plan)            # any timm VisionTransformer
    gflops = paretoken.count_flops(model, images)   # fvcore, per image
"""
from paretoken.compress import Plan, Stage, apply, load_plan, token_counts
from paretoken.compress.presets import PRESETS, preset
from paretoken.errors import ParetokenError


def count_flops(model, images, max_images: int = 32) -> float:
    """GFLOPs per image of ``model`` on ``images`` (B, C, H, W), fvcore convention.

    Plans whose token count differs per image are counted one image at a time
    (up to ``max_images``) and averaged, so batching padding is never counted.
    """
    from paretoken.compress import applied_plan
    from paretoken.evaluators.flops import count_flops as _count

    plan = applied_plan(model)
    return _count(model, images, per_image=bool(plan and plan.per_image), max_images=max_images)


__all__ = ["PRESETS", "ParetokenError", "Plan", "Stage", "apply", "count_flops", "load_plan", "preset",
           "token_counts"]
