"""Which classes a model gets wrong: per-class top-1 error and the confusion matrix, from its scores."""

from __future__ import annotations

import csv
import io

import matplotlib

matplotlib.use("Agg")  # the stages run headless: DVC, CI, Ray jobs
import matplotlib.pyplot as plt
import numpy as np

# Above this many classes the matrix is drawn without tick labels (ImageNet's 1,000 would be unreadable).
LABELLED_CLASSES = 30


def predictions(log_probs: np.ndarray) -> np.ndarray:
    return log_probs.argmax(axis=1)


def confusion_matrix(log_probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[actual, predicted]."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions(log_probs)), 1)
    return counts


def per_class_table(scores_by_protocol: dict, classes: list[str]) -> str:
    """CSV: class, images, and each protocol's top-1 error on that class (empty for a class with no image)."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["class", "images", *(f"{protocol}_top1_error" for protocol in scores_by_protocol)])
    any_scores = next(iter(scores_by_protocol.values()))
    images = np.bincount(any_scores.labels, minlength=len(classes))
    wrong = {protocol: np.bincount(scores.labels, weights=predictions(scores.log_probs) != scores.labels,
                                   minlength=len(classes))
             for protocol, scores in scores_by_protocol.items()}
    for label, name in enumerate(classes):
        errors = [f"{wrong[protocol][label] / images[label]:.6g}" if images[label] else "" for protocol in wrong]
        writer.writerow([name, int(images[label]), *errors])
    return table.getvalue()


def confusion_rows(log_probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> str:
    """CSV of (actual, predicted) class names, one row per image: DVC's confusion-matrix plot template."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[actual], classes[predicted]) for actual, predicted in zip(labels, predictions(log_probs)))
    return table.getvalue()


def confusion_figure(counts: np.ndarray, classes: list[str], title: str):
    """Rows normalised to the share of each actual class's images, so rare classes show as clearly."""
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = 4 + 0.25 * min(len(classes), LABELLED_CLASSES)
    figure, axes = plt.subplots(figsize=(side, side))
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= LABELLED_CLASSES:
        axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        axes.set_yticks(range(len(classes)), classes, fontsize=7)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("actual class")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the actual class's images")
    figure.tight_layout()
    return figure
