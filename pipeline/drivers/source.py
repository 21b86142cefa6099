"""The source stage: data/source.json, a fingerprint of the archives data.root holds (name, size,
mtime_ns, a hash of the first and last MiB: pipeline/data/archives.py), which the prepare and
preprocess stages depend on instead of the archives themselves. DVC reruns this stage every time (it
reads a few MiB) and the stages after it only when the fingerprint changed, so `dvc status` never hashes
ILSVRC-2012's 145 GB and still sees an archive replaced."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Params
from pipeline.data.archives import fingerprint
from pipeline.storage import atomic


def run_source(params: Params, out: Path) -> None:
    found = fingerprint(params.data)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, json.dumps(found, indent=1) + "\n")
    print(f"source: {len(found['archives'])} archives fingerprinted -> {out}")
