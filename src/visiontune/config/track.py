"""Where a run is reported to: an experiment tracker (MLflow) and its model registry.

Not part of a run's config.yaml: where a run is sent is not how it was made, so repeating a run from its
config.yaml never logs it to someone's tracker by surprise.
"""

from __future__ import annotations

from dataclasses import dataclass

from visiontune.settings import SettingError, Settings, setting

TRACKERS = ("mlflow",)
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable: the URI teams already set
MODEL_URI_PREFIX = "models:/"  # MLflow's registry URIs: models:/NAME/VERSION or models:/NAME@alias


@dataclass(frozen=True)
class TrackConfig(Settings):
    track: str | None = setting(None, "send the run (settings, per-epoch metrics, evaluation, report, model card, "
                                      "plots, model.json, config.yaml) to this experiment tracker once its folder "
                                      "is written", choices=TRACKERS)
    tracking_uri: str | None = setting(None, f"the tracking server (default: ${TRACKING_URI_ENV}, else MLflow's "
                                             "default: mlflow.db in the working folder)")
    experiment: str = setting("visiontune", "experiment the run is logged under (made when missing)")
    run_name: str | None = setting(None, "name of the tracked run (default: the run folder's name)")
    tags: str | None = setting(None, "tags of the tracked run, as KEY=VALUE,KEY=VALUE")
    # MLflow's servers refuse a parameter value over 6000 characters (500 on older ones); longer ones are cut and
    # the tracked run is tagged with the names that were.
    param_chars: int = setting(500, "longest parameter value sent; longer ones are truncated (and named in the "
                                    "run's visiontune.truncated_params tag)", low=20)
    register: str | None = setting(None, "export: log the ONNX model as an MLflow model and register a version of "
                                         "this registered model (implies --track mlflow)")
    alias: str | None = setting(None, "export --register: point these aliases at the new version (e.g. champion; "
                                      "comma-separated); MLflow's stages are deprecated, aliases replace them")

    def check(self) -> None:
        self.tag_items()  # a malformed tag is refused before any work starts
        if self.alias and not self.register:
            raise SettingError("alias", "an alias names a registered version: give --register NAME too")
        for name in (self.register, self.alias):
            if name is not None and (not name.strip() or "/" in name or "@" in name):
                raise SettingError("register" if name == self.register else "alias",
                                   f"{name!r}: a registered model or alias name has no '/' or '@' and is not empty")

    def tag_items(self) -> dict[str, str]:
        """--tags as a mapping; SettingError on an item without '='."""
        out = {}
        for item in (self.tags or "").split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise SettingError("tags", f"{item!r}: expected KEY=VALUE")
            out[key.strip()] = value.strip()
        return out

    @property
    def enabled(self) -> bool:
        return self.track is not None or self.register is not None
