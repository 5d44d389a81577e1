"""Exceptions that mean "the user asked for something invalid".

Library code raises these (or ValueError / FileNotFoundError); only `cli.py` turns them into a
one-line message and an exit code.
"""


class ClusterlmError(Exception):
    """Base class: bad input, with a message that says what is wrong and what would be valid."""


class ConfigError(ClusterlmError, ValueError):
    """An invalid run file, override or config value."""


class DataError(ClusterlmError, ValueError):
    """Unusable input text, shards or data directory."""


class CheckpointError(ClusterlmError, ValueError):
    """A missing, corrupt or incompatible checkpoint."""
