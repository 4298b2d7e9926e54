"""One configuration per fresh Python process, interleaved, repeated: how the benchmarks
measure. A TensorFlow process that has built several large models runs later ones slower,
and these machines are shared and noisy, so each configuration runs in its own process and
the rounds alternate (A, B, A, B, ...); figures are the median and range over the rounds.

A benchmark script calls `interleaved` from its parent process; each child runs the same
script with `--only=NAME` (plus the parent's other arguments) and prints one JSON object as
its last stdout line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def interleaved(script: str, names, repeats: int, args=()) -> dict[str, list[dict]]:
    """{name: [the JSON each fresh `script --only=name *args` printed, one per round]}."""
    runs = {name: [] for name in names}
    for r in range(repeats):
        for name in names:
            log(f"round {r + 1}/{repeats}: {name} (fresh process)")
            done = subprocess.run(
                [sys.executable, os.path.abspath(script), f"--only={name}", *args],
                stdout=subprocess.PIPE,
                check=True,
                text=True,
            )
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def median_range(values, digits: int = 3) -> dict:
    """{"median": ..., "range": [min, max]} of a list of numbers."""
    values = [float(v) for v in values]
    return {
        "median": round(statistics.median(values), digits),
        "range": [round(min(values), digits), round(max(values), digits)],
    }


def passed_args(argv=None) -> list[str]:
    """The command line's arguments without --repeats/--only, for the children."""
    argv = sys.argv[1:] if argv is None else argv
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith(("--repeats", "--only")):
            skip = "=" not in a  # `--repeats 3`: its value too
        else:
            out.append(a)
    return out
