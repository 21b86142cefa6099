"""Image files -> the samples a .beton's image field stores: each file decoded once, checked,
converted to RGB uint8, resized, and stored as JPEG or raw pixels.

This runs in the preprocess stage's worker processes (pipeline/data/beton.py), so it imports neither
FFCV nor torch: a spawned worker would spend seconds importing them (FFCV: ~4 s on the 2-core VM).

Reading: a file of a tree is read whole; an image inside an archive (ArchiveMember: ILSVRC-2012 as
downloaded, webdataset shards) is read with os.pread at its offset, from a descriptor each worker
process opens once per archive, so no image file is ever written and no archive is opened per image.

Decoding and conversion (load_rgb), to a C-contiguous uint8 H x W x 3 array:
  RGB                                   kept as is
  L, LA, RGBA, P, PA, CMYK, 1, ...      converted to RGB with PIL's convert("RGB"), the conversion
                                        torchvision's ImageFolder loader uses (alpha is dropped)
  16-bit grey (I;16*, I)                scaled to 8 bits (value // 257), then grey -> RGB
  a format other than its extension     kept (e.g. PNG bytes named .JPEG, as one ILSVRC-2012 train image)
  empty, not an image, truncated or     unusable: UnusableImage with the reason; the stage skips it
  any other decoding failure

Resizing (preprocess.short_side, preprocess.max_resolution; the aspect ratio is kept):
  short_side null   only shrink: an image whose long side exceeds max_resolution gets exactly that
                    long side; smaller images are stored as they are
  short_side S      the short side becomes S, up or down (AlexNet's and torchvision's ImageNet recipe:
                    256), unless the long side would then exceed max_resolution: then the long side
                    is max_resolution and the short side less than S. So extreme aspect ratios are
                    stored letterbox-thin: with S 256 and max_resolution 512, a 4:1 panorama becomes
                    512 x 128 (and the validation centre crop sees only its middle).
Shrinking uses OpenCV's INTER_AREA, FFCV's own resizer. Enlarging uses INTER_LINEAR: bilinear is the
filter of torchvision's Resize(256), the recipe the 256 comes from; INTER_CUBIC would add overshoot
halos at edges that an image enlarged 2x or more makes visible, for no gain to a model that then
crops and rescales it again. The stored sides are rounded so that the side being set is exact.

Storing (store_images): what FFCV 1.0.2's RGBImageField.encode does (ffcv/fields/rgb_image.py) with
the pixels, so the .beton reads as if that field had written it: write_mode "raw" stores the pixels,
"jpg" a JPEG (OpenCV's encoder at jpeg_quality, from BGR, as FFCV's encode_jpeg), "smart" a JPEG
when the raw pixels exceed smart_threshold bytes, "proportion" a JPEG with probability
compress_probability. That draw comes from np.random seeded with (seed, the file's position in its
manifest), so it does not depend on which process stores the file or on other files being skipped.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg"})
# Reseeded for every draw: np.random.seed's generator, without the ~0.1 ms a new RandomState costs.
# One per process; each worker process calls store_images from one thread.
_PROPORTION_DRAWS = np.random.RandomState()
# Archive path -> descriptor, opened on first use and kept for the process's life (a worker reads the
# same few archives for a whole split); os.pread needs no seek, so the descriptor holds no position.
_ARCHIVES: dict[Path, int] = {}


@dataclass(frozen=True, slots=True)
class ArchiveMember:
    """An image stored in an archive: `size` bytes at `offset` of `archive`; `name` is its path in it."""

    archive: Path
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.archive}/{self.name}"

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix


ImageSource = Path | ArchiveMember


class UnusableImage(Exception):
    """The file cannot be decoded into an image; str(error) is the reason."""


@dataclass(frozen=True, slots=True)  # slots: the stage keeps one per file (1.28 million for ILSVRC-2012)
class ImageCheck:
    """What checking one file found."""

    skip_reason: str | None = None  # set when the file is unusable
    conversion: str | None = None  # set when the pixels were converted to RGB uint8
    resized_from: tuple[int, int] | None = None  # (width, height) before resizing


@dataclass(frozen=True)
class ImageStorage:
    """The preprocess params that decide a stored sample's bytes (see PreprocessParams)."""

    max_resolution: int
    short_side: int | None
    write_mode: str
    compress_probability: float
    jpeg_quality: int
    smart_threshold: int
    seed: int


@dataclass(frozen=True, slots=True)
class StoredImage:
    """One file's sample as the image field stores it, or (check.skip_reason set, no data) why it has none."""

    check: ImageCheck
    jpeg: bool = False  # data holds JPEG bytes, else the raw H x W x 3 pixels
    width: int = 0
    height: int = 0
    data: bytes = b""


def read_image_bytes(source: ImageSource) -> bytes:
    """The bytes of a file, or of an archive member. Raises UnusableImage."""
    try:
        if isinstance(source, Path):
            return source.read_bytes()
        if source.archive not in _ARCHIVES:
            _ARCHIVES[source.archive] = os.open(source.archive, os.O_RDONLY)
        data = os.pread(_ARCHIVES[source.archive], source.size, source.offset)
    except OSError as error:
        raise UnusableImage(f"cannot be read: {error}") from None
    if len(data) != source.size:
        raise UnusableImage(f"cannot be read: {len(data)} of its {source.size} bytes left in {source.archive}")
    return data


def load_rgb(path: ImageSource, max_resolution: int, short_side: int | None = None) -> tuple[np.ndarray, ImageCheck]:
    """The pixels stored for `path` (a file or an archive member) before any JPEG encoding: uint8
    H x W x 3, converted and resized by the rules of the module docstring. Raises UnusableImage."""
    data = read_image_bytes(path)
    if not data:
        raise UnusableImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # load() decodes every pixel: truncated and corrupt files fail here.
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
    size = _stored_size(width, height, max_resolution, short_side)
    if size == (width, height):
        return pixels, ImageCheck(conversion=conversion)
    shrinking = size[0] * size[1] < width * height
    pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return pixels, ImageCheck(conversion=conversion, resized_from=(width, height))


def store_images(paths: Sequence[ImageSource], first_position: int, storage: ImageStorage) -> list[StoredImage]:
    """The stored sample of each path; paths[i] is at `first_position + i` in its manifest."""
    return [_store_image(path, first_position + offset, storage) for offset, path in enumerate(paths)]


def _store_image(path: ImageSource, position: int, storage: ImageStorage) -> StoredImage:
    try:
        pixels, check = load_rgb(path, storage.max_resolution, storage.short_side)
    except UnusableImage as error:
        return StoredImage(ImageCheck(skip_reason=str(error)))
    height, width = pixels.shape[:2]
    if storage.write_mode == "proportion":
        _PROPORTION_DRAWS.seed([storage.seed, position])
        as_jpeg = _PROPORTION_DRAWS.rand() < storage.compress_probability
    elif storage.write_mode == "smart":
        as_jpeg = pixels.nbytes > storage.smart_threshold
    else:
        as_jpeg = storage.write_mode == "jpg"
    if not as_jpeg:
        return StoredImage(check, jpeg=False, width=width, height=height, data=pixels.tobytes())
    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    encoded, jpeg = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), storage.jpeg_quality])
    if not encoded:
        raise RuntimeError(f"{path}: OpenCV could not JPEG-encode its {width}x{height} pixels")
    return StoredImage(check, jpeg=True, width=width, height=height, data=jpeg.tobytes())


def _to_rgb(image: Image.Image) -> tuple[np.ndarray, str | None]:
    if image.mode == "RGB":
        return np.asarray(image), None
    if image.mode in SIXTEEN_BIT_MODES:
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) // 257).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2)), f"16-bit {image.mode} converted to RGB"
    return np.asarray(image.convert("RGB")), f"{image.mode} converted to RGB"


def _stored_size(width: int, height: int, max_resolution: int, short_side: int | None) -> tuple[int, int]:
    long_side, short = max(width, height), min(width, height)
    if short_side is not None and round(long_side * short_side / short) <= max_resolution:
        new_long, new_short = round(long_side * short_side / short), short_side
    elif short_side is not None or long_side > max_resolution:
        new_long, new_short = max_resolution, max(1, round(short * max_resolution / long_side))
    else:
        return width, height
    return (new_long, new_short) if width >= height else (new_short, new_long)
