"""Does an exported model give the answers the trained one gives? Numbers, then a verdict.

Each check compares logits on the same crops: the largest absolute difference, the smallest per-image
cosine similarity, top-1 agreement, and (where labels are known) each model's accuracy.
"""

from __future__ import annotations

import numpy as np

from visiontune.errors import ExportError


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict:
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


def check_close(name: str, result: dict, *, atol: float, cosine: float) -> dict:
    """Float exports (fp32 ONNX, TorchScript): logits within `atol` and every cosine >= `cosine`."""
    result = dict(result, thresholds={"max_abs_diff": atol, "min_cosine": cosine})
    result["passed"] = result["max_abs_diff"] <= atol and result["min_cosine"] >= cosine
    return result


def check_cosine(name: str, result: dict, *, cosine: float) -> dict:
    """fp16: the logits' direction must survive (absolute differences scale with the logits)."""
    result = dict(result, thresholds={"min_cosine": cosine})
    result["passed"] = result["min_cosine"] >= cosine
    return result


def check_agreement(name: str, result: dict, *, agreement: float) -> dict:
    """INT8: the same top-1 class as fp32 on at least `agreement` of the images."""
    result = dict(result, thresholds={"top1_agreement": agreement})
    result["passed"] = result["top1_agreement"] >= agreement
    return result


def raise_if_failed(name: str, result: dict, where: str) -> None:
    if result.get("passed", True):
        return
    failed = [f"{key} {result[key]:.6g} (needs {'<=' if key == 'max_abs_diff' else '>='} {bound:g})"
              for key, bound in result["thresholds"].items()
              if (result[key] > bound if key == "max_abs_diff" else result[key] < bound)]
    hint = ("; more --calibration-images may help (accuracies of both are in parity.json)"
            if "top1_agreement" in result["thresholds"] else "")
    raise ExportError(f"{where}: {name} failed its parity check against the reference on {result['images']} images: "
                      f"{'; '.join(failed)}; nothing was written (details in parity.json){hint}")
