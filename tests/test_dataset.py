"""dataset.json's reader: every way the described files can be missing or changed is a one-line
DataError naming the file, found without hashing anything."""

from __future__ import annotations

import json

import pytest

from pipeline.data.dataset import BetonFile, Dataset
from pipeline.errors import DataError


def test_dataset_read_names_what_is_missing_or_changed(tmp_path):
    folder = tmp_path / "beton"
    with pytest.raises(DataError, match=r"dataset.json: not found; run the preprocess stage"):
        Dataset.read(folder)

    folder.mkdir()
    for split in ("train", "val"):
        (folder / f"{split}.beton").write_bytes(b"0123456789")
    files = {split: BetonFile(folder / f"{split}.beton", 2, 10, "ab" * 32) for split in ("train", "val")}
    Dataset(folder, ["a", "b"], files, {"seed": 0}).write(folder / "dataset.json")
    # The recorded sha256 is not the files': read checks sizes only, it never hashes.
    assert Dataset.read(folder) == Dataset(folder, ["a", "b"], files, {"seed": 0})

    (folder / "train.beton").write_bytes(b"01234567890")
    with pytest.raises(DataError, match=r"train.beton: 11 bytes where .*dataset.json records 10: changed since"):
        Dataset.read(folder)
    (folder / "train.beton").write_bytes(b"0123456789")
    (folder / "val.beton").unlink()
    with pytest.raises(DataError, match=r"val.beton: missing, though .*dataset.json lists it"):
        Dataset.read(folder)

    description = json.loads((folder / "dataset.json").read_text())
    del description["splits"]["val"]
    (folder / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(DataError, match=r"dataset.json: not as the preprocess stage writes it \(KeyError: 'val'\)"):
        Dataset.read(folder)
    (folder / "dataset.json").write_text(json.dumps(description | {"format": 2}))
    with pytest.raises(DataError, match=r"dataset.json: format 2, this code reads format 1"):
        Dataset.read(folder)
    (folder / "dataset.json").write_text('{"format": 1, "classes": [')
    with pytest.raises(DataError, match=r"dataset.json: unreadable \(Expecting value"):
        Dataset.read(folder)
