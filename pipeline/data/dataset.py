"""dataset.json: the description the preprocess stage writes beside its .beton files, and its reader.

<out>/dataset.json is renamed into place after both .beton files (pipeline/data/beton.py), so its presence
means the set is complete:
  {"format": 1,
   "classes": [name of label 0, name of label 1, ...],       the prepared classes.json's, in label order
   "splits": {"train": {"file": "train.beton", "images": N, "bytes": B, "sha256": HEX}, "val": {...}},
   "preprocess": {the preprocess params the files were written with}}
`classes` gives the number of classes even when every image of a class was skipped; a file's sha256
identifies the data it holds (e.g. in run names) without anyone reading the file again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError

FORMAT = 1
SPLITS = ("train", "val")
FILE_NAME = "dataset.json"


@dataclass(frozen=True)
class BetonFile:
    path: Path
    images: int
    bytes: int
    sha256: str  # of the whole file, hex


@dataclass(frozen=True)
class Dataset:
    folder: Path
    classes: list[str]
    files: dict[str, BetonFile]  # by split
    preprocess: dict  # the PreprocessParams the files were written with, as a dict

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def write(self, path: Path) -> None:
        """Write the description to `path`; the caller renames it to folder/dataset.json once the
        files it describes are in place."""
        splits = {
            split: {"file": beton.path.name, "images": beton.images, "bytes": beton.bytes, "sha256": beton.sha256}
            for split, beton in self.files.items()
        }
        description = {"format": FORMAT, "classes": self.classes, "splits": splits, "preprocess": self.preprocess}
        path.write_text(json.dumps(description, indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Dataset:
        """folder/dataset.json, with each file it lists checked by its size only (nothing is hashed)."""
        path = folder / FILE_NAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise DataError(f"{path}: not found; run the preprocess stage") from None
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: unreadable ({error}); run the preprocess stage again") from None
        dataset = cls.parse(text, folder, source=str(path))
        for beton in dataset.files.values():
            if not beton.path.is_file():
                raise DataError(f"{beton.path}: missing, though {path} lists it; run the preprocess stage")
            size = beton.path.stat().st_size
            if size != beton.bytes:
                raise DataError(
                    f"{beton.path}: {size} bytes where {path} records {beton.bytes}: changed since it was "
                    "written; run the preprocess stage"
                )
        return dataset

    @classmethod
    def parse(cls, text: str, folder: Path, source: str) -> Dataset:
        """The description in `text` (read from `source`, named in errors), for files in `folder`, which
        need not hold them yet (pipeline/data/node_copy.py copies them there from a URI)."""
        try:
            description = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{source}: unreadable ({error}); run the preprocess stage again") from None
        written_format = description.get("format") if isinstance(description, dict) else None
        if written_format != FORMAT:
            raise DataError(
                f"{source}: format {written_format!r}, this code reads format {FORMAT}; run the preprocess stage again"
            )
        try:
            classes = [str(name) for name in description["classes"]]
            files = {split: _beton_file(folder, description["splits"][split]) for split in SPLITS}
            preprocess = dict(description["preprocess"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"{source}: not as the preprocess stage writes it ({type(error).__name__}: {error}); run it again"
            ) from None
        return cls(folder=folder, classes=classes, files=files, preprocess=preprocess)


def file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _beton_file(folder: Path, entry: dict) -> BetonFile:
    return BetonFile(
        path=folder / str(entry["file"]), images=int(entry["images"]), bytes=int(entry["bytes"]),
        sha256=str(entry["sha256"]),
    )
