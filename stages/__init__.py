"""One thin entry point per DVC stage: parse arguments, load params, call pipeline/."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.errors import InputError


def run_stage(stage: Callable[[], object]) -> int:
    """Runs a stage; bad input becomes one line on stderr and exit status 2 instead of a traceback,
    and an interruption (Ctrl-C, or SIGTERM, which pipeline.tracking turns into one) exits with 130."""
    try:
        stage()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ray Train re-raises a plain KeyboardInterrupt, so which signal it was is lost by here.
        print("interrupted", file=sys.stderr)
        return 130
    return 0
