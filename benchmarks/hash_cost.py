"""What DVC's first hash of a dependency costs, against the source stage's fingerprint, on one
multi-GB file: DVC's own MD5 (dvc_data's file_md5, what `dvc status` and `dvc repro` run on a file it
has not seen) and pipeline.data.archives' fingerprint (size, mtime, SHA-256 of the first and last MiB).

    python -m benchmarks.hash_cost [--gib 2] [--folder /tmp]

The file is written with os.urandom in --folder, hashed right after (so from the page cache, if the
machine has the memory: a bound on the rate, the disk's read rate is the other), and deleted. The
README scales the rate to ILSVRC-2012's 145 GB.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from dvc_data.hashfile.hash import file_md5

from pipeline.config import DataParams
from pipeline.data.archives import VAL_TAR, fingerprint

ILSVRC_BYTES = 145e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    size = int(args.gib * 2**30)
    with tempfile.TemporaryDirectory(dir=args.folder) as scratch:
        # Named as an archive, so that the fingerprint of the source stage covers it.
        path = Path(scratch) / VAL_TAR
        with path.open("wb") as file:
            for _ in range(size // 2**24):
                file.write(os.urandom(2**24))
        started = time.perf_counter()
        file_md5(str(path))
        md5_seconds = time.perf_counter() - started
        params = DataParams(source="imagenet", root=scratch, val_ground_truth=None, devkit_meta=None,
                            digits_image_size=80, digits_val_fraction=0.2, seed=0)
        started = time.perf_counter()
        found = fingerprint(params)
        fingerprint_seconds = time.perf_counter() - started
        assert [entry["name"] for entry in found["archives"]] == [VAL_TAR]
    rate = size / md5_seconds
    print(f"{size / 2**30:.1f} GiB file: DVC's MD5 {md5_seconds:.2f} s ({rate / 1e6:,.0f} MB/s) -> 145 GB: "
          f"{ILSVRC_BYTES / rate / 60:.1f} min at that rate; fingerprint {fingerprint_seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
