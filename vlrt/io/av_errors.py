"""Turning PyAV exceptions into text for one-line user messages."""

from __future__ import annotations


def reason(exc: BaseException) -> str:
    """The cause of a PyAV or OS error without the file name they append (ours is in the message)."""
    return getattr(exc, "strerror", None) or str(exc)
