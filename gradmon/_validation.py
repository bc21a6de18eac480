"""Argument checks shared by every public constructor.

Each raises ``ValueError`` naming the argument, the bad value and what is accepted, so the error points at the line
the user wrote rather than at a failure deep inside training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def _fail(name: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"`{name}={value!r}` is not valid: expected {accepted}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    # Same type as well as equal: 1 is not True, 1.0 is not "1".
    if not any(value == c and type(value) is type(c) for c in choices):
        raise _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_int(name: str, value: Any, minimum: int = 0, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        accepted = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise _fail(name, value, accepted)
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float = 0.0,
    inclusive: bool = False,
    allow_inf: bool = False,
    allow_none: bool = False,
) -> float | None:
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = value >= minimum if inclusive else value > minimum
        if ok and math.isinf(value) and not allow_inf:
            ok = False
    if not ok:
        bound = ">=" if inclusive else ">"
        accepted = f"a finite number {bound} {minimum}" + (" or None" if allow_none else "")
        raise _fail(name, value, accepted)
    return float(value)


def check_norm_type(name: str, value: Any) -> float:
    """A p-norm order: any real p > 0, or ``"inf"`` / ``float("inf")``."""
    if isinstance(value, str):
        if value.lower() in ("inf", "infinity"):
            return math.inf
        try:
            value = float(value)
        except ValueError:
            raise _fail(name, value, 'a number p > 0 or "inf"') from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise _fail(name, value, 'a number p > 0 or "inf"')
    return float(value)
