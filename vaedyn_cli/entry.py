"""The `vaedyn` console script and `python -m vaedyn_cli`: Ctrl-C and SIGTERM are caught from the
first instant (importing the CLI takes a while), so that an interruption at any point ends with one
line, never a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    from vaedyn_cli import errors

    errors.catch_signals()
    try:
        from vaedyn_cli import cli
    except KeyboardInterrupt as e:
        line, code = errors.interrupt_line(e)
        print(line, file=sys.stderr, flush=True)
        sys.exit(code)
    cli.main()
