"""Ensemble combination checked against hand computations on fixed logits."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.scoring.combine import combine, error_curve, top_k_errors

# Two members, two samples, three classes. Sample 0's true class is 0, sample 1's is 2.
LOGITS = torch.tensor(
    [
        [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]],  # member A: right on sample 0, wrong (class 1) on sample 1
        [[0.0, 0.0, 1.0], [0.0, 0.0, 4.0]],  # member B: wrong (class 2) on sample 0, right on sample 1
    ]
)
LABELS = torch.tensor([0, 2])


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_softmax_average_matches_hand_computation():
    expected = [
        [(a + b) / 2 for a, b in zip(softmax(LOGITS[0, s].tolist()), softmax(LOGITS[1, s].tolist()))]
        for s in range(2)
    ]
    assert combine(LOGITS, "softmax").flatten().tolist() == pytest.approx(sum(expected, []), abs=1e-6)
    # Sample 0: A gives class 0 p=e^2/(e^2+2)=0.787, B gives class 2 p=e/(e+2)=0.576; the average picks class 0.
    assert combine(LOGITS, "softmax").argmax(1).tolist() == [0, 2]


def test_logit_average_can_disagree_with_softmax_average():
    averaged = combine(LOGITS, "logits")
    assert averaged.tolist() == [[1.0, 0.0, 0.5], [0.0, 1.5, 2.0]]
    # One very confident member against two fairly sure ones: probabilities saturate at 1, so the
    # two outvote it (class 1: ~2/3 against ~1/3); raw logits average to [10, 3.3, 0] and it wins.
    one_loud_two_quiet = torch.tensor([[[30.0, 0.0, 0.0]], [[0.0, 5.0, 0.0]], [[0.0, 5.0, 0.0]]])
    assert combine(one_loud_two_quiet, "softmax").argmax(1).item() == 1
    assert combine(one_loud_two_quiet, "logits").argmax(1).item() == 0


def test_top_k_errors():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    # Sample 0 (label 6) is the top-1; sample 1 (label 5) is ranked 6th: outside the top 5.
    assert top_k_errors(scores, torch.tensor([6, 5])) == (0.5, 0.5)
    # label 2 of sample 1 is ranked 3rd: a top-1 miss but a top-5 hit.
    assert top_k_errors(scores, torch.tensor([6, 2])) == (0.5, 0.0)


def test_error_curve_over_first_k_members():
    curve = error_curve(LOGITS, LABELS, "softmax")
    assert [point["members"] for point in curve] == [1, 2]
    assert curve[0]["top1_error"] == 0.5  # member A alone gets sample 0 only
    assert curve[1]["top1_error"] == 0.0  # together they get both
    assert curve[1]["top5_error"] == 0.0
