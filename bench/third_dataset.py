"""A third benchmark dataset from another domain: the Sign Language Digits Dataset (Turkey Ankara Ayrancı Anadolu
High School; 2,062 RGB photos of hands showing the digits 0-9, 100 x 100 px, one folder per digit), built from its
public repository into a temporary folder with a seeded, stratified 60 / 20 / 20 split. Never committed.

    git clone https://github.com/ardamavi/Sign-Language-Digits-Dataset /tmp/sld-repo
    .venv/bin/python bench/third_dataset.py --source /tmp/sld-repo --out /tmp/visiontune-signs
    .venv/bin/python bench/budget_curve.py --data /tmp/visiontune-signs/split.csv --budgets none,5m

`--source` may also be a bare git directory (its HEAD is read with `git archive`).
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

SHARES = {"train": 0.6, "val": 0.2, "test": 0.2}


def extract(source: Path, out: Path) -> None:
    """Copies the repository's Dataset/<digit>/ folders to out/<digit>/."""
    if (source / "Dataset").is_dir():
        for folder in sorted((source / "Dataset").iterdir()):
            if folder.is_dir():
                shutil.copytree(folder, out / folder.name)
        return
    tar = subprocess.run(["git", f"--git-dir={source}", "archive", "HEAD", "Dataset"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for member in archive.getmembers():
            if member.isfile():
                target = out / Path(member.name).relative_to("Dataset")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())


def write_split(out: Path, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        files = sorted(p.relative_to(out).as_posix() for p in folder.iterdir() if p.is_file())
        rng.shuffle(files)
        n_train, n_val = round(len(files) * SHARES["train"]), round(len(files) * SHARES["val"])
        for i, path in enumerate(files):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            rows.append((path, folder.name, split))
    manifest = out / "split.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows(sorted(rows))
    return manifest


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="a checkout or bare git dir of the repository")
    parser.add_argument("--out", type=Path, default=Path("/tmp/visiontune-signs"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    extract(args.source, args.out)
    manifest = write_split(args.out, args.seed)
    counts = {}
    for row in csv.DictReader(open(manifest)):
        counts[row["split"]] = counts.get(row["split"], 0) + 1
    print(f"{manifest}: {counts}")
    return manifest


if __name__ == "__main__":
    main()
