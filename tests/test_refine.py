"""Front steps (search/refine.py): the neighbourhood against a brute-force one, and the sampler in real Optuna studies."""
from __future__ import annotations

import itertools

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from paretoken.search import refine
from paretoken.search import study as st
from paretoken.search.cli import FRONT_STEPS

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTRIBUTIONS = {
    "r": IntDistribution(0, 4),
    "keep": FloatDistribution(0.4, 0.6, step=0.05),
    "op": CategoricalDistribution(("prune", "merge", "joint")),
    "on": CategoricalDistribution((False, True)),
}


def _grid(distribution) -> list:
    """Every value of a distribution, in order (the brute force's own enumeration)."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    n = round((distribution.high - distribution.low) / distribution.step)
    return [round(distribution.low + k * distribution.step, 9) for k in range(n + 1)]


def _one_step(a, b, distribution) -> bool:
    """b is one step from a: adjacent on the ordered grid, or any other choice of a categorical."""
    if isinstance(distribution, CategoricalDistribution):
        return a != b
    grid = _grid(distribution)
    return abs(grid.index(round(a, 9)) - grid.index(round(b, 9))) == 1


@pytest.mark.parametrize("parent", [
    {"r": 0, "keep": 0.4, "op": "prune", "on": False},
    {"r": 2, "keep": 0.5, "op": "merge", "on": True},
    {"r": 4, "keep": 0.6, "op": "joint", "on": True},
])
def test_neighbours_are_the_sets_one_or_two_steps_away(parent):
    """Against a brute force over the whole grid: sets differing in one or two parameters, each by one step."""
    names = list(DISTRIBUTIONS)
    expected = set()
    for values in itertools.product(*(_grid(DISTRIBUTIONS[n]) for n in names)):
        candidate = dict(zip(names, values))
        changed = [n for n in names if candidate[n] != (round(parent[n], 9) if isinstance(parent[n], float)
                                                          else parent[n])]
        if 1 <= len(changed) <= 2 and all(_one_step(parent[n], candidate[n], DISTRIBUTIONS[n]) for n in changed):
            expected.add(refine._key(candidate))
    found = refine.neighbours(parent, DISTRIBUTIONS)
    assert len(found) == len({refine._key(p) for p in found})  # no repeats
    assert {refine._key(p) for p in found} == expected
    for p in found:
        for name, value in p.items():
            dist = DISTRIBUTIONS[name]
            assert dist._contains(dist.to_internal_repr(value))


def test_moves_of_stepless_floats_stay_in_range():
    linear, log = FloatDistribution(0.0, 1.0), FloatDistribution(1e-3, 1.0, log=True)
    assert refine.moves(0.5, linear) == pytest.approx([0.45, 0.55])
    assert refine.moves(0.0, linear) == pytest.approx([0.05])
    up = refine.moves(1e-3, log)
    assert len(up) == 1 and up[0] == pytest.approx(1e-3 * 1000 ** (1 / 20))


def _objective(trial) -> tuple[float, float]:
    """Two conflicting objectives on a conditional grid space: n extra blocks each with an amount."""
    base = trial.suggest_int("base", 0, 20)
    n = trial.suggest_int("n", 0, 2)
    extra = sum(trial.suggest_float(f"x{k}", 0.0, 1.0, step=0.1) for k in range(n))
    cost = base + 3 * extra
    quality = -((base - 13) ** 2) / 10 + extra - 0.5 * n
    return quality, cost


def _study(share: float, seed: int = 0, trials: int = 40):
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=st.make_sampler("tpe", seed, front_steps=share))
    study.enqueue_trial({"base": 10, "n": 0})
    study.optimize(_objective, n_trials=trials)
    return study


def test_front_steps_move_a_front_trial_and_never_repeat_one():
    study = _study(0.5)
    trials = study.get_trials()
    steps = [t for t in trials if refine.STEP_ATTR in t.system_attrs]
    assert 10 <= len(steps) <= 30  # about half of 40
    for t in steps:
        assert refine._key(t.params) not in {refine._key(o.params) for o in trials[:t.number]}
        parent = trials[t.system_attrs[refine.STEP_ATTR]]
        assert parent.number < t.number and parent.state.name == "COMPLETE"
        # the parent was on the front of the trials finished before the step
        earlier = [o for o in trials[:t.number] if o.state.name == "COMPLETE"]
        assert not any(o.values[0] >= parent.values[0] and o.values[1] <= parent.values[1]
                       and o.values != parent.values for o in earlier)
        shared = [k for k in parent.params if k in t.params]
        changed = [k for k in shared if t.params[k] != parent.params[k]]
        assert changed and len(changed) <= 2
        for k in changed:
            assert refine._key({k: t.params[k]}) in {refine._key({k: v}) for v in
                                                       refine.moves(parent.params[k], parent.distributions[k])}
        # unchanged shared parameters are the parent's, so a step is a near copy of its parent
        assert all(t.params[k] == parent.params[k] for k in shared if k not in changed)


def test_front_steps_are_reproducible_and_off_at_zero():
    first, again = _study(0.5, seed=3, trials=25), _study(0.5, seed=3, trials=25)
    assert [t.params for t in first.trials] == [t.params for t in again.trials]
    assert not any(refine.STEP_ATTR in t.system_attrs for t in _study(0.0, trials=15).trials)
    assert isinstance(st.make_sampler("random", 0, front_steps=0), st.TrialSeededSampler)


def test_front_steps_default_is_one_number():
    assert FRONT_STEPS == st.FRONT_STEPS
    assert repr(st.make_sampler("tpe", 0)).startswith(f"FrontStepSampler(TrialSeededSampler(TPESampler, seed=0), "
                                                      f"share={st.FRONT_STEPS})")


@pytest.mark.parametrize("share", [-0.1, 1.01, True, "0.3", np.nan])
def test_front_steps_out_of_range_is_a_one_line_error(share):
    from paretoken.errors import ParetokenError

    with pytest.raises(ParetokenError, match=r"^front-steps: .* is invalid; valid: a share of the trials in \[0, 1\]"):
        st.make_sampler("tpe", 0, front_steps=share)
