"""The one error type for a sample that cannot be used (a file, an image, a coordinate, a caption).

Readers catch :class:`BadSampleError` to skip the sample and count it under its ``reason``; every
other exception is a bug and propagates.
"""

from __future__ import annotations

__all__ = ["BadSampleError"]


class BadSampleError(ValueError):
    """A sample that cannot be decoded or used.

    ``path`` names the sample (a file path, a shard member, or a description such as
    ``"<array>"``); ``reason`` is a short slug to count skips by (``"missing"``, ``"empty"``,
    ``"undecodable"``, ``"silent-zero-length"``, ...); ``detail`` is free text for humans.
    """

    def __init__(self, path: object, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        message = f"{self.path}: {reason}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)

    def __reduce__(self):
        # Keeps the attributes when the error crosses a DataLoader worker boundary (pickled).
        return (type(self), (self.path, self.reason, self.detail))
