"""A finding: one thing worth telling the user about one file (or one class), with how much it matters."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# error: the dataset or an evaluation on it would be wrong (leakage, an empty class);
# warning: a file is skipped; info: a file is used after a conversion, or something is ignored.
LEVELS = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    level: str
    path: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def sort_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (LEVELS.index(f.level), f.path, f.reason))
