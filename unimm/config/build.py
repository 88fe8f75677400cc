"""Building a config from layers: defaults <- recipe YAML <- CLI options <- ``--set a.b=value``.

Unknown keys, wrong types and invalid values are all collected and raised together in one
:class:`~unimm.errors.ConfigError`, each naming the dotted key and what to change. Recipes are
YAML files or the names of the shipped recipes (the repository's top-level ``recipes/``, which the
wheel carries as ``unimm/recipes/``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from unimm.errors import ConfigError

C = TypeVar("C")

# Every section a recipe may hold. A command ignores the sections it does not use, so that one
# recipe drives prepare, train and embed; a key outside this set is a typo and fails.
RECIPE_SECTIONS = frozenset(
    {
        "prepare",
        "teachers",
        "model",
        "data",
        "align",
        "train",
        "embed",
        "index",
        "retrieve",
        "chat",
        "eval",
        "serve",
        "push",
        "export",
        "mine",
    }
)


def _shipped_recipes_dir() -> Path:
    # The repository's top-level recipes/ is the source of truth (users browse and copy from it);
    # a wheel carries it as unimm/recipes/ (pyproject's package-dir). An installed wheel has the
    # latter, a checkout (editable install) only the former.
    package = Path(__file__).resolve().parents[1]
    packaged = package / "recipes"
    return packaged if packaged.is_dir() else package.parent / "recipes"


SHIPPED_RECIPES = _shipped_recipes_dir()
"""The shipped recipes (``tiny-cpu``, ``llava-7b-lora``, ``accelerate/ddp``, ...): the checkout's
``recipes/``, or ``unimm/recipes/`` inside an installed wheel."""


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of every recipe shipped with the package (``accelerate/fsdp`` for launch configs)."""
    return {
        path.relative_to(SHIPPED_RECIPES).with_suffix("").as_posix(): path
        for path in sorted(SHIPPED_RECIPES.rglob("*.yaml"))
    }


def recipe_description(path: Path, width: int = 80) -> str:
    """A recipe's first comment line (its title), shortened to ``width`` characters."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and line.strip("# "):
            text = line.lstrip("# ").rstrip()
            return text if len(text) <= width else text[: width - 1].rstrip() + "…"
    return ""


def resolve_recipe(recipe: str | Path, *, flag: str = "--recipe") -> Path:
    """A recipe file: ``recipe`` itself when it is a file, else the shipped recipe of that name.

    ``tiny-cpu``, ``tiny-cpu.yaml`` and ``recipes/tiny-cpu.yaml`` all name the shipped
    ``tiny-cpu`` recipe, so the commands in the docs work from any directory after ``pip install``.
    A file of the same path in the working directory wins.

    Raises:
        ConfigError: when neither exists, listing the shipped names (``flag`` names the input).
    """
    path = Path(recipe)
    if path.is_file():
        return path
    name = path.as_posix().removeprefix("./").removeprefix("recipes/").removesuffix(".yaml")
    shipped = shipped_recipes()
    if name in shipped:
        return shipped[name]
    if path.exists():
        raise ConfigError(
            ["not a file: give a recipe YAML file or a shipped recipe's name"], source=f"{flag} {recipe}"
        )
    raise ConfigError(
        [f"no such file, and no shipped recipe of that name (shipped: {', '.join(shipped)})"],
        source=f"{flag} {recipe}",
    )


class _StrictBoolLoader(yaml.SafeLoader):
    """YAML's safe loader with YAML 1.2 booleans: only ``true``/``false``. YAML 1.1 also reads
    ``no``/``yes``/``on``/``off`` as booleans, so ``--set train.mixed_precision=no`` became
    ``False`` and was refused."""


_StrictBoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictBoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_recipe(recipe: str | Path) -> dict[str, Any]:
    """Read a recipe (a YAML file or a shipped recipe's name, see :func:`resolve_recipe`) into a
    dict; raise :class:`ConfigError` naming the file on failure."""
    path = resolve_recipe(recipe)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read recipe: {exc.strerror or exc}"], source=str(path)) from None
    try:
        data = yaml.load(text, Loader=_StrictBoolLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(
            [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"], source=str(path)
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            ["the top level must be a mapping of sections (prepare:, train:, ...)"], source=str(path)
        )
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is parsed as YAML (``true``, ``3``, ``[a, b]``, ``null``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError([f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=2e-4"], source="--set")
    try:
        value = yaml.load(raw, Loader=_StrictBoolLoader) if raw.strip() else ""  # a SafeLoader
    except yaml.YAMLError:
        value = raw
    return key, value


def build_config(
    cls: type[C],
    *,
    recipe: str | Path | None = None,
    options: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> C:
    """Build a config of type ``cls`` from defaults, a recipe, CLI options and ``--set`` overrides.

    Args:
        cls: the command's config dataclass (e.g. :class:`PrepareConfig`).
        recipe: optional YAML file; sections the command does not use are ignored.
        options: dotted key -> value from CLI options; ``None`` values mean "not given".
        overrides: ``KEY=VALUE`` strings from repeated ``--set``; applied last.

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every unknown key, wrong type and invalid value at once.
    """
    cfg, problems = resolve_config(cls, recipe=recipe, options=options, overrides=overrides)
    if problems:
        raise ConfigError(problems)
    return cfg


def resolve_config(
    cls: type[C],
    *,
    recipe: str | Path | None = None,
    options: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> tuple[C, list[str]]:
    """:func:`build_config`'s config and its problems, without raising (``unimm config show``
    lists them); a field with a problem keeps its default."""
    problems: list[str] = []
    tree: dict[str, Any] = {}
    if recipe is not None:
        data = load_recipe(recipe)
        own = {f.name for f in dataclasses.fields(cls)}
        for section, body in data.items():
            if section in own:
                tree[section] = body
            elif section not in RECIPE_SECTIONS:
                known = ", ".join(sorted(RECIPE_SECTIONS))
                problems.append(f"{section}: unknown recipe section in {recipe} (known: {known})")
    for key, value in (options or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    for text in overrides or []:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        _set_dotted(tree, key, value)
    cfg = _build(cls, tree, "", problems)
    # Fields with a type problem kept their (valid) defaults, so value checks can still run and
    # every problem is reported in one go.
    problems.extend(_validate(cfg))
    return cfg, problems


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-JSON view of a config (for ``unimm.json`` and manifests)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, appending problems instead of raising."""
    where = prefix.rstrip(".") or "configuration"
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping of keys, got {type(data).__name__}")
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key (known in {where}: {', '.join(sorted(fields))})")
    kwargs = {}
    for name in fields:
        if name not in data:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], f"{prefix}{name}.", problems)
            continue
        ok, value = _coerce(data[name], hint)
        if ok and not _finite(value):
            problems.append(f"{prefix}{name}: must be a finite number, got {data[name]!r}")
        elif ok:
            kwargs[name] = value
        else:
            problems.append(f"{prefix}{name}: expected {_describe(hint)}, got {data[name]!r}")
    return cls(**kwargs)


def _finite(value: Any) -> bool:
    """No infinity or NaN in ``value`` (a number, or a list or mapping of them)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _validate(cfg: Any) -> list[str]:
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            problems.extend(_validate(value))
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        problems.extend(validate())
    return problems


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Check ``value`` against type ``hint``; convert strings from ``--set`` where unambiguous."""
    origin = get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = get_args(hint)
        if value is None:
            return (type(None) in args), None
        for arg in args:
            if arg is type(None):
                continue
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, None
    if origin is Literal:
        return (value in get_args(hint)), value
    if origin is list:
        (item,) = get_args(hint) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is not Any:
            value = [value]  # a single value where a list is expected: --set data.train=DIR
        if not isinstance(value, list):
            return False, None
        out = []
        for v in value:
            ok, c = _coerce(v, item)
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if origin is dict:
        key_t, val_t = get_args(hint) or (Any, Any)
        if not isinstance(value, dict):
            return False, None
        out = {}
        for k, v in value.items():
            ok_k, ck = _coerce(k, key_t)
            ok_v, cv = _coerce(v, val_t)
            if not (ok_k and ok_v):
                return False, None
            out[ck] = cv
        return True, out
    if hint is Any:
        return True, value
    if hint is bool:
        if isinstance(value, bool):
            return True, value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return True, value.lower() in ("true", "yes", "1")
        return False, None
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if isinstance(value, str):
            try:
                return True, int(value.replace("_", ""))
            except ValueError:
                return False, None
        return False, None
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        if isinstance(value, str):
            return True, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)  # --set data.train=123 names a folder "123"
        return False, None
    return isinstance(value, hint), value


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + " | ".join(repr(a) for a in get_args(hint))
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in get_args(hint))
    if origin is list:
        (item,) = get_args(hint) or (Any,)
        return f"a list of {_describe(item)}"
    if origin is dict:
        return "a mapping"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
