"""The one exception type for bad input: the CLI prints its message as a single line and exits non-zero."""


class HybridPruneError(ValueError):
    """Bad input from the user: a wrong value, a missing file, an incompatible checkpoint.

    Example:
        >>> raise HybridPruneError("filter ratio 1.5 is outside [0, 1)")
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: filter ratio 1.5 is outside [0, 1)
    """


def first_line(e: BaseException, limit: int = 200) -> str:
    r"""`Type: first line of the message`, for one-line errors made from a library's exception.

    Example:
        >>> first_line(ValueError("bad value\nmore detail"))
        'ValueError: bad value'
    """
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__
