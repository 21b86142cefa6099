"""How an ensemble's members are combined and scored: pure functions on scores, no I/O."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.scoring.protocols import Scores

Rule = Literal["softmax", "logits"]


def combine(member_logits: torch.Tensor, rule: Rule) -> torch.Tensor:
    """[members, samples, classes] logits -> [samples, classes] scores.

    "softmax" averages the members' probabilities, the AlexNet paper's rule; "logits" averages the
    raw scores, which lets one confident member dominate more."""
    if rule == "softmax":
        return member_logits.softmax(dim=-1).mean(dim=0)
    return member_logits.mean(dim=0)


def top_k_hits(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of the [samples, classes] scores have the label first, and among the first five, as
    tensors on the scores' device (reading them would wait for it); ties go to the lower class index."""
    best = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = best == labels[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def top_k_errors(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 error of [samples, classes] scores."""
    top1, top5 = top_k_hits(scores, labels)
    return 1 - top1.item() / len(labels), 1 - top5.item() / len(labels)


def error_curve(member_logits: torch.Tensor, labels: torch.Tensor, rule: Rule) -> list[dict]:
    """The ensemble of the first k members, for k = 1..N: how the error falls as members are added."""
    curve = []
    for k in range(1, member_logits.shape[0] + 1):
        top1, top5 = top_k_errors(combine(member_logits[:k], rule), labels)
        curve.append({"members": k, "top1_error": top1, "top5_error": top5})
    return curve


def evaluate_members(scores: list[Scores], names: list[str], members: int, rule: str) -> tuple[dict, list[dict]]:
    """Every model's errors (its own members first, then the included models), the members' mean and
    spread, the whole ensemble's errors and the curve over the first k models."""
    log_probs = torch.from_numpy(np.stack([s.log_probs for s in scores]).astype(np.float32))
    labels = torch.from_numpy(scores[0].labels)
    errors = [top_k_errors(model, labels) for model in log_probs]
    curve = error_curve(log_probs, labels, rule)
    top1s, top5s = [e[0] for e in errors[:members]], [e[1] for e in errors[:members]]
    spread = statistics.stdev if members > 1 else lambda values: 0.0
    summary = {
        "members": members,
        "models": len(scores),
        "protocol": scores[0].protocol,
        "combine": rule,
        "model_top1_error": {name: e[0] for name, e in zip(names, errors)},
        "model_top5_error": {name: e[1] for name, e in zip(names, errors)},
        "member_top1_error_mean": statistics.mean(top1s),
        "member_top1_error_std": spread(top1s),
        "member_top5_error_mean": statistics.mean(top5s),
        "member_top5_error_std": spread(top5s),
        "ensemble_top1_error": curve[-1]["top1_error"],
        "ensemble_top5_error": curve[-1]["top5_error"],
    }
    summary["gain_top1"] = summary["member_top1_error_mean"] - summary["ensemble_top1_error"]
    summary["gain_top5"] = summary["member_top5_error_mean"] - summary["ensemble_top5_error"]
    return summary, curve


def best_model(summary: dict, among: list[str] | None = None) -> str:
    """The name (member_i, or an included model's) with the lowest top-1 error, of all or of `among`; ties
    (common on a small validation set) go to top-5, then to the first in the summary's order: members first."""
    return min(among or summary["model_top1_error"], key=lambda name: (summary["model_top1_error"][name],
                                                                       summary["model_top5_error"][name]))
