"""paretoken.spaces: define-by-run search spaces, an Optuna trial in and a valid Plan out.

    from paretoken.spaces import get_space
    space = get_space("evit")
    plan = space.sample(trial, depth=12)        # trial: optuna.Trial (or FixedTrial)
    params = space.params_for(plan, depth=12)   # the inverse, None if not expressible

Spaces: tome, evit, dynamicvit, asvit, jmp, slim, mixed (:data:`SPACES`).
"""
from __future__ import annotations

from paretoken.errors import ParetokenError
from paretoken.spaces.base import Param, Space
from paretoken.spaces.families import (AsVitSpace, DynamicVitSpace, EvitSpace, JmpSpace, MixedSpace, SlimSpace,
                                       TomeSpace)

SPACES: dict[str, Space] = {s.name: s for s in (TomeSpace(), EvitSpace(), DynamicVitSpace(), AsVitSpace(),
                                                 JmpSpace(), SlimSpace(), MixedSpace())}

DEFAULT_SPACE = "mixed"


def get_space(name: str | Space) -> Space:
    """The space called ``name`` (a :class:`Space` passes through); unknown names list the valid ones."""
    if isinstance(name, Space):
        return name
    try:
        return SPACES[name]
    except (KeyError, TypeError):
        raise ParetokenError(f"space: {name!r} is unknown; valid: {', '.join(SPACES)}") from None


__all__ = ["DEFAULT_SPACE", "Param", "SPACES", "Space", "get_space"]
