"""Where a stage's files land: the project's home, and the params' and command line's locations.

A stage does not always run in the user's checkout:
  `dvc exp run --temp`, `dvc queue`   run it in <project>/.dvc/tmp/exps/<tmp>/; DVC sets DVC_ROOT to
                                      the project for every stage command it runs.
  `ray job submit --working-dir`      runs it in Ray's unpacked copy, /tmp/ray/session_*/
                                      runtime_resources/working_dir_files/_ray_pkg_*/, which Ray
                                      deletes (also when another node's agent unpacks it again).
The stores that outlive a run, Ray's checkpoints and run records (ray.storage_path) and the default
MLflow store, belong to the project, so relative params paths are taken from the project's home:
PIPELINE_HOME when set, else DVC_ROOT, else the checkout the code runs from. In Ray's copy, with
neither variable set, the home is unknown and a relative location is refused before any work.

Command-line paths (--data, --out) name a stage's DVC inputs and outputs, which DVC manages in the
workspace it runs the stage in, so they stay relative to the current folder; in Ray's copy they too
are taken from PIPELINE_HOME, or refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pipeline.config import PROJECT_ROOT
from pipeline.errors import InputError
from pipeline.storage.location import Location, is_uri

HOME_VARIABLE = "PIPELINE_HOME"
DVC_ROOT_VARIABLE = "DVC_ROOT"


def in_ray_job_copy(folder: Path) -> bool:
    """Whether `folder` lies in the copy of a working directory that Ray unpacks for a job."""
    return "working_dir_files" in folder.parts and any(part.startswith("_ray_pkg_") for part in folder.parts)


def project_home(environ: Mapping[str, str] = os.environ, code_root: Path = PROJECT_ROOT) -> Path | None:
    """The user's project folder, or None when the code runs in a copy Ray will delete."""
    explicit = environ.get(HOME_VARIABLE)
    if explicit:
        home = Path(explicit)
        if not home.is_absolute() or not home.is_dir():
            raise InputError(f"{HOME_VARIABLE}={explicit}: not an absolute path to a folder")
        return home
    if environ.get(DVC_ROOT_VARIABLE):
        return Path(environ[DVC_ROOT_VARIABLE])
    return None if in_ray_job_copy(code_root) else code_root


def _unknown_home(what: str) -> InputError:
    return InputError(
        f"{what} is relative, but this stage runs in the copy of the project that `ray job submit "
        f"--working-dir` made, which Ray deletes: give an absolute path or URI, or set {HOME_VARIABLE} "
        f"to the project folder (ray job submit --runtime-env-json "
        f"'{{\"env_vars\": {{\"{HOME_VARIABLE}\": \"/path/to/project\"}}}}')"
    )


def params_location(value: str, key: str, environ: Mapping[str, str] = os.environ,
                    code_root: Path = PROJECT_ROOT) -> Location:
    """A params.yaml path or URI (e.g. ray.storage_path) as a Location; relative paths from the home."""
    if is_uri(value) or os.path.isabs(value):
        return _parsed(value, key, environ)
    home = project_home(environ, code_root)
    if home is None:
        raise _unknown_home(f"params.yaml: {key}={value!r}")
    return Location.local(home / value)


def command_line_location(value: str, flag: str, environ: Mapping[str, str] = os.environ,
                          cwd: Path | None = None) -> Location:
    """A --data or --out argument as a Location; relative paths from the current folder, except in
    Ray's job copy, where they come from PIPELINE_HOME or are refused."""
    if is_uri(value) or os.path.isabs(value):
        return _parsed(value, flag, environ)
    cwd = cwd or Path.cwd()
    if in_ray_job_copy(cwd):
        if not environ.get(HOME_VARIABLE):
            raise _unknown_home(f"{flag} {value}")
        return Location.local(Path(environ[HOME_VARIABLE]) / value)
    return Location.local(cwd / value)


def _parsed(value: str, key: str, environ: Mapping[str, str]) -> Location:
    try:
        return Location.parse(value, environ)
    except (ValueError, OSError) as error:
        raise InputError(f"{key}={value!r}: not a path or storage URI that pyarrow can open ({error})") from None
