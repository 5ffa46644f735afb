"""The Space contract: an Optuna trial in, a valid :class:`~paretoken.compress.plan.Plan` out.

Spaces are define-by-run: :meth:`Space.sample` asks the trial for the
parameters it needs, conditionally (a block's amount is asked only when the
block has a stage), and builds the plan. Parameter names carry the block
index (``at_3``, ``keep_3``), so a trial's parameters read like its plan.
Spaces make stages only: a search runs every sampled plan with ``prefix_only_last``
(the last block computes only the prefix tokens, which is exact and never costs more),
so it is not a choice for the sampler (see :func:`paretoken.search.study.runs_prefix_only`).
A stage in the last block is then moot, so the blocks a space chooses stages for
(:func:`chosen_blocks`) stop before it; a schedule over every block (a ToMe ramp, a
Patch Slimming pyramid) keeps its last entry, and the search drops that stage.

:meth:`Space.params_for` is the inverse: the parameters that make the space
produce a given plan (``None`` when the space cannot express it). The search
uses it to enqueue the published presets as ordinary trials, so the sampler
learns from them like from any other trial.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from paretoken.compress.plan import Plan
from paretoken.errors import ParetokenError, check_int


@dataclass(frozen=True)
class Param:
    """One (family of) parameter(s) of a space, for listing.

    ``name`` may hold ``<l>``: one parameter per block index l.
    ``values``: the distribution in words; ``when``: the condition under which it is asked.
    """

    name: str
    values: str
    meaning: str
    when: str = ""

    def to_dict(self) -> dict[str, str]:
        out = {"name": self.name, "values": self.values, "meaning": self.meaning}
        if self.when:
            out["when"] = self.when
        return out


def chosen_blocks(depth: int) -> range:
    """The blocks of a ``depth``-block model a space chooses stages for: all but the last (moot under
    ``prefix_only_last``), or the one block of a one-block model."""
    return range(max(depth - 1, 1))


def check_depth(depth: Any) -> int:
    return check_int("depth", depth, 1, note="the model's number of blocks")


class Space:
    """A search space over plans. Subclasses set ``name``, ``description``, ``params`` and implement
    :meth:`_sample` and :meth:`_params_for`."""

    name: str = ""
    description: str = ""
    params: tuple[Param, ...] = ()

    def sample(self, trial, depth: int = 12) -> Plan:
        """The plan for ``trial`` (an ``optuna.Trial``, ``FixedTrial`` or ``FrozenTrial``) on a ``depth``-block
        model; its ``prefix_only_last`` is False."""
        return self._sample(trial, check_depth(depth))

    def _sample(self, trial, depth: int) -> Plan:  # pragma: no cover - abstract
        """The plan for ``trial`` on a ``depth``-block model (``depth`` checked)."""
        raise NotImplementedError

    def _params_for(self, plan: Plan, depth: int) -> dict[str, Any] | list[dict[str, Any]] | None:
        """Candidate parameters for ``plan`` (one dict, or a list tried in order); None: not expressible."""
        raise NotImplementedError  # pragma: no cover - abstract

    def params_for(self, plan: Plan, depth: int = 12) -> dict[str, Any] | None:
        """The parameters that make :meth:`sample` return ``plan``'s stages exactly, or None when this
        space cannot express them (other ops, amounts off the space's grid, layers beyond ``depth``).
        ``plan.prefix_only_last`` is not the space's (see the module docstring).

        The answer is checked by sampling with those parameters: every parameter is used,
        lies inside its distribution, and the plan comes out equal.
        """
        depth = check_depth(depth)
        try:
            plan.check_depth(depth)
        except ParetokenError:
            return None
        stages = dataclasses.replace(plan, prefix_only_last=False)
        candidates = self._params_for(stages, depth)
        if candidates is None:
            return None
        for params in candidates if isinstance(candidates, list) else [candidates]:
            if self._reproduces(params, stages, depth):
                return params
        return None

    def _reproduces(self, params: dict[str, Any], plan: Plan, depth: int) -> bool:
        import optuna

        fixed = optuna.trial.FixedTrial(params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                made = self.sample(fixed, depth)
            except (ValueError, ParetokenError):
                return False
        used = fixed.distributions
        if made != plan or set(used) != set(params):
            return False
        return all(dist._contains(dist.to_internal_repr(params[key])) for key, dist in used.items())

    def describe(self) -> dict[str, Any]:
        """Plain-data description: name, description, parameters."""
        return {"name": self.name, "description": self.description,
                "params": [p.to_dict() for p in self.params]}

    def __repr__(self) -> str:
        return f"<Space {self.name}>"


def stages_by_layer(plan: Plan) -> Mapping[int, Any]:
    return {s.layer: s for s in plan.stages}
