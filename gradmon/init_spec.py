"""The string form of an initialisation scheme, as configs and command lines write it: ``"normal(std=0.01)"``.

:func:`parse_scheme` reads it (parsed, never evaluated), :func:`format_scheme` writes it, and :func:`resolve_scheme`
joins it with keyword arguments and checks the result against the scheme's function in :mod:`gradmon.init_schemes`.
Pure torch: never imports Lightning.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Mapping
from typing import Any

import torch

from gradmon._validation import check_choice, invalid
from gradmon.init_schemes import DEFAULT, SCHEME_NAMES, SCHEMES, apply_scheme


def parse_scheme(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"normal(std=0.01)"`` into ``("normal", {"std": 0.01})``; a bare name has no arguments.

    The string comes from configs and command lines, so it is parsed, never evaluated: only a name, optionally
    called with keyword arguments whose values are Python literals.
    """
    malformed = invalid(
        "scheme",
        spec,
        "a scheme name, optionally with literal keyword arguments, such as 'xavier_uniform' or \"normal(std=0.01)\"",
    )
    if not isinstance(spec, str):
        raise malformed
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except (SyntaxError, ValueError):  # ValueError: a null byte in the string
        raise malformed from None
    if isinstance(node, ast.Name):
        return node.id, {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
        raise malformed
    keywords = [keyword.arg for keyword in node.keywords]
    if None in keywords or len(set(keywords)) < len(keywords):  # None: a `**mapping`
        raise malformed
    try:
        return node.func.id, {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise malformed from None


def format_scheme(scheme: str, arguments: Mapping[str, Any]) -> str:
    """The string form :func:`parse_scheme` reads: ``format_scheme("normal", {"std": 0.01}) == "normal(std=0.01)"``."""
    if not arguments:
        return scheme
    return f"{scheme}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})"


def scheme_keywords(scheme: str) -> tuple[str, ...]:
    """The keyword arguments a scheme accepts."""
    if scheme == DEFAULT:
        return ()
    return tuple(p for p in inspect.signature(SCHEMES[scheme]).parameters if p not in ("tensor", "generator"))


def resolve_scheme(scheme: str, arguments: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The scheme's name and all its arguments, from the string form and keywords together, checked.

    Raises ``ValueError`` naming the argument for an unknown name, an unknown or missing keyword, a keyword given
    twice, or a value the scheme rejects (not a finite number, beyond float32's range, a bad choice); the checks
    run on a small scratch tensor with a private generator, so they cost nothing and leave the global RNG alone.
    """
    name, parsed = parse_scheme(scheme)
    check_choice("scheme", name, SCHEME_NAMES)
    arguments = dict(arguments or {})
    repeated = sorted(parsed.keys() & arguments.keys())
    if repeated:
        keyword = repeated[0]
        raise invalid(
            keyword,
            arguments[keyword],
            f"a single value: `{keyword}` is given both in `scheme={scheme!r}` and as a keyword",
        )
    arguments = {**parsed, **arguments}
    accepted = scheme_keywords(name)
    unknown = [keyword for keyword in arguments if keyword not in accepted]
    if unknown:
        expected = (
            f"one of the keywords scheme {name!r} accepts: {', '.join(accepted)}"
            if accepted
            else f"no keywords: scheme {name!r} accepts none"
        )
        raise invalid(unknown[0], arguments[unknown[0]], expected)
    if name == DEFAULT:
        return name, arguments
    parameters = inspect.signature(SCHEMES[name]).parameters.values()
    required = [p.name for p in parameters if p.default is p.empty and p.name != "tensor"]
    missing = [keyword for keyword in required if keyword not in arguments]
    if missing:
        raise invalid(
            "scheme",
            scheme,
            f"a value for its keyword {missing[0]!r}, such as {format_scheme(name, {missing[0]: 0.0})!r}",
        )
    try:
        apply_scheme(name, torch.empty(4, 4), arguments, torch.Generator())
    except ValueError as error:
        raise ValueError(f"Scheme {name!r}: {error}") from None
    return name, arguments
