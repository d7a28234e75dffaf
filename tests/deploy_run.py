"""One small real run for the export / inference / predict tests, trained once per test session.

EfficientNet-Lite0 with its real ImageNet weights on 3 classes x 8 embedded sample photos (FAST settings,
about 10 s). pytest-xdist workers share it through a lock in the session's common temp folder; each test
module works on its own copy, so exports written by one module never race another's reads.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

from visiontune import samples

CLASSES = ("daisy", "roses", "tulips")
FAST = dict(views=1, head_epochs=3, finetune_epochs=1, seed=0, val=0.25, test=0.25, evaluate=False)


def photos_folder(base: Path) -> Path:
    root = base / "flowers"
    if not root.is_dir():
        source = samples.path("flowers-mini")
        for name in CLASSES:
            (root / name).mkdir(parents=True)
            for photo in sorted((source / name).glob("*.jpg"))[:8]:
                shutil.copy(photo, root / name / photo.name)
    return root


def shared_run(tmp_path_factory) -> Path:
    """The trained run (read-only by convention: copy it before writing into it)."""
    import visiontune

    base = tmp_path_factory.getbasetemp()
    common = base.parent if base.name.startswith("popen-gw") else base  # xdist: every worker's parent
    lock = common / "deploy_run.lock"
    run = common / "deploy_run" / "run"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if not (run / "model.json").is_file():
            shutil.rmtree(run.parent, ignore_errors=True)
            data = photos_folder(run.parent)
            visiontune.train(data, out=run, **FAST)
    return run


def copy_run(tmp_path_factory, name: str) -> Path:
    """A private copy of the shared run (with its photos, since split.csv paths are relative to the run)."""
    source = shared_run(tmp_path_factory)
    target = tmp_path_factory.mktemp(name)
    shutil.copytree(source.parent, target, dirs_exist_ok=True)
    return target / "run"


def exported_onnx(tmp_path_factory, name: str) -> Path:
    """A private copy of the shared run, exported: its lone fp32 .onnx file (the fastest engine to start)."""
    import visiontune

    run = copy_run(tmp_path_factory, name)
    visiontune.api.export(run)
    return run / "export" / "model.onnx"
