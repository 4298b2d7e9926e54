"""The library's one error type for bad user input."""


class UsageError(ValueError):
    """A problem with the user's input (a setting, a path, a layer name).

    The command line prints it as one line (`error: ...`) with exit status 1 and no
    traceback; library callers can catch it as the ValueError it is.
    """
