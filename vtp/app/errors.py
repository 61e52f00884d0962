"""The application's one error type."""
from __future__ import annotations

__all__ = ["VTPError"]


class VTPError(Exception):
    """A problem the user can fix (bad input, missing file, diverged run): one clean message.

    The command prints it as ``vtp <command>: error: <message>`` and exits with status 1;
    anything else is a bug and keeps its traceback.
    """
