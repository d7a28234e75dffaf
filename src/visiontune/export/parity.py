"""Does an exported model give the answers the trained one gives? Numbers, then a verdict.

Each check compares logits on the same crops: the largest absolute difference, the smallest per-image
cosine similarity, top-1 agreement, and (where labels are known) each model's accuracy. A model with the
unknown score has it compared too: its largest relative difference, and how often the unknown decision agrees.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from visiontune.errors import ExportError


class Outputs(NamedTuple):
    """What a model gave on the parity crops: logits, and unknown scores when it has them."""

    logits: np.ndarray
    scores: np.ndarray | None = None


def compare(reference, candidate, labels: np.ndarray | None = None, *, threshold: float | None = None) -> dict:
    """`reference` and `candidate`: logits, or `Outputs`; with scores on both sides (and the model's `threshold`
    for the decision), the unknown score is compared as well."""
    ref_out, cand_out = _outputs(reference), _outputs(candidate)
    result = _compare_logits(ref_out.logits, cand_out.logits, labels)
    if ref_out.scores is not None and cand_out.scores is not None:
        result.update(compare_scores(ref_out.scores, cand_out.scores, threshold))
    elif ref_out.scores is not None:
        result["unknown_missing"] = True  # the candidate lost the score: refused by every check
    return result


def compare_scores(reference: np.ndarray, candidate: np.ndarray, threshold: float | None) -> dict:
    ref = reference.astype(np.float64).reshape(-1)
    cand = candidate.astype(np.float64).reshape(-1)
    # Absolute: the score is a cosine distance, between 0 and 2, and near 0 for images like the training ones.
    result = {"unknown_max_abs_diff": float(np.max(np.abs(ref - cand))) if len(ref) else 0.0}
    if threshold is not None:
        result["unknown_agreement"] = float(np.mean((ref > threshold) == (cand > threshold))) if len(ref) else 1.0
        result["unknown_share"] = float(np.mean(cand > threshold)) if len(ref) else 0.0
    return result


def _outputs(value) -> Outputs:
    return value if isinstance(value, Outputs) else Outputs(value)


def _compare_logits(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> dict:
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.where(norms > 0, np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-30), 1.0)
    result = {
        "images": int(len(ref)),
        "max_abs_diff": float(np.max(np.abs(ref - cand))) if len(ref) else 0.0,
        "min_cosine": float(np.min(cosine)) if len(ref) else 1.0,
        "top1_agreement": float(np.mean(ref.argmax(1) == cand.argmax(1))) if len(ref) else 1.0,
    }
    if labels is not None and len(labels):
        result["reference_accuracy"] = float(np.mean(ref.argmax(1) == labels))
        result["accuracy"] = float(np.mean(cand.argmax(1) == labels))
        result["accuracy_change_points"] = round(100.0 * (result["accuracy"] - result["reference_accuracy"]), 4)
    return result


def check_close(name: str, result: dict, *, atol: float, cosine: float, score_atol: float) -> dict:
    """Float exports (fp32 ONNX, TorchScript): logits within `atol`, every cosine >= `cosine`, and the unknown
    score (where there is one) within `score_atol` of the reference's."""
    return _verdict(result, {"max_abs_diff": atol, "min_cosine": cosine}, {"unknown_max_abs_diff": score_atol})


def check_cosine(name: str, result: dict, *, cosine: float, score_atol: float) -> dict:
    """fp16: the logits' direction must survive (absolute differences scale with the logits); so must the
    unknown score, within `score_atol` (computed in float32, from fp16 features)."""
    return _verdict(result, {"min_cosine": cosine}, {"unknown_max_abs_diff": score_atol})


def check_agreement(name: str, result: dict, *, agreement: float, unknown_agreement: float,
                    max_drop: float | None = None) -> dict:
    """INT8: the same top-1 class as fp32 on at least `agreement` of the images, the same unknown decision on at
    least `unknown_agreement` of them, and (where labels are known) accuracy at most `max_drop` points lower."""
    optional = {"unknown_agreement": unknown_agreement}
    if max_drop is not None:
        optional["accuracy_change_points"] = -max_drop
    return _verdict(result, {"top1_agreement": agreement}, optional)


_UPPER_BOUNDS = ("max_abs_diff", "unknown_max_abs_diff")


def _verdict(result: dict, bounds: dict, score_bounds: dict) -> dict:
    bounds = {**bounds, **{k: v for k, v in score_bounds.items() if k in result}}
    result = dict(result, thresholds=bounds)
    result["passed"] = not result.get("unknown_missing") and all(
        result[k] <= v if k in _UPPER_BOUNDS else result[k] >= v for k, v in bounds.items())
    return result


def raise_if_failed(name: str, result: dict, where: str) -> None:
    if result.get("passed", True):
        return
    failed = [f"{key} {result[key]:.6g} (needs {'<=' if key in _UPPER_BOUNDS else '>='} {bound:g})"
              for key, bound in result["thresholds"].items()
              if (result[key] > bound if key in _UPPER_BOUNDS else result[key] < bound)]
    if result.get("unknown_missing"):
        failed.append("the unknown score is missing from the export's outputs")
    hint = result.get("hint") or ("; more --calibration-images may help (accuracies of both are in parity.json)"
                                  if "top1_agreement" in result["thresholds"] else "")
    raise ExportError(f"{where}: {name} failed its parity check against the reference on {result['images']} images: "
                      f"{'; '.join(failed)}; nothing was written (details in parity.json){hint}")
