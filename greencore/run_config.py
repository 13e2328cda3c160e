"""A run's config file (YAML or JSON of a :class:`~greencore.spec.TrainSpec`), read and checked as the service
checks a job: unknown keys refused by name, values of the wrong type refused, bounds checked by
``TrainSpec.check()``; paths relative to the file's folder. ``greentrainer train --config`` reads it.

The file holds the TrainSpec's fields, ``hyperparameters`` and ``energy`` as mappings::

    model_dir: models/demo-tiny       # a Hugging Face model folder
    train_file: train.jsonl
    output_dir: runs/demo             # epoch-N/, final/ and epochs.jsonl go here
    method: green
    hyperparameters: {n_epochs: 2, batch_size: 4, learning_rate: 1.0e-3, rho: 0.5}
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from greencore.spec import EnergySettings, Hyperparameters, SpecError, TrainSpec

PATH_FIELDS = ("model_dir", "train_file", "output_dir", "valid_file", "resume_from")  # relative to the file
SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


def read_run_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainSpec:
    """The checked TrainSpec of the config file at ``path``, its paths made absolute (relative ones are taken
    from the file's folder). ``overrides``: top-level values that replace the file's (paths in them are
    taken from the current folder, as a command line gives them).

    Raises SpecError (``field`` names the key, dotted for nested ones: ``hyperparameters.n_epochs``) on a file
    that cannot be read or parsed, an unknown or missing key, a value of the wrong type or out of its bounds,
    or a path that does not exist.
    """
    path = Path(path)
    raw = parse_config_file(path)
    given = dict(raw)
    for key, value in (overrides or {}).items():
        given[key] = str(Path(value).resolve()) if key in PATH_FIELDS and value is not None else value
    return spec_from_mapping(given, path.resolve().parent)


def parse_config_file(path: Path) -> dict[str, Any]:
    """The mapping a ``.json``, ``.yaml`` or ``.yml`` file holds (SpecError ``config`` otherwise)."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise SpecError("config", f"{path.name}: give a .json, .yaml or .yml file")
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError("config", f"cannot read {path}: {exc.strerror}") from exc
    try:
        if kind == "json":
            data = json.loads(text)
        else:
            import yaml  # PyYAML, a dependency of transformers

            data = yaml.safe_load(text)
    except ValueError as exc:  # json.JSONDecodeError
        raise SpecError("config", f"{path.name} is not valid JSON: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError (yaml is imported only for YAML files)
        raise SpecError("config", f"{path.name} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError("config", f"{path.name} must hold a mapping of settings, not {type(data).__name__}")
    return data


def spec_from_mapping(given: Mapping[str, Any], base_dir: Path) -> TrainSpec:
    """The checked TrainSpec of ``given`` (a config file's mapping); relative paths are from ``base_dir``."""
    values = _dataclass_values(TrainSpec, given, "")
    values["hyperparameters"] = Hyperparameters(
        **_dataclass_values(Hyperparameters, given.get("hyperparameters") or {}, "hyperparameters.")
    )
    values["energy"] = EnergySettings(
        **_dataclass_values(EnergySettings, given.get("energy") or {}, "energy.")
    )
    for key in PATH_FIELDS:
        if values.get(key) is not None:
            values[key] = str((base_dir / values[key]).resolve())
    spec = TrainSpec(**values)
    spec.check()
    _check_paths(spec)
    return spec


def _dataclass_values(cls: type, given: Any, prefix: str) -> dict[str, Any]:
    """``given``'s values for the fields of dataclass ``cls``, each checked against its type (nested
    dataclasses are left to the caller); SpecError on an unknown key, a missing required one or a bad
    value."""
    if not isinstance(given, Mapping):
        raise SpecError(prefix.rstrip(".") or "config", f"must be a mapping, not {type(given).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in given:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {near[0]}?" if near else f"known: {', '.join(fields)}"
            raise SpecError(f"{prefix}{key}", f"unknown key ({hint})")
    hints = get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        nested = dataclasses.is_dataclass(hints[name])
        if name not in given:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"{prefix}{name}", "missing: this key is required")
            continue
        if not nested:
            values[name] = _checked(given[name], hints[name], f"{prefix}{name}")
    return values


def _checked(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` (``int``, ``float``, ``bool``, ``str``, a StrEnum, or one of them
    ``| None``), or SpecError naming ``key``."""
    kinds = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    if value is None:
        if NoneType in kinds:
            return None
        raise SpecError(key, "must not be null")
    kind = next(k for k in kinds if k is not NoneType)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise SpecError(key, f"must be true or false, not {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SpecError(key, f"must be an integer, not {value!r}")
    if kind is float:
        # PyYAML reads 1e-3 (no dot) as a string: a number written as text is taken, as the API's JSON
        # schema takes it.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise SpecError(key, f"must be a number, not {value!r}") from None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise SpecError(key, f"must be a finite number, not {value!r}")
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        if value in set(kind):
            return kind(value)
        raise SpecError(key, f"must be one of {', '.join(kind)}, not {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise SpecError(key, f"must be a string, not {value!r}")
    raise TypeError(f"{key}: no check for type {hint!r}")  # a field type this reader does not know yet


def _check_paths(spec: TrainSpec) -> None:
    """The inputs exist (the model folder's contents and the files' lines are checked when the run loads
    them)."""
    for key, is_dir in (("model_dir", True), ("train_file", False), ("valid_file", False)):
        value = getattr(spec, key)
        if value is None:
            continue
        found = Path(value).is_dir() if is_dir else Path(value).is_file()
        if not found:
            raise SpecError(key, f"no such {'folder' if is_dir else 'file'}: {value}")
    if spec.resume_from is not None and not Path(spec.resume_from).is_dir():
        raise SpecError("resume_from", f"no such folder: {spec.resume_from}")
