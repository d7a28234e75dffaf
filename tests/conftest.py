"""Shared fixtures: real files made under tmp_path, the embedded sample photos, and a guard that proves
no user file was touched.

Images stay small: generated ones are 48 x 48 noise (distinct content and distinct perceptual hashes, so
they are never near-duplicates of each other); where a real photo is needed, it is one of the embedded
sample's ~17 kB JPEGs.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from visiontune import samples

SAMPLE = "flowers-mini"
SAMPLE_CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
# The console script installed next to this interpreter (the real entry point, not `python -m`).
VISIONTUNE = Path(sys.executable).parent / "visiontune"
# Debian's chromium, driven by Playwright (never `playwright install`); `make test` installs it.
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test installs it)")


@contextmanager
def browser_page(viewport: dict) -> Iterator[tuple[object, list[str], list[str]]]:
    """(a page in headless chromium, the console errors it logs, the URLs it requests)."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport=viewport)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda r: requests.append(r.url))
            ARTIFACTS.mkdir(exist_ok=True)
            yield page, errors, requests
        finally:
            browser.close()


def tree_state(*roots: Path) -> dict[str, tuple]:
    """Every file and folder below `roots` (hidden ones too): content hash, size, mtime and mode.

    Symlinks and special files (named pipes) are recorded, not opened, and symlinked folders not followed.
    """
    state: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        if root.is_file():
            entries = [(root.parent, [], [root.name])]
        else:
            entries = os.walk(root)
        for folder, dirs, files in entries:
            for name in dirs:
                st = os.stat(os.path.join(folder, name))
                state[os.path.join(folder, name)] = ("dir", st.st_mode)
            for name in files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):  # a symlink, named pipe, socket: never opened here
                    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
                    state[path] = (stat.S_IFMT(st.st_mode), target, st.st_mtime_ns, st.st_mode)
                    continue
                try:
                    with open(path, "rb") as fh:
                        digest = hashlib.sha256(fh.read()).hexdigest()
                except PermissionError:  # a test's deliberately unreadable file (when not root)
                    digest = "unreadable"
                state[path] = (digest, st.st_size, st.st_mtime_ns, st.st_mode)
    return state


@contextmanager
def _untouched(*roots: Path) -> Iterator[None]:
    before = tree_state(*roots)
    assert before, f"nothing to guard under {roots}"
    yield
    after = tree_state(*roots)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"user files were created, changed or removed: {changed[:10]}"


@pytest.fixture(scope="session")
def untouched():
    """`with untouched(root): ...` fails the test if any file or folder under `root` changes."""
    return _untouched


def noise_image(seed: int, size: int = 48, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)


_seed_counter = iter(range(1, 10**9))


def write_noise(path: Path, seed: int | None = None, size: int = 48) -> Path:
    """A small, unique, valid image at `path` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(next(_seed_counter) if seed is None else seed, size).save(path)
    return path


def make_classes(root: Path, counts: dict[str, int], suffix: str = ".png") -> Path:
    """root/<class>/<i>.png with `counts[class]` distinct noise images each (an empty folder for 0)."""
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_noise(root / name / f"{i:03d}{suffix}")
    return root


@pytest.fixture(scope="session", name="make_classes")
def make_classes_fixture():
    """`make_classes(root, {"a": 3, "b": 0})`: class folders of distinct small images."""
    return make_classes


@pytest.fixture(scope="session", name="write_noise")
def write_noise_fixture():
    """`write_noise(path)`: one distinct small valid image, format from the suffix."""
    return write_noise


@pytest.fixture(scope="session")
def sample_root() -> Path:
    return samples.path(SAMPLE)


@pytest.fixture(scope="session")
def photos(sample_root) -> dict[str, list[Path]]:
    """The embedded sample's real photos, by class, in name order."""
    return {name: sorted((sample_root / name).glob("*.jpg")) for name in SAMPLE_CLASSES}


@pytest.fixture(scope="session")
def photo(photos) -> Path:
    """One real JPEG photo (207 x 240)."""
    return photos["daisy"][0]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    assert VISIONTUNE.exists(), f"console script not installed at {VISIONTUNE}"
    return subprocess.run([str(VISIONTUNE), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def cli():
    """`cli("scan", path, "--json")`: runs the console script, returns the CompletedProcess."""
    return run_cli


def kill_train_when(out: Path, marker: str, *args: str, seconds: float = 240, watch: str = "history.csv") -> None:
    """Start `visiontune train ... --out OUT`, and kill it (SIGKILL, as a crash would) once its history.csv (or the
    run's file `watch`) holds `marker`: a run stopped at a chosen point, for the resume tests."""
    import signal
    import time

    proc = subprocess.Popen([str(VISIONTUNE), "train", *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        history = Path(out) / watch
        if history.is_file() and marker in history.read_text():
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray (2 CPUs) per test process, for every test file that needs one: a second `ray.init` in the same
    process fails, and starting Ray costs seconds."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'; make test does)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
