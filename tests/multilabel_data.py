"""A small multi-label dataset of real photos: 2 x 2 mosaics of the embedded sample's flowers, labelled with the
classes they show, and a manifest `path,labels[,split]` (a|b) beside them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from visiontune import samples

CLASSES = ("daisy", "roses", "tulips")


def mosaic_dataset(folder: Path, images: int = 36, seed: int = 0, side: int = 128) -> Path:
    """`images` mosaics (each one, two or three of CLASSES) and folder/labels.csv; returns the manifest."""
    rng = np.random.default_rng(seed)
    root = samples.path("flowers-mini")
    photos = {c: sorted((root / c).glob("*.jpg")) for c in CLASSES}
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for i in range(images):
        present = [c for c in CLASSES if rng.random() < 0.45] or [CLASSES[i % len(CLASSES)]]
        tiles = [present[k % len(present)] for k in range(4)]
        rng.shuffle(tiles)
        canvas = Image.new("RGB", (side, side))
        half = side // 2
        for k, c in enumerate(tiles):
            photo = Image.open(photos[c][int(rng.integers(len(photos[c])))]).convert("RGB").resize((half, half))
            canvas.paste(photo, ((k % 2) * half, (k // 2) * half))
        name = f"m{i:03d}.jpg"
        canvas.save(folder / name, quality=90)
        rows.append(f"{name},{'|'.join(present)}")
    manifest = folder / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest
