"""One exception family: every message names the offending value, the limit, and the fix."""


class AnyshapeError(ValueError):
    """Base class for errors caused by user input; the CLI prints them as one line, exit 2."""


class ShapeError(AnyshapeError):
    """A Shape that does not fit its parent model."""


class CheckpointError(AnyshapeError):
    """A model file or folder that cannot be loaded (missing, corrupt, unsupported, unsafe)."""


class DataError(AnyshapeError):
    """Text or data that cannot be read or is too short for the requested protocol."""


class TaskError(AnyshapeError):
    """An evaluation task that cannot be found or run (unknown name, unsupported request)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its class name if the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
