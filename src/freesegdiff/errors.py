"""Exceptions a user can cause, each with a message that says what to do."""

from __future__ import annotations


class FreeSegDiffError(Exception):
    """Base class of every error freesegdiff raises on purpose."""


class ConfigError(FreeSegDiffError, ValueError):
    """A setting, preset or argument has a value that cannot work."""


class ImageReadError(FreeSegDiffError, OSError):
    """An image file is missing, unreadable or of a kind we cannot turn into RGB."""


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than the configured limit (``limits.max_pixels``)."""


class ModelUnavailableError(FreeSegDiffError, OSError):
    """A model's weights could not be found locally nor fetched from the Hub."""


class EmptyVocabularyError(FreeSegDiffError, ValueError):
    """A label set is empty where at least one name is required."""
