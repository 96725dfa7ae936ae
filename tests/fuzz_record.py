"""The fuzz tests' hypothesis profile and their record of outcomes (docs/reliability/fuzz_results.json).

Each fuzz module (``tests/test_fuzz_*.py``) keeps a :class:`Tally`: for every generated example
it notes the fault it injected and the outcome it asserted. When the module finishes and
``TIMM_JAX_FUZZ_RESULTS=<file>`` is set, the tally is merged into that JSON list as rows
``{"fault", "where", "times", "outcome", "data_lost"}`` (one per fault, replacing an older row
of the same fault and place). Without the variable nothing is written.

``python tests/fuzz_record.py`` runs the fuzz modules, the larger ``slow`` runs included, and
writes ``docs/reliability/fuzz_results.json`` only if every test passed.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

ENV = "TIMM_JAX_FUZZ_RESULTS"
KEYS = ("fault", "where", "times", "outcome", "data_lost")
MODULES = ("tests/test_fuzz_merge.py", "tests/test_fuzz_validate.py", "tests/test_fuzz_layouts.py")
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "reliability" / "fuzz_results.json"

# deterministic (the same examples on every run and machine), no deadline (a 2-core VM shared
# with other jobs has erratic timings), no example database; each test sets max_examples
settings.register_profile(
    "timm_jax_fuzz",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("timm_jax_fuzz")


class Tally:
    """Counts per fault of the examples run and of each outcome seen, for one place in the code."""

    def __init__(self, where: str):
        self.where = where
        self.counts: dict[str, collections.Counter] = {}
        self.lost: dict[str, str] = {}

    def add(self, fault: str, outcome: str, data_lost: str = "none") -> None:
        self.counts.setdefault(fault, collections.Counter())[outcome] += 1
        self.lost[fault] = data_lost

    def rows(self) -> list[dict]:
        rows = []
        for fault, outcomes in self.counts.items():
            times = sum(outcomes.values())
            if len(outcomes) == 1:
                outcome = next(iter(outcomes))
            else:
                outcome = "; ".join(f"{o} ({n})" for o, n in outcomes.most_common())
            rows.append(dict(zip(KEYS, (fault, self.where, times, outcome, self.lost[fault]))))
        return rows

    def write(self) -> None:
        """Merge the rows into the file named by ``TIMM_JAX_FUZZ_RESULTS`` (if set)."""
        path = os.environ.get(ENV)
        if not path or not self.counts:
            return
        rows = json.loads(Path(path).read_text()) if os.path.isfile(path) else []
        new = self.rows()
        keys = {(r["fault"], r["where"]) for r in new}
        rows = [r for r in rows if (r["fault"], r["where"]) not in keys] + new
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)


def main() -> int:
    """Run the fuzz modules (slow runs too) and write RESULTS if they all pass."""
    root = RESULTS.parent.parent.parent
    partial = RESULTS.with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    env = {**os.environ, ENV: str(partial)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "", "-p", "no:cacheprovider", *MODULES]
    rc = subprocess.run(cmd, cwd=root, env=env).returncode
    if rc != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        print(f"fuzz tests failed (exit {rc}); {RESULTS} left as it was", file=sys.stderr)
        return rc or 1
    rows = json.loads(partial.read_text())
    for row in rows:
        assert tuple(row) == KEYS, row
    partial.replace(RESULTS)
    print(f"wrote {len(rows)} rows to {RESULTS.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
