"""The one error type for problems with what the user gave: options, files, data.

Anything that derives from :class:`UserError` is reported by the command line as a short
message naming the cause and the fix, without a traceback, with exit code 2. It is a leaf
module (no project imports), so every layer can raise it.
"""

from __future__ import annotations

#: Exit codes of every command (documented in docs/cli.md): completed, failed (an internal error or a
#: diverged run), a user error (named in one paragraph), stopped by SIGINT (Ctrl-C) or SIGTERM as shells
#: report them (128 + the signal).
EXIT_COMPLETED, EXIT_FAILED, EXIT_USER, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143


class UserError(Exception):
    """A problem with the user's input; the message names the cause and the fix."""


class ConfigError(UserError, ValueError):
    """An option value that cannot work (checked before any data pass)."""


class PluginError(UserError, ImportError):
    """A plugin (``--plugin MODULE``, a suite's ``plugins:``, an installed entry point) that cannot be imported."""


class CLIError(UserError):
    """A user error on the command line (a flag, a file it names): printed without a traceback, exit code 2."""
