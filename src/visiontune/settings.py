"""How a setting is declared, checked, overridden and stored; the `config` package declares the settings themselves.

A setting is a dataclass field made with `setting(...)`: its default, help text, CLI flag, allowed values and
range travel together, so the CLI, the validation and the YAML files all read them from the one declaration.
A config checks every value when it is made (`Settings.__post_init__`), so no bad value ever reaches a job.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import yaml

from visiontune.errors import ConfigError
from visiontune.files import atomic_write_text


class SettingError(ConfigError):
    """A bad value, naming the setting by its dotted path (`augment.mixup`) so the user can find it."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name, self.problem = name, problem

    def under(self, section: str) -> "SettingError":
        return SettingError(f"{section}.{self.name}", self.problem)


_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in "90s", "5m", "1.5h", "2min" or a bare number of seconds; ValueError otherwise."""
    text = str(text).strip().lower()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):].strip() or "s"
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r}")
    seconds = float(number) * _UNITS[unit]
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError("not a positive duration")
    return seconds


def setting(default: Any = MISSING, help: str = "", *, flag: str | None = None, choices: tuple | None = None,
            low: float | None = None, high: float | None = None, above: float | None = None, cli: bool = True,
            aliases: tuple[str, ...] = (), also: tuple[str, ...] = ()) -> Any:
    """A config field. `flag`: the CLI flag when it is not --<name>; `low`/`high`: inclusive bounds; `above`:
    an exclusive lower bound; `aliases`: other keyword names the API accepts; `also`: dotted paths of settings
    that take the same value when this one is overridden (a run's seed is also its split's seed)."""
    meta = {"help": help, "flag": flag, "choices": choices, "low": low, "high": high, "above": above, "cli": cli,
            "aliases": aliases, "also": also}
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str = "") -> Any:
    """A nested group of settings (a config of its own, e.g. TrainConfig.augment)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


@dataclass(frozen=True)
class Settings:
    """Base of every config: checks each value (type, choices, range) as the config is made."""

    def __post_init__(self) -> None:
        for spec in specs(type(self)):
            if spec.is_section:
                continue
            object.__setattr__(self, spec.name, spec.check(getattr(self, spec.name)))
        self.check()

    def check(self) -> None:
        """Rules that tie several settings together; a config overrides it."""


@dataclass(frozen=True)
class Spec:
    """One setting as read from its declaration."""

    name: str
    kind: type  # bool, int, float, str, tuple, or a Settings subclass for a section
    optional: bool  # None is allowed
    default: Any
    meta: dict

    @property
    def is_section(self) -> bool:
        return bool(self.meta.get("section"))

    @property
    def flag(self) -> str:
        return self.meta.get("flag") or "--" + self.name.replace("_", "-")

    @property
    def element(self) -> type:
        """The type of a tuple setting's items (from its default)."""
        return float if any(isinstance(x, float) for x in self.default or ()) else int

    def describe(self) -> str:
        parts = [self.meta.get("help", "")]
        if self.meta.get("choices"):
            parts.append("one of " + " | ".join(str(c) for c in self.meta["choices"]))
        default = ",".join(map(str, self.default)) if isinstance(self.default, tuple) else self.default
        parts.append(f"default {default}")
        return "; ".join(p for p in parts if p)

    def check(self, value: Any) -> Any:
        """`value` as this setting stores it (ints widened to float, lists to tuples), or SettingError."""
        if value is None:
            if self.optional:
                return None
            raise SettingError(self.name, f"needs a value ({self.kind.__name__})")
        value = self._typed(value)
        choices = self.meta.get("choices")
        if choices and value not in choices:
            raise SettingError(self.name, f"{value!r} is not one of {', '.join(map(str, choices))}")
        for item in value if isinstance(value, tuple) else (value,):
            self._check_range(item)
        return value

    def _typed(self, value: Any) -> Any:
        kind = self.kind
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif kind is str:
            if isinstance(value, str):
                return value
            if isinstance(value, Path):
                return str(value)
        elif kind is tuple:
            if isinstance(value, (list, tuple)):
                element = Spec(self.name, self.element, False, None, {})
                return tuple(element._typed(x) for x in value)
        raise SettingError(self.name, f"expected {_kind_name(kind)}, got {value!r}")

    def _check_range(self, value: Any) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return
        low, high, above = self.meta.get("low"), self.meta.get("high"), self.meta.get("above")
        if low is not None and value < low:
            raise SettingError(self.name, f"{value} is below {low}, the least it can be")
        if high is not None and value > high:
            raise SettingError(self.name, f"{value} is above {high}, the most it can be")
        if above is not None and value <= above:
            raise SettingError(self.name, f"{value} must be more than {above}")


def _kind_name(kind: type) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text",
            tuple: "a list of numbers"}.get(kind, kind.__name__)


@functools.lru_cache(maxsize=None)
def specs(cls: type) -> tuple[Spec, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        kind, optional = _unwrap(hints[f.name])
        default = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
        out.append(Spec(f.name, kind, optional, default, dict(f.metadata)))
    return tuple(out)


def _unwrap(hint: Any) -> tuple[type, bool]:
    """(the type, whether None is allowed) of `X` or `X | None`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return _unwrap(rest[0])[0], True
    return (typing.get_origin(hint) or hint), False


def spec_of(cls: type, name: str) -> Spec:
    return next(s for s in specs(cls) if s.name == name)


# --- overrides -----------------------------------------------------------------------------------------------


def override(config: Settings, **changes: Any) -> Settings:
    """A copy of `config` with `changes` applied; nothing else differs, and the result is checked whole.

    A key is a setting's name or alias, a section's name (with a dict of that section's changes), or the name
    of a setting inside a section when only one section has it (`val=0.2` sets `split.val`).
    """
    nested: dict[str, dict] = {}
    for key, value in changes.items():
        path = _resolve(type(config), key)
        if len(path) == 1 and spec_of(type(config), path[0]).is_section:
            if not isinstance(value, dict):
                if isinstance(value, Settings):
                    value = to_dict(value)
                else:
                    raise SettingError(key, f"expected a mapping of its settings, got {value!r}")
            for inner, inner_value in value.items():
                _put(nested, (path[0], *_resolve(type(getattr(config, path[0])), inner, path[0])), inner_value)
            continue
        _put(nested, path, value)
        for linked in spec_at(type(config), path).meta.get("also", ()):
            if tuple(linked.split(".")) not in _paths(changes, type(config)):
                _put(nested, tuple(linked.split(".")), value)
    return _apply(config, nested, "")


def spec_at(cls: type, path: tuple[str, ...]) -> Spec:
    spec = spec_of(cls, path[0])
    return spec_at(spec.kind, path[1:]) if len(path) > 1 else spec


def _paths(changes: dict, cls: type) -> set[tuple[str, ...]]:
    """The settings `changes` names explicitly (an explicit value beats one linked by `also`)."""
    found = set()
    for key, value in changes.items():
        path = _resolve(cls, key)
        if isinstance(value, dict) and len(path) == 1:
            found |= {(path[0], *_resolve(spec_of(cls, path[0]).kind, k, path[0])) for k in value}
        found.add(path)
    return found


def _put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _resolve(cls: type, key: str, where: str = "") -> tuple[str, ...]:
    """The dotted path (as a tuple) that keyword `key` names in config class `cls`."""
    own = specs(cls)
    for spec in own:
        if key == spec.name or key in spec.meta.get("aliases", ()):
            return (spec.name,)
    inside = [(s.name, *_resolve(s.kind, key)) for s in own if s.is_section and _knows(s.kind, key)]
    if len(inside) == 1:
        return inside[0]
    prefix = f"{where}." if where else ""
    if len(inside) > 1:
        raise SettingError(prefix + key, f"ambiguous; say which: {', '.join('.'.join(p) for p in inside)}")
    known = sorted(all_names(cls))
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {', '.join(known)}"
    raise SettingError(prefix + key, f"no such setting{hint}")


def _knows(cls: type, key: str) -> bool:
    try:
        _resolve(cls, key)
        return True
    except SettingError:
        return False


def all_names(cls: type) -> set[str]:
    names = set()
    for spec in specs(cls):
        names.add(spec.name)
        names.update(spec.meta.get("aliases", ()))
        if spec.is_section:
            names |= all_names(spec.kind)
    return names


def _apply(config: Settings, nested: dict, where: str) -> Settings:
    values = {}
    try:
        # this level's own values first: a bad value is named before any that it was linked to in a section
        for name, value in nested.items():
            spec = spec_of(type(config), name)
            if not spec.is_section:
                values[name] = spec.check(value)
        for name, value in nested.items():
            if spec_of(type(config), name).is_section:
                values[name] = _apply(getattr(config, name), value, f"{where}{name}.")
        return dataclasses.replace(config, **values)
    except SettingError as exc:
        raise (exc.under(where.rstrip(".")) if where and not exc.name.startswith(where) else exc) from None


# --- dicts and YAML ------------------------------------------------------------------------------------------


def to_dict(config: Settings) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict | None, where: str = "config") -> Settings:
    """Build config `cls` from a plain mapping (YAML), refusing unknown keys so a typo is never ignored."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    known = {s.name for s in specs(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}")
    values = {}
    for spec in specs(cls):
        if spec.name in data:
            value = data[spec.name]
            values[spec.name] = from_dict(spec.kind, value, f"{where}: {spec.name}") if spec.is_section else value
    try:
        return cls(**values)
    except SettingError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def save_yaml(config: Settings, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def load_yaml(cls: type, path: Path) -> Settings:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return from_dict(cls, data, str(path))


def walk(cls: type, skip: tuple[str, ...] = (), prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Spec]]:
    """Every CLI setting of `cls` with its dotted path, sections flattened; `skip` names paths (or sections)
    a verb leaves out."""
    for spec in specs(cls):
        path = (*prefix, spec.name)
        if ".".join(path) in skip:
            continue
        if spec.is_section:
            yield from walk(spec.kind, skip, path)
        elif spec.meta.get("cli", True):
            yield path, spec
