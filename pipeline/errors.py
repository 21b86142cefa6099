"""The exception types a stage reports in one line instead of a traceback."""


class InputError(ValueError):
    """A params key, file or folder the user gave cannot be used: the message names it.

    Stage scripts print it as one line and exit with status 2, before any expensive work."""


class DataError(InputError):
    """The input data or its layout cannot be used; the message names the path or key at fault."""


class ExplainedFailure(RuntimeError):
    """A failure whose message says what happened and what to do (e.g. the cluster had no room for the
    workers): stage scripts print it as one line and exit with status 1."""
