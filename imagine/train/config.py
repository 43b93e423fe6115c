"""Run configs: one YAML file per run, with command-line overrides `key.sub=value`."""

from __future__ import annotations

import copy
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
        loaded = parse_yaml(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping at the top level")
        deep_update(cfg, loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        set_dotted(cfg, key.strip(), parse_yaml(value))
    return cfg


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
