"""Probabilities and soft-voting arithmetic: numpy only, no model in sight.

An ensemble's probability is the weighted mean of its members' temperature-calibrated probabilities
(p = sum_m w_m softmax(z_m / T_m), weights on the simplex); its "logits" are log p, so softmax gives p back
and every consumer of logits (evaluation, calibration, predict) works on an ensemble unchanged.
"""

from __future__ import annotations

import numpy as np

from visiontune.errors import ConfigError

TINY = 1e-30  # floor of a probability before its log


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) of each row, float32."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def entropy_of(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of a probability matrix."""
    return -np.sum(p * np.log(np.clip(p, 1e-12, 1.0)), axis=1)


def normalise(weights, members: int) -> np.ndarray:
    """Weights as a point of the simplex; one per member, none negative, not all zero."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != members:
        raise ConfigError(f"--weights: {len(w)} weight(s) for {members} member(s); give one per run, in order")
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"--weights {','.join(f'{x:g}' for x in w)}: weights must be 0 or more, and not all 0")
    return w / w.sum()


def soft_vote(probabilities: np.ndarray, weights) -> np.ndarray:
    """M x N x C member probabilities and M weights -> N x C ensemble probabilities (float64)."""
    p = np.asarray(probabilities, dtype=np.float64)
    return np.tensordot(normalise(weights, len(p)), p, axes=1)


def ensemble_logits(probabilities: np.ndarray, weights) -> np.ndarray:
    """log of the soft vote: float32 N x C "logits" whose softmax is the ensemble's probability."""
    return np.log(np.maximum(soft_vote(probabilities, weights), TINY)).astype(np.float32)


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (N x C probabilities)."""
    p = np.asarray(probabilities, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(p, TINY))))


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(probabilities).argmax(axis=1) == labels))


def fit_weights(probabilities: np.ndarray, labels: np.ndarray, iterations: int = 1000,
                tolerance: float = 1e-8) -> np.ndarray:
    """Weights on the simplex minimising the log loss of the soft vote on (validation) images.

    The objective -mean log(sum_m w_m q_m,i), with q the members' probabilities of the true class, is convex
    in w. EM for mixture weights (w_m <- mean_i of w_m q_m,i / sum_k w_k q_k,i) decreases it every step, but
    crawls when the optimum lies on the simplex's boundary (a member that should get exactly 0); so its
    result starts SLSQP (bounds and the sum-to-one constraint exact, analytic gradient), and the better of
    the two is kept. Deterministic, no tuning.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    members = len(p)
    if members == 0 or len(labels) == 0:
        raise ConfigError("fitting ensemble weights needs validation images")
    q = np.maximum(p[:, np.arange(len(labels)), labels], TINY)  # M x N

    def objective(w: np.ndarray) -> float:
        return float(-np.mean(np.log(np.maximum(w @ q, TINY))))

    def gradient(w: np.ndarray) -> np.ndarray:
        return -(q / np.maximum(w @ q, TINY)).mean(axis=1)

    w = np.full(members, 1.0 / members)
    for _ in range(max(1, iterations)):
        share = w[:, None] * q
        new = (share / share.sum(axis=0, keepdims=True)).mean(axis=1)
        done = np.abs(new - w).max() < tolerance
        w = new
        if done:
            break
    if members > 1:
        from scipy.optimize import minimize

        polished = minimize(objective, w, jac=gradient, method="SLSQP", bounds=[(0.0, 1.0)] * members,
                            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones_like(x)}],
                            options={"ftol": 1e-12, "maxiter": 500})
        candidate = np.clip(polished.x, 0.0, None)
        if candidate.sum() > 0:
            candidate = candidate / candidate.sum()
            if objective(candidate) <= objective(w):
                w = candidate
    return w / w.sum()


def parse_weights(text: str) -> str | list[float]:
    """--weights: "equal", "fit", or comma-separated numbers."""
    text = str(text).strip()
    if text in ("equal", "fit"):
        return text
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--weights {text!r}: expected 'equal', 'fit', or one number per run, e.g. 0.5,0.3,0.2") from None
