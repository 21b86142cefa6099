"""Local files and folders that readers see whole or not at all: written under a hidden name beside their
final one, then renamed into place (a rename within a folder is atomic on POSIX file systems)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def partial_path(target: Path) -> Path:
    """A hidden name beside `target`, unique to this writer."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yields the path to write; when the block succeeds it replaces `target`, else it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(target)
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def write_text(target: Path, text: str) -> None:
    with replacing(target) as partial:
        partial.write_text(text)


@contextlib.contextmanager
def replacing_folder(target: Path) -> Iterator[Path]:
    """Yields an empty folder to fill; when the block succeeds it takes `target`'s place, else it is
    removed. Its name is fixed, so what a killed writer left is cleared by the next one."""
    partial, previous = target.with_name(f".{target.name}.partial"), target.with_name(f".{target.name}.previous")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
        partial.rename(target)
        shutil.rmtree(previous)
    else:
        partial.rename(target)
