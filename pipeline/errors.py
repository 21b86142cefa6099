"""The one exception type for bad user input, so every stage reports it the same way."""


class InputError(ValueError):
    """A params key, file or folder the user gave cannot be used: the message names it.

    Stage scripts print it as one line and exit with status 2, before any expensive work."""
