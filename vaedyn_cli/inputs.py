"""Reading what a user hands vaedyn: text files, stdin, JSON and YAML.

Every way such an input can be unreadable (missing, a folder, not UTF-8, stdin closed, nested
deeper than a parser recurses, not valid syntax) becomes one VaedynError line that names what and
where and says how to fix it, never a traceback from deep inside a decoder or parser.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from vaedyn_cli.errors import VaedynError


def _join(message: str, fix: str) -> str:
    return f"{message}; {fix}" if fix else message


def _not_utf8(what: str, err: UnicodeDecodeError, fix: str) -> VaedynError:
    byte = err.object[err.start] if err.start < len(err.object) else 0
    return VaedynError(_join(f"{what} is not UTF-8 text (byte {byte:#04x} at offset {err.start}): save it as UTF-8", fix))


def read_text(path: Path | str, what: str, fix: str = "") -> str:
    """The UTF-8 text of a file; `what` names it in errors ("config file", "targets file")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(f"{what} {path}", e, fix) from None
    except FileNotFoundError:
        raise VaedynError(_join(f"{what} {path} not found", fix)) from None
    except IsADirectoryError:
        raise VaedynError(_join(f"{what} {path} is a folder, not a file", fix)) from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise VaedynError(_join(f"cannot read {what} {path} ({getattr(e, 'strerror', None) or e})", fix)) from None


def read_stdin(what: str, fix: str) -> str:
    """All of stdin as text; a closed stdin (`<&-`) or bytes that are not UTF-8 are one-line errors."""
    stream = sys.stdin
    if stream is None or getattr(stream, "closed", False):
        raise VaedynError(f"{what}: stdin is closed; {fix}")
    try:
        return stream.read()
    except UnicodeDecodeError as e:
        raise _not_utf8(f"{what}: stdin", e, fix) from None
    except (OSError, ValueError):  # ValueError: "I/O operation on closed file"
        raise VaedynError(f"{what}: stdin is closed or unreadable; {fix}") from None


def parse_json(text: str, where: str, fix: str) -> Any:
    """JSON text (`where` names its origin, e.g. "targets file x.json"), as Python objects."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise VaedynError(f"{where} is not valid JSON (line {e.lineno}, column {e.colno}); {fix}") from None
    except RecursionError:
        raise VaedynError(f"{where} is nested too deeply to be read as JSON; {fix}") from None


def read_json(path: Path | str, what: str, fix: str) -> Any:
    """A JSON file: `read_text`, then `parse_json`."""
    return parse_json(read_text(path, what, fix), f"{what} {path}", fix)


def parse_yaml(text: str, where: str, fix: str) -> Any:
    """YAML text through `yaml.safe_load` (plain data only: no tags that build objects)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise VaedynError(f"YAML syntax error in {where}{at}: {problem}; {fix}") from None
    except RecursionError:
        raise VaedynError(f"{where} is nested too deeply to be read as YAML; {fix}") from None


def shorten(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters: a hostile value quoted in an error must not flood its one line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message ("" when it has none): what a one-line
    error quotes of a library's multi-line message."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")
