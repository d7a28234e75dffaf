"""Which labels look wrong, from features and labels alone: numbers in, numbers out (no files, no model).

- Out-of-fold probabilities: a logistic regression on standardised features, fitted k times, each time scoring the
  fold it did not see, so no image is judged by a model that learnt its own (possibly wrong) label.
- Confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
  JAIR 2021): class j's threshold t_j is the mean probability of j over the images labelled j; an image labelled i
  is an issue when, of the classes that reach their own threshold (p_j >= t_j), the most probable is some j != i,
  and j is the suggestion. Per-class thresholds keep a class the model is less sure of from being flagged wholesale.
- Outliers: images far from every other image (mean cosine similarity to the nearest few, on L2-normalised
  features), beyond Tukey's far-out fence of that distance.
- Duplicate groups whose members carry different labels: one picture should have one label; the suggestion is the
  class the out-of-fold probabilities of the group favour.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from visiontune.data.parallel import progress

# Rows of the similarity matrix computed at a time: memory stays at _BLOCK x n floats however many images there are.
_BLOCK = 1024


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, *, folds: int, l2: float,
                              seed: int, groups: np.ndarray | None = None, quiet: bool = True) -> np.ndarray:
    """n x num_classes probabilities, each row from a model fitted on the other folds (stratified by label).

    `groups`: images with the same group number (copies of one picture) share a fold, so no image is judged by a
    model that learnt its copy's label. `l2` is the penalty per training image, so its meaning does not change with
    the size of the data (scikit-learn's C is 1 / (l2 x images)). Every class needs 2 images, so that each fold's
    model has seen the class."""
    from sklearn.model_selection import StratifiedGroupKFold

    probs = np.zeros((len(labels), num_classes), dtype=np.float64)
    groups = np.arange(len(labels)) if groups is None else groups
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class smaller than `folds` is fine: each fold holds out one of it at most
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        assignments = list(splitter.split(features, labels, groups))
    with progress(folds, "out-of-fold fits", quiet, unit="fit") as bar:
        for train, held in assignments:
            probs[held] = _fit_and_score(features, labels, train, held, num_classes, l2)
            bar.update()
    return probs


def _fit_and_score(features: np.ndarray, labels: np.ndarray, train: np.ndarray, held: np.ndarray, num_classes: int,
                   l2: float) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features[train])
    model = LogisticRegression(C=1.0 / (l2 * len(train)), max_iter=1000)
    with warnings.catch_warnings():  # the rare fold that stops short still ranks its images usefully
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(scaler.transform(features[train]), labels[train])
    out = np.zeros((len(held), num_classes))
    out[:, model.classes_] = model.predict_proba(scaler.transform(features[held]))
    return out


@dataclass
class Verdicts:
    thresholds: np.ndarray  # per class: mean probability of the class over the images labelled with it
    suggested: np.ndarray  # per image: the class confident learning suggests instead, or -1 (the label stands)
    self_confidence: np.ndarray  # per image: probability of its given label
    margin: np.ndarray  # per image: probability of its given label minus that of the most probable other class

    def issues(self, rank_by: str) -> np.ndarray:
        """Positions of the images with a suggestion, most likely wrong first (lowest score, then position)."""
        flagged = np.flatnonzero(self.suggested >= 0)
        score = self.score(rank_by)[flagged]
        return flagged[np.lexsort((flagged, score))]

    def score(self, rank_by: str) -> np.ndarray:
        return self.margin if rank_by == "margin" else self.self_confidence


def confident_learning(probs: np.ndarray, labels: np.ndarray) -> Verdicts:
    n, num_classes = probs.shape
    rows = np.arange(n)
    thresholds = np.full(num_classes, np.inf)  # a class nobody carries is never confidently suggested
    for j in range(num_classes):
        members = labels == j
        if members.any():
            thresholds[j] = probs[members, j].mean()
    confident = probs >= thresholds
    best = np.where(confident, probs, -1.0).argmax(axis=1)
    suggested = np.where(confident.any(axis=1) & (best != labels), best, -1)
    self_confidence = probs[rows, labels]
    others = probs.copy()
    others[rows, labels] = -np.inf
    margin = self_confidence - others.max(axis=1) if num_classes > 1 else self_confidence
    return Verdicts(thresholds, suggested, self_confidence, margin)


def outlier_distances(features: np.ndarray, neighbours: int) -> np.ndarray:
    """Per image: 1 - mean cosine similarity to its `neighbours` most similar other images."""
    n = len(features)
    if n < 2:
        return np.zeros(n)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = (features / np.maximum(norms, 1e-12)).astype(np.float32)
    k = min(neighbours, n - 1)
    out = np.empty(n)
    for start in range(0, n, _BLOCK):
        sims = unit[start:start + _BLOCK] @ unit.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf  # not its own neighbour
        nearest = -np.partition(-sims, k - 1, axis=1)[:, :k]
        out[start:start + len(sims)] = 1.0 - nearest.mean(axis=1)
    return out


def far_out(distances: np.ndarray, fence: float) -> np.ndarray:
    """Mask of the distances beyond the upper quartile plus `fence` interquartile ranges."""
    if len(distances) < 4:
        return np.zeros(len(distances), dtype=bool)
    q1, q3 = np.percentile(distances, [25, 75])
    return distances > q3 + fence * (q3 - q1)


def confirmed_groups(groups: list[list[int]], features: np.ndarray, row: np.ndarray, min_similarity: float) -> list[list[int]]:
    """Each duplicate group cut down to the members whose features have a cosine similarity of at least
    `min_similarity` with its first member that has features (`row[i]`: image i's row of `features`, -1 for none);
    groups left with fewer than two members are dropped. A difference hash can match two different pictures of the
    same layout; the features tell them apart."""
    kept = []
    for group in groups:
        members = [i for i in group if row[i] >= 0]
        if len(members) < 2:
            continue
        unit = features[row[members]] / np.maximum(np.linalg.norm(features[row[members]], axis=1, keepdims=True), 1e-12)
        close = [i for i, similarity in zip(members, unit @ unit[0]) if similarity >= min_similarity]
        if len(close) > 1:
            kept.append(close)
    return kept


@dataclass
class Conflict:
    members: list[int]  # indices into the arrays given (one duplicate group)
    suggested: int  # the class the group's out-of-fold probabilities favour (-1: none of them has any)
    probability: float  # that class's mean probability over the members


def conflicting_groups(groups: list[list[int]], labels: np.ndarray, probs: np.ndarray) -> list[Conflict]:
    """Duplicate groups whose members carry more than one label. `probs` rows of NaN: an image without features."""
    found = []
    for group in groups:
        if len({int(labels[i]) for i in group}) < 2:
            continue
        rows = probs[group]
        rows = rows[~np.isnan(rows).any(axis=1)]
        if len(rows):
            mean = rows.mean(axis=0)
            found.append(Conflict(list(group), int(mean.argmax()), float(mean.max())))
        else:
            found.append(Conflict(list(group), -1, float("nan")))
    return found
