"""JSON in and out: the only format arguments, results and progress are stored in."""

from __future__ import annotations

import json
from typing import Any

from flexq._errors import InvalidArguments

# ASCII output: a lone surrogate (from a surrogateescape file name, say) stays a valid escape.
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=True)
loads = json.loads


def dumps(value: Any, what: str) -> str:
    """Encode ``value`` as compact JSON, or raise :class:`InvalidArguments` naming ``what``."""
    try:
        return _encoder.encode(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArguments(
            f"{what} must be JSON values (None, bool, int, float, str, list, dict): {exc}"
        ) from None
    except RecursionError:
        raise InvalidArguments(f"{what} are nested too deeply to store as JSON") from None
