"""Argument checks shared by every public constructor.

Each raises ``ValueError`` (``TypeError`` for a value of the wrong kind where that is clearer, such as a string for a
boolean) naming the argument, the bad value and what is accepted, so the error points at the line the user wrote
rather than at a failure deep inside training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

#: The largest integer gradmon accepts for a count or a step: beyond it a float cannot hold the value exactly and
#: arithmetic on it overflows later, far from the line that set it.
MAX_INT = 2**53
#: Seeds are handed to ``torch.Generator.manual_seed``, which takes unsigned 64-bit values.
MAX_SEED = 2**64 - 1
#: The largest finite float32: a weight, bias or standard deviation above it is inf once it is in a float32 tensor.
FLOAT32_MAX = 3.4028234663852886e38


def invalid(name: str, value: Any, accepted: str) -> ValueError:
    """The one form of every argument error: ``ValueError("`name=value` is not valid: expected <accepted>.")``, for
    the caller to raise (composite conditions the ``check_*`` helpers cannot express)."""
    return ValueError(f"`{name}={_show(value)}` is not valid: expected {accepted}.")





def _show(value: Any) -> str:
    """``repr(value)``, shortened for an integer too long to print whole (Python refuses beyond 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"{'-' if value < 0 else ''}<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    return repr(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    # Same type as well as equal: 1 is not True, 1.0 is not "1".
    if not any(value == c and type(value) is type(c) for c in choices):
        raise invalid(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` only: ``"false"`` and ``0`` are refused rather than read as truthy or falsy."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}={value!r}` is not valid: expected True or False.")
    return value


def check_int(
    name: str, value: Any, minimum: int = 0, *, maximum: int = MAX_INT, allow_none: bool = False
) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        accepted = f"an integer in [{minimum}, {maximum}]" + (" or None" if allow_none else "")
        raise invalid(name, value, accepted)
    return value


def check_seed(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """A seed ``torch.Generator.manual_seed`` takes: an integer in [0, 2**64 - 1]."""
    return check_int(name, value, 0, maximum=MAX_SEED, allow_none=allow_none)


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float = 0.0,
    inclusive: bool = False,
    maximum: float = math.inf,
    max_inclusive: bool = True,
    allow_inf: bool = False,
    allow_none: bool = False,
) -> float | None:
    """A real number (``int`` or ``float``, not ``bool``, not NaN) above ``minimum`` (or equal, with ``inclusive``)
    and below ``maximum`` (or equal, with ``max_inclusive``); infinite only with ``allow_inf``."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float
            number = math.inf if value > 0 else -math.inf
        ok = not math.isnan(number)
        ok = ok and (number >= minimum if inclusive else number > minimum)
        ok = ok and (number <= maximum if max_inclusive else number < maximum)
        ok = ok and (allow_inf or not math.isinf(number))
    if not ok:
        low = f"{'>=' if inclusive else '>'} {minimum:g}" if minimum > -math.inf else ""
        high = f"{'<=' if max_inclusive else '<'} {maximum:g}" if maximum < math.inf else ""
        bounds = " and ".join(b for b in (low, high) if b)
        kind = "a number" if allow_inf else "a finite number"
        accepted = f"{kind} {bounds}".rstrip() + (" or None" if allow_none else "")
        raise invalid(name, value, accepted)
    return number


#: The smallest p-norm order accepted. The p-norm of n entries of the same size is n**(1/p) times one entry: at
#: p = 0.25 a layer of 1e9 parameters measures 1e36 times its typical entry, near float32's 3.4e38; below it, healthy
#: layers' norms overflow to inf (at p = 0.001 every layer's norm is inf at every step).
MIN_NORM_TYPE = 0.25


def check_norm_type(name: str, value: Any) -> float:
    """A p-norm order: any real p >= :data:`MIN_NORM_TYPE` (0.25), or ``"inf"`` / ``float("inf")``."""
    accepted = f'a number p >= {MIN_NORM_TYPE:g} or "inf" (smaller p overflow every norm to inf)'
    if isinstance(value, str):
        if value.lower() in ("inf", "infinity"):
            return math.inf
        try:
            value = float(value)
        except ValueError:
            raise invalid(name, value, accepted) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, value, accepted)
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf if value > 0 else -math.inf
    if math.isnan(number) or number < MIN_NORM_TYPE:
        raise invalid(name, value, accepted)
    return number
