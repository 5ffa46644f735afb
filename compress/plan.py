"""The Plan: which blocks reduce tokens, how, and by how much.

A plan is plain, frozen data with a YAML/JSON form (schema version 1)::

    version: 1
    stages:
      - {layer: 3, op: prune_fuse, keep: 0.7, score: cls_attn}

``layer`` is the 0-based block index; a stage acts inside that block, after
attention and before the MLP. ``op`` names a registered op
(:mod:`paretoken.compress.ops`, one module each), which says which amount fields
the stage gives and which scores it takes: ``keep`` is the fraction of the block's
current patch tokens kept, ``r`` the number of patch tokens removed (give one of
the two). ``prefix_only_last: true`` makes the last block compute only the prefix
tokens (class, distillation): every token is still a key and value of its
attention, but only the prefix tokens are queries and go through its
projection and MLP. The head reads only the prefix tokens, so this is exact (the
logits do not change) and saves most of a block; a stage in the last block is
then moot and is not run. Construction validates everything except the model-dependent layer
range, which :meth:`Plan.check_depth` checks when the plan meets a model.
Every error is one :class:`ParetokenError` line naming the stage, the field,
the bad value and the valid values.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from paretoken.compress.ops import SCORES, get_op, op_names, stage_fields
from paretoken.errors import ParetokenError
from paretoken.jsonvalues import json_ready

SCHEMA_VERSION = 1

_STAGE_KEYS = ("layer", "op", "score")


@dataclass(frozen=True, init=False, repr=False)
class Stage:
    """One token reduction inside block ``layer``: ``Stage(3, "prune_fuse", keep=0.7)``.

    layer: 0-based block index. op: a registered op (:func:`paretoken.compress.ops.op_names`).
    score: token score, one of the op's scores; defaults to the op's first.
    The op's amount fields (``keep``/``r``, ``mass`` and ``sim``, ``threshold``, ...) and options
    (``fuse``), as keywords; each op's module says what they mean and their units. They read as
    attributes (``stage.keep``: None where the stage does not give that amount; an option of the op
    reads its default when not given) and are held in ``values``, (field, value) pairs in the op's
    order, an option only where it differs from its default.
    """

    layer: int
    op: str
    score: str | None
    values: tuple[tuple[str, Any], ...]

    def __init__(self, layer: int, op: str, score: str | None = None, *,
                 values: Iterable[tuple[str, Any]] | Mapping[str, Any] = (), **given: Any) -> None:
        given = {**dict(values), **given}  # dataclasses.replace passes the old values, then the changes
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ParetokenError(f"stage: layer {layer!r} is invalid; valid: a block index, an integer >= 0")
        where = f"stage at layer {layer}"
        if op not in op_names():
            raise ParetokenError(f"{where}: op {op!r} is unknown; valid: {', '.join(op_names())}")
        spec = get_op(op)
        if score is None:
            score = spec.scores[0]
        elif score not in SCORES:
            raise ParetokenError(f"{where}: score {score!r} is unknown; valid: {', '.join(SCORES)}")
        elif score not in spec.scores:
            raise ParetokenError(f"{where}: score {score!r} does not fit op {op!r}; valid: {', '.join(spec.scores)}")
        given = {k: v for k, v in given.items() if v is not None}
        spec.check_amounts(where, given)
        defaults = {o.name: o.default for o in spec.options}
        kept = tuple((f, given[f]) for f in spec.fields + spec.option_names
                     if f in given and given[f] != defaults.get(f))
        for name, value in (("layer", layer), ("op", op), ("score", score), ("values", kept)):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        """An amount or option field as an attribute (see the class docstring)."""
        if name in stage_fields():
            values = dict(object.__getattribute__(self, "values"))
            option = {o.name: o for o in get_op(object.__getattribute__(self, "op")).options}.get(name)
            return values.get(name, option.default if option is not None else None)
        raise AttributeError(f"'Stage' object has no attribute {name!r}")

    @property
    def settings(self) -> dict[str, Any]:
        """Every amount the stage gives and every option of its op (defaults filled in): what the op's
        reduce function takes as keywords."""
        return {**{o.name: o.default for o in get_op(self.op).options}, **dict(self.values)}

    def __repr__(self) -> str:
        fields_ = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"Stage({fields_})"

    @property
    def per_image(self) -> bool:
        """True when this stage keeps a different number of tokens per image."""
        return get_op(self.op).per_image

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "op": self.op, "score": self.score, **dict(self.values)}


@dataclass(frozen=True)
class Plan:
    """An ordered set of :class:`Stage` s, at most one per block.

    ``prefix_only_last``: the last block computes only the prefix tokens (see the module docstring).
    ``meta`` carries free-form provenance (model, weights, metrics) that export
    adds; it never changes what the plan does. It is JSON: a number that is not finite (a metric
    not measured) is read and written as null.
    """

    stages: tuple[Stage, ...] = ()
    version: int = SCHEMA_VERSION
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    prefix_only_last: bool = False

    def __post_init__(self) -> None:
        if self.version != SCHEMA_VERSION:
            raise ParetokenError(f"plan: version {self.version!r} is unsupported; valid: {SCHEMA_VERSION}")
        if not isinstance(self.prefix_only_last, bool):
            raise ParetokenError(f"plan: prefix_only_last {self.prefix_only_last!r} is invalid; valid: true, false")
        stages = tuple(self.stages)
        for i, stage in enumerate(stages):
            if not isinstance(stage, Stage):
                raise ParetokenError(f"stage {i}: is {type(stage).__name__}, not a Stage")
        seen: set[int] = set()
        for stage in stages:
            if stage.layer in seen:
                raise ParetokenError(f"stage at layer {stage.layer}: layer {stage.layer} has two stages; valid: one stage per layer")
            seen.add(stage.layer)
        object.__setattr__(self, "stages", tuple(sorted(stages, key=lambda s: s.layer)))

    @property
    def per_image(self) -> bool:
        """True when some stage keeps a different number of tokens per image."""
        return any(s.per_image for s in self.stages)

    def stages_run(self, depth: int) -> tuple[Stage, ...]:
        """The stages a ``depth``-block model runs: all of them, but for one in the last block when
        ``prefix_only_last`` makes it moot."""
        return tuple(s for s in self.stages if not (self.prefix_only_last and s.layer == depth - 1))

    def check_depth(self, depth: int) -> None:
        """Raise unless every stage's layer is a block of a ``depth``-block model."""
        for stage in self.stages:
            if stage.layer >= depth:
                raise ParetokenError(
                    f"stage at layer {stage.layer}: layer {stage.layer} is out of range; "
                    f"valid: 0..{depth - 1} for this {depth}-block model")

    # -- plain-data form ---------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """Build and validate a plan from its dict form (as YAML/JSON load it)."""
        if not isinstance(data, Mapping):
            raise ParetokenError(f"plan: expected a mapping with 'version' and 'stages', got {type(data).__name__}")
        unknown = set(data) - set(_PLAN_FIELDS)
        if unknown:
            raise ParetokenError(f"plan: field {sorted(map(str, unknown))[0]!r} is unknown; "
                                 f"valid: {', '.join(_PLAN_FIELDS)}")
        raw_stages = data.get("stages", [])
        if not isinstance(raw_stages, (list, tuple)):
            raise ParetokenError(f"plan: stages must be a list, got {type(raw_stages).__name__}")
        stages = []
        for i, raw in enumerate(raw_stages):
            if not isinstance(raw, Mapping):
                raise ParetokenError(f"stage {i}: expected a mapping, got {type(raw).__name__}")
            bad = [k for k in raw if k not in (*_STAGE_KEYS, *stage_fields())]
            if bad:  # a field no op has; one another op has is the Stage's error ("does not apply")
                op = raw.get("op")
                valid = (*_STAGE_KEYS, *(get_op(op).fields + get_op(op).option_names if op in op_names()
                                         else stage_fields()))
                raise ParetokenError(f"stage {i}: field {bad[0]!r} is unknown; valid: {', '.join(valid)}")
            if "layer" not in raw or "op" not in raw:
                raise ParetokenError(f"stage {i}: field {'layer' if 'layer' not in raw else 'op'!r} is missing")
            try:
                stages.append(Stage(**raw))
            except ParetokenError as err:
                raise ParetokenError(f"stage {i}: {str(err).split(': ', 1)[1]}") from None
        meta = data.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise ParetokenError(f"plan: meta must be a mapping, got {type(meta).__name__}")
        try:
            json.dumps(meta)  # studies and exports store it as JSON
        except (TypeError, ValueError) as exc:
            raise ParetokenError(f"plan: meta must hold JSON values (mappings, lists, strings, numbers, booleans, "
                                 f"null): {exc}") from None
        return cls(stages=tuple(stages), version=data.get("version", SCHEMA_VERSION), meta=json_ready(dict(meta)),
                   prefix_only_last=data.get("prefix_only_last", False))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "stages": [s.to_dict() for s in self.stages]}
        if self.prefix_only_last:
            out["prefix_only_last"] = True
        if self.meta:
            out["meta"] = json_ready(dict(self.meta))
        return out

    def save(self, path: str | Path) -> Path:
        """Write the plan as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".yaml", ".yml"):
            path.write_text(yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def describe(self) -> str:
        """The stages on one line, for tables and logs."""
        if not self.stages and not self.prefix_only_last:
            return "(no stages: uncompressed)"
        return "; ".join(
            [f"L{s.layer} {s.op}(" + ", ".join(f"{k}={v}" for k, v in s.to_dict().items() if k not in ("layer", "op"))
             + ")" for s in self.stages] + (["prefix-only last block"] if self.prefix_only_last else []))


_PLAN_FIELDS = ("version", "stages", "prefix_only_last", "meta")
MAX_FILE_VALUES = 100_000  # a plan file's values (an export's meta holds a few hundred)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (``1e-3`` is a number, not the string YAML 1.1
    makes it) and no key written twice in one mapping (PyYAML keeps the last silently; keys a
    ``<<`` merge brings in may still be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = []
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.append(key)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes what :class:`_Loader` would read as a float (``'1e5'``)."""


for _yaml_class in (_Loader, _Dumper):
    _yaml_class.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
_Loader.yaml_implicit_resolvers = {  # YAML 1.2 has no timestamps: 2024-05-01 in a meta is the string it reads as
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()}


def is_uncompressed(data: Any) -> bool:
    """True when ``data``, a plan's dict form as studies store it, changes nothing: no stages and
    ``prefix_only_last`` off."""
    return isinstance(data, Mapping) and not data.get("stages") and not data.get("prefix_only_last")


def plan_as_run(data: Any, depth: int) -> Plan | None:
    """The plan that ``data`` (a plan's dict form as studies store it, possibly malformed) makes a
    ``depth``-block model run: without the last-block stage ``prefix_only_last`` makes moot
    (:meth:`Plan.stages_run`); None when ``data`` is not a valid plan. Plans compare (and hash) without
    ``meta``, so two stored plans that compute the same thing give equal results."""
    try:
        plan = Plan.from_dict(data)
    except (ValueError, TypeError):  # ParetokenError is a ValueError
        return None
    return replace(plan, stages=plan.stages_run(depth))


def load_plan(path: str | Path) -> Plan:
    """Read a plan written by :meth:`Plan.save` (YAML or JSON; an export file works too)."""
    path = Path(path)
    if not path.exists():
        raise ParetokenError(f"plan: file {str(path)!r} does not exist")
    if not path.is_file():
        raise ParetokenError(f"plan: {str(path)!r} is not a regular file; valid: a YAML or JSON plan file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        where = f" (line {mark.line + 1}{': ' + problem if problem else ''})" if mark else ""
        raise ParetokenError(f"plan: {str(path)!r} is not valid YAML/JSON{where}") from None
    except UnicodeDecodeError:
        raise ParetokenError(f"plan: {str(path)!r} is not UTF-8 text; valid: a YAML or JSON plan file") from None
    except RecursionError:
        raise ParetokenError(f"plan: {str(path)!r} nests too deeply; valid: a YAML or JSON plan file") from None
    if data is None:
        raise ParetokenError(f"plan: {str(path)!r} is empty; valid: a YAML or JSON plan file")
    if _values(data) > MAX_FILE_VALUES:  # YAML aliases can nest a few lines into billions of values
        raise ParetokenError(f"plan: {str(path)!r} holds more than {MAX_FILE_VALUES:,} values once its YAML aliases "
                             "are expanded; valid: a YAML or JSON plan file")
    if isinstance(data, Mapping) and "plan" in data and "stages" not in data:
        data = data["plan"]  # an export file: the plan sits under 'plan'
    return Plan.from_dict(data)


def _values(data: Any, limit: int = MAX_FILE_VALUES) -> int:
    """How many values ``data`` holds, each alias counted again, counting stopped past ``limit``."""
    count, todo = 0, [data]
    while todo and count <= limit:
        value = todo.pop()
        count += 1
        if isinstance(value, Mapping):
            todo.extend(value.keys())
            todo.extend(value.values())
        elif isinstance(value, (list, tuple)):
            todo.extend(value)
    return count
