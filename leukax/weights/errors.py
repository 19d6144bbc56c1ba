"""The one exception every weights-file refusal raises.

A wrong hash, a truncated or corrupt `.h5`/`.npz`/`.pth`, a shape mismatch, or a pickle in a `.pth` or
`.npz` all raise `WeightsError` with `path` (the file, or None when no file is involved, e.g. a file that
is missing and cannot be downloaded) and `reason`; its message is "<path>: <reason>". It is raised
`from None`: the reason already carries the underlying library's message, so the user sees one error, not
a chain. Loaders raise it before they hand anything back, so a refused file never leaves variables
partially loaded (the caller's variables are never modified in place).
"""
from __future__ import annotations


class WeightsError(ValueError):
    """A weights file is missing, unverifiable, corrupt or does not fit; `path` and `reason` say which/why."""

    def __init__(self, path, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(reason if path is None else f"{self.path}: {reason}")
