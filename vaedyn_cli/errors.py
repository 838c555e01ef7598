"""Errors that the CLI turns into one clear line on stderr and an exit code."""

from __future__ import annotations


class VaedynError(Exception):
    """Bad usage or bad input: the user can fix it. Exit code 2.

    The message is one line that says what is wrong, where, and how to fix it.
    """

    exit_code = 2


class RuntimeFailure(VaedynError):
    """The input was fine but the work failed (non-finite loss, a crashed worker). Exit code 1."""

    exit_code = 1
