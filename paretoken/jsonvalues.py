"""Values as strict JSON has them: what was not measured (a NaN or an infinity) is ``null``."""
from __future__ import annotations

import math
from typing import Any


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth of its mappings, lists and tuples, made
    ``None``, so ``json.dumps(..., allow_nan=False)`` accepts it; other values are returned as they are."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value
