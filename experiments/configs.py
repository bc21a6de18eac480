"""The training variants' configs (``configs/*.yaml``): finding them, reading what the demo and the tests need from
them, and the two things the experiments' CLI does to a config file before LightningCLI parses it.

Adding a variant is one YAML file in ``configs/``: ``make demo`` runs it and the tests check it, with no Python edit.
Besides LightningCLI's keys, a variant's file may hold two things LightningCLI never sees:

- a top-level ``demo`` mapping, removed before parsing, read by the demo and the tests::

      demo:
        order: 3.1                          # optional: where `make demo` runs it; the others run after, by file name
        diagnosis: [saturating_activation]  # the causes ActivationMonitor names ([] for a healthy run)

- ``trainer.callbacks`` as a mapping from ``class_path`` to the ``init_args`` that differ, merged into the base's
  callback list: an entry for one of ``configs/base.yaml``'s callbacks updates its ``init_args`` key by key (``{}``
  keeps it as it is), ``null`` removes it, and a ``class_path`` the base does not have is added after the base's::

      trainer:
        callbacks:
          gradmon.WeightInit: {scheme: "normal(std=1)"}    # seed: 0 stays, from the base
          gradmon.GradHealthMonitor: null                  # removed
          gradmon.GradCheck: {every_n_steps: 20}           # added

  A list keeps LightningCLI's meaning: it replaces the base's list as a whole (as a run's saved ``config.yaml`` does).

:func:`load` is the YAML loader that does both; the CLI parses its config files with it (the jsonargparse parser mode
:data:`PARSER_MODE`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import get_loader, set_loader

from gradmon.diagnosis import CAUSES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
#: What every experiment's config shares, loaded before the variant's own.
BASE_NAME = "base"
BASE_CONFIG = CONFIG_DIR / f"{BASE_NAME}.yaml"
#: The top-level key of what the demo and the tests read from a variant's file; LightningCLI never sees it.
DEMO_KEY = "demo"
DEMO_FIELDS = {"order", "diagnosis"}
#: The jsonargparse parser mode whose loader is :func:`load`.
PARSER_MODE = "experiments_yaml"


@dataclass(frozen=True)
class Variant:
    """One variant's config file and what the demo and the tests read from it.

    Attributes:
        name: The file's name without ``.yaml``, e.g. ``vanishing_sigmoid``.
        path: The file.
        experiment: Its run's experiment, the logger's ``name``: the run is ``<save_dir>/<experiment>/<version>``.
        version: Its run's variant, the logger's ``version``.
        order: Where the demo runs it (``demo.order``), or ``None``: after every ordered one, by name.
        diagnosis: The causes ActivationMonitor should name in its run, other than those of non-finite values
            (``demo.diagnosis``; empty for a healthy run), or ``None`` where the file states none.
    """

    name: str
    path: Path
    experiment: str
    version: str
    order: float | None
    diagnosis: frozenset[str] | None

    def sort_key(self) -> tuple[bool, float, str]:
        return (self.order is None, self.order or 0.0, self.name)


def variants(config_dir: Path = CONFIG_DIR) -> list[Variant]:
    """Every variant in ``config_dir`` (each ``*.yaml`` but ``base.yaml``), in the demo's order: by ``demo.order``,
    then those without one by name."""
    base = config_dir / f"{BASE_NAME}.yaml"
    found = [read_variant(path, base) for path in config_dir.glob("*.yaml") if path.stem != BASE_NAME]
    return sorted(found, key=Variant.sort_key)


def read_variant(path: Path, base: Path = BASE_CONFIG) -> Variant:
    """The variant ``path`` (its run's name from the variant's logger or else the ``base``'s)."""
    raw = yaml.safe_load(path.read_text()) or {}
    demo = raw.get(DEMO_KEY) or {}
    where = f"{path}: {DEMO_KEY}"
    if not isinstance(demo, dict) or not set(demo) <= DEMO_FIELDS:
        raise ValueError(f"{where} must be a mapping with keys among {sorted(DEMO_FIELDS)}, not {demo!r}")
    order = demo.get("order")
    if order is not None and (isinstance(order, bool) or not isinstance(order, (int, float))):
        raise ValueError(f"{where}.order must be a number, not {order!r}")
    diagnosis = demo.get("diagnosis")
    if diagnosis is not None:
        if not isinstance(diagnosis, list) or not set(diagnosis) <= set(CAUSES):
            raise ValueError(f"{where}.diagnosis must be a list of causes among {sorted(CAUSES)}, not {diagnosis!r}")
        diagnosis = frozenset(diagnosis)
    names: dict[str, Any] = {}
    for data in (yaml.safe_load(base.read_text()) or {}, raw):
        names.update((((data.get("trainer") or {}).get("logger") or {}).get("init_args")) or {})
    return Variant(path.stem, path, names["name"], str(names["version"]), order, diagnosis)


def merge_callbacks(base: list[Any], changes: dict[str, Any]) -> list[Any]:
    """``base``'s callback list with ``changes`` (``class_path`` -> the ``init_args`` that differ, or ``None`` to
    remove it) applied; new classes come after the base's, in the order ``changes`` gives them."""
    merged = copy.deepcopy(base)
    known = [entry.get("class_path") if isinstance(entry, dict) else None for entry in merged]
    for class_path, init_args in changes.items():
        if init_args is not None and not isinstance(init_args, dict):
            raise ValueError(f"trainer.callbacks.{class_path}: give its init_args as a mapping, or null to remove it,"
                             f" not {init_args!r}")
        if class_path not in known:
            if init_args is None:
                raise ValueError(f"trainer.callbacks.{class_path}: null removes one of the base's callbacks "
                                 f"({', '.join(str(k) for k in known)}), and it has none of that class_path")
            merged.append({"class_path": class_path, "init_args": dict(init_args)})
            known.append(class_path)
            continue
        i = known.index(class_path)
        if init_args is None:
            del merged[i], known[i]
        elif init_args:
            merged[i]["init_args"] = {**(merged[i].get("init_args") or {}), **init_args}
    return merged


def base_callbacks(base: Path = BASE_CONFIG) -> list[Any]:
    """The callback list of the base config."""
    return list(((yaml.safe_load(base.read_text()) or {}).get("trainer") or {}).get("callbacks") or [])


def load(text: str) -> Any:
    """jsonargparse's YAML loader, then for a config (a mapping): its ``demo`` mapping removed and a
    ``trainer.callbacks`` mapping merged into the base's list (:func:`merge_callbacks`)."""
    value = _yaml_load(text)
    if isinstance(value, dict):
        value.pop(DEMO_KEY, None)
        trainer = value.get("trainer")
        if isinstance(trainer, dict) and isinstance(trainer.get("callbacks"), dict):
            trainer["callbacks"] = merge_callbacks(base_callbacks(), trainer["callbacks"])
    return value


_yaml_load = get_loader("yaml")
set_loader(PARSER_MODE, load, exceptions=(yaml.YAMLError, ValueError))
