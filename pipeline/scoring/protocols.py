"""Test-time protocols, and scoring a trained model on the validation set with them on the cluster.

A protocol turns a validation image into class probabilities (see params.yaml's evaluate section):
  center          the central resolution crop of the resolution*256/224 short side (what training reports)
  center_mirror   that crop and its mirror image, softmax averaged
  ten_crop        AlexNet's (Krizhevsky et al. 2012, section 4.1): the central S x S square
                  (S = resolution*256/224), its four corner crops and central crop of side resolution,
                  each with its mirror image, softmax averaged over the ten
  multi_scale     VGG's dense evaluation (Simonyan & Zisserman 2015, section 3.2): the central square at
                  each scale Q, the fully connected layers applied as convolutions (the first as a
                  pooled_side x pooled_side one, the others 1 x 1) so the net yields a class score map, the
                  map averaged; with the mirror image; softmax averaged over scales and mirrors. Models
                  that pool globally (ResNet, GoogLeNet) are dense as they are: averaging a linear
                  layer's outputs over positions equals applying it to the averaged features.
VGG evaluated the whole rescaled image; a batch needs one shape, so here it is the central square.

Scoring runs as Ray tasks, each on a contiguous share of the validation set with a worker's resources
(a GPU when ray.use_gpu), so every image is scored exactly once and no driver CPU does the work.
The result per protocol is Scores: log-probabilities (float16: 100 MB for ImageNet's 50,000 x 1,000)
with the labels and the SHA-256 of the validation file they belong to, saved as .npz for later stages.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F
from torch import nn

from models import ConvNet
from pipeline.config import VAL_CROP_RATIO, Params
from pipeline.data.node_copy import local_copy
from pipeline.errors import InputError
from pipeline.runs.identity import RunSpec
from pipeline.scoring.combine import top_k_errors
from pipeline.storage.location import Location

TEN_CROP_RATIO = 256 / 224
# log(0) would be -inf; this floor is far below any probability a float32 softmax resolves.
SMALLEST_PROBABILITY = 1e-30


class ScoresError(InputError):
    """Saved scores are missing, unreadable, or of another validation set: the message names the file."""


@dataclass(frozen=True)
class Scores:
    protocol: str
    log_probs: np.ndarray  # float16 [images, classes]
    labels: np.ndarray  # int64 [images]
    val_sha256: str

    def errors(self) -> tuple[float, float]:
        return top_k_errors(torch.from_numpy(self.log_probs.astype(np.float32)), torch.from_numpy(self.labels))

    def save(self, location: Location) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, log_probs=self.log_probs, labels=self.labels, val_sha256=np.array(self.val_sha256),
                 protocol=np.array(self.protocol))
        location.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, location: Location, val_sha256: str) -> Scores:
        """Refuses scores of another validation set than the one whose SHA-256 is given."""
        try:
            with np.load(io.BytesIO(location.read_bytes())) as saved:
                scores = cls(str(saved["protocol"]), saved["log_probs"], saved["labels"], str(saved["val_sha256"]))
        except (OSError, ValueError, KeyError) as error:
            raise ScoresError(f"{location}: not readable as scores ({error})") from None
        if scores.val_sha256 != val_sha256:
            raise ScoresError(f"{location}: scores of another validation set (val.beton SHA-256 {scores.val_sha256[:12]}, "
                              f"this data's is {val_sha256[:12]}); run the stage that wrote them again")
        return scores


def scores_file(folder: Location, protocol: str) -> Location:
    return folder / f"scores-{protocol}.npz"


def image_streams(protocol: str, resolution: int, scales: Sequence[int]) -> list[tuple[int, float]]:
    """(side, crop ratio) of each decoded image stream a protocol reads: the central square of
    crop_ratio times the short side, resized to side."""
    if protocol in ("center", "center_mirror"):
        return [(resolution, VAL_CROP_RATIO)]
    if protocol == "ten_crop":
        return [(round(resolution * TEN_CROP_RATIO), 1.0)]
    return [(round(resolution * scale / 224), 1.0) for scale in scales]


def probabilities(protocol: str, model: nn.Module, images: list[torch.Tensor], resolution: int) -> torch.Tensor:
    """[batch, classes] class probabilities of one batch under `protocol`; `images` are its streams."""
    if protocol == "center":
        views = [model(images[0])]
    elif protocol == "center_mirror":
        views = [model(images[0]), model(images[0].flip(-1))]
    elif protocol == "ten_crop":
        views = [model(crop) for crop in ten_crops(images[0], resolution)]
    else:
        views = [dense_logits(model, view) for scale in images for view in (scale, scale.flip(-1))]
    return torch.stack([view.float().softmax(dim=1) for view in views]).mean(dim=0)


def ten_crops(images: torch.Tensor, side: int) -> list[torch.Tensor]:
    """The four corner crops and the central one, each with its mirror image (AlexNet's ten patches)."""
    height, width = images.shape[-2:]
    top, left = (height - side) // 2, (width - side) // 2
    corners = [(0, 0), (0, width - side), (height - side, 0), (height - side, width - side), (top, left)]
    crops = [images[..., y : y + side, x : x + side] for y, x in corners]
    return crops + [crop.flip(-1) for crop in crops]


def dense_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class score map's spatial mean: the classifier applied at every pooled_side x pooled_side
    window of the feature map (VGG's fully convolutional evaluation). Where the map is smaller than one
    window, and for models that pool globally, it is the model's own forward pass."""
    if not isinstance(model, ConvNet):
        return model(images)
    features = model.features(images)
    side = model.avgpool.output_size[0]
    if min(features.shape[-2:]) < side:
        return model(images)
    scores, first = features, True
    for layer in model.classifier:
        if isinstance(layer, nn.Linear):
            # The first layer reads the flattened (channels, side, side) block: the same weights as a
            # side x side convolution; the others read one vector each: 1 x 1 convolutions.
            kernel = (layer.weight.view(layer.out_features, -1, side, side) if first
                      else layer.weight[:, :, None, None])
            scores, first = F.conv2d(scores, kernel, layer.bias), False
        else:
            scores = layer(scores)
    return scores.mean(dim=(2, 3))


@torch.no_grad()
def score_share(specs: list[RunSpec], weight_refs: list[ray.ObjectRef], data: Location, cache: Path,
                protocols: list[str], scales: list[int], batch_size: int, indices: list[int], threads: int
                ) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """One task's work: for each model, {protocol: (log-probabilities float16, labels)} for the validation
    images `indices`. The models' weights are fetched one at a time, so a task holds one model at once."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    val = local_copy(data, cache).files["val"].path
    loaders = ValLoaders(val, batch_size, indices, threads, device)
    results = []
    for spec, weights_ref in zip(specs, weight_refs, strict=True):
        model = spec.build_model()
        model.load_state_dict(ray.get(weights_ref))
        model.eval().to(device)
        use_amp = spec.recipe.amp and device.type == "cuda"
        results.append({protocol: score_protocol(protocol, model, loaders, spec.recipe.resolution, scales, use_amp)
                        for protocol in protocols})
    return results


def score_protocol(protocol: str, model: nn.Module, loaders: ValLoaders, resolution: int, scales: list[int],
                   use_amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities float16, labels) of one model under one protocol, on the loaders' images."""
    streams = [loaders.get(side, ratio, torch.bfloat16 if use_amp else torch.float32)
               for side, ratio in image_streams(protocol, resolution, scales)]
    device = loaders.device
    log_probs, labels = [], []
    # The streams read the same images in the same order, a batch at a time.
    for batches in zip(*streams, strict=True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            chance = probabilities(protocol, model, [images for images, _ in batches], resolution)
        log_probs.append(chance.clamp_min(SMALLEST_PROBABILITY).log().to(torch.float16).cpu())
        labels.append(batches[0][1].cpu())
    return torch.cat(log_probs).numpy(), torch.cat(labels).numpy().astype(np.int64)


class ValLoaders:
    """A task's validation loaders, one per image stream (side, crop ratio, dtype), each built once and
    read once per model: building one compiles FFCV's pipeline, which costs more than scoring a small set."""

    def __init__(self, val: Path, batch_size: int, indices: list[int], threads: int, device: torch.device):
        # Imported here, in the task: the drivers and trials that import this module read no data, and
        # FFCV costs 3.5 s of CPU to import.
        from pipeline.data.loaders import make_val_loader

        self.device = device
        self.make = functools.partial(make_val_loader, val, batch_size=batch_size, indices=indices,
                                      num_threads=threads, distributed=False, device=device)
        self.built: dict[tuple, object] = {}

    def get(self, side: int, ratio: float, dtype: torch.dtype):
        key = (side, ratio, dtype)
        if key not in self.built:
            self.built[key] = self.make(resolution=side, crop_ratio=ratio, dtype=dtype)
        return self.built[key]


def score_on_cluster(models: Sequence[tuple[RunSpec, dict[str, torch.Tensor]]], data: Location, cache: Path,
                     val_images: int, val_sha256: str, protocols: list[str], params: Params,
                     tasks: int) -> list[dict[str, Scores]]:
    """Every validation image scored exactly once under each protocol by each model, by `tasks` Ray
    tasks with a worker's resources each; one task scores every model on its share of the images, since
    a task's start (a process, its imports, FFCV's compilation) costs more than scoring a small set."""
    shares = np.array_split(np.arange(val_images), min(tasks, val_images))
    weight_refs = [ray.put(weights) for _, weights in models]
    specs = [spec for spec, _ in models]
    # "DEFAULT": scheduled on the cluster's resources, not inside the placement group of the caller.
    task = ray.remote(score_share).options(
        num_cpus=params.ray.cpus_per_worker, num_gpus=1 if params.ray.use_gpu else 0,
        max_retries=params.ray.max_failures, scheduling_strategy="DEFAULT")
    threads = max(1, int(params.ray.cpus_per_worker))
    # The refs go inside a list, which Ray passes as they are: each task fetches a model when it scores it.
    futures = [task.remote(specs, weight_refs, data, cache, protocols, params.evaluate.scales,
                           params.evaluate.batch_size, share.tolist(), threads) for share in shares]
    parts = ray.get(futures)
    return [model_scores([part[index] for part in parts], protocols, val_images, val_sha256)
            for index in range(len(models))]


def model_scores(parts: list[dict[str, tuple[np.ndarray, np.ndarray]]], protocols: list[str], val_images: int,
                 val_sha256: str) -> dict[str, Scores]:
    """One model's scores from its tasks' shares, in the shares' order."""
    scores = {}
    for protocol in protocols:
        log_probs = np.concatenate([part[protocol][0] for part in parts])
        labels = np.concatenate([part[protocol][1] for part in parts])
        if len(labels) != val_images:
            raise RuntimeError(f"{protocol}: scored {len(labels)} of {val_images} validation images")
        scores[protocol] = Scores(protocol, log_probs, labels, val_sha256)
    return scores
