"""Keep mutmut's verdicts in the repository, so that a mutation session continues in a fresh clone.

mutmut keeps its verdicts in `mutants/` (ignored by git) and trusts a verdict while the hash of its
function is unchanged. `save` writes every verdict and function hash to docs/mutation-verdicts.json;
`restore` writes them back into mutmut's `.meta` files before a run, so `nox -s mutate` reruns only
the functions changed since, and the mutants not yet run.

Both directions keep a verdict while its function's hash is unchanged: a verdict mutmut has now wins,
and a mutant it has none for (not run yet, or reset by mutmut because its test selection or test
arguments changed) keeps the one in the file. Tests only ever added since keep a kill a kill. To run
every mutant again, delete the file before `restore`.

    python tools/mutation_verdicts.py save|restore
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = ROOT / "docs" / "mutation-verdicts.json"
MUTANTS = ROOT / "mutants"
_NAME = re.compile(r"^(?P<function>.+)__mutmut_(?P<n>\d+)$")


def _load_file() -> dict[str, dict[str, Any]]:
    return json.loads(VERDICTS.read_text())["files"] if VERDICTS.is_file() else {}


def _stored(files: dict[str, dict[str, Any]], path: str, function: str, digest: str | None) -> dict[str, Any]:
    """The file's verdicts for `function`, by mutant number, while its hash is `digest` (else none)."""
    entry = files.get(path, {}).get(function)
    return entry["codes"] if entry is not None and digest is not None and entry.get("hash") == digest else {}


def save() -> int:
    old = _load_file()
    files: dict[str, dict] = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        path = str(meta.relative_to(MUTANTS))[: -len(".meta")]
        data = json.loads(meta.read_text())
        functions: dict[str, dict] = {}
        for key, code in data["exit_code_by_key"].items():
            m = _NAME.match(key)
            if m is None:
                raise SystemExit(f"{meta}: unexpected mutant name {key!r}")
            entry = functions.setdefault(m["function"], {"codes": {}})
            entry["codes"][m["n"]] = code
        by_short = {f.rpartition(".")[2]: f for f in functions}  # mutmut keys hashes by the short name
        for function, digest in data["hash_by_function_name"].items():
            if function in by_short:
                functions[by_short[function]]["hash"] = digest
        for function, entry in functions.items():
            stored = _stored(old, path, function, entry.get("hash"))
            for n, code in entry["codes"].items():
                if code is None and stored.get(n) is not None:
                    entry["codes"][n] = stored[n]
        files[path] = dict(sorted(functions.items()))
    VERDICTS.write_text(json.dumps({"mutmut": "3", "files": files}, indent=0, sort_keys=True) + "\n")
    return sum(len(e["codes"]) for f in files.values() for e in f.values())


def restore() -> int:
    n = 0
    for path, functions in _load_file().items():
        meta = MUTANTS / f"{path}.meta"
        if meta.exists():
            data = json.loads(meta.read_text())
        else:
            data = {"exit_code_by_key": {}, "hash_by_function_name": {}, "type_check_error_by_key": {},
                    "durations_by_key": {}, "estimated_durations_by_key": {}}
            data["hash_by_function_name"] = {f.rpartition(".")[2]: e["hash"] for f, e in functions.items() if "hash" in e}
        codes = data["exit_code_by_key"]
        for function in functions:
            digest = data["hash_by_function_name"].get(function.rpartition(".")[2])
            stored = _stored({path: functions}, path, function, digest)
            for k, code in stored.items():
                key = f"{function}__mutmut_{k}"
                if code is not None and codes.get(key) is None:
                    codes[key] = code
                    n += 1
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(data))
    return n


if __name__ == "__main__":
    if sys.argv[1:] not in (["save"], ["restore"]):
        raise SystemExit(__doc__)
    count = save() if sys.argv[1] == "save" else restore()
    print(f"{sys.argv[1]}: {count} verdicts ({VERDICTS.relative_to(ROOT)})", file=sys.stderr)
