"""The one exception type for bad input: the CLI prints its message as a single line and exits non-zero."""


class HybridPruneError(ValueError):
    """Bad input from the user: a wrong value, a missing file, an incompatible checkpoint.

    Example:
        >>> raise HybridPruneError("filter ratio 1.5 is outside [0, 1)")
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: filter ratio 1.5 is outside [0, 1)
    """
