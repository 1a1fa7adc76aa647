"""The project's error classes: the one line between "you gave me something I cannot use" and "a bug".

``UserError`` is bad config or bad input (a pool file, an annotations file, a selector parameter): its
message names the field or file, the value and the fix, and the CLI prints it without a traceback and
exits 2. It subclasses ``ValueError`` so that library callers who catch ``ValueError`` keep working.
Anything that is not a ``UserError`` is a failure of edsft or of its environment: the CLI prints its
traceback and exits 1, so a bug never passes for a user's mistake.
"""

from __future__ import annotations

__all__ = ["EdsftError", "UserError"]


class EdsftError(Exception):
    """Base of every error edsft raises on purpose."""


class UserError(EdsftError, ValueError):
    """Bad config or input; the message names what is wrong and how to fix it (CLI exit 2)."""
