"""Open, fully decode, check and convert image files into what an FFCV RGBImageField stores.

FFCV's writer processes hang the whole write when one of them raises (see STACK_NOTES), so every
file goes through load_rgb first; what comes out is always a C-contiguous uint8 H x W x 3 array whose
long side is at most max_resolution. What it does with each kind of file:
  RGB                                   kept as is
  L, LA, RGBA, P, PA, CMYK, 1, ...      converted to RGB with PIL's convert("RGB"), the conversion
                                        torchvision's ImageFolder loader uses (alpha is dropped)
  16-bit grey (I;16*, I)                scaled to 8 bits (value // 257), then grey -> RGB
  a format other than its extension     kept (e.g. PNG bytes named .JPEG, as one ILSVRC-2012 train image)
  empty, not an image, truncated or     unusable: UnusableImage with the reason; the caller skips it
  any other decoding failure
Larger images are resized with OpenCV's INTER_AREA (FFCV's own resizer) so that the long side equals
max_resolution exactly; FFCV's resizer then has nothing left to do.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg"})


class UnusableImage(Exception):
    """The file cannot be decoded into an image; str(error) is the reason."""


@dataclass(frozen=True)
class ImageCheck:
    """What checking one file found."""

    skip_reason: str | None = None  # set when the file is unusable
    conversion: str | None = None  # set when the pixels were converted to RGB uint8
    resized_from: tuple[int, int] | None = None  # (width, height) before shrinking to max_resolution


def load_rgb(path: Path, max_resolution: int) -> tuple[np.ndarray, ImageCheck]:
    """Pixels of `path` as uint8 H x W x 3 with long side <= max_resolution; raises UnusableImage."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UnusableImage(f"cannot be read: {error}") from None
    if not data:
        raise UnusableImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # load() decodes every pixel: truncated and corrupt files fail here, not in the writer.
            image.load()
            pixels, conversion = _to_rgb(image)
            file_format = image.format
    except UnidentifiedImageError:
        raise UnusableImage("not an image (no known image format)") from None
    # Pillow reports malformed files with many exception types (OSError, SyntaxError, ValueError,
    # struct.error, EOFError, DecompressionBombError...): each means the same, the file is unusable.
    except Exception as error:  # noqa: BLE001
        raise UnusableImage(f"cannot be decoded ({type(error).__name__}: {error})") from None

    if path.suffix.lower() in JPEG_EXTENSIONS and file_format != "JPEG":
        named = f"{file_format} data named {path.suffix}"
        conversion = named if conversion is None else f"{named}; {conversion}"
    height, width = pixels.shape[:2]
    resized_from = None
    if max(height, width) > max_resolution:
        resized_from = (width, height)
        pixels = _shrink(pixels, max_resolution)
    return pixels, ImageCheck(conversion=conversion, resized_from=resized_from)


def check_image(path: Path, max_resolution: int) -> ImageCheck:
    try:
        return load_rgb(path, max_resolution)[1]
    except UnusableImage as error:
        return ImageCheck(skip_reason=str(error))


def check_images(paths: Sequence[Path], max_resolution: int, workers: int, description: str) -> list[ImageCheck]:
    """check_image for every path, in `workers` processes, with a progress bar; results in input order."""
    check = partial(check_image, max_resolution=max_resolution)
    # Spawned, not forked: a fork copies locks held by the caller's threads (Ray, torch, numba), and a
    # forked worker once hung the pool's shutdown in the test process that runs Ray.
    with get_context("spawn").Pool(workers) as pool:
        results = pool.imap(check, paths, chunksize=16)
        return list(tqdm(results, total=len(paths), desc=description, unit="img"))


def _to_rgb(image: Image.Image) -> tuple[np.ndarray, str | None]:
    if image.mode == "RGB":
        return np.asarray(image), None
    if image.mode in SIXTEEN_BIT_MODES:
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) // 257).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2)), f"16-bit {image.mode} converted to RGB"
    return np.asarray(image.convert("RGB")), f"{image.mode} converted to RGB"


def _shrink(pixels: np.ndarray, max_resolution: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    scale = max_resolution / max(height, width)
    # Integer sides computed so the long side is exactly max_resolution (scale * side can round down).
    if width >= height:
        size = (max_resolution, max(1, round(height * scale)))
    else:
        size = (max(1, round(width * scale)), max_resolution)
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
