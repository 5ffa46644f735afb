"""Opening a search's study: create it (settings and objectives recorded, presets enqueued), or load
it and check that its settings match (:func:`check_settings`), adopting an empty study made
elsewhere and finishing the presets of a creator that died while enqueueing them.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from paretoken.errors import ParetokenError
from paretoken.evaluators.metrics import BOUNDS
from paretoken.search import record
from paretoken.search import study as st
from paretoken.search.halving import PROMOTIONS
from paretoken.search.options import SearchOptions
from paretoken.search.storage import redact


#: The ops ``mixed`` chose among before the op registry grew (studies of then record no ``ops``).
MIXED_OPS_BEFORE_REGISTRY = ("prune", "prune_fuse", "merge", "joint", "threshold")


def check_settings(study_name: str, stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    """One-line error when a study is resumed with settings that would mix incomparable trials."""
    if stored.get("space") == "mixed" and "ops" not in stored:  # made before mixed could choose pitome, prune_merge
        stored = {**stored, "ops": list(MIXED_OPS_BEFORE_REGISTRY)}
    labels = {"space": "--space", "ops": "--ops", "objectives": "--objectives",
              **{b: "--" + b.replace("_", "-") for b in BOUNDS},
              "depth": "the model depth", "heartbeat_s": "--heartbeat", "grace_s": "grace_s"}

    def shown(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else repr(value)

    for key, flag in labels.items():
        if key in stored and stored[key] != wanted.get(key):
            raise ParetokenError(f"study: {study_name!r} was created with {key} {shown(stored[key])}, not "
                                 f"{shown(wanted[key])}; pass {flag} as before or start a new --study")
    # none recorded: made without successive halving; no promotion recorded: made before --promotion, "front"
    halving = [stored.get("min_images"), stored.get("eta"),
               stored.get("promotion", PROMOTIONS[0]) if stored.get("min_images") else None]
    if halving != [wanted.get(k) for k in ("min_images", "eta", "promotion")]:
        made = (f"with --min-images {halving[0]} --eta {halving[1]} --promotion {halving[2]}" if halving[0]
                else "without --min-images")
        raise ParetokenError(f"study: {study_name!r} was created {made} (successive halving); pass the same "
                             "--min-images, --eta and --promotion, or start a new --study")
    from paretoken.evaluators.data import canonical_data

    wanted_measurement = record.measurement_of(wanted)
    for key, value in record.measurement_of(stored).items():
        same = (canonical_data(value) == canonical_data(wanted_measurement.get(key)) if key == "data"
                else wanted_measurement.get(key) == value)
        if not same:
            raise ParetokenError(f"study: {study_name!r} measures with {key} {value!r}, not "
                                 f"{wanted_measurement.get(key)!r}; pass the same --{key.replace('_', '-')} "
                                 "or start a new --study")


def check_existing(study_name: str, storage, settings: Mapping[str, Any]) -> None:
    """The one-line settings error for a study that exists already in ``storage``, without touching it."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return
    stored = storage.get_study_user_attrs(study_id).get(record.SETTINGS)
    if stored:
        check_settings(study_name, stored, settings)


def wait_for_study_attr(study, key: str, timeout: float = 15.0) -> Any:
    """Study user attr ``key`` that another process writes right after creating the study (None if it
    has not within ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        value = study.user_attrs.get(key)
        if value is not None or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def open_study(options: SearchOptions, storage, sampler, log: Callable[[str], None]):
    """Create the study (settings stored, presets enqueued) or load it after checking its settings;
    logs which, with its counts."""
    import optuna

    name, url, objectives, settings = options.study, options.storage, options.objectives, options.settings
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                    directions=st.directions(objectives))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        created = False
    except Exception as exc:  # noqa: BLE001 - e.g. a read-only file, a dropped connection
        raise ParetokenError(f"storage: cannot create study {name!r} in {redact(url)} "
                             f"({' '.join(str(exc).split())[:200]})") from None
    if created:
        study.set_metric_names(list(objectives))
        record.write_study(study, objectives, settings)
        _enqueue_presets(study, options, log)
    else:
        _adopt(study, options, log)
    c0 = st.counts(study)
    log(f"study {name} in {redact(url)}: " + ("created" if created else
        f"resumed with {c0.complete} complete, {c0.failed} failed, {c0.interrupted} interrupted, "
        f"{c0.running} running, {c0.waiting} waiting")
        + f"; space {options.space.name}, objectives {','.join(objectives)}, sampler {options.sampler} "
          f"(seed {options.seed}), target {options.n_trials} trials"
        + (f"; successive halving on {','.join(map(str, options.rungs))} images (top 1/{options.eta} promoted)"
           if options.rungs else ""))
    return study


def _enqueue_presets(study, options: SearchOptions, log: Callable[[str], None]) -> None:
    st.enqueue_presets(study, options.space, options.depth, options.presets, log)
    study.set_user_attr(record.PRESETS_ENQUEUED, bool(options.presets))


def _adopt(study, options: SearchOptions, log: Callable[[str], None]) -> None:
    """Check a loaded study against ``options``; adopt it when it was made empty elsewhere."""
    name, objectives = options.study, options.objectives
    if study.user_attrs.get(record.SETTINGS) is None and study.get_trials(deepcopy=False):
        raise ParetokenError(f"study: {name!r} in {redact(options.storage)} was not made by a paretoken search (it "
                             "holds trials without paretoken's settings); valid: a new --study name")
    if [d.name.lower() for d in study.directions] != st.directions(objectives):
        stored = study.user_attrs.get(record.OBJECTIVES) or [d.name.lower() for d in study.directions]
        raise ParetokenError(f"study: {name!r} has objectives {','.join(map(str, stored))}, not "
                             f"{','.join(objectives)}; pass --objectives as before or start a new --study")
    stored = wait_for_study_attr(study, record.SETTINGS)
    if stored is None:  # made empty elsewhere (e.g. `optuna create-study`): adopt it
        record.write_study(study, objectives, options.settings)
    else:
        check_settings(name, stored, options.settings)
    if wait_for_study_attr(study, record.PRESETS_ENQUEUED) is None:
        # the creating process died while enqueueing: finish its job (each preset at most once)
        _enqueue_presets(study, options, log)
