"""paretoken.results: what users do after a search.

Query a study (:func:`load`, :func:`front`, :func:`hypervolume`, :func:`compare`), draw the front
(:mod:`paretoken.results.plots`), export a chosen plan (:func:`export`) and fine-tune it
(:mod:`paretoken.results.finetune`).
"""
from paretoken.results.query import (DEFAULT_OBJECTIVES, MAXIMIZE, best, compare, front, hypervolume,
                                     hypervolume_history, load, plan_label, reference_point)

__all__ = ["DEFAULT_OBJECTIVES", "MAXIMIZE", "best", "compare", "front", "hypervolume", "hypervolume_history",
           "load", "plan_label", "reference_point"]
