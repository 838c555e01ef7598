"""Keep mutmut's verdicts in the repository, so that a mutation session continues in a fresh clone.

mutmut keeps its verdicts in `mutants/` (ignored by git) and trusts a verdict while the hash of its
function is unchanged. `save` writes every verdict and function hash to docs/mutation-verdicts.json;
`restore` writes them back as mutmut's `.meta` files before a run (a local run's own files win), so
`nox -s mutate` reruns only the functions changed since, and the mutants not yet run.

    python tools/mutation_verdicts.py save|restore
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = ROOT / "docs" / "mutation-verdicts.json"
MUTANTS = ROOT / "mutants"
_NAME = re.compile(r"^(?P<function>.+)__mutmut_(?P<n>\d+)$")


def save() -> int:
    files: dict[str, dict] = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
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
        files[str(meta.relative_to(MUTANTS))[: -len(".meta")]] = dict(sorted(functions.items()))
    VERDICTS.write_text(json.dumps({"mutmut": "3", "files": files}, indent=0, sort_keys=True) + "\n")
    return sum(len(e["codes"]) for f in files.values() for e in f.values())


def restore() -> int:
    if not VERDICTS.is_file():
        return 0
    n = 0
    for path, functions in json.loads(VERDICTS.read_text())["files"].items():
        meta = MUTANTS / f"{path}.meta"
        if meta.exists():
            continue
        codes = {f"{function}__mutmut_{k}": code for function, e in functions.items() for k, code in e["codes"].items()}
        hashes = {function.rpartition(".")[2]: e["hash"] for function, e in functions.items() if "hash" in e}
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"exit_code_by_key": codes, "hash_by_function_name": hashes,
                                    "type_check_error_by_key": {}, "durations_by_key": {},
                                    "estimated_durations_by_key": {}}))
        n += len(codes)
    return n


if __name__ == "__main__":
    if sys.argv[1:] not in (["save"], ["restore"]):
        raise SystemExit(__doc__)
    count = save() if sys.argv[1] == "save" else restore()
    print(f"{sys.argv[1]}: {count} verdicts ({VERDICTS.relative_to(ROOT)})", file=sys.stderr)
