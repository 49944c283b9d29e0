"""Find, read, override and validate recipes: the only place that reads recipe YAML.

Every problem becomes a UserError whose single line names the file (or --set), the dotted key and what
is allowed, so a typo is fixed in one go.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from qlora_app.errors import UserError
from qlora_app.recipe.schema import Recipe

PATH_KEYS = (("model", "path"), ("data", "source"), ("data", "eval_split"), ("eval", "tasks"),
             ("train", "init_adapter"))


def recipes_dir() -> Path:
    """$QLORA_RECIPES_DIR, else the recipes/ folder of the source tree or image."""
    if env := os.environ.get("QLORA_RECIPES_DIR"):
        return Path(env)
    return Path(__file__).resolve().parents[2] / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise UserError(f"recipe file {name_or_path} does not exist")
        return candidate
    path = recipes_dir() / f"{name_or_path}.yaml"
    if path.is_file():
        return path
    known = list_recipes()
    hint = _did_you_mean(name_or_path, known)
    raise UserError(f"unknown recipe '{name_or_path}'{hint}; known recipes: {', '.join(known)}")


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    _resolve_relative_paths(raw, path.parent)
    overridden = apply_overrides(raw, overrides)
    return validate(overridden, source=str(path), overrides=overrides)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: malformed YAML: {exc.problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings; values are parsed as YAML (numbers, booleans, [lists])."""
    result = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise UserError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-4")
        value = _parse_value(text)
        if tuple(parts) in PATH_KEYS:
            value = _relative_to(value, Path.cwd())
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return result


def validate(raw: dict[str, Any], source: str, overrides: Sequence[str] = ()) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        origin = f"{source} (with --set {' '.join(overrides)})" if overrides else source
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise UserError(f"{origin}: {problems}") from None


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc) or "recipe"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        hint = _did_you_mean(loc[-1], valid)
        return f"unknown key '{dotted}'{hint} (valid keys here: {', '.join(valid)})"
    if kind == "missing":
        return f"missing required key '{dotted}'"
    got = err.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict) else ""
    return f"{dotted}: {err['msg'].replace('Value error, ', '')}{shown}"


def _valid_keys(loc: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    close = close or [c for c in choices if word.startswith(c) or c.startswith(word)][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    """`./x` and `../x` inside a recipe file are relative to the file, not to the working directory."""
    for section, key in PATH_KEYS:
        node = raw.get(section)
        if isinstance(node, dict) and key in node:
            node[key] = _relative_to(node[key], base)


def _relative_to(value: Any, base: Path) -> Any:
    """A path (or each path of a list) starting with '.', resolved against base; anything else as it is."""
    if isinstance(value, list):
        return [_relative_to(item, base) for item in value]
    if isinstance(value, str) and value.startswith("."):
        return str((base / value).resolve())
    return value



def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, in the schema's section order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, width=100, allow_unicode=True)
