"""Run every benchmark in turn with the settings whose figures are in bench/RESULTS.md.

    python bench/run_all.py            # all (about 45 minutes on a 2-core CPU)
    python bench/run_all.py track      # one of: train, track, classify

Each benchmark prints its own figures on stdout; run them on a quiet machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "train": ["bench_train.py"],
    "track": ["bench_track.py"],
    "classify": ["bench_classify.py"],
}


def main(names: list[str]) -> int:
    for name in names or list(BENCHES):
        if name not in BENCHES:
            print(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        script, *args = BENCHES[name]
        print(f"# {name}: {script} {' '.join(args)}", file=sys.stderr, flush=True)
        rc = subprocess.call([sys.executable, str(HERE / script), *args])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
