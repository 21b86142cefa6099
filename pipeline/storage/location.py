"""Files on the local disk or in object storage, through the filesystems Ray Train itself writes with.

`Location` is a path on a pyarrow filesystem: a local (or NFS-mounted) folder, or a URI that
pyarrow understands (`s3://bucket/prefix`, `gs://...`, `file:///...`, `hdfs://...`). Every file the
stages write or remove outside their own DVC outputs (run records, member weights, scores, Ray's
checkpoints) goes through it, so the run store, Ray Train and every node agree on where things are.

S3-compatible servers other than AWS take pyarrow's URI options, e.g.
`s3://bucket/runs?endpoint_override=minio.local:9000&scheme=http`. Credentials come from the usual
AWS chain (environment, ~/.aws, instance role); when the driver has them in its environment they are
put into the filesystem object itself, so Ray's workers on other nodes use the same ones.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pyarrow.fs as pafs

# pyarrow's type names -> the URI scheme users write.
_SCHEMES = {"s3": "s3", "gcs": "gs", "hadoop": "hdfs"}


def is_uri(text: str) -> bool:
    return "://" in text


@dataclass(frozen=True)
class Location:
    filesystem: pafs.FileSystem
    path: str

    @classmethod
    def parse(cls, text: str, environ: Mapping[str, str] = os.environ) -> Location:
        """An absolute local path or a URI. Relative paths are the caller's business (see paths.py)."""
        if not is_uri(text):
            if not os.path.isabs(text):
                raise ValueError(f"{text!r} is neither an absolute path nor a URI")
            return cls(pafs.LocalFileSystem(), os.path.normpath(text))
        filesystem, path = pafs.FileSystem.from_uri(text)
        if isinstance(filesystem, pafs.S3FileSystem) and environ.get("AWS_ACCESS_KEY_ID"):
            filesystem = _s3_with_explicit_keys(text, environ)
        return cls(filesystem, path.rstrip("/"))

    @classmethod
    def local(cls, path: Path) -> Location:
        return cls(pafs.LocalFileSystem(), str(path.resolve()))

    def __truediv__(self, name: str) -> Location:
        return Location(self.filesystem, posixpath.join(self.path, name))

    def __str__(self) -> str:
        scheme = _SCHEMES.get(self.filesystem.type_name)
        return f"{scheme}://{self.path}" if scheme else self.path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self} is not on the local filesystem")
        return Path(self.path)

    def _info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def children(self) -> list[Location]:
        """Entries directly inside this folder; none when it does not exist."""
        if not self.is_dir():
            return []
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return [Location(self.filesystem, info.path) for info in sorted(infos, key=lambda info: info.path)]

    def make_dirs(self) -> None:
        self.filesystem.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    @contextlib.contextmanager
    def open_write(self) -> Iterator[IO[bytes]]:
        """Writes to a hidden name beside the file and moves it into place when the block ends, so
        readers never see half a file; on an error the partial file is removed."""
        if self.is_local:
            Path(posixpath.dirname(self.path)).mkdir(parents=True, exist_ok=True)
        partial = posixpath.join(posixpath.dirname(self.path), f".{self.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with self.filesystem.open_output_stream(partial) as stream:
                yield stream
            self.filesystem.move(partial, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                self.filesystem.delete_file(partial)
            raise

    def write_bytes(self, data: bytes) -> None:
        with self.open_write() as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def delete(self) -> None:
        """Removes this file or folder (recursively); nothing happens when it is not there."""
        info = self._info()
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)
        elif info.type != pafs.FileType.NotFound:
            self.filesystem.delete_file(self.path)

    def download(self, target: Path) -> None:
        """Copies this file to a local path."""
        pafs.copy_files(self.path, str(target), source_filesystem=self.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())


def _s3_with_explicit_keys(uri: str, environ: Mapping[str, str]) -> pafs.S3FileSystem:
    """The same S3 filesystem with the driver's keys inside it: a pickled S3FileSystem carries explicit
    keys to Ray's workers, while one built from the default chain looks them up again on every node."""
    from urllib.parse import parse_qs, urlparse

    options = {key: values[-1] for key, values in parse_qs(urlparse(uri).query).items()}
    flags = {"allow_bucket_creation", "allow_bucket_deletion"}
    return pafs.S3FileSystem(
        access_key=environ["AWS_ACCESS_KEY_ID"],
        secret_key=environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=environ.get("AWS_SESSION_TOKEN"),
        **{key: value for key, value in options.items() if key not in flags},
        **{key: options[key].lower() == "true" for key in flags & options.keys()},
    )
