"""Every setting, declared once: default, help, CLI flag, allowed values. The CLI is generated from here.

Each config checks itself when made (see `settings.py`); `override(config, **changes)` is the one way to change
one, and YAML goes in and out through `from_dict` / `save_yaml`. The declarations are split by stage (`train`,
`deploy`) with the allowed values in `choices`; everything is imported from `visiontune.config`.
"""

from __future__ import annotations

from visiontune.config.choices import *  # noqa: F403 (the allowed values and default_workers, one namespace)
from visiontune.config.choices import default_workers
from visiontune.config.deploy import BenchConfig, EvalConfig, ExplainConfig, ExportConfig, InferenceConfig, ServeConfig
from visiontune.config.track import MODEL_URI_PREFIX, TRACKERS, TRACKING_URI_ENV, TrackConfig
from visiontune.config.train import (
           DEFAULT_VIEWS,
           MOST_VIEWS,
           AugmentConfig,
           DataConfig,
           DistillConfig,
           DoctorConfig,
           EnsembleConfig,
           ScanConfig,
           SplitConfig,
           TrainConfig,
)
from visiontune.settings import from_dict, load_yaml, override, save_yaml, to_dict

__all__ = ["AugmentConfig", "BenchConfig", "DataConfig", "DistillConfig", "DoctorConfig", "EnsembleConfig", "EvalConfig",
           "ExplainConfig", "ExportConfig", "InferenceConfig", "ScanConfig", "ServeConfig", "SplitConfig", "TrackConfig",
           "TrainConfig", "DEFAULT_VIEWS", "MOST_VIEWS", "MODEL_URI_PREFIX", "TRACKERS", "TRACKING_URI_ENV",
           "default_workers", "from_dict", "load_yaml", "override", "save_yaml", "to_dict"]
