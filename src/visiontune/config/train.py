"""The settings of the data, training and the doctor: scan, split, augment, distill, ensemble, train."""

from __future__ import annotations

import math
from dataclasses import dataclass

from visiontune.config.choices import AMP, BACKENDS, BALANCE, FRACTION, HEADS, RANKINGS, SCHEDULES, TASK_CHOICES
from visiontune.settings import SettingError, Settings, parse_duration, section, setting


@dataclass(frozen=True)
class ScanConfig(Settings):
    min_side: int = setting(32, "images whose shorter side is smaller carry too little to learn from", low=1)
    # Pillow's own decompression-bomb threshold (about 9459 x 9459)
    max_pixels: int = setting(89_478_485, "images with more pixels are refused as decompression bombs", low=1)
    # Scaled so its short side fits the model, a 300000 x 32 image would be 2 million pixels long: gigabytes.
    max_aspect: float = setting(20.0, "images whose long side is more than this many times their short side are "
                                      "refused from their header, undecoded", low=1.0)
    # A progressive JPEG has about 10 scans (and an embedded thumbnail's add a few); each costs a pass over the
    # image, and a 787 KB file with 9,400 of them took 88 s to decode. 100 scans of a 50 MP photo take about a second.
    max_jpeg_scans: int = setting(100, "JPEGs with more scans than this are refused from their markers, undecoded",
                                  low=1)
    near_duplicate_distance: int = setting(4, "Hamming distance between 64-bit difference hashes that makes two "
                                              "images near-duplicate candidates", low=0, high=64)
    # The hash alone grouped 88 different garments sharing a magenta backdrop; on the benchmark datasets the copies
    # it found correlate at 0.87 or more at 32 x 32 (recoloured, cropped a little), its different pictures at 0.80 or
    # less (BENCHMARKS.md).
    near_duplicate_correlation: float = setting(0.85, "a candidate pair is a near-duplicate only when its 32 x 32 "
                                                      "greyscale thumbnails correlate at least this much (and their "
                                                      "detail agrees too)", low=-1.0, high=1.0)
    workers: int = setting(0, "decoding processes (0: one per core)", low=0)


@dataclass(frozen=True)
class SplitConfig(Settings):
    val: float = setting(0.1, "fraction of each class for validation", **FRACTION)
    test: float = setting(0.1, "fraction of each class for test", **FRACTION)
    seed: int = setting(0, "same seed, same split", low=0)
    min_per_split: int = setting(1, "fewest images of each class in each split asked for; 0 lets a class be absent",
                                 low=0)

    def check(self) -> None:
        if self.val + self.test >= 1.0:
            raise SettingError("val", f"val {self.val} + test {self.test} leave nothing to train on")


@dataclass(frozen=True)
class DataConfig(Settings):
    """`visiontune split`: which files are usable, and how they are divided."""

    scan: ScanConfig = section(ScanConfig)
    split: SplitConfig = section(SplitConfig)


@dataclass(frozen=True)
class AugmentConfig(Settings):
    scale: tuple = setting((0.25, 1.0), "random resized crop: range of the image area kept", low=0.0, high=1.0)
    ratio: tuple = setting((0.75, 1.3333), "random resized crop: range of aspect ratios", above=0.0)
    hflip: float = setting(0.5, "probability of a horizontal flip", **FRACTION)
    rotate_degrees: float = setting(10.0, "largest random rotation", low=0.0, high=180.0)
    brightness: float = setting(0.2, "largest random brightness change (fraction)", low=0.0)
    contrast: float = setting(0.2, "largest random contrast change (fraction)", low=0.0)
    # Full fine-tune only: they need a fresh image every step, which the cached recipe does not have.
    randaugment: bool = setting(False, "RandAugment (full fine-tune only)")
    mixup: float = setting(0.0, "mixup Beta alpha, e.g. 0.2 (full fine-tune only; 0: off)", low=0.0)
    cutmix: float = setting(0.0, "cutmix Beta alpha, e.g. 1.0 (full fine-tune only; 0: off)", low=0.0)

    def check(self) -> None:
        for name in ("scale", "ratio"):
            pair = getattr(self, name)
            if len(pair) != 2 or pair[0] > pair[1]:
                raise SettingError(name, f"expected two numbers, smallest first, got {pair}")


@dataclass(frozen=True)
class DistillConfig(Settings):
    """Knowledge distillation (`visiontune distill`): the student's loss on each cached view is
    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * label loss."""

    teacher: str | None = setting(None, "a run or ensemble directory to learn from (None: an ordinary run)")
    alpha: float = setting(0.7, "weight of the KL-to-teacher term; 1 - alpha weighs the label loss", **FRACTION)
    temperature: float = setting(2.0, "softens teacher and student distributions, so the teacher's second choices "
                                      "carry signal", above=0.0)
    teacher_backend: str = setting("onnx", "engine computing the teacher's logits once per training view",
                                   choices=BACKENDS)
    teacher_batch: int = setting(64, "views cropped and sent to the teacher at a time", low=1)


@dataclass(frozen=True)
class EnsembleConfig(Settings):
    weights: str = setting("equal", "equal, fit (minimum validation log loss of the soft vote), or one number per "
                                    "run: w1,w2,...")
    backend: str = setting("onnx", "engine scoring the members while the ensemble is built and evaluated",
                           choices=BACKENDS)
    fit_iterations: int = setting(1000, "EM steps of the (convex) weight fit, before SLSQP polishes it", low=1)
    fit_tolerance: float = setting(1e-8, "the fit stops when no weight moves more than this in one step", above=0.0)
    batch_images: int = setting(256, "validation images decoded and scored at a time", low=1)
    workers: int = setting(0, "decoding processes (0: one per core)", low=0)
    evaluate: bool = setting(True, "score the ensemble on its test split at the end (report.html, metrics.json)")

    def check(self) -> None:
        if self.weights in ("equal", "fit"):
            return
        try:
            numbers = [float(x) for x in self.weights.split(",") if x.strip()]
        except ValueError:
            numbers = []
        if not numbers or min(numbers) < 0 or sum(numbers) <= 0:
            raise SettingError("weights", f"{self.weights!r}: expected equal, fit, or one number per run (0 or more, "
                                          f"not all 0), e.g. 0.5,0.3,0.2")


# Unset --views: this many for most data, up to MOST_VIEWS for few-shot data (TrainConfig.views_for).
DEFAULT_VIEWS = 4
MOST_VIEWS = 8


@dataclass(frozen=True)
class TrainConfig(Settings):
    model: str = setting("efficientnet_lite0", "registry or timm name", aliases=("student",))
    weights: str | None = setting(None, "backbone weights file (timm / Hugging Face safetensors or a PyTorch state "
                                        "dict) for any timm architecture; its classifier is replaced")
    # A ViT is built for its input size (e.g. vit_small_patch14_dinov2 at 518 px): smaller is far cheaper on a CPU,
    # and its position embeddings are resampled to the new grid when the weights load.
    input_size: int = setting(0, "input size in pixels (0: the architecture's own, from timm's pretrained config)",
                              low=0)
    from_scratch: bool = setting(False, "random initialisation, no pretrained weights")
    download: bool = setting(False, "let timm download weights from its hub (only where one is reachable)")
    seed: int = setting(0, "drives the split, augmentations and initialisation", low=0, also=("split.seed",))
    task: str = setting("auto", "multiclass (one label an image) or multilabel (a set of labels an image: sigmoid "
                                "outputs, binary cross-entropy, a threshold per label); auto: multilabel when the "
                                "data holds label sets (a manifest's `labels` column, a|b)", choices=TASK_CHOICES)
    # A label with a handful of held-out positives gives an F1 curve of a few steps: the threshold it picks is noise.
    threshold_min_positives: int = setting(3, "multilabel: fewest held-out images of a label for its threshold to be "
                                              "chosen for the best F1 (fewer: it stays at 0.5)", low=1)
    deterministic: bool = setting(False, "deterministic kernels where torch has them")
    full_finetune: bool = setting(False, "train every layer on fresh augmentations (the natural choice on a GPU)")
    # A run with a budget replaces views and phase-2 epochs with its plan and clears budget in its config.yaml.
    budget: str | None = setting(None, "finish within this wall-clock time, e.g. 90s, 5m, 1h: views and phase-2 "
                                       "epochs planned from a short warm-up on this machine")
    # The search tries recipes on the run's own data (training/search.py): no setting helped both benchmark datasets.
    search: bool = setting(True, "with --budget, search the recipe in the time the plan leaves: wider backbones, "
                                 "learning rates, label smoothing, dropout, phase-2 epochs and EMA, scored out of fold "
                                 "(--no-search: the plan alone)")
    search_models: str | None = setting(None, "backbones the --budget search may try besides --model, comma "
                                              "separated (a+b joins branches); default: --model with Lite1, then "
                                              "with Lite1 and Lite2, when --model is a registry EfficientNet-Lite")
    search_trials: int = setting(0, "the most trials a --budget search runs (0: as many as the budget allows)",
                                 low=0)
    # Ray, not processes we start: a cluster users already run, with its own scheduling, retries and dashboard.
    search_ray: str | None = setting(None, "run the --budget search's TPE trials on a Ray cluster: local (a Ray "
                                           "started for the run), auto (the cluster this node is in), or an "
                                           "address (ray://head:10001)", flag="--ray")
    search_ray_threads: int = setting(0, "torch threads of each trial worker on Ray (0: 2, or the cluster's CPUs "
                                         "when fewer)", low=0)
    # The val split's images are never trained on without it: on oxford102's official split (10 images a class in
    # train and in val) that is half the labelled images (BENCHMARKS.md "Refit on every labelled image").
    refit: bool = setting(True, "train the kept model on train + val: the best epochs and whether phase 2 beats the "
                                "head alone are chosen on held-out predictions first (--no-refit: train on train "
                                "only and choose on val)")
    folds: int = setting(1, "held-out folds the refit's choices are made on: 1 holds out the val split; k >= 2 "
                            "makes k stratified folds over train + val (k fits, then the refit)", low=1, high=20)
    # Cached recipe: phase 1 fits the head on pooled features of the frozen backbone; phase 2 fine-tunes the top
    # `trainable_stages` stages on activations cached at the boundary below them.
    # Few-shot data gains most from more views and its frozen pass is short: oxford102 (10 labelled images a class)
    # scores 1.4 points higher on its val split with 8 views than with 4, the same with 12, lower with 16;
    # flower_photos and the signs (160 and more images a class) keep 4 (BENCHMARKS.md "More views for few-shot data").
    views: int | None = setting(None, "augmented views cached per training image, besides the plain centre crop "
                                      "(unset: 4, or as many as --class-views asks for, at most 8)", low=0)
    class_views: int = setting(160, "unset --views: augmented views a class averages at the least, so data with few "
                                    "images a class gets more views per image", low=0)
    # Random crops make objects look larger than the centre crop evaluation sees, so training a little below the
    # test size matches them (the train/test resolution discrepancy), and smaller views cost less to cache.
    train_size: int = setting(0, "side of the cached training views, in pixels (0: the model's input size); "
                                 "validation, test and the saved model keep the input size", low=0)
    trainable_stages: int = setting(2, "top backbone stages fine-tuned in phase 2", low=0)
    head_epochs: int = setting(20, "phase 1 epochs (the head on cached pooled features)", low=0)
    head_lr: float = setting(1e-3, "phase 1 learning rate", above=0.0)
    head_batch_size: int = setting(64, "phase 1 batch size", low=1)
    finetune_epochs: int = setting(4, "phase 2 / full fine-tune epochs", flag="--epochs", aliases=("epochs",), low=0)
    finetune_lr: float = setting(1e-4, "phase 2 / full fine-tune learning rate", flag="--lr", aliases=("lr",),
                                 above=0.0)
    # Each cached view is seen every epoch, so without mixup the top stages can memorise the cache.
    feature_mixup: float = setting(0.0, "phase 2: mixup of cached activations, Beta alpha (0: off)", low=0.0)
    batch_size: int = setting(32, "phase 2 / full fine-tune batch size", low=1)
    ema: float = setting(0.0, "phase 2 / full fine-tune: decay of an exponential moving average of the weights, "
                              "validated and kept instead of the raw ones (0: off; e.g. 0.999)", low=0.0, high=0.99999)
    weight_decay: float = setting(0.01, "AdamW weight decay", low=0.0)
    label_smoothing: float = setting(0.1, "cross-entropy label smoothing", low=0.0, high=0.99)
    dropout: float = setting(0.2, "dropout before the classifier", low=0.0, high=0.99)
    head: str = setting("linear", "what pools the final feature map before the classifier: the backbone's average "
                                  "(linear) or a learned spatial attention map (attention: trained with the top stages "
                                  "in phase 2 or by --full-finetune; shown by `explain`)", choices=HEADS)
    schedule: str = setting("cosine", "learning-rate schedule", choices=SCHEDULES)
    warmup_fraction: float = setting(0.1, "of each phase's steps spent warming up", **FRACTION)
    balance: str = setting("none", "for imbalanced data: class-weighted loss or balanced batches", choices=BALANCE)
    early_stopping: int = setting(0, "stop after this many epochs without a better validation score (0: never)",
                                  low=0)
    amp: str = setting("auto", "mixed precision on CUDA (auto: bf16 or fp16 on CUDA, off on CPU)", choices=AMP)
    # A shared folder lets runs that differ only after the frozen pass (epochs, learning rates) skip it.
    cache_dir: str | None = setting(None, "keep cached views here to reuse across runs (default: inside the run, "
                                          "deleted at the end)")
    evaluate: bool = setting(True, "score the test split at the end: metrics, plots, report.html, MODEL_CARD.md")
    augment: AugmentConfig = section(AugmentConfig)
    split: SplitConfig = section(SplitConfig, "when the data has no split of its own")
    scan: ScanConfig = section(ScanConfig)
    distill: DistillConfig = section(DistillConfig, "set by `visiontune distill`; no teacher otherwise")

    def views_for(self, images_per_class: float) -> int:
        """The views a run caches: --views when given, else the default raised until a class averages
        --class-views views (a few-shot dataset's frozen pass is short)."""
        if self.views is not None:
            return self.views
        wanted = math.ceil(self.class_views / max(images_per_class, 1e-9) - 1e-9)  # 160 / 20.0 is 8
        return min(MOST_VIEWS, max(DEFAULT_VIEWS, wanted))

    def check(self) -> None:
        if self.weights and self.from_scratch:
            raise SettingError("weights", "--weights and --from-scratch contradict each other; pass one")
        if self.budget is not None:
            try:
                parse_duration(self.budget)
            except ValueError as exc:
                raise SettingError("budget", f"{self.budget!r}: {exc}; expected e.g. 90s, 5m or 1h") from None
            if self.full_finetune:
                raise SettingError("budget", "--budget plans the cached recipe; --full-finetune takes --epochs")
        if self.search_ray is not None and not self.search:
            raise SettingError("search_ray", "--ray runs the trials of --budget's search, which --no-search turns off")
        if self.task == "multilabel" and (self.full_finetune or self.distill.teacher or self.balance == "sampler"):
            raise SettingError("task", "multilabel trains with the cached recipe, without a teacher or --balance "
                                       "sampler (--balance weights weighs each label's positives)")
        if self.distill.teacher and self.full_finetune:
            raise SettingError("full_finetune", "distillation uses the cached recipe (the teacher's logits are computed "
                                                "once per cached view); --full-finetune draws fresh augmentations "
                                                "every epoch, so it cannot take a teacher")


@dataclass(frozen=True)
class DoctorConfig(Settings):
    """`visiontune doctor`: label issues, outliers and differently labelled duplicates, from out-of-fold predictions
    of a linear model on the pretrained backbone's centre-crop features."""

    model: str = setting(TrainConfig.model, "backbone whose pretrained features are compared (registry or timm name)")
    weights: str | None = setting(None, "backbone weights file (timm / Hugging Face safetensors or a PyTorch state "
                                        "dict), as for train")
    input_size: int = setting(0, "input size in pixels (0: the architecture's own)", low=0)
    folds: int = setting(5, "out-of-fold predictions: each image is scored by a model fitted on the other folds",
                         low=2)
    # On flower_photos with 5 % of the training labels flipped, 0.1 caught the most flips among the top k (k = the
    # number flipped): 75 % against 71 % (0.03), 68 % (0.3) and 67 % (1; these last two flag fewer than k)
    # (BENCHMARKS.md "Label issues").
    l2: float = setting(0.1, "L2 penalty of the logistic regression, per image (scikit-learn's C is 1 / (l2 x "
                             "training images)); larger trusts the given labels less", above=0.0)
    # The margin ranked no better there: the same top k at l2 0.1, 0.3 and 1, and 70.7 % against 71.4 % at 0.03.
    rank_by: str = setting("self_confidence", "order of the likely mislabelled images: the lowest out-of-fold "
                                              "probability of the given label first, or the lowest margin of the "
                                              "given label over the best other one", choices=RANKINGS)
    neighbours: int = setting(5, "outliers: mean cosine similarity to this many nearest images", low=1)
    # On flower_photos 2 flagged 12 images, each one where a flower is absent or incidental (a shop sign, a bus, a
    # tortoise, a bridge, a limousine, ...); Tukey's far-out 3 flagged none, 1.5 flagged 55 (BENCHMARKS.md).
    outlier_fence: float = setting(2.0, "outliers: a distance beyond the upper quartile plus this many interquartile "
                                        "ranges", above=0.0)
    # On flower_photos the pairs the difference hash found that show one scene had a cosine similarity of 0.83 or
    # more; its one false match (a daisy and a dandelion clock of the same layout) had 0.30.
    duplicate_similarity: float = setting(0.8, "near-duplicates (by difference hash) count as copies of one picture "
                                               "only when their features have at least this cosine similarity",
                                          **FRACTION)
    # A newcomer's fixed manifest relabelled all 82 suggestions where the model agreed with 86.8 % of the labels;
    # about 7 of the top 12 were right as labelled. On flower_photos with 5 % of the training labels flipped (87.5 %
    # agreement), all 155 suggestions gave the true label to 70 %; those at 0.95 or more, to 51 of 54 (94 %; 2 of the 3
    # others are mislabelled in the data itself), at 0.9 to 88 %; on the clean data 5 pass, not 31 (BENCHMARKS.md).
    relabel_probability: float = setting(0.95, "the fixed manifest relabels an image only when the suggested label's "
                                              "out-of-fold probability is at least this (every suggestion stays in "
                                              "issues.csv / .html; 0: apply them all)", **FRACTION)
    limit: int = setting(20, "issues printed in the terminal table (every one is in issues.csv)", low=0)
    page_images: int = setting(600, "issues shown with thumbnails in issues.html", low=0)
    seed: int = setting(0, "which images fall in which fold", low=0)
    cache_dir: str | None = setting(None, "keep the backbone's features here to reuse across runs (a train "
                                          "--cache-dir folder of the same data serves too)")
    scan: ScanConfig = section(ScanConfig)
