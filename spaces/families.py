"""The spaces, one per source method plus ``mixed``.

The grids of an op's amounts (the keep ratio of prune and prune_fuse, merge's r, JMP's mass and
sim, AS-ViT's threshold) are the op's own (:class:`~paretoken.compress.ops.OpSpec` ``grids``);
the located spaces and ``mixed`` read them from the registry. The schedules of ToMe and Patch
Slimming have grids of their own, here:

  r          0 .. 20 (tome; ramp ends 0 .. 24)   patch tokens merged away in a block
  slim keep  0.60 .. 1.00 step 0.05              1.00 means no stage in that block

Every published preset of :mod:`paretoken.compress.presets` lies on these grids.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from paretoken.compress.ops import Choice, Grid, OpSpec, get_op, ops, stage_fields
from paretoken.compress.plan import Plan, Stage
from paretoken.errors import ParetokenError
from paretoken.spaces.base import Param, Space, chosen_blocks, stages_by_layer

SLIM_KEEP = Grid(0.6, 1.0, 0.05)
R_MAX = 20
R_RAMP_MAX = 24
MAX_OVERRIDES = 4  # blocks of a mixed plan off its ToMe ramp; every preset needs at most 3

_AT = Param("at_<l>", "categorical False/True, l = 0..depth-2", "block l has a stage")


def _meaning(field: str) -> str:
    """The one-line meaning of amount or option field ``field``, as the op registry declares it."""
    return stage_fields()[field].meaning


def _suggest_amounts(trial, layer: int, spec: OpSpec) -> dict[str, Any]:
    """Each field ``f`` the op has a grid for, asked as parameter ``f_<layer>`` on it."""
    return {name: grid.suggest(trial, f"{name}_{layer}") for name, grid in spec.grids.items()}


def _amount_params(stage: Stage, spec: OpSpec) -> dict[str, Any] | None:
    """The inverse of :func:`_suggest_amounts`, or None when the stage gives an amount without a grid,
    sets an option the space does not sample, or is off a grid."""
    settings, amounts = stage.settings, {f for f, _ in stage.values if f in spec.fields}
    options = {o.name: o.default for o in spec.options if o.name not in spec.grids}
    if amounts != {f for f in spec.grids if f in spec.fields} or any(settings[o] != d for o, d in options.items()):
        return None
    if not all(grid.contains(settings[f]) for f, grid in spec.grids.items()):
        return None
    return {f"{name}_{stage.layer}": settings[name] for name in spec.grids}


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
    """A stage of one op, with one score, in each block whose ``at_<l>`` is True, with per-block
    amounts on the op's grids; the parameter of field ``f`` at block ``l`` is ``f_<l>``."""

    op: str = ""
    score: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.params = (_AT, *(Param(f"{name}_<l>", grid.words(), _meaning(name), "at_<l>")
                             for name, grid in get_op(cls.op).grids.items()))

    def _sample(self, trial, depth: int) -> Plan:
        spec, stages = get_op(self.op), []
        for layer in chosen_blocks(depth):
            if trial.suggest_categorical(f"at_{layer}", (False, True)):
                stages.append(Stage(layer, self.op, score=self.score, **_suggest_amounts(trial, layer, spec)))
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
            amount = _amount_params(stage, get_op(self.op))
            if amount is None:
                return None
            params.update(amount)
        return params


class EvitSpace(LocatedSpace):
    name = "evit"
    op = "prune_fuse"
    score = "cls_attn"
    description = ("EViT: keep the top tokens by class attention and fuse the rest into one token, "
                   "at chosen blocks with a keep ratio each")


class DynamicVitSpace(LocatedSpace):
    name = "dynamicvit"
    op = "prune"
    score = "cls_attn"
    description = ("DynamicViT (inference form, class-attention scores standing in for the learned predictors): "
                   "drop all but the top tokens at chosen blocks with a keep ratio each; "
                   "`paretoken finetune` on a plan with score: predictor trains the predictors")


class AsVitSpace(LocatedSpace):
    name = "asvit"
    op = "threshold"
    score = "head_weighted"
    description = ("AS-ViT: keep the tokens whose head-weighted class attention exceeds a threshold "
                   "(a per-image count), at chosen blocks with a threshold each")


class JmpSpace(LocatedSpace):
    name = "jmp"
    op = "joint"
    score = "cls_attn"
    description = ("JMP: critical tokens hold a mass of the class attention; each other token merges into its "
                   "most similar critical token above a similarity or is pruned, at chosen blocks")


# --------------------------------------------------------------------------- Patch Slimming
class SlimSpace(Space):
    name = "slim"
    description = ("Patch Slimming: a static pyramid, a keep ratio of the current tokens in every block "
                   "(so counts never grow with depth), tokens picked by class importance")
    params = (Param("keep_<l>", SLIM_KEEP.words() + ", l = 0..depth-2",
                    "fraction of the block's patch tokens kept (1: no stage); the last block repeats "
                    "block depth-2's"),)

    def _sample(self, trial, depth: int) -> Plan:
        keeps = [SLIM_KEEP.suggest(trial, f"keep_{layer}") for layer in chosen_blocks(depth)]
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
            if stage.op != "slim" or stage.score != "cls_attn" or not SLIM_KEEP.contains(stage.keep) \
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

    def __init__(self, ops: Sequence[str] | None = None) -> None:
        """``ops``: the ops an overriding block chooses among (default: every registered op that
        declares itself for ``mixed``, :func:`mixed_ops`, read when the space samples)."""
        if ops is not None:
            ops = tuple(ops)
            valid = mixed_ops()
            bad = [op for op in ops if op not in valid]
            if bad or not ops or len(set(ops)) != len(ops):
                raise ParetokenError(f"ops: {','.join(bad) or ','.join(ops) or '(none)'} is invalid; valid: a list "
                                     f"without repeats of {', '.join(valid)}")
        self._ops = ops

    @property
    def ops(self) -> tuple[str, ...]:
        """The ops an overriding block chooses among, in registration order."""
        return tuple(op for op in mixed_ops() if self._ops is None or op in self._ops)

    @property
    def description(self) -> str:
        return (f"A ToMe ramp (r_first to r_last) as the base; up to {MAX_OVERRIDES} blocks override it, each "
                f"with its own op ({', '.join(self.ops)}), amount and, where it applies, score")

    @property
    def params(self) -> tuple[Param, ...]:
        """The base, the overrides, and each op's amount and score parameters, from the op registry."""
        choices = self.ops
        base = (
            Param("r_first", f"int 0..{R_RAMP_MAX}", "base ToMe ramp: r in block 0"),
            Param("r_last", f"int 0..{R_RAMP_MAX}", "base ToMe ramp: r in the last block (rounded linear in between)"),
            Param("overrides", f"int 0..{MAX_OVERRIDES} (at most depth-1)", "how many blocks override the base"),
            Param("override_<k>", "int 0..depth-2, k = 0..overrides-1",
                  "the k-th overriding block (a repeat adds none)", "overrides"),
            Param("op_<l>", "categorical " + "/".join(choices), "block l's op", "override_<k> = l"))
        by_grid: dict[tuple[str, Grid | Choice], list[str]] = {}
        scored: dict[str, list[str]] = {}
        for op in choices:
            spec = get_op(op)
            for name, grid in spec.grids.items():
                by_grid.setdefault((name, grid), []).append(op)
            if len(spec.search_scores) > 1:
                for score in spec.search_scores:
                    scored.setdefault(score, []).append(op)
        amounts = tuple(Param(f"{name}_<l>", grid.words(), _meaning(name), _when(used))
                        for (name, grid), used in by_grid.items())
        score_ops = sorted({op for used in scored.values() for op in used}, key=choices.index)
        score = (Param("score_<l>", "categorical " + "/".join(scored), "token score", _when(score_ops)),) \
            if scored else ()
        return base + amounts + score

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
                stages.append(self._override(trial, layer, self.ops))
            elif base[layer] > 0:
                stages.append(Stage(layer, "merge", r=base[layer]))
        return Plan(tuple(stages))

    @staticmethod
    def _override(trial, layer: int, choices: tuple[str, ...]) -> Stage:
        spec = get_op(trial.suggest_categorical(f"op_{layer}", choices))
        amounts = _suggest_amounts(trial, layer, spec)
        scores = spec.search_scores
        score = trial.suggest_categorical(f"score_{layer}", scores) if len(scores) > 1 else None
        return Stage(layer, spec.name, score=score, **amounts)

    def _params_for(self, plan: Plan, depth: int) -> dict[str, Any] | None:
        """The base ramp that leaves the fewest blocks to override (every (r_first, r_last) is tried)."""
        by = stages_by_layer(plan)
        overrides = {layer: self._override_params(stage, self.ops) for layer, stage in by.items()}
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
    def _override_params(stage: Stage, choices: tuple[str, ...]) -> dict[str, Any] | None:
        """The parameters of one overriding block, or None when off the space's ops, scores or grids."""
        spec = get_op(stage.op)
        if stage.op not in choices or stage.score not in spec.search_scores:
            return None
        amount = _amount_params(stage, spec)
        if amount is None:
            return None
        score = {f"score_{stage.layer}": stage.score} if len(spec.search_scores) > 1 else {}
        return {f"op_{stage.layer}": stage.op, **amount, **score}


def mixed_ops() -> tuple[str, ...]:
    """The ops ``mixed`` chooses among for an overriding block, in registration order."""
    return tuple(spec.name for spec in ops() if spec.mixed)


def _when(used: list[str]) -> str:
    return f"op_<l> = {used[0]}" if len(used) == 1 else f"op_<l> in {', '.join(used)}"
