"""Datasets shipped inside the package, so the demo and the tests need nothing from outside."""

from pathlib import Path

from visiontune.errors import DatasetError

_HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.name for p in _HERE.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def path(name: str) -> Path:
    """The folder of the embedded sample dataset `name` (e.g. "flowers-mini")."""
    folder = _HERE / name
    if name not in names():
        raise DatasetError(f"no embedded sample named {name!r}; available: {', '.join(names())}")
    return folder
