"""The CLI's settings flags, generated from the declarations in the `config` package: one flag per setting, grouped by
section, typed and checked as the setting is; a flag the user does not give changes nothing."""

from __future__ import annotations

import argparse
import sys

from visiontune.settings import Spec, spec_at, walk

PREFIX = "setting:"  # argparse dest of a settings flag: PREFIX + dotted path
TRACK_PREFIX = "track:"  # the same for the tracking flags, which are not the verb's own settings


class Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, exit 2, as every other user error."""

    def error(self, message: str):
        where = self.prog.split()[-1]  # the verb, or the program itself before a verb was read
        print(f"visiontune{'' if where == 'visiontune' else ' ' + where}: error: {message}", file=sys.stderr)
        sys.exit(2)


def add_settings(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                 extra_flags: dict[str, list[str]] | None = None, prefix: str = PREFIX, title: str = "",
                 tracked: tuple[str, ...] | None = None) -> None:
    """A flag for every setting of config class `cls` (sections flattened: --val sets split.val), but `skip`; with
    `tracked`, the tracking flags too, but those it names."""
    groups: dict[tuple, argparse._ArgumentGroup] = {}
    for path, spec in walk(cls, skip):
        section = path[:-1]
        if section not in groups:
            name = f"{'.'.join(section)} settings" if section else title or "settings"
            groups[section] = parser.add_argument_group(name)
        flags = [spec.flag, *(extra_flags or {}).get(".".join(path), [])]
        groups[section].add_argument(*flags, dest=prefix + ".".join(path), default=argparse.SUPPRESS,
                                     help=spec.describe().replace("%", "%%"), **_kind(spec))
    if tracked is not None:
        add_track_flags(parser, tracked)


EXPORT_ONLY = ("register", "alias")  # the tracking flags of `export` alone


def add_track_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = EXPORT_ONLY) -> None:
    """The tracking flags (`config.TrackConfig`), but `skip`."""
    from visiontune.config import TrackConfig

    add_settings(parser, TrackConfig, skip=skip, prefix=TRACK_PREFIX, title="tracking settings")


def tracked(args: argparse.Namespace):
    """The TrackConfig of the tracking flags given (any of them means --track mlflow), or None when none was."""
    from visiontune.config import TrackConfig
    from visiontune.settings import override

    given = overrides(args, TRACK_PREFIX)
    return override(TrackConfig(track="mlflow"), **given) if given else None


def _kind(spec: Spec) -> dict:
    if spec.kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if spec.kind is tuple:
        return {"type": _list_of(spec.element), "metavar": "A,B,..."}
    return {"type": spec.kind, "choices": spec.meta.get("choices"),
            "metavar": None if spec.meta.get("choices") else spec.name.upper()}


def _list_of(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 1,4,16") from None

    return parse


def overrides(args: argparse.Namespace, prefix: str = PREFIX) -> dict:
    """The settings the user gave, as `override(config, **...)` takes them (sections as nested dicts)."""
    out: dict = {}
    for dest, value in vars(args).items():
        if not dest.startswith(prefix):
            continue
        *section, name = dest[len(prefix):].split(".")
        tree = out
        for part in section:
            tree = tree.setdefault(part, {})
        tree[name] = value
    return out


def flag_of(cls: type | None, name: str) -> str | None:
    """The flag of the setting at dotted path `name` of config class `cls` (None if it has none)."""
    try:
        return spec_at(cls, tuple(name.split("."))).flag if cls is not None else None
    except (StopIteration, AttributeError, TypeError):
        return None
