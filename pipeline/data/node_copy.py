"""The .beton files where FFCV can read them: a local folder as it is, or a node's copy of a URI.

FFCV memory-maps its files, so they must be local files (a shared POSIX mount counts: NFS, Lustre,
a cloud file system); with data in object storage (`--data s3://bucket/beton`), each node copies the
files once into ray.local_data_cache. Every worker on a node asks at the same time: the first takes a
lock and copies, the others wait for it and find the copy. A copy is verified against the SHA-256 in
dataset.json before it is renamed into place, and a copy made before the data changed is replaced.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import filelock

from pipeline.data.dataset import FILE_NAME, Dataset, file_sha256
from pipeline.errors import DataError
from pipeline.storage import atomic
from pipeline.storage.location import Location

LOCK_TIMEOUT_S = 6 * 3600  # another worker may be copying a few hundred GB


def cache_root(configured: str | None) -> Path:
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "cnn-pipeline-data"


def describe(data: Location, cache: Path) -> Dataset:
    """What dataset.json says, reading nothing else: for a URI, the files are named where this node
    would keep its copy."""
    if data.is_local:
        return Dataset.read(data.local_path())
    description = data / FILE_NAME
    try:
        text = description.read_text()
    except OSError as error:
        raise DataError(f"{description}: cannot be read ({error}); run the preprocess stage, or check the URI") from None
    return Dataset.parse(text, _copy_folder(data, cache), source=str(description))


def local_copy(data: Location, cache: Path) -> Dataset:
    """The data set as files on this node: `data` itself when local, else this node's verified copy."""
    if data.is_local:
        return Dataset.read(data.local_path())
    wanted = describe(data, cache)
    folder = wanted.folder
    folder.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(folder / ".copying.lock", timeout=LOCK_TIMEOUT_S):
        for beton in wanted.files.values():
            if beton.path.is_file() and beton.path.stat().st_size == beton.bytes and _verified(beton.path, beton.sha256):
                continue
            with atomic.replacing(beton.path) as partial:
                (data / beton.path.name).download(partial)
                if file_sha256(partial) != beton.sha256:
                    raise DataError(f"{data / beton.path.name}: its SHA-256 is not the one {data / FILE_NAME} "
                                    "records; the data changed while it was copied: run the preprocess stage again")
            _mark_verified(beton.path, beton.sha256)
        (folder / FILE_NAME).write_text((data / FILE_NAME).read_text())
    return Dataset.read(folder)


def _copy_folder(data: Location, cache: Path) -> Path:
    return cache / hashlib.sha256(str(data).encode()).hexdigest()[:16]


def _verified(path: Path, sha256: str) -> bool:
    """A copy is hashed once, when it is made; later runs trust the marker written beside it."""
    marker = path.with_name(f".{path.name}.sha256")
    return marker.is_file() and marker.read_text() == sha256


def _mark_verified(path: Path, sha256: str) -> None:
    path.with_name(f".{path.name}.sha256").write_text(sha256)
