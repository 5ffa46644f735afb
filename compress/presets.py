"""Published schedules written as plans for a 12-block, 196-patch ViT (DeiT at 224 px).

Each preset names its source. The search enqueues them first, so a study's
front starts at the published state of the art.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from paretoken.compress.plan import Plan, Stage
from paretoken.errors import ParetokenError

DEPTH = 12


@dataclass(frozen=True)
class Preset:
    name: str
    source: str
    plan: Plan


def _every_block(op: str, **amount) -> tuple[Stage, ...]:
    return tuple(Stage(layer, op, **amount) for layer in range(DEPTH))


def _at(layers, op: str, **amount) -> tuple[Stage, ...]:
    return tuple(Stage(layer, op, **amount) for layer in layers)


_SLIM_KEEP = (0.95, 0.9, 0.9, 0.85, 0.85, 0.8, 0.8, 0.75, 0.75, 0.7, 0.7)  # layers 1..11


def _pitome(ratio: float) -> tuple[Stage, ...]:
    """PiToMe's DeiT schedule: every block keeps ``ratio`` of its patch tokens, r = floor(T - T * ratio)
    as its code counts them, with the margin 0.75 - 0.75 * layer / depth."""
    stages, tokens = [], 196
    for layer in range(DEPTH):
        r = math.floor(tokens - tokens * ratio)
        stages.append(Stage(layer, "pitome", r=r, margin=0.75 - 0.75 * layer / DEPTH))
        tokens -= r
    return tuple(stages)


def _diffrate(prune_kept: tuple[int, ...], merge_kept: tuple[int, ...]) -> tuple[Stage, ...]:
    """A DiffRate schedule from its kept token counts per block (class token included) after pruning
    and after merging, as its compression_rate.json gives them."""
    stages, tokens = [], 197
    for layer, (after_prune, after_merge) in enumerate(zip(prune_kept, merge_kept)):
        if (tokens - after_prune, after_prune - after_merge) != (0, 0):
            stages.append(Stage(layer, "prune_merge", pruned=tokens - after_prune, merged=after_prune - after_merge))
        tokens = after_merge
    return tuple(stages)

_PRESETS = (
    Preset("tome-r8", "ToMe (Bolya et al., ICLR 2023): bipartite merging, r=8 tokens in every block",
           Plan(_every_block("merge", r=8))),
    Preset("tome-r13", "ToMe: r=13 in every block (DeiT-S 2.7 GFLOPs)", Plan(_every_block("merge", r=13))),
    Preset("tome-r16", "ToMe: r=16 in every block", Plan(_every_block("merge", r=16))),
    Preset("evit-0.7", "EViT (Liang et al., ICLR 2022): keep 0.7 + fused token at blocks 3, 6, 9 (DeiT-S 3.0 GFLOPs)",
           Plan(_at((3, 6, 9), "prune_fuse", keep=0.7))),
    Preset("evit-0.5", "EViT: keep 0.5 + fused token at blocks 3, 6, 9",
           Plan(_at((3, 6, 9), "prune_fuse", keep=0.5))),
    Preset("dynamicvit-0.7", "DynamicViT (Rao et al., NeurIPS 2021): keep 0.7, 0.49, 0.343 of the patches "
           "(137, 96, 67 tokens) at blocks 3, 6, 9 (DeiT-S 2.9 GFLOPs); training-free class-attention scores "
           "stand in for the learned predictors",
           Plan(_at((3, 6, 9), "prune", keep=0.7))),
    Preset("asvit", "AS-ViT (Liu et al., 2022): head-importance-weighted class attention against per-stage "
           "thresholds at blocks 3, 6, 9; thresholds are training-free starting values (fine-tuning learns them)",
           Plan((Stage(3, "threshold", threshold=0.5), Stage(6, "threshold", threshold=0.6),
                 Stage(9, "threshold", threshold=0.7)))),
    Preset("jmp", "JMP (joint merging and pruning): critical tokens hold 0.9 of the class attention; the rest "
           "merge into a critical token with cosine >= 0.5 or are pruned, at blocks 3, 6, 9",
           Plan(_at((3, 6, 9), "joint", mass=0.9, sim=0.5))),
    Preset("slim", "Patch Slimming (Tang et al., CVPR 2022): a static pyramid, counts never growing with depth, "
           "tokens picked by class importance propagated back one attention step (ViT-Ti -45% GFLOPs)",
           Plan(tuple(Stage(layer, "slim", keep=k) for layer, k in enumerate(_SLIM_KEEP, start=1)))),
    Preset("pitome-0.9", "PiToMe (Tran et al., NeurIPS 2024): energy-protected merging keeping 0.9 of the tokens "
           "in every block, margin 0.75 - 0.75 * layer / 12 (its DeiT setting); its code's bipartite variant in "
           "the first half of the blocks is not reproduced", Plan(_pitome(0.9))),
    Preset("pitome-0.925", "PiToMe: keep 0.925 of the tokens in every block", Plan(_pitome(0.925))),
    Preset("tofu-r13", "ToFu (Kim et al., WACV 2024): ToMe's matching with r=13 in every block; the matched "
           "tokens are dropped in blocks 0-6 and merged by MLERP after (the split of the PiToMe repository's "
           "ToFu)", Plan(tuple(Stage(layer, "merge", r=13, fuse="drop" if layer <= DEPTH // 2 else "mlerp")
                               for layer in range(DEPTH)))),
    Preset("diffrate-2.9", "DiffRate (Chen et al., ICCV 2023): its searched DeiT-S schedule for 2.9 GFLOPs "
           "(79.54 % top-1 off the shelf), prune by class attention then merge in each block",
           Plan(_diffrate((197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3),
                          (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)))),
    Preset("diffrate-2.3", "DiffRate: its searched DeiT-S schedule for 2.3 GFLOPs",
           Plan(_diffrate((197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3),
                          (197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3)))),
)

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def preset(name: str) -> Plan:
    """The plan of a published schedule; see :data:`PRESETS` for names and sources."""
    try:
        return PRESETS[name].plan
    except KeyError:
        raise ParetokenError(f"preset: {name!r} is unknown; valid: {', '.join(PRESETS)}") from None
