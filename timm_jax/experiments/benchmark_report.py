"""The benchmark's report, computed from its raw files only (``DIR/raw/``), by this code.

* :func:`gates` — the pre-registered gates from the pilot's raw results.
* :func:`write_report` — ``DIR/report.md``: the pre-registration's commit, the gates, the sources,
  and — once the grid has cells — Table 2 (mean ± sd over replicates), every pre-registered
  comparison with its hierarchical-bootstrap interval, the per-replicate differences and the
  verdict, Table 3 (the T-IMM stages), Table 4 (forgetting, each fused model once), convergence,
  and the figures.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np

from timm_jax.atomic import atomic_write
from timm_jax.experiments import stats
from timm_jax.workflows.report import markdown_table
from timm_jax.workflows.report import read_csv as _csv

__all__ = ["cells", "gates", "grid_plan", "pilot_plan", "run_dir", "slug", "write_report"]

ROOT = Path(__file__).resolve().parents[2]
#: the committed pre-registration (the report cites its commit; the benchmark reads it by default)
PREREG = ROOT / "docs" / "benchmark" / "preregistration.json"


def _jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fraction(dirname: str) -> float:
    return int(dirname[1:]) / 100


def cells(raw: str) -> dict:
    """``{(fraction, init slug): {replicate: {case: dice_mean}}}`` of every finished cell."""
    out: dict = defaultdict(dict)
    root = os.path.join(raw, "runs")
    if not os.path.isdir(root):
        return {}
    for fdir in sorted(os.listdir(root)):
        for rdir in sorted(os.listdir(os.path.join(root, fdir))):
            for init in sorted(os.listdir(os.path.join(root, fdir, rdir))):
                rows = _csv(os.path.join(root, fdir, rdir, init, "per_case.csv"))
                if rows:
                    out[(_fraction(fdir), init)][int(rdir[3:])] = {
                        r["case"]: float(r["dice_mean"]) for r in rows
                    }
    return dict(out)


def _matrix(cell: dict) -> tuple[np.ndarray, list[int], list[str]]:
    """(replicates × cases) of a cell, cases in a fixed order."""
    reps = sorted(cell)
    cases = sorted(next(iter(cell.values())))
    return np.array([[cell[r][c] for c in cases] for r in reps]), reps, cases


def slug(name: str) -> str:
    """An initialisation's folder name (``"All-HCP 1:7"`` → ``allhcp_1_7``)."""
    return name.lower().replace(" ", "_").replace(":", "_").replace("-", "")


def _capped(run_raw: str) -> bool | None:
    """Whether a run stopped at its epoch cap (not early-stopped); ``None`` without its raw files."""
    cfg_path = os.path.join(run_raw, "config.json")
    hist = _jsonl(os.path.join(run_raw, "metrics.jsonl"))
    if not os.path.isfile(cfg_path) or not hist:
        return None
    with open(cfg_path) as f:
        train = json.load(f).get("train") or {}
    best = min(range(len(hist)), key=lambda i: (hist[i]["val_loss"], i))
    early = (len(hist) - 1 - best) >= train.get("early_stopping_patience", math.inf)
    return not early and len(hist) >= train.get("max_epochs", math.inf)


def run_dir(fraction: float, r: int, init: str) -> str:
    """A cell's raw folder relative to ``raw/`` (``runs/f004/rep0/no_transfer``)."""
    return os.path.join("runs", f"f{round(fraction * 100):03d}", f"rep{r}", slug(init))


def pilot_plan(prereg: dict) -> list[str]:
    """Every raw folder the pilot writes, relative to ``raw/``: its sources, then each
    replicate's no-transfer run and threshold baseline."""
    plan = [os.path.join("sources", s) for s in prereg["pilot_sources"]]
    for f, n in prereg["fractions"].items():
        for r in range(int(n)):
            plan += [run_dir(float(f), r, "no transfer"), run_dir(float(f), r, "threshold")]
    return plan


def grid_plan(prereg: dict) -> list[tuple[str, float, int, str]]:
    """The grid's transfer cells ``(part, fraction, replicate, initialisation)`` in the order they
    run: the claim set first (the fractions the verdicts are about, every initialisation but no
    transfer, which is the pilot's), then the other fractions, then the All-HCP transfers and the
    variants. Within a part replicate 0 of every fraction runs first, then replicate 1, ... — so
    that an interrupted grid has the claims partly answered rather than a side table complete."""
    reps = {float(f): int(n) for f, n in prereg["fractions"].items()}
    claimed = sorted({float(f) for c in prereg["verdicts"]["claims"] for f in c["fractions"]} & set(reps))
    main = [n for n in prereg["initialisations"] if n != "no transfer"]
    parts = [
        ("claims", claimed, main),
        ("other fractions", [f for f in sorted(reps) if f not in claimed], main),
        ("All-HCP", [float(prereg["all_hcp"]["fraction"])], list(prereg["all_hcp"]["sources"])),
        ("variants", [float(prereg["variants"]["fraction"])], list(prereg["variants"]["settings"])),
    ]
    plan = []
    for part, fractions, names in parts:
        order = by_replicate(reps, [f for f in fractions if f in reps])
        plan += [(part, f, r, n) for f, r in order for n in names]
    return plan


def by_replicate(reps: dict[float, int], fractions: list[float]) -> list[tuple[float, int]]:
    """``(fraction, replicate)`` for ``fractions`` (``reps``: each one's replicate count): every
    fraction's replicate 0, then replicate 1, ... — so that an interrupted stage has every
    fraction partly done rather than one fully."""
    top = max((reps[f] for f in fractions), default=0)
    return [(f, r) for r in range(top) for f in fractions if r < reps[f]]


def _finished(raw: str, rel: str) -> bool:
    return os.path.isfile(os.path.join(raw, rel, "per_case.csv"))


def _pilot_runs(raw: str, prereg: dict) -> list[str]:
    """The pilot's finished training runs (its sources and no-transfer cells)."""
    return [
        os.path.join(raw, rel)
        for rel in pilot_plan(prereg)
        if not rel.endswith("threshold") and _finished(raw, rel)
    ]


def gates(raw: str, prereg: dict) -> dict:
    """The pilot's gates (``prereg["gates"]``) from the raw results: each with its number, the
    threshold and whether it is met. Until every pilot run has finished (``complete`` false) the
    numbers are provisional and each gate's ``met`` is ``None`` (pending)."""
    g = prereg["gates"]
    plan = pilot_plan(prereg)
    done = sum(_finished(raw, rel) for rel in plan)
    complete = done == len(plan) and os.path.isfile(os.path.join(raw, "sources.csv"))
    sources = {r["source"]: r for r in _csv(os.path.join(raw, "sources.csv"))}
    c = cells(raw)
    out = []
    dice = {s: float(sources[s]["dice_mean"]) if s in sources else math.nan for s in g["G1"]["sources"]}
    out.append(
        {
            "gate": "G1",
            "what": g["G1"]["what"],
            "value": dice,
            "threshold": g["G1"]["min_dice"],
            "met": all(v >= g["G1"]["min_dice"] for v in dice.values()),
        }
    )

    def mean_of(fraction: str, init: str) -> float:
        cell = c.get((float(fraction), init))
        return float(_matrix(cell)[0].mean()) if cell else math.nan

    hi, lo = mean_of(g["G2"]["high"], "no_transfer"), mean_of(g["G2"]["low"], "no_transfer")
    out.append(
        {
            "gate": "G2",
            "what": g["G2"]["what"],
            "value": {"high": hi, "low": lo, "gap": hi - lo},
            "threshold": g["G2"]["min_gap"],
            "met": hi - lo >= g["G2"]["min_gap"],
        }
    )
    nt, thr = mean_of(g["G3"]["fraction"], "no_transfer"), mean_of(g["G3"]["fraction"], "threshold")
    out.append(
        {
            "gate": "G3",
            "what": g["G3"]["what"],
            "value": {"no_transfer": nt, "threshold": thr, "gap": nt - thr},
            "threshold": g["G3"]["min_gap"],
            "met": nt - thr >= g["G3"]["min_gap"],
        }
    )
    capped = [_capped(r) for r in _pilot_runs(raw, prereg)]
    known = [x for x in capped if x is not None]
    share = sum(known) / len(known) if known else math.nan
    out.append(
        {
            "gate": "G4",
            "what": g["G4"]["what"],
            "value": {"capped": int(sum(known)), "runs": len(known), "share": share},
            "threshold": g["G4"]["max_capped"],
            "met": bool(known) and share < g["G4"]["max_capped"],
        }
    )
    if not complete:
        for x in out:
            x["met"] = None
    return {
        "gates": out,
        "all_met": complete and all(x["met"] for x in out),
        "complete": complete,
        "pilot_runs": {"finished": done, "planned": len(plan)},
    }


def _commit_of(path: Path) -> str:
    try:
        return (
            subprocess.run(
                ["git", "log", "-1", "--format=%h %ci", "--", str(path)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or "not committed"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def machine() -> str:
    """This machine in one line: CPU model, whether it has AVX-512 (XLA compiles for the host's
    instruction set, so runs on machines that differ here differ in their last digits), CPUs."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name") and not model:
                    model = ln.split(":", 1)[1].strip()
                elif ln.startswith(("flags", "Features")) and not flags:
                    flags = set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    isa = ", AVX-512" if "avx512f" in flags else ", AVX2" if "avx2" in flags else ""
    return f"{model or platform.machine()}{isa}, {os.cpu_count()} CPUs, {platform.system()}"


def _fmt(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def write_report(out: str, prereg: dict) -> str:
    """``out/report.md`` from ``out/raw/``; returns its path."""
    raw = os.path.join(out, "raw")
    g = gates(raw, prereg)
    wall: dict = {}  # raw/wall_time.json and a sharded grid's wall_time_shard*.json
    for name in sorted(os.listdir(raw)) if os.path.isdir(raw) else []:
        if name.startswith("wall_time") and name.endswith(".json"):
            with open(os.path.join(raw, name)) as f:
                wall |= json.load(f)
    lines = [
        "# Does T-IMM help? The benchmark",
        "",
        "Written by `python -m timm_jax.experiments.benchmark` from the raw files in `raw/` "
        "(`timm_jax/experiments/benchmark_report.py`); nothing here is typed by hand.",
        "",
        "- Pre-registration: `docs/benchmark/preregistration.json`, last changed in commit "
        f"{_commit_of(PREREG)} (a copy of what ran is `raw/preregistration.json`).",
        "- Machine: "
        + (
            "; ".join(sorted({x["machine"] for v in wall.values() for x in v if "machine" in x}))
            or f"not recorded with the wall times (this report was written on {machine()})"
        )
        + ".",
        "- Wall time: "
        + (
            ", ".join(
                f"{k} {sum(x['seconds'] for x in v) / 3600:.2f} h in {len(v)} invocation(s)"
                for k, v in wall.items()
            )
            or "none yet"
        )
        + ".",
        "- **The images are synthetic** (generator "
        f"{prereg['data']['generator']}, built on real Desikan–Killiany anatomy): these numbers say "
        "nothing about real MRI.",
        "",
        "## Gates (the pilot: sources, no transfer and the threshold baseline only)",
        "",
        markdown_table(
            [
                {
                    "gate": x["gate"],
                    "what": x["what"],
                    "measured": _fmt(x["value"]),
                    "threshold": _fmt(x["threshold"]),
                    "met": "pending" if x["met"] is None else "yes" if x["met"] else "**no**",
                }
                for x in g["gates"]
            ],
            ["gate", "what", "measured", "threshold", "met"],
        ),
        "",
    ]
    if not g["complete"]:
        n = g["pilot_runs"]
        lines += [
            f"**The pilot has finished {n['finished']} of its {n['planned']} runs: the gates are "
            "pending and their numbers provisional (from the replicates finished so far).** No transfer "
            "claim is made before they are decided.",
            "",
        ]
    elif not g["all_met"]:
        failed = [x["gate"] for x in g["gates"] if not x["met"]]
        lines += [
            f"**Gate(s) {', '.join(failed)} not met: on this benchmark no claim about the transfer "
            "methods is made** (pre-registered rule). Tables of transfer cells below, if any, are "
            "descriptive only.",
            "",
        ]
    lines += _progress(raw, prereg)
    lines += _design_resolution(raw, prereg, complete=g["complete"])
    lines += _sources_section(raw)
    lines += _cells_section(raw, prereg, claims=g["all_met"])
    lines += (
        _table3(raw) + _table4(raw) + _convergence(raw) + _fisher_section(raw) + _figures(out, raw, prereg)
    )
    path = os.path.join(out, "report.md")
    with atomic_write(path) as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


def _hours(hist: list[dict]) -> str:
    """The median epoch time × epochs (robust to a run paused mid-epoch: that epoch's time counts
    the pause)."""
    if not hist or not all("epoch_s" in h for h in hist):
        return ""
    return f"{np.median([h['epoch_s'] for h in hist]) * len(hist) / 3600:.2f}"


def _run_row(raw: str, rel: str) -> dict:
    """One run's epochs, steps, how it stopped, hours and test Dice ("to run" if not finished)."""
    d = os.path.join(raw, rel)
    if not _finished(raw, rel):
        return {"run": rel, "epochs": "to run", "steps": "", "stopped": "", "hours": "", "test Dice": ""}
    rows = _csv(os.path.join(d, "per_case.csv"))
    hist = _jsonl(os.path.join(d, "metrics.jsonl"))
    capped = _capped(d)
    return {
        "run": f"[{rel}](raw/{rel})",
        "epochs": str(len(hist)) if hist else "",
        "steps": str(hist[-1].get("step", "")) if hist else "",
        "stopped": "" if capped is None else "at the cap" if capped else "early stopping",
        "hours": _hours(hist),
        "test Dice": f"{np.mean([float(r['dice_mean']) for r in rows]):.3f} ({len(rows)} cases)",
    }


def _provenance(cell: str) -> dict | None:
    """The ``provenance.json`` of the grid cell in folder ``cell`` (``None`` if not recorded)."""
    path = os.path.join(cell, "provenance.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _build(p: dict | None) -> tuple | None:
    """What a grid cell started from, given its provenance ``p``: ``(machine, sources, note)``
    (the code that ran it does not change the numbers and is listed apart), ``None`` if not
    recorded."""
    return None if p is None else (p["machine"], tuple(sorted(p["sources"].items())), p.get("note", ""))


def _short_code(code: str) -> str:
    return code[:7] + ("+changes" if code.endswith("+changes") else "")


def _wall_hours(p: dict | None) -> str:
    """A grid cell's wall time from its provenance ``p`` ("resumed" if it ran in more than one
    invocation, blank if not recorded)."""
    p = p or {}
    if "wall_s" not in p:
        return ""
    return "resumed" if p.get("resumed") else f"{p['wall_s'] / 3600:.2f}"


def _progress(raw: str, prereg: dict) -> list[str]:
    """Each pilot run's state (epochs, steps, how it stopped, test Dice; a replicate's threshold
    baseline beside its no-transfer run), the grid's cells finished per part and each finished
    cell's state (with its adaption stage, where it has one)."""
    rows = []
    for rel in pilot_plan(prereg):
        if rel.endswith("threshold"):
            rows[-1]["threshold test Dice"] = _run_row(raw, rel)["test Dice"] or "to run"
            continue
        rows.append(_run_row(raw, rel) | {"threshold test Dice": ""})
    counts: dict = defaultdict(lambda: [0, 0])
    grid_rows, builds, codes = [], {}, defaultdict(set)
    for part, f, r, name in grid_plan(prereg):
        rel = run_dir(f, r, name)
        counts[part][1] += 1
        counts[part][0] += _finished(raw, rel)
        if _finished(raw, rel):
            # a T-IMM cell's adaption stage is its fusion's (``<cell>_fused``)
            adaption = _jsonl(os.path.join(raw, run_dir(f, r, name + " fused"), "adaption_metrics.jsonl"))
            row = {"part": part, **_run_row(raw, rel), "adaption hours": _hours(adaption)}
            prov = _provenance(os.path.join(raw, rel))
            row["built"] = builds.setdefault(_build(prov), chr(ord("A") + len(builds)))
            codes[row["built"]].add(_short_code((prov or {}).get("code", "")))
            row["wall hours"] = _wall_hours(prov)
            grid_rows.append(row | {"adaption epochs": str(len(adaption)) if adaption else ""})
    legend = [
        f"- {letter}: "
        + (
            "not recorded"
            if key is None
            else f"{key[0]}, sources {', '.join(f'{n} {d:.4f}' for n, d in key[1])}, "
            f"code {', '.join(sorted(codes[letter]))}" + (f" ({key[2]})" if key[2] else "")
        )
        + f": {sum(r['built'] == letter for r in grid_rows)} cell(s)"
        for key, letter in builds.items()
    ]
    cols = ["run", "epochs", "steps", "stopped", "hours"]
    return [
        "## Progress",
        "",
        "The pilot's runs: the sources, then each fraction's replicates (no transfer, with the "
        "threshold baseline fitted on the same training cases); hours: the median epoch time × "
        "epochs (training and validation; without the test evaluation):",
        "",
        markdown_table(rows, [*cols, "test Dice", "threshold test Dice"]),
        "",
        "The grid's transfer cells finished: "
        + ", ".join(f"{part} {done} of {n}" for part, (done, n) in counts.items())
        + ".",
        "",
        *(
            [
                "Each finished cell (hours as above; a T-IMM cell's adaption stage beside its "
                "fine-tune; the Fishers and the test evaluation are not counted in those; wall hours: "
                "the whole cell, Fishers, fusion and evaluations included, where it ran in one "
                "invocation and recorded it):",
                "",
                markdown_table(
                    grid_rows,
                    ["part", *cols, "adaption epochs", "adaption hours", "wall hours", "test Dice", "built"],
                ),
                "",
                "Built: the machine and the sources' test Dice each cell started from, and the code "
                "that ran it (`provenance.json` beside its raw results). XLA's generated code "
                "differs between machines, so a grid continued on another machine starts from "
                "sources rebuilt there, accepted within the pre-registered "
                f"{prereg['sources_tolerance']} test Dice; the replicates of one arm may then differ "
                "in their sources too, and the intervals' replicate spread includes that:",
                "",
                *legend,
                "",
            ]
            if grid_rows
            else []
        ),
        *_rebuilds(raw, prereg),
    ]


def _rebuilds(raw: str, prereg: dict) -> list[str]:
    """The sources rebuilt on another machine (``raw/rebuilds/<source>_<Dice>/``), each with its
    test Dice against the committed one and whether it was accepted (within the tolerance)."""
    top = os.path.join(raw, "rebuilds")
    committed = {r["source"]: float(r["dice_mean"]) for r in _csv(os.path.join(raw, "sources.csv"))}
    rows = []
    for name in sorted(os.listdir(top)) if os.path.isdir(top) else []:
        with open(os.path.join(top, name, "summary.json")) as f:
            dice = json.load(f)["metrics"]["dice_mean"]["mean"]
        source = name.rsplit("_", 1)[0]
        diff = dice - committed[source]
        rows.append(
            {
                "rebuild": f"[rebuilds/{name}](raw/rebuilds/{name})",
                "epochs": str(len(_jsonl(os.path.join(top, name, "metrics.jsonl")))),
                "test Dice": f"{dice:.4f}",
                "committed": f"{committed[source]:.4f}",
                "difference": f"{diff:+.4f}",
                "verdict": "accepted"
                if abs(diff) <= prereg["sources_tolerance"]
                else "refused: no cell runs on it",
            }
        )
    if not rows:
        return []
    return [
        "Sources rebuilt on other machines (their results beside the committed ones, which the "
        f"gates read; accepted within the pre-registered {prereg['sources_tolerance']} test Dice):",
        "",
        markdown_table(rows, list(rows[0])),
        "",
    ]


def design_resolution(raw: str, prereg: dict) -> dict[float, tuple[int, float]]:
    """Per fraction with ≥ 2 no-transfer replicates: ``(replicates, half-width)`` of the
    pre-registered interval of no transfer against itself — an arm with no-transfer's spread over
    replicates and cases compared with a copy of it (a true difference of 0). A transfer effect
    much smaller than the half-width cannot be resolved by the grid, before any transfer cell runs."""
    st = prereg["statistics"]
    out = {}
    for (f, init), cell in sorted(cells(raw).items()):
        if init == "no_transfer" and len(cell) >= 2:
            m = _matrix(cell)[0]
            lo, hi, _ = stats.hierarchical_bootstrap(
                m, m, n_boot=st["n_boot"], level=st["level"], seed=st["seed"]
            )
            out[f] = (len(cell), (hi - lo) / 2)
    return out


def _design_resolution(raw: str, prereg: dict, *, complete: bool) -> list[str]:
    res = design_resolution(raw, prereg)
    if not res:
        return []
    return [
        "## What the grid can resolve (from the pilot)",
        "",
        "Half-width of the pre-registered interval of no transfer against a copy of itself (replicates "
        "resampled per arm, cases paired): if a transfer arm varies between replicates and cases as "
        "no transfer does, a difference much smaller than this cannot be told from 0"
        + ("" if complete else " (provisional: from the replicates finished so far)")
        + ": "
        + ", ".join(f"{f:.0%} ±{h:.3f} ({n} replicates)" for f, (n, h) in res.items())
        + ".",
        "",
    ]


def _sources_section(raw: str) -> list[str]:
    rows = _csv(os.path.join(raw, "sources.csv"))
    if not rows:
        return []
    cols = list(rows[0])
    return [
        "## Sources (test Dice on their own tasks, per class)",
        "",
        markdown_table(
            [
                {k: v if k in ("source", "task") or not v else _fmt(float(v)) for k, v in r.items()}
                for r in rows
            ],
            cols,
        ),
        "",
    ]


def _cells_section(raw: str, prereg: dict, *, claims: bool) -> list[str]:
    c = cells(raw)
    if not c:
        return []
    fractions = sorted({f for f, _ in c})
    inits = [
        *prereg["initialisations"],
        *prereg["all_hcp"]["sources"],
        *prereg["variants"]["settings"],
        "threshold",
    ]
    table = []
    for name in inits:
        row = {"initialisation": name}
        for f in fractions:
            cell = c.get((f, slug(name)))
            if cell:
                m = _matrix(cell)[0].mean(axis=1)
                sd = f" ± {m.std(ddof=1):.3f}" if len(m) > 1 else ""  # no sd of one replicate
                row[f"{f:.0%}"] = f"{m.mean():.3f}{sd} (n={len(m)})"
            else:
                row[f"{f:.0%}"] = ""
        if any(v for k, v in row.items() if k != "initialisation"):
            table.append(row)
    lines = [
        "## Table 2: test Dice (mean of ET, TC, WT), mean ± sd over replicates",
        "",
        markdown_table(table, ["initialisation", *[f"{f:.0%}" for f in fractions]]),
        "",
    ]
    st = prereg["statistics"]
    comp = []
    for claim in prereg["verdicts"]["claims"]:
        for fs in claim["fractions"]:
            a, b = c.get((float(fs), slug(claim["a"]))), c.get((float(fs), slug(claim["b"])))
            if not a or not b:
                continue
            ma, reps_a, cases = _matrix(a)
            mb, reps_b, _ = _matrix(b)
            lo, hi, _ = stats.hierarchical_bootstrap(
                ma, mb, n_boot=st["n_boot"], level=st["level"], seed=st["seed"]
            )
            per_rep = [
                f"{ma[reps_a.index(r)].mean() - mb[reps_b.index(r)].mean():+.3f}"
                for r in reps_a
                if r in reps_b
            ]
            planned = int(prereg["fractions"][fs])
            if not claims:
                word = "no claim (gate failed)"
            elif min(len(reps_a), len(reps_b)) < planned:  # the rule is for the whole design
                word = f"pending ({len(reps_a)} and {len(reps_b)} of {planned} replicates)"
            else:
                word = stats.verdict(lo, hi)
            comp.append(
                {
                    "claim": claim["claim"],
                    "fraction": f"{float(fs):.0%}",
                    "difference": f"{ma.mean() - mb.mean():+.3f}",
                    "95 % interval": f"[{lo:+.3f}, {hi:+.3f}]",
                    "per replicate": " ".join(per_rep),
                    "verdict": word,
                    "_half": (hi - lo) / 2,
                }
            )
    if comp:
        res = defaultdict(list)
        for x in comp:
            res[x["fraction"]].append(x.pop("_half"))
        lines += [
            "## Pre-registered comparisons",
            "",
            "Hierarchical bootstrap: replicates resampled per arm, test cases resampled paired. "
            + "A verdict is given once both arms have every pre-registered replicate; until then it "
            + "is pending and the interval provisional. "
            + "Smallest difference this design resolves (median half-width of the intervals): "
            + ", ".join(f"{k} {np.median(v):.3f}" for k, v in res.items())
            + ".",
            "",
            markdown_table(
                comp, ["claim", "fraction", "difference", "95 % interval", "per replicate", "verdict"]
            ),
            "",
        ]
    return lines


def _fused_raw(raw: str) -> dict:
    """``{(fraction, init slug): {replicate: raw dir of its fusion}}``."""
    out: dict = defaultdict(dict)
    root = os.path.join(raw, "runs")
    for fdir in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for rdir in sorted(os.listdir(os.path.join(root, fdir))):
            for name in sorted(os.listdir(os.path.join(root, fdir, rdir))):
                if name.endswith("_fused"):
                    out[(_fraction(fdir), name[: -len("_fused")])][int(rdir[3:])] = os.path.join(
                        root, fdir, rdir, name
                    )
    return dict(out)


def _best(hist: list[dict]) -> tuple[int, float]:
    """(epochs run, validation Dice of the best epoch) of a run's curve."""
    if not hist:
        return 0, math.nan
    best = min(hist, key=lambda h: (h["val_loss"], h["epoch"]))
    return len(hist), float(best.get("val_dice_mean", math.nan))


def _mean_sd(xs, digits: int = 3) -> str:
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return ""
    return f"{np.mean(xs):.{digits}f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.{digits}f}"


def _table3(raw: str) -> list[str]:
    """T-IMM's two stages per fraction: epochs and best validation Dice (paper Table 3)."""
    fused = _fused_raw(raw)
    rows = []
    for (f, init), reps in sorted(fused.items()):
        if init != "timm":
            continue
        ad = [_best(_jsonl(os.path.join(d, "adaption_metrics.jsonl"))) for d in reps.values()]
        ft = [
            _best(
                _jsonl(
                    os.path.join(raw, "runs", f"f{round(f * 100):03d}", f"rep{r}", "timm", "metrics.jsonl")
                )
            )
            for r in reps
        ]
        rows.append(
            {
                "fraction": f"{f:.0%}",
                "replicates": len(reps),
                "adaption epochs": _mean_sd([float(e) for e, _ in ad], digits=0),
                "adaption val Dice": _mean_sd([d for _, d in ad]),
                "fine-tuning epochs": _mean_sd([float(e) for e, _ in ft if e], digits=0),
                "fine-tuning val Dice": _mean_sd([d for e, d in ft if e]),
            }
        )
    if not rows:
        return []
    cols = list(rows[0])
    return ["## Table 3: T-IMM's stages (mean ± sd over replicates)", "", markdown_table(rows, cols), ""]


def _forgetting_value(path: str, task: str) -> float:
    if not os.path.isfile(path):
        return math.nan
    with open(path) as f:
        v = json.load(f).get(task)
    return float(v["mean"]) if isinstance(v, dict) else math.nan


def _table4(raw: str) -> list[str]:
    """Forgetting (paper Table 4): the transferable weights of each model with M1's task-specific
    leaves on task 1's test cases and M2's on task 2's. IMM and mean-IMM are one model whatever
    the replicate (their fused transferable weights do not depend on it): counted once per build
    of the sources the cells started from (:func:`_build`)."""
    rows = []
    for name in ("m1", "m2"):
        path = os.path.join(raw, "sources", name, "forgetting.json")
        if os.path.isfile(path):
            rows.append(
                {
                    "weights": name.upper(),
                    "models": 1,
                    "task 1 (M1 heads)": _forgetting_value(path, "m1"),
                    "task 2 (M2 heads)": _forgetting_value(path, "m2"),
                }
            )
    fused = _fused_raw(raw)
    for init, label in (("imm", "IMM"), ("meanimm", "mean-IMM"), ("timm", "T-IMM (after adaption)")):
        paths = []
        for (_, name), reps in sorted(fused.items()):
            if name != init:
                continue
            paths += [os.path.join(d, "forgetting.json") for d in reps.values()]
        if init in ("imm", "meanimm"):  # one per build: the first cell's of each
            one = {_build(_provenance(os.path.dirname(p)[: -len("_fused")])): p for p in reversed(paths)}
            paths = sorted(one.values())
        if paths:
            t1 = [_forgetting_value(p, "m1") for p in paths]
            t2 = [_forgetting_value(p, "m2") for p in paths]
            rows.append(
                {
                    "weights": label,
                    "models": len(paths),
                    "task 1 (M1 heads)": _mean_sd(t1),
                    "task 2 (M2 heads)": _mean_sd(t2),
                }
            )
    if not rows:
        return []
    cols = ["weights", "models", "task 1 (M1 heads)", "task 2 (M2 heads)"]
    return [
        "## Table 4: forgetting (mean test Dice; ± sd over the fused models)",
        "",
        markdown_table(rows, cols),
        "",
    ]


def _convergence(raw: str) -> list[str]:
    runs = []
    root = os.path.join(raw, "runs")
    for dirpath, _, files in os.walk(root):
        if "metrics.jsonl" in files and "config.json" in files:
            runs.append(dirpath)
    for name in (
        os.listdir(os.path.join(raw, "sources")) if os.path.isdir(os.path.join(raw, "sources")) else []
    ):
        runs.append(os.path.join(raw, "sources", name))
    capped = [r for r in runs if _capped(r)]
    if not runs:
        return []
    lines = [
        "## Convergence",
        "",
        f"{len(capped)} of {len(runs)} runs stopped at their step cap (the others early-stopped on the "
        "validation loss)"
        + (": " + ", ".join(os.path.relpath(r, raw) for r in capped) if capped else "")
        + ".",
        "",
    ]
    return lines


def _fisher_section(raw: str) -> list[str]:
    rows = _csv(os.path.join(raw, "fisher_diagnostics.csv"))
    if not rows:
        return []
    cols = list(rows[0])
    return [
        "## Fisher diagnostics (M1 vs M2, per transferable layer)",
        "",
        "Share of M1 in the layer's Fisher mass, the median over the layer's elements of M1's share "
        "F₁ / (F₁ + F₂), and where the IMM-fused weights lie between the sources (median over elements "
        "of (θ − θ₂) / (θ₁ − θ₂): 1 = M1's weight, 0 = M2's), with the Fishers as they are and normalised "
        "per layer (`--fisher_normalisation=layer`).",
        "",
        markdown_table(
            [{k: v if k == "layer" else _fmt(float(v)) for k, v in r.items()} for r in rows], cols
        ),
        "",
    ]


def _figures(out: str, raw: str, prereg: dict) -> list[str]:
    """The learning curve of every initialisation, the per-case differences of T-IMM (Fig. 4) and
    the learned ratios (Fig. 5), as PNGs in ``out/figures``."""
    from matplotlib.figure import Figure

    c = cells(raw)
    if not c:
        return []
    fig_dir = os.path.join(out, "figures")
    lines = ["## Figures", ""]
    fractions = sorted({f for f, _ in c})
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name in [*prereg["initialisations"], "threshold"]:
        xs, ys, es = [], [], []
        for f in fractions:
            cell = c.get((f, slug(name)))
            if cell:
                m = _matrix(cell)[0].mean(axis=1)
                xs.append(f * 100)
                ys.append(m.mean())
                es.append(m.std(ddof=1) if len(m) > 1 else 0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("% of the tumour pool")
    ax.set_ylabel("test Dice (mean ± sd over replicates)")
    ax.legend(fontsize=7)
    _save(fig, os.path.join(fig_dir, "learning_curve.png"))
    lines += [
        "![learning curves](figures/learning_curve.png)",
        "",
        "*Test Dice against the data fraction.*",
        "",
    ]
    others = [n for n in prereg["initialisations"] if n != "T-IMM"]
    diffs = {}
    for f in fractions:
        t = c.get((f, "timm"))
        if not t:
            continue
        mt = _matrix(t)[0].mean(axis=0)
        for n in others:
            o = c.get((f, slug(n)))
            if o:
                diffs[f"{f:.0%} vs {n}"] = mt - _matrix(o)[0].mean(axis=0)
    if diffs:
        fig = Figure(figsize=(max(6, 0.6 * len(diffs)), 4))
        ax = fig.subplots()
        ax.boxplot(list(diffs.values()), showfliers=False)
        ax.set_xticks(range(1, len(diffs) + 1), list(diffs))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("T-IMM − other, per test case (replicate means)")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        _save(fig, os.path.join(fig_dir, "per_case_differences.png"))
        lines += [
            "![per-case differences](figures/per_case_differences.png)",
            "",
            "*Per test case, T-IMM's Dice minus each other initialisation's (averaged over replicates; "
            "cf. paper Fig. 4).*",
            "",
        ]
    ratios = defaultdict(list)
    for (f, init), reps in _fused_raw(raw).items():
        if init != "timm":
            continue
        for d in reps.values():
            p = os.path.join(d, "mixing_ratios.json")
            if os.path.isfile(p):
                with open(p) as fh:
                    r = json.load(fh)["ratios"]
                ratios[f].append({k: v[0] for k, v in r.items()})
    if ratios:
        fig = Figure(figsize=(6, 6))
        ax = fig.subplots()
        for f, runs in sorted(ratios.items()):
            layers = list(runs[0])
            m = np.array([[run[k] for k in layers] for run in runs])
            ax.errorbar(
                m.mean(0), np.arange(len(layers)), xerr=m.std(0), marker="o", capsize=2, label=f"{f:.0%}"
            )
        ax.set_yticks(np.arange(len(layers)), layers, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("learned ratio of M1 (M2: 1 − it), mean ± sd over replicates")
        ax.legend(fontsize=7)
        _save(fig, os.path.join(fig_dir, "mixing_ratios.png"))
        lines += [
            "![mixing ratios](figures/mixing_ratios.png)",
            "",
            "*T-IMM's learned ratios per layer (cf. paper Fig. 5).*",
            "",
        ]
    return lines


def _save(fig, path: str) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
