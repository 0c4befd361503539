"""The one error type for problems with what the user gave: options, files, data.

Anything that derives from :class:`UserError` is reported by the command line as a short
message naming the cause and the fix, without a traceback, with exit code 2. It is a leaf
module (no project imports), so every layer can raise it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the cause and the fix."""


class ConfigError(UserError, ValueError):
    """An option value that cannot work (checked before any data pass)."""
