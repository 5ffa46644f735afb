"""The op registry: what an op is (:class:`OpSpec`), and the table of registered ops.

An op is one way a block reduces its tokens. Its module (one per op, beside this one) declares
everything about it in one :class:`OpSpec` and registers it: the amount fields a stage of it gives
(with their valid ranges and search grids), the token scores it accepts, whether its token count
differs per image, what attention must provide for it, the reduce function, and whether the
``mixed`` space may choose it. Plan validation, patching, the spaces, ``paretoken spaces`` and the
docs' op table all read this table, so a new op is one module::

    from paretoken.compress.ops import KEEP, R, OpSpec, register
    register(OpSpec(name="my_prune", summary="...", source="...", amounts=((KEEP, R),),
                    scores=("cls_attn",), reduce=my_reduce, grids={"keep": Grid(0.4, 0.95, 0.05)}))

This module imports without torch: reduce functions import it when they run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from paretoken.errors import ParetokenError

#: Every token score a stage can name. ``cls_attn``: class attention averaged over heads (EViT);
#: ``head_weighted``: class attention with heads weighted by their output norm (AS-ViT); ``keys``:
#: the attention keys averaged over heads, a similarity metric rather than a score (ToMe);
#: ``predictor``: a learned DynamicViT predictor's keep probability.
SCORES = ("cls_attn", "head_weighted", "keys", "predictor")

#: What attention must keep for each score: "cls" class attention, "head" head importance.
SCORE_NEEDS: Mapping[str, frozenset[str]] = {
    "cls_attn": frozenset({"cls"}), "head_weighted": frozenset({"cls", "head"}),
    "keys": frozenset(), "predictor": frozenset()}

#: Scores that need trained weights: a search never samples them.
TRAINED_SCORES = frozenset({"predictor"})

#: What an op may ask of attention beyond its score: "keys" (the head-averaged keys, as
#: ``info["keys"]`` (B, N, D)), "full" (the score carried back one step through the full attention
#: matrix, Patch Slimming's propagated importance, in place of ``info["score"]``).
NEEDS = frozenset({"keys", "full"})

#: The reduce function of an op: ``reduce(x, size, info, prefix, **amounts) -> (x, size)`` with x
#: (B, N, C) tokens, size (B, N) patches per token (0: padding), info the attention by-products
#: (``"score"`` (B, N), ``"keys"`` (B, N, D)) and the stage's amount fields as keywords.
Reduce = Callable[..., tuple[Any, Any]]


@dataclass(frozen=True)
class TokenDims:
    """The widths an op's own work depends on: ``dim`` (C, a token's features), ``heads`` and
    ``head_dim`` (D, the width of the head-averaged keys ToMe's metric is)."""

    dim: int
    heads: int
    head_dim: int


#: The multiply-adds an op's reduce function computes per image, in fvcore's convention (matmul,
#: linear, einsum and norm layers count; elementwise, sort, gather and scatter ops count zero):
#: ``flops(n, m, dims, prefix, **amounts) -> (B,)`` with n (B,) the image's tokens into the stage and m
#: (B,) those it leaves (prefix included; integer tensors), dims the model's :class:`TokenDims` and the
#: stage's amount and option fields as keywords. What attention computes for the op's score and
#: ``needs`` is counted apart (:mod:`paretoken.evaluators.flop_model`).
Flops = Callable[..., Any]


def no_flops(n, m, dims: TokenDims, prefix: int, **amounts: Any):
    """The :data:`Flops` of an op that only selects tokens (sorting and gathering count zero)."""
    return n * 0


@dataclass(frozen=True)
class Amount:
    """One amount field a stage may give: ``name`` (a Stage keyword), an integer or a float,
    ``check(value) -> bool`` on finite numbers, ``valid`` the valid values in words, ``meaning``
    one line with units."""

    name: str
    integer: bool
    check: Callable[[float], bool]
    valid: str
    meaning: str

    def validate(self, where: str, value: Any) -> None:
        """Raise a one-line error unless ``value`` is a valid value of this field."""
        if self.integer:
            if isinstance(value, bool) or not isinstance(value, int) or not self.check(value):
                raise ParetokenError(f"{where}: {self.name} {value!r} is invalid; valid: {self.valid}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ParetokenError(f"{where}: {self.name} {value!r} is not a finite number; valid: {self.valid}")
        if not self.check(float(value)):
            raise ParetokenError(f"{where}: {self.name} {value!r} is out of range; valid: {self.valid}")


@dataclass(frozen=True)
class Option:
    """A categorical setting of an op with a default: ``name`` (a Stage keyword), its ``choices``,
    ``default`` (one of them; a stage that gives it is the same stage as one that does not) and
    ``meaning``."""

    name: str
    choices: tuple[str, ...]
    default: str
    meaning: str

    def validate(self, where: str, value: Any) -> None:
        if value not in self.choices:
            raise ParetokenError(f"{where}: {self.name} {value!r} is unknown; valid: {', '.join(self.choices)}")


KEEP = Amount("keep", False, lambda v: 0.0 < v <= 1.0, "0 < keep <= 1",
              "fraction of the block's current patch tokens kept")
R = Amount("r", True, lambda v: v >= 0, "an integer >= 0", "patch tokens removed from the block")
FUSE = Option("fuse", ("average", "mlerp", "drop"), "average",
              "how a merged token is made: the size-weighted average (ToMe); that average rescaled to the "
              "largest norm of the tokens merged (ToFu's MLERP); or the token merged into, the others dropped "
              "(ToFu's pruning)")


@dataclass(frozen=True)
class Grid:
    """A search grid: ``low, low + step, ..., high``; integers when all three are ints."""

    low: float
    high: float
    step: float

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step))

    def suggest(self, trial, name: str) -> float | int:
        """Ask ``trial`` for parameter ``name`` on this grid (floats rounded so 0.7 reads 0.7)."""
        if self.integer:
            return trial.suggest_int(name, self.low, self.high, step=self.step)
        return round(float(trial.suggest_float(name, self.low, self.high, step=self.step)), 6)

    def contains(self, value: Any) -> bool:
        """True when ``value`` is a point of the grid."""
        if value is None or isinstance(value, bool) or not self.low - 1e-9 <= value <= self.high + 1e-9:
            return False
        k = (value - self.low) / self.step
        return abs(k - round(k)) < 1e-6 and (not self.integer or isinstance(value, int))

    def words(self) -> str:
        if self.integer:
            return f"int {self.low}..{self.high}" + (f" step {self.step}" if self.step != 1 else "")
        return f"float {self.low:g}..{self.high:g} step {self.step:g}"


@dataclass(frozen=True)
class Choice:
    """A search grid over an :class:`Option`'s ``choices``."""

    choices: tuple[str, ...]

    def suggest(self, trial, name: str) -> str:
        return trial.suggest_categorical(name, self.choices)

    def contains(self, value: Any) -> bool:
        return value in self.choices

    def words(self) -> str:
        return "categorical " + "/".join(self.choices)


#: The keep grid of the keep-ratio pruners (0.4 .. 0.95: stages compound, so the grid stops short of
#: the extremes where a plan with several stages would keep almost nothing).
KEEP_GRID = Grid(0.4, 0.95, 0.05)


@dataclass(frozen=True)
class OpSpec:
    """Everything about one op.

    name: the plan's ``op`` value. summary: what it does, one line. source: the paper.
    amounts: groups of amount fields; a stage gives exactly one field of each group.
    options: categorical settings with defaults, passed to ``reduce`` with every other field.
    scores: the scores a stage may name, the default first.
    per_image: True when the number of tokens kept differs from image to image.
    needs: what attention must provide beyond the score (a subset of :data:`NEEDS`).
    reduce: the reduce function (see :data:`Reduce`).
    grids: the search grid (:class:`Grid`, :class:`Choice` for an option) of each field a search
      samples, for the located spaces and ``mixed``; a field without one is never sampled (an
      option then stays at its default).
    mixed: whether ``mixed`` may choose this op for an overriding block.
    flops: the multiply-adds its reduce function computes (:data:`Flops`); None when not declared,
      and then the GFLOPs of a plan with it are traced with fvcore instead of counted.
    reduce_uniform: the same reduction for a *uniform* batch, in which every image has all its
      ``x.shape[1]`` tokens valid (no padding, the same count): counts follow from shapes as Python
      ints, so it never synchronises with the device (what ``torch.compile(fullgraph=True)`` needs)
      and makes fewer passes over the tokens. It returns the same tokens in the same order as
      ``reduce`` and computes the same multiply-adds (``flops`` counts both). None: ``reduce`` runs
      (a plan with such an op compiles with graph breaks). Per-image ops have none.
    sums_sizes: whether a token it keeps may stand for several patches afterwards (it merges or
      fuses); an op that only selects tokens leaves every size 1 where it was, so attention stays
      unmasked.
    """

    name: str
    summary: str
    source: str
    amounts: tuple[tuple[Amount, ...], ...]
    scores: tuple[str, ...]
    reduce: Reduce
    options: tuple[Option, ...] = ()
    per_image: bool = False
    needs: frozenset[str] = frozenset()
    grids: Mapping[str, Grid | Choice] = field(default_factory=dict)
    mixed: bool = True
    flops: Flops | None = None
    reduce_uniform: Reduce | None = None
    sums_sizes: bool = False

    def __post_init__(self) -> None:
        where = f"op {self.name!r}"
        if not self.name.isidentifier():
            raise ParetokenError(f"{where}: the name must be an identifier")
        if not self.scores or any(s not in SCORES for s in self.scores):
            raise ParetokenError(f"{where}: scores {self.scores!r}; valid: a non-empty tuple of {', '.join(SCORES)}")
        if not self.needs <= NEEDS:
            raise ParetokenError(f"{where}: needs {sorted(self.needs)!r}; valid: a subset of {sorted(NEEDS)}")
        if self.per_image and self.reduce_uniform is not None:
            raise ParetokenError(f"{where}: a per-image op has no uniform reduce; valid: reduce_uniform=None")
        if any(name not in self.fields + self.option_names for name in self.grids):
            raise ParetokenError(f"{where}: a grid names a field it has not; valid: "
                                 f"{', '.join(self.fields + self.option_names)}")
        for option in self.options:
            if option.default not in option.choices:
                raise ParetokenError(f"{where}: option {option.name!r} defaults to {option.default!r}; "
                                     f"valid: one of {', '.join(option.choices)}")
        for group in self.amounts:
            gridded = [a.name for a in group if a.name in self.grids]
            if len(gridded) > 1 or (self.mixed and not gridded):
                raise ParetokenError(f"{where}: grids {sorted(self.grids)}; valid: one grid for one field of each "
                                     "amount group (a search samples one), none needed when mixed is False")

    @property
    def fields(self) -> tuple[str, ...]:
        """The amount fields, in declaration order."""
        return tuple(a.name for group in self.amounts for a in group)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def amount_words(self) -> str:
        """The amount fields in words: ``keep or r``; groups joined by ``and``."""
        return " and ".join(" or ".join(a.name for a in group) for group in self.amounts)

    @property
    def search_scores(self) -> tuple[str, ...]:
        """The scores a search chooses among, in :data:`SCORES` order (none that needs training)."""
        return tuple(s for s in SCORES if s in self.scores and s not in TRAINED_SCORES)

    def check_amounts(self, where: str, amounts: Mapping[str, Any]) -> None:
        """Raise a one-line error unless ``amounts`` gives exactly one field of each group, each valid,
        and valid values of the options it gives."""
        for name in amounts:
            if name in self.option_names:
                self.options[self.option_names.index(name)].validate(where, amounts[name])
            elif name not in self.fields:
                valid = " or ".join("/".join(a.name for a in g) for g in self.amounts)
                raise ParetokenError(f"{where}: field {name!r} does not apply to op {self.name!r}; "
                                     f"valid: {valid}{''.join(', ' + o for o in self.option_names)}")
        for group in self.amounts:
            given = [a for a in group if amounts.get(a.name) is not None]
            if len(given) != 1:
                raise ParetokenError(f"{where}: op {self.name!r} needs exactly one of "
                                     f"{' or '.join(a.name for a in group)}; got {len(given)}")
            given[0].validate(where, amounts[given[0].name])


_OPS: dict[str, OpSpec] = {}
_FIELDS: dict[str, Amount | Option] = {}  # every amount and option field of the registered ops


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the registry (after the ops registered before it); returns it.

    A field another op declares already must be the same :class:`Amount` or :class:`Option`.
    """
    if spec.name in _OPS:
        raise ParetokenError(f"op {spec.name!r}: registered already; valid: a new name")
    declared = [a for group in spec.amounts for a in group] + list(spec.options)
    for field_ in declared:
        known = _FIELDS.get(field_.name)
        if known is not None and known != field_:
            raise ParetokenError(f"op {spec.name!r}: field {field_.name!r} is declared already with another "
                                 "meaning; valid: the same Amount or Option, or a new field name")
    for field_ in declared:
        _FIELDS.setdefault(field_.name, field_)
    _OPS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove op ``name`` (and the fields no other op declares) from the registry."""
    spec = _OPS.pop(name)
    still = {f for other in _OPS.values() for f in other.fields + other.option_names}
    for field_name in spec.fields + spec.option_names:
        if field_name not in still:
            del _FIELDS[field_name]


def get_op(name: str) -> OpSpec:
    """The registered op ``name``; an unknown name is a one-line error listing the valid ones."""
    try:
        return _OPS[name]
    except (KeyError, TypeError):
        raise ParetokenError(f"op {name!r} is unknown; valid: {', '.join(_OPS)}") from None


def op_names() -> tuple[str, ...]:
    """The registered ops' names, in registration order."""
    return tuple(_OPS)


def ops() -> tuple[OpSpec, ...]:
    """The registered ops, in registration order."""
    return tuple(_OPS.values())


def op_table() -> list[dict[str, str]]:
    """One row per registered op, in words: op, amount, scores (default first), per image, source,
    summary (``paretoken ops`` prints it; the docs' op table is tested against it)."""
    return [{"op": s.name, "amount": s.amount_words, "scores": ", ".join(s.scores),
             "per image": "yes" if s.per_image else "no", "source": s.source, "summary": s.summary} for s in ops()]


def stage_fields() -> dict[str, Amount | Option]:
    """Every amount and option field some registered op declares, by name."""
    return dict(_FIELDS)
