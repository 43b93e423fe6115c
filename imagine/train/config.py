"""Run configs: one YAML file per run, with command-line overrides `key.sub=value`."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: PyYAML (YAML 1.1) reads `1e-4`, a learning rate's usual spelling, as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | Path | None, overrides: list[str] | None = None, defaults: dict | None = None) -> dict:
    cfg = copy.deepcopy(defaults or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); a config "
                             f"is a UTF-8 YAML file") from None
        try:
            loaded = parse_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {_yaml_error(e)}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping at the top level")
        deep_update(cfg, loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        try:
            parsed = parse_yaml(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not valid YAML: {_yaml_error(e)} (a string "
                             f"that YAML cannot read as given must be quoted)") from None
        set_dotted(cfg, key.strip(), parsed)
    return cfg


def _yaml_error(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several lines)."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(problem)


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
        if not isinstance(node.setdefault(p, {}), dict):
            raise ValueError(f"override {key}: {p} is not a section")
        node = node[p]
    node[parts[-1]] = value


def check_keys(section: dict, allowed: set[str], where: str) -> None:
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a mapping of keys to values; got {section!r}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")


# -- values: each check names the key and what is valid (a ValueError), and returns the value made plain -----------
def as_bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false; got {value!r}")
    return value


def as_int(value, key: str, least: int | None = None) -> int:
    """A whole number (an int, or a float such as YAML's 1e5 with no fraction), at least `least`."""
    ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if not ok or (least is not None and value < least):
        raise ValueError(f"{key} must be a whole number{f' >= {least}' if least is not None else ''}; got {value!r}")
    return int(value)


def as_number(value, key: str, least: float | None = None, inclusive: bool = True, below: float | None = None,
              none: bool = False) -> float | None:
    """A finite number (a YAML "1e-4" read as a string is taken) in [least, below) (least excluded unless
    `inclusive`); None too when `none`."""
    if value is None and none:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        v = float(value)
    except (TypeError, ValueError):
        v = None
    bad = v is None or not math.isfinite(v) or (least is not None and not (v >= least if inclusive else v > least)) \
        or (below is not None and not v < below)
    if bad:
        where = " ".join(filter(None, [f"{'>=' if inclusive else '>'} {least:g}" if least is not None else "",
                                       f"below {below:g}" if below is not None else ""]))
        raise ValueError(f"{key} must be a finite number{' ' + where if where else ''}{' or null' if none else ''}; "
                         f"got {value!r}")
    return v


def as_choice(value, key: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {key} {value!r}; valid: {', '.join(map(repr, choices))}")
    return value


def as_mapping(value, key: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping of keys to values; got {value!r}")
    return value


def check_fields(section, config_class, where: str) -> None:
    """The keys of a model section (`model:`) must be fields of its config class (dataclass): a misspelt key
    would otherwise be dropped silently by the class's from_dict, which reads diffusers' folders and so ignores
    keys it does not know."""
    from dataclasses import fields

    check_keys(section, {f.name for f in fields(config_class)}, where)
