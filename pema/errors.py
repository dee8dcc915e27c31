"""Exceptions that carry a message fit to show a user as one line."""


class PemaError(Exception):
    """Base class: any error a caller may report to a user without a traceback."""


class DataError(PemaError):
    """Input data (TSV files, pairs, token sequences) is missing or malformed."""


class ModelError(PemaError):
    """A model folder is missing, unreadable or incompatible."""


class AdapterError(PemaError):
    """An adapter checkpoint is missing, malformed or trained on another model revision."""


class MemoryFormatError(PemaError):
    """A stored external memory is malformed, truncated or does not match what was asked for."""
