"""Exceptions raised for bad or missing data, each naming the file or value at fault."""

from __future__ import annotations


class DatasetError(ValueError):
    """Data on disk (or a value describing it) is unusable: the message names what and why."""


class DataNotFoundError(DatasetError, FileNotFoundError):
    """An expected file or folder is missing: the message names it and the expected layout."""
