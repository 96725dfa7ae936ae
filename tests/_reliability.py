"""The reliability tests' record: each passing fault case appends one row to a JSON file.

Set ``TIMM_JAX_RELIABILITY_RESULTS=<file>`` (``make reliability`` does) and each case that
passes appends ``{"fault", "where", "times", "outcome", "data_lost"}``;
``docs/reliability/render.py`` turns the file into ``docs/reliability.md``. Without the
variable nothing is written.
"""

import json
import os

KEYS = ("fault", "where", "times", "outcome", "data_lost")


def record(fault: str, where: str, times: int, outcome: str, data_lost: str = "none") -> None:
    path = os.environ.get("TIMM_JAX_RELIABILITY_RESULTS")
    if not path:
        return
    row = dict(zip(KEYS, (fault, where, int(times), outcome, data_lost)))
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = json.load(f)
    rows = [r for r in rows if (r["fault"], r["where"]) != (fault, where)] + [row]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
