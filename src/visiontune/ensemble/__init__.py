"""Ensembles (soft voting over runs trained on the same labels) and the teacher side of distillation.

- `voting`: the arithmetic (weighted mean of calibrated probabilities, weights fitted on validation);
- `engine`: an ensemble directory as an inference engine, so `Classifier.load(ENS)` works everywhere a run does;
- `build`: `visiontune ensemble RUN… --out ENS` (checks labels and splits, fits weights, writes the directory);
- `distill`: a run or an ensemble as the teacher that `visiontune distill` trains a student against.

`visiontune.ensemble` is both this package and the API verb (`visiontune.ensemble(runs, out=...)`).
"""

from visiontune._verb_package import make_callable

make_callable(__name__, "ensemble")
