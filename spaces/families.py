"""The spaces, one per source method plus ``mixed``.

Grids (chosen so every published preset of :mod:`paretoken.compress.presets` lies on them):

  keep       0.40 .. 0.95 step 0.05   fraction of the block's current patch tokens kept (prune, prune_fuse)
  slim keep  0.60 .. 1.00 step 0.05   1.00 means no stage in that block
  r          0 .. 20 (tome; ramp ends 0 .. 24), 1 .. 20 (mixed merge)   patch tokens merged away in a block
  threshold  0.10 .. 1.20 step 0.05   relative to uniform attention (1.0 = average token)
  mass       0.70 .. 1.00 step 0.05   score mass held by JMP's critical tokens
  sim        0.00 .. 1.00 step 0.05   cosine at or above which JMP merges instead of pruning

Stages compound (a keep ratio applies to the tokens that are left), so the ranges stop short of the
extremes where a plan with several stages would keep almost nothing.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from paretoken.compress.plan import Plan, Stage
from paretoken.spaces.base import Param, Space, chosen_blocks, stages_by_layer, suggest_grid

KEEP = (0.4, 0.95, 0.05)
SLIM_KEEP = (0.6, 1.0, 0.05)
THRESHOLD = (0.1, 1.2, 0.05)
MASS = (0.7, 1.0, 0.05)
SIM = (0.0, 1.0, 0.05)
R_MAX = 20
R_RAMP_MAX = 24
SCORES = ("cls_attn", "head_weighted")
MIXED_OPS = ("prune", "prune_fuse", "merge", "joint", "threshold")
MAX_OVERRIDES = 4  # blocks of a mixed plan off its ToMe ramp; every preset needs at most 3


def _grid(values: tuple[float, float, float]) -> str:
    low, high, step = values
    return f"float {low:g}..{high:g} step {step:g}"


def _on_grid(value: float | None, values: tuple[float, float, float]) -> bool:
    low, high, step = values
    if value is None or not low - 1e-9 <= value <= high + 1e-9:
        return False
    k = (value - low) / step
    return abs(k - round(k)) < 1e-6


_AT = Param("at_<l>", "categorical False/True, l = 0..depth-2", "block l has a stage")

Amounts = dict[str, tuple[tuple[float, float, float], str]]  # amount field -> ((low, high, step), help)


def _suggest_amount(trial, layer: int, amounts: Amounts) -> dict[str, Any]:
    """Each amount field ``f`` of a stage at block ``layer``, asked as parameter ``f_<layer>`` on its grid."""
    return {name: suggest_grid(trial, f"{name}_{layer}", *grid) for name, (grid, _) in amounts.items()}


def _amount_params(stage: Stage, amounts: Amounts) -> dict[str, Any] | None:
    """The inverse of :func:`_suggest_amount`, or None when a field is off its grid."""
    values = {name: getattr(stage, name) for name in amounts}
    if not all(_on_grid(values[name], grid) for name, (grid, _) in amounts.items()):
        return None
    return {f"{name}_{stage.layer}": value for name, value in values.items()}


# --------------------------------------------------------------------------- ToMe
class TomeSpace(Space):
    """ToMe: bipartite merging of ``r`` tokens per block, per layer or on a ramp."""

    name = "tome"
    description = ("ToMe (bipartite soft matching, keys): r tokens merged in each block, "
                   "as one constant r, a linear ramp from the first to the last block, or r per layer")
    params = (
        Param("schedule", "categorical constant/linear/per_layer", "how r varies with depth"),
        Param("r", f"int 0..{R_MAX}", "r in every block", "schedule = constant"),
        Param("r_first", f"int 0..{R_RAMP_MAX}", "r in block 0", "schedule = linear"),
        Param("r_last", f"int 0..{R_RAMP_MAX}", "r in the last block (rounded linear in between)", "schedule = linear"),
        Param("r_<l>", f"int 0..{R_MAX}, l = 0..depth-2", "r in block l (0: no stage)", "schedule = per_layer"),
    )

    @staticmethod
    def ramp(first: int, last: int, depth: int) -> list[int]:
        if depth == 1:
            return [first]
        return [int(math.floor(first + (last - first) * layer / (depth - 1) + 0.5)) for layer in range(depth)]

    def _sample(self, trial, depth: int) -> Plan:
        schedule = trial.suggest_categorical("schedule", ("constant", "linear", "per_layer"))
        if schedule == "constant":
            rs = [trial.suggest_int("r", 0, R_MAX)] * depth
        elif schedule == "linear":
            rs = self.ramp(trial.suggest_int("r_first", 0, R_RAMP_MAX), trial.suggest_int("r_last", 0, R_RAMP_MAX),
                           depth)
        else:
            chosen = chosen_blocks(depth)
            rs = [trial.suggest_int(f"r_{layer}", 0, R_MAX) for layer in chosen] + [0] * (depth - len(chosen))
        return Plan(tuple(Stage(layer, "merge", r=r) for layer, r in enumerate(rs) if r > 0))

    def _params_for(self, plan: Plan, depth: int) -> list[dict[str, Any]] | None:
        if any(s.op != "merge" or s.r is None for s in plan.stages):
            return None
        by = stages_by_layer(plan)
        rs = [by[layer].r if layer in by else 0 for layer in range(depth)]
        candidates = []
        if len(set(rs)) == 1:
            candidates.append({"schedule": "constant", "r": rs[0]})
        if self.ramp(rs[0], rs[-1], depth) == rs:
            candidates.append({"schedule": "linear", "r_first": rs[0], "r_last": rs[-1]})
        chosen = chosen_blocks(depth)
        if not any(rs[len(chosen):]):
            candidates.append({"schedule": "per_layer", **{f"r_{layer}": rs[layer] for layer in chosen}})
        return candidates


# --------------------------------------------------------------------------- located stages
class LocatedSpace(Space):
    """A stage of one op in each block whose ``at_<l>`` is True, with per-block amounts.

    ``amounts`` maps each amount field of the op to its (low, high, step) grid and a help line;
    the parameter of field ``f`` at block ``l`` is ``f_<l>``.
    """

    op: str = ""
    score: str = ""
    amounts: Amounts = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.params = (_AT, *(Param(f"{name}_<l>", _grid(grid), text, "at_<l>")
                             for name, (grid, text) in cls.amounts.items()))

    def _sample(self, trial, depth: int) -> Plan:
        stages = []
        for layer in chosen_blocks(depth):
            if trial.suggest_categorical(f"at_{layer}", (False, True)):
                stages.append(Stage(layer, self.op, score=self.score, **_suggest_amount(trial, layer, self.amounts)))
        return Plan(tuple(stages))

    def _params_for(self, plan: Plan, depth: int) -> dict[str, Any] | None:
        by = stages_by_layer(plan)
        chosen = chosen_blocks(depth)
        if any(layer not in chosen for layer in by):
            return None
        params: dict[str, Any] = {}
        for layer in chosen:
            stage = by.get(layer)
            params[f"at_{layer}"] = stage is not None
            if stage is None:
                continue
            if stage.op != self.op or stage.score != self.score:
                return None
            amount = _amount_params(stage, self.amounts)
            if amount is None:
                return None
            params.update(amount)
        return params


_KEEP_AMOUNT = {"keep": (KEEP, "fraction of the block's patch tokens kept")}


class EvitSpace(LocatedSpace):
    name = "evit"
    op = "prune_fuse"
    score = "cls_attn"
    description = ("EViT: keep the top tokens by class attention and fuse the rest into one token, "
                   "at chosen blocks with a keep ratio each")
    amounts = _KEEP_AMOUNT


class DynamicVitSpace(LocatedSpace):
    name = "dynamicvit"
    op = "prune"
    score = "cls_attn"
    description = ("DynamicViT (inference form, class-attention scores standing in for the learned predictors): "
                   "drop all but the top tokens at chosen blocks with a keep ratio each; "
                   "`paretoken finetune` on a plan with score: predictor trains the predictors")
    amounts = _KEEP_AMOUNT


class AsVitSpace(LocatedSpace):
    name = "asvit"
    op = "threshold"
    score = "head_weighted"
    description = ("AS-ViT: keep the tokens whose head-weighted class attention exceeds a threshold "
                   "(a per-image count), at chosen blocks with a threshold each")
    amounts = {"threshold": (THRESHOLD, "score threshold relative to uniform attention")}


class JmpSpace(LocatedSpace):
    name = "jmp"
    op = "joint"
    score = "cls_attn"
    description = ("JMP: critical tokens hold a mass of the class attention; each other token merges into its "
                   "most similar critical token above a similarity or is pruned, at chosen blocks")
    amounts = {"mass": (MASS, "score mass held by the critical tokens"),
               "sim": (SIM, "cosine at or above which a token merges instead of being pruned")}


MIXED_AMOUNTS: dict[str, Amounts] = {cls.op: cls.amounts for cls in (DynamicVitSpace, EvitSpace, JmpSpace, AsVitSpace)}


# --------------------------------------------------------------------------- Patch Slimming
class SlimSpace(Space):
    name = "slim"
    description = ("Patch Slimming: a static pyramid, a keep ratio of the current tokens in every block "
                   "(so counts never grow with depth), tokens picked by class importance")
    params = (Param("keep_<l>", _grid(SLIM_KEEP) + ", l = 0..depth-2",
                    "fraction of the block's patch tokens kept (1: no stage); the last block repeats "
                    "block depth-2's"),)

    def _sample(self, trial, depth: int) -> Plan:
        keeps = [suggest_grid(trial, f"keep_{layer}", *SLIM_KEEP) for layer in chosen_blocks(depth)]
        keeps += keeps[-1:] * (depth - len(keeps))  # the pyramid's last step: moot under prefix_only_last
        return Plan(tuple(Stage(layer, "slim", keep=k) for layer, k in enumerate(keeps) if k < 1.0))

    def _params_for(self, plan: Plan, depth: int) -> dict[str, Any] | None:
        by = stages_by_layer(plan)
        params = {}
        for layer in chosen_blocks(depth):  # the last block's stage is checked by params_for's resampling
            stage = by.get(layer)
            if stage is None:
                params[f"keep_{layer}"] = 1.0
                continue
            if stage.op != "slim" or stage.score != "cls_attn" or not _on_grid(stage.keep, SLIM_KEEP) \
                    or stage.keep >= 1.0:
                return None
            params[f"keep_{layer}"] = stage.keep
        return params


# --------------------------------------------------------------------------- mixed
class MixedSpace(Space):
    """A ToMe ramp as the base schedule, and up to :data:`MAX_OVERRIDES` blocks that override it
    with an op of their own.

    The base makes the published ToMe schedules two-parameter points with near neighbours
    (``r_first``, ``r_last``), so a sampler can walk along the schedule that the presets show to
    be strong; the overrides let chosen blocks prune, fuse, merge, join or threshold instead.
    The number of overriding blocks is a parameter of its own (not a True/False per block, which
    makes a random plan override half the blocks and a pure ramp a 1-in-4096 draw).
    """

    name = "mixed"
    description = ("A ToMe ramp (r_first to r_last) as the base; up to "
                   f"{MAX_OVERRIDES} blocks override it, each with its own op "
                   "(prune, prune_fuse, merge, joint, threshold), amount and, where it applies, score")
    params = (
        Param("r_first", f"int 0..{R_RAMP_MAX}", "base ToMe ramp: r in block 0"),
        Param("r_last", f"int 0..{R_RAMP_MAX}", "base ToMe ramp: r in the last block (rounded linear in between)"),
        Param("overrides", f"int 0..{MAX_OVERRIDES} (at most depth-1)", "how many blocks override the base"),
        Param("override_<k>", "int 0..depth-2, k = 0..overrides-1", "the k-th overriding block (a repeat adds none)",
              "overrides"),
        Param("op_<l>", "categorical " + "/".join(MIXED_OPS), "block l's op", "override_<k> = l"),
        Param("keep_<l>", _grid(KEEP), "fraction of patch tokens kept", "op_<l> in prune, prune_fuse"),
        Param("r_<l>", f"int 1..{R_MAX}", "tokens merged away", "op_<l> = merge"),
        Param("mass_<l>", _grid(MASS), "JMP critical score mass", "op_<l> = joint"),
        Param("sim_<l>", _grid(SIM), "JMP merge similarity", "op_<l> = joint"),
        Param("threshold_<l>", _grid(THRESHOLD), "score threshold", "op_<l> = threshold"),
        Param("score_<l>", "categorical " + "/".join(SCORES), "token score", "op_<l> not merge"),
    )

    @staticmethod
    def max_overrides(depth: int) -> int:
        """Blocks a plan may override on a ``depth``-block model."""
        return min(MAX_OVERRIDES, len(chosen_blocks(depth)))

    def _sample(self, trial, depth: int) -> Plan:
        base = TomeSpace.ramp(trial.suggest_int("r_first", 0, R_RAMP_MAX), trial.suggest_int("r_last", 0, R_RAMP_MAX),
                              depth)
        count = trial.suggest_int("overrides", 0, self.max_overrides(depth))
        overridden = {trial.suggest_int(f"override_{k}", 0, chosen_blocks(depth)[-1]) for k in range(count)}
        stages = []
        for layer in range(depth):
            if layer in overridden:
                stages.append(self._override(trial, layer))
            elif base[layer] > 0:
                stages.append(Stage(layer, "merge", r=base[layer]))
        return Plan(tuple(stages))

    @staticmethod
    def _override(trial, layer: int) -> Stage:
        op = trial.suggest_categorical(f"op_{layer}", MIXED_OPS)
        if op == "merge":
            return Stage(layer, op, r=trial.suggest_int(f"r_{layer}", 1, R_MAX))
        amount = _suggest_amount(trial, layer, MIXED_AMOUNTS[op])
        return Stage(layer, op, score=trial.suggest_categorical(f"score_{layer}", SCORES), **amount)

    def _params_for(self, plan: Plan, depth: int) -> dict[str, Any] | None:
        """The base ramp that leaves the fewest blocks to override (every (r_first, r_last) is tried)."""
        by = stages_by_layer(plan)
        overrides = {layer: self._override_params(stage) for layer, stage in by.items()}
        fits = (self._fit_base(by, overrides, first, last, depth)
                for first in range(R_RAMP_MAX + 1) for last in range(R_RAMP_MAX + 1))
        return min((fit for fit in fits if fit is not None), key=lambda fit: fit[0], default=(0, None))[1]

    @staticmethod
    def _fit_base(by: Mapping[int, Stage], overrides: Mapping[int, dict[str, Any] | None], first: int, last: int,
                  depth: int) -> tuple[int, dict[str, Any]] | None:
        """(blocks overridden, parameters) of the plan on base ramp first..last; None when a block
        the base does not make cannot be an override, or more than the allowed blocks differ."""
        base = TomeSpace.ramp(first, last, depth)
        layers = [layer for layer in range(depth)
                  if by.get(layer) != (Stage(layer, "merge", r=base[layer]) if base[layer] else None)]
        if len(layers) > MixedSpace.max_overrides(depth) or any(
                overrides.get(layer) is None or layer not in chosen_blocks(depth) for layer in layers):
            return None
        params: dict[str, Any] = {"r_first": first, "r_last": last, "overrides": len(layers)}
        for k, layer in enumerate(layers):
            params[f"override_{k}"] = layer
            params.update(overrides[layer])
        return len(layers), params

    @staticmethod
    def _override_params(stage: Stage) -> dict[str, Any] | None:
        """The parameters of one overriding block, or None when off the space's ops or grids."""
        layer = stage.layer
        if stage.op == "merge":
            return {f"op_{layer}": "merge", f"r_{layer}": stage.r} if stage.r is not None and 1 <= stage.r <= R_MAX \
                else None
        if stage.op not in MIXED_AMOUNTS or stage.score not in SCORES:
            return None
        amount = _amount_params(stage, MIXED_AMOUNTS[stage.op])
        if amount is None:
            return None
        return {f"op_{layer}": stage.op, **amount, f"score_{layer}": stage.score}
