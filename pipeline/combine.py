"""How an ensemble's members are combined and scored: pure functions on logits, no I/O."""

from __future__ import annotations

from typing import Literal

import torch

Rule = Literal["softmax", "logits"]


def combine(member_logits: torch.Tensor, rule: Rule) -> torch.Tensor:
    """[members, samples, classes] logits -> [samples, classes] scores.

    "softmax" averages the members' probabilities, the AlexNet paper's rule; "logits" averages the
    raw scores, which lets one confident member dominate more."""
    if rule == "softmax":
        return member_logits.softmax(dim=-1).mean(dim=0)
    return member_logits.mean(dim=0)


def top_k_errors(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 error of [samples, classes] scores; ties go to the lower class index."""
    k = min(5, scores.shape[1])
    best = scores.topk(k, dim=1).indices
    hits = best == labels[:, None]
    return 1 - hits[:, 0].float().mean().item(), 1 - hits.any(dim=1).float().mean().item()


def error_curve(member_logits: torch.Tensor, labels: torch.Tensor, rule: Rule) -> list[dict]:
    """The ensemble of the first k members, for k = 1..N: how the error falls as members are added."""
    curve = []
    for k in range(1, member_logits.shape[0] + 1):
        top1, top5 = top_k_errors(combine(member_logits[:k], rule), labels)
        curve.append({"members": k, "top1_error": top1, "top5_error": top5})
    return curve
