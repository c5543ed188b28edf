"""Recipe files, read and checked the same way by every command.

- `read_recipe(name, overrides)`: a shipped recipe's name or a path, its `base:` chain merged
  under it, then `dotted.key=value` overrides (values are YAML) -> a plain mapping.
- `typed(cls, raw, where, error)`: the dataclass from a mapping, every key known and every value of
  its field's type, numbers finite; the error's one-line message starts with the key.

Errors here are `UserError`s: bad input that the command line prints as one line and exits 2.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import yaml


class UserError(ValueError):
    """Bad input (a recipe, a file, a checkpoint): the message is one line naming it."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name), for one-line errors about it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class RecipeError(UserError):
    """A recipe that cannot run; the message is one line starting with the key."""


def find_recipe(name: str) -> Path:
    """A path, or the name of a recipe shipped in recipes/pretrain/ (with or without .yaml)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    from recur import RECIPES_DIR

    for candidate in (RECIPES_DIR / "pretrain" / name, RECIPES_DIR / "pretrain" / f"{name}.yaml", RECIPES_DIR / name,
                      RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise RecipeError(f"recipe {name!r}: is a folder, not a recipe file")
    shipped = sorted(p.stem for p in (RECIPES_DIR / "pretrain").glob("*.yaml") if not p.stem.startswith("_")) + sorted(
        f"linearize/{p.stem}" for p in (RECIPES_DIR / "linearize").glob("*.yaml") if not p.stem.startswith("_"))
    raise RecipeError(f"recipe {name!r}: no such file, and not a shipped recipe (shipped: {', '.join(shipped)})")


def read_yaml(path: Path, seen: tuple = ()) -> dict:
    """The YAML mapping of a recipe file, with its `base:` chain merged under it."""
    if path.resolve() in seen:
        raise RecipeError(f"base: {path} includes itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read it ({e})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError(f"base: expected a path, got {base!r}")
    base_path = (path.parent / base).resolve()
    if not base_path.is_file():
        raise RecipeError(f"base: {base!r} not found (relative to {path.parent})")
    return deep_merge(read_yaml(base_path, seen + (path.resolve(),)), raw)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "sources":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`train.max_steps=20`, `data.tokenizer=byte`, `train.betas=[0.9,0.99]`: values are YAML."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"{item!r}: an override is dotted.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = raw
        *parents, last = key.split(".")
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"{'.'.join(parents[:depth + 1])}: is {child!r}, not a section, so {key} cannot be set")
            node = child
        node[last] = value
    return raw


def read_recipe(name: str, overrides: list[str] = ()) -> tuple[dict, Path]:
    """The raw mapping of a recipe (name or path), bases merged and overrides applied, and its file."""
    path = find_recipe(name)
    return apply_overrides(read_yaml(path), list(overrides)), path


def _float(value):
    """YAML 1.1 reads 3e-4 (no dot) as a string: accept such strings as numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def typed(cls, raw: dict, where: str, error: type = RecipeError, skip: tuple = ()):
    """`cls(**raw)` for a dataclass, refusing unknown keys, values of the wrong type and non-finite
    numbers with one line naming `where.key`. Field types are written as strings (`from __future__
    import annotations`): str, int, float, bool, dict, list (of anything) and `X | None`."""
    prefix = f"{where}." if where else ""
    if not isinstance(raw, dict):
        raise error(f"{where}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise error(f"{prefix}{key}: unknown key (known: {', '.join(sorted(fields))})")
        want = fields[key].type if isinstance(fields[key].type, str) else fields[key].type.__name__
        options = [t.strip() for t in want.split("|")]
        if value is None and "None" in options:
            values[key] = None
            continue
        kinds = [t.split("[")[0] for t in options if t != "None"]
        if "float" in kinds:
            value = _float(value)
        ok = any({"str": isinstance(value, str), "bool": isinstance(value, bool),
                  "int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "dict": isinstance(value, dict), "list": isinstance(value, list)}.get(kind, True) for kind in kinds)
        if not ok:
            raise error(f"{prefix}{key}: expected {want}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{prefix}{key}: must be a finite number, got {value}")
        values[key] = float(value) if kinds == ["float"] else value
    return cls(**values)
