"""Local files that readers see whole or not at all: written under a hidden name beside their final one,
then renamed into place (a rename within a folder is atomic on POSIX file systems)."""

from __future__ import annotations

import contextlib
import os
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
