"""Settings: declared once in the config package, checked when made, overridden one way, and the same from YAML, the CLI
and the Python API."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

import visiontune
from deploy_run import photos_folder
from visiontune import config as c
from visiontune.cli import build_parser
from visiontune.cli_settings import overrides as cli_overrides
from visiontune.errors import ConfigError
from visiontune.models.run_dir import RunDir
from visiontune.settings import SettingError, Spec, from_dict, load_yaml, override, save_yaml, specs, to_dict, walk

CONFIGS = [c.ScanConfig, c.SplitConfig, c.DataConfig, c.AugmentConfig, c.DistillConfig, c.EnsembleConfig,
           c.TrainConfig, c.EvalConfig, c.InferenceConfig, c.ExportConfig, c.BenchConfig, c.ExplainConfig, c.ServeConfig,
           c.DoctorConfig]
# verb -> the config its settings flags come from
VERBS = {"scan": c.ScanConfig, "split": c.DataConfig, "train": c.TrainConfig, "distill": c.TrainConfig,
         "evaluate": c.EvalConfig, "explain": c.ExplainConfig, "export": c.ExportConfig, "predict": c.InferenceConfig,
         "bench": c.BenchConfig, "serve": c.ServeConfig, "ensemble": c.EnsembleConfig, "doctor": c.DoctorConfig}


def bad_values(spec: Spec) -> list:
    """Values the declaration of `spec` must refuse."""
    meta, out = spec.meta, []
    if meta.get("choices"):
        out.append("bogus")
    for bound, step in (("low", -1), ("high", 1), ("above", 0)):
        if meta.get(bound) is not None:
            value = meta[bound] + step
            out.append((value,) if spec.kind is tuple else value)
    out.append({bool: "yes", int: "three", float: "fast", str: 3, tuple: "1,2"}[spec.kind])
    return out


BAD = [(cls, path, spec, value) for cls in CONFIGS for path, spec in walk(cls) for value in bad_values(spec)]


@pytest.mark.parametrize("cls, path, spec, value", BAD,
                         ids=[f"{cls.__name__}.{'.'.join(p)}={v!r}" for cls, p, _, v in BAD])
def test_every_bad_value_is_refused_naming_its_setting(cls, path, spec, value):
    change: dict = value
    for part in reversed(path[1:]):
        change = {part: change}
    with pytest.raises(SettingError) as exc:
        override(cls(), **{path[0]: change})
    assert exc.value.name == ".".join(path) and len(str(exc.value).splitlines()) == 1


def test_every_setting_has_help_and_a_checked_default():
    for cls in CONFIGS:
        made = cls()  # the defaults pass their own checks
        for path, spec in walk(cls):
            assert spec.meta["help"], f"{cls.__name__}.{'.'.join(path)} has no help text"
        assert from_dict(cls, to_dict(made)) == made


def test_yaml_dataclass_and_cli_round_trip(tmp_path):
    cfg = override(c.TrainConfig(), model="resnet18", epochs=7, lr=3e-4, schedule="onecycle", mixup=0.2, val=0.2,
                   workers=1, scale=(0.5, 1.0), evaluate=False)
    assert (cfg.finetune_epochs, cfg.finetune_lr, cfg.augment.mixup, cfg.split.val, cfg.scan.workers) == (7, 3e-4, 0.2, 0.2, 1)
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(c.TrainConfig, tmp_path / "c.yaml") == cfg
    args = build_parser().parse_args(["train", "data", "--model", "resnet18", "--epochs", "7", "--lr", "3e-4",
                                      "--schedule", "onecycle", "--mixup", "0.2", "--val", "0.2", "--workers", "1",
                                      "--scale", "0.5,1.0", "--no-evaluate"])
    assert override(c.TrainConfig(), **cli_overrides(args)) == cfg
    # flags not given change nothing
    assert cli_overrides(build_parser().parse_args(["train", "data"])) == {}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_setting_of_a_verb_is_a_flag(verb):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[verb]
    flags = {s for a in sub._actions for s in a.option_strings}
    skip = {"train": ("split.seed", "distill"), "distill": ("split.seed", "distill.teacher")}.get(verb, ())
    for path, spec in walk(VERBS[verb], skip):
        assert spec.flag in flags, f"{verb} has no {spec.flag} for {'.'.join(path)}"


def test_override_precedence_and_names():
    base = c.TrainConfig(model="resnet18", from_scratch=True, seed=3)
    assert override(base).model == "resnet18"  # nothing given: the config's own values stand
    assert override(base, seed=5).split.seed == 5  # a run's seed is its split's seed ...
    assert override(base, seed=5, split={"seed": 9}).split.seed == 9  # ... unless the split's is given
    with pytest.raises(SettingError, match="did you mean schedule"):
        override(base, shedule="cosine")
    with pytest.raises(SettingError, match="expected a whole number"):
        override(base, seed="x")


def test_contradicting_settings_are_refused():
    with pytest.raises(SettingError, match="contradict"):
        c.TrainConfig(weights="w.safetensors", from_scratch=True)
    with pytest.raises(SettingError, match="leave nothing to train on"):
        c.SplitConfig(val=0.6, test=0.4)
    with pytest.raises(SettingError, match="fp32 only"):
        c.ExportConfig(format="torchscript", precision="int8")
    with pytest.raises(SettingError, match="one number per run"):
        c.EnsembleConfig(weights="0.5,heavy")
    with pytest.raises(SettingError, match="full-finetune"):
        c.TrainConfig(full_finetune=True, distill=c.DistillConfig(teacher="runs/x"))


@pytest.mark.parametrize("verb, call", [
    ("train", lambda data: visiontune.train(data, schedule="bogus")),
    ("train", lambda data: visiontune.train(data, amp="fp8")),
    ("distill", lambda data: visiontune.distill(data, teacher=data, temperature=0)),
    ("split", lambda data: visiontune.split(data, val=1.5)),
    ("scan", lambda data: visiontune.scan(data, min_side=0)),
    ("ensemble", lambda data: visiontune.ensemble([data, data], out=data, backend="tensorflow")),
    ("bench", lambda data: visiontune.bench(data, runs=0)),
    ("predict", lambda data: visiontune.predict(data, data, top_k=0)),
    ("evaluate", lambda data: visiontune.evaluate(data, split="holdout")),
    ("export", lambda data: visiontune.api.export(data, precision="int4")),
    ("explain", lambda data: visiontune.api.explain(data, data, method="magic")),
    ("doctor", lambda data: visiontune.doctor(data, folds=1)),
])
def test_bad_settings_fail_before_the_data_is_looked_at(tmp_path, verb, call):
    # The data does not exist: a SettingError (not "no such folder") proves the settings were checked first.
    with pytest.raises(SettingError):
        call(tmp_path / "not-there")


def test_cli_refuses_a_bad_setting_in_one_line_within_seconds(cli):
    started = time.perf_counter()
    done = cli("train", "flowers-mini", "--schedule", "bogus")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "schedule" in done.stderr
    done = cli("train", "flowers-mini", "--views", "-1")
    assert done.returncode == 2 and done.stderr.strip() == "visiontune: error: --views: -1 is below 0, the least it can be"
    done = cli("train", "flowers-mini", "--no-such-flag")
    assert done.returncode == 2 and done.stderr.strip() == "visiontune: error: unrecognized arguments: --no-such-flag"
    done = cli("train", "flowers-mini", "--min-per-split", "0", "--val", "0.7", "--test", "0.3")
    assert done.returncode == 2 and "--val" in done.stderr and "nothing to train on" in done.stderr
    done = cli("train", "flowers-mini", "--resume", "runs/x")
    assert done.returncode == 2 and "give no others" in done.stderr
    assert time.perf_counter() - started < 25  # five processes, each well under 5 s


@pytest.mark.slow
def test_a_config_object_is_what_trains(tmp_path):
    # The bug this guards: `train`'s model= keyword defaulted to TrainConfig.model and silently replaced the model
    # the given config named.
    cfg = c.TrainConfig(model="resnet18", from_scratch=True, views=0, head_epochs=1, finetune_epochs=0,
                        evaluate=False, split=c.SplitConfig(val=0.25, test=0.25))
    result = visiontune.train(photos_folder(tmp_path / "data"), out=tmp_path / "r18", config=cfg)
    meta = json.loads(RunDir(result.run_dir).meta.read_text())
    assert meta["architecture"]["timm_name"] == "resnet18"
    recorded = yaml.safe_load(RunDir(result.run_dir).config.read_text())
    assert recorded["model"] == "resnet18" and recorded["from_scratch"] is True and recorded["split"]["val"] == 0.25


def test_a_config_file_is_a_base_that_flags_override(tmp_path):
    path = tmp_path / "settings.yaml"
    save_yaml(c.TrainConfig(views=2, head_epochs=3), path)
    cfg = visiontune.api.train_config(path, head_epochs=5)
    assert (cfg.views, cfg.head_epochs) == (2, 5)
    path.write_text("views: 2\nvewis: 3\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        visiontune.api.train_config(path)
    path.write_text("views: -2\n")
    with pytest.raises(ConfigError, match="views: -2 is below 0"):
        visiontune.api.train_config(Path(path))


def test_specs_read_types_from_the_declarations():
    kinds = {s.name: (s.kind, s.optional) for s in specs(c.TrainConfig)}
    assert kinds["views"] == (int, True) and kinds["head_epochs"] == (int, False) and kinds["weights"] == (str, True)
    assert kinds["augment"][0] is c.AugmentConfig
