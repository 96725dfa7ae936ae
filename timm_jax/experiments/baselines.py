"""Non-learning baseline: the best global intensity threshold rule per output channel.

    python -m timm_jax.experiments.baselines --data_dir=DIR/brats --layout=brats --task_key=task3 \\
        [--fraction=1.0] [--split=test] [--out=OUT]

For each output channel of the task (WT / TC / ET of the tumour task, or each parcellation class)
one rule ``lo < image[..., c] <= hi`` on one input channel ``c`` (``lo = -inf`` gives a ``<=``
threshold, ``hi = +inf`` a ``>`` threshold) is chosen to maximise the mean Dice over the training
cases, and applied unchanged to the cases of ``--split``. The images are the ones the networks see
(the same preprocessing and normalisation, ``--normalisation``); candidate thresholds are
``n_bins`` quantiles of the training voxels of each input channel (bins exactly: every rule
between candidate thresholds is scored by its exact Dice on every training case). Writes
``per_case.csv`` and ``summary.json`` in the evaluation's format (``dice_<channel>``, ``dice_mean``)
and ``rules.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags

from timm_jax.atomic import atomic_write
from timm_jax.config import EvalConfig

__all__ = ["ThresholdRule", "candidate_edges", "fit_threshold_rules", "apply_rules", "evaluate_rules", "main"]


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
    """Predict ``lo < image[..., channel] <= hi``; ``train_dice`` is the mean training Dice."""

    channel: int
    lo: float
    hi: float
    train_dice: float

    def predict(self, image: np.ndarray) -> np.ndarray:
        x = image[..., self.channel]
        return (x > self.lo) & (x <= self.hi)

    def describe(self, names: Sequence[str] | None = None) -> str:
        c = names[self.channel] if names else f"channel {self.channel}"
        if np.isinf(self.lo):
            return f"{c} <= {self.hi:.4g}"
        if np.isinf(self.hi):
            return f"{c} > {self.lo:.4g}"
        return f"{self.lo:.4g} < {c} <= {self.hi:.4g}"


def candidate_edges(images: Sequence[np.ndarray], n_bins: int = 64, sample: int = 20000) -> list[np.ndarray]:
    """Per input channel: ``-inf``, the distinct quantiles ``0, 1/n_bins, ..., (n_bins-1)/n_bins`` of
    (a seeded sample of) the voxels of ``images`` (each ``(D, H, W, C)``), ``+inf``."""
    rng = np.random.default_rng(0)
    n_ch = images[0].shape[-1]
    out = []
    for c in range(n_ch):
        vals = []
        for img in images:
            flat = img[..., c].reshape(-1)
            vals.append(flat if flat.size <= sample else flat[rng.integers(0, flat.size, sample)])
        # the top quantile is left to +inf: a rule reaching the training maximum is a ``>`` rule
        q = np.unique(np.quantile(np.concatenate(vals), np.linspace(0, 1, n_bins + 1)[:-1]))
        out.append(np.concatenate([[-np.inf], q, [np.inf]]))
    return out


def _interval_dice(x: np.ndarray, truth: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Dice of ``edges[i] < x <= edges[j]`` for every ``i < j`` (``(E, E)``, 0 where ``i >= j``)."""
    # bin b holds edges[b] < x <= edges[b + 1]; cumulative counts over bins give every interval
    b = np.clip(np.searchsorted(edges, x.reshape(-1), side="left") - 1, 0, len(edges) - 2)
    n_all = np.bincount(b, minlength=len(edges) - 1)
    n_fg = np.bincount(b, weights=truth.reshape(-1).astype(np.float64), minlength=len(edges) - 1)
    c_all = np.concatenate([[0], np.cumsum(n_all)])
    c_fg = np.concatenate([[0], np.cumsum(n_fg)])
    pred = c_all[None, :] - c_all[:, None]
    tp = c_fg[None, :] - c_fg[:, None]
    g = float(truth.sum())
    denom = pred + g
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1e-12), 1.0)
    return np.triu(dice, k=1)


def fit_threshold_rules(
    images: Sequence[np.ndarray], targets: Sequence[np.ndarray], n_bins: int = 64
) -> list[ThresholdRule]:
    """One rule per output channel of ``targets`` (each ``(D, H, W, K)``), maximising the mean Dice
    over the cases; ties go to the first input channel and the lowest thresholds."""
    edges = candidate_edges(images, n_bins)
    n_out = targets[0].shape[-1]
    rules = []
    for k in range(n_out):
        best = None
        for c, e in enumerate(edges):
            mean = np.zeros((len(e), len(e)))
            for img, t in zip(images, targets):
                mean += _interval_dice(img[..., c], t[..., k] > 0.5, e)
            mean /= len(images)
            i, j = np.unravel_index(np.argmax(mean), mean.shape)
            if best is None or mean[i, j] > best.train_dice + 1e-12:
                best = ThresholdRule(channel=c, lo=float(e[i]), hi=float(e[j]), train_dice=float(mean[i, j]))
        rules.append(best)
    return rules


def apply_rules(rules: Sequence[ThresholdRule], image: np.ndarray) -> np.ndarray:
    """``(D, H, W, K)`` 0/1 predictions of the rules on one image."""
    return np.stack([r.predict(image) for r in rules], axis=-1).astype(np.float32)


def evaluate_rules(
    rules: Sequence[ThresholdRule], cases, ids: Sequence[str], task, spacing_hd95: bool = False
) -> list[dict]:
    """Per-case rows like the evaluation's (``case``, ``dice_<channel>``, ``dice_mean``)."""
    from timm_jax.training.metrics import evaluate_case

    rows = []
    for cid, case in zip(ids, cases):
        probs = apply_rules(rules, case.image)
        rows.append(
            {
                "case": cid,
                **evaluate_case(
                    probs,
                    task.targets(case.labels),
                    task.channel_names,
                    spacing=case.spacing,
                    compute_hd95=spacing_hd95,
                ),
            }
        )
    return rows


def run_baseline(spec, split: str = EvalConfig.split, out: str = "", n_bins: int = 64) -> dict:
    """Fit on ``spec``'s training cases (its fraction), evaluate on ``split``; returns the summary."""
    from timm_jax.data.spec import resolve
    from timm_jax.training.metrics import write_results

    data = resolve(spec)
    train = data.load(data.train_ids)
    targets = [data.task.targets(c.labels) for c in train]
    rules = fit_threshold_rules([c.image for c in train], targets, n_bins)
    del targets
    del train
    ids = data.splits[split]
    rows = evaluate_rules(rules, data.load(ids), ids, data.task)
    modalities = data.info.modalities
    described = {
        name: {**dataclasses.asdict(r), "rule": r.describe(modalities)}
        for name, r in zip(data.task.channel_names, rules)
    }
    extra = {
        "baseline": "best global intensity threshold per channel",
        "train_cases": len(data.train_ids),
        "split": split,
        "rules": described,
    }
    out = out or os.path.join(os.path.dirname(os.path.abspath(spec.data_dir)), "baseline_threshold")
    os.makedirs(out, exist_ok=True)
    summary = write_results(rows, os.path.join(out, "per_case.csv"), os.path.join(out, "summary.json"), extra)
    with atomic_write(os.path.join(out, "rules.json")) as f:
        readable = {k: {**v, "lo": str(v["lo"]), "hi": str(v["hi"])} for k, v in described.items()}
        json.dump(readable, f, indent=1)
    return summary


def _define(fv) -> None:
    flags.DEFINE_string("data_dir", None, "Root of the data layout.", flag_values=fv)
    flags.mark_flag_as_required("data_dir", flag_values=fv)
    flags.DEFINE_enum("layout", "brats", ["brats", "parcellation"], "Data layout.", flag_values=fv)
    flags.DEFINE_string("task_key", "task3", "Task of the demo manifest.", flag_values=fv)
    flags.DEFINE_float("fraction", 1.0, "Fraction of the pool (as train.py).", flag_values=fv)
    flags.DEFINE_integer("split_seed", 0, "Seed of the split and fraction (as train.py).", flag_values=fv)
    flags.DEFINE_enum("normalisation", "histogram", ["histogram", "zscore"], "As train.py.", flag_values=fv)
    flags.DEFINE_string("split", "test", "Split to evaluate on.", flag_values=fv)
    flags.DEFINE_integer("n_bins", 64, "Quantile bins of candidate thresholds.", flag_values=fv)
    flags.DEFINE_string(
        "out", "", "Output folder (default <data_dir>/../baseline_threshold).", flag_values=fv
    )


def main(argv: Sequence[str] | None = None) -> int:
    from timm_jax import cli
    from timm_jax.data.spec import DataSpec

    fv = cli.parse_command("python -m timm_jax.experiments.baselines", __doc__.split("\n")[0], _define, argv)
    if isinstance(fv, int):
        return fv
    spec = DataSpec(
        data_dir=fv.data_dir,
        layout=fv.layout,
        task_key=fv.task_key,
        fraction=fv.fraction,
        split_seed=fv.split_seed,
        normalisation=fv.normalisation,
    )
    summary = run_baseline(spec, fv.split, fv.out, fv.n_bins)
    m = summary["metrics"]
    chans = [k for k in m if k.startswith("dice_") and k != "dice_mean"]
    print(
        f"threshold baseline on {fv.split} ({summary['n_cases']} cases): mean Dice "
        f"{m['dice_mean']['mean']:.3f} " + " ".join(f"{k[5:]} {m[k]['mean']:.3f}" for k in chans)
    )
    for name, r in summary["extra"]["rules"].items():
        print(f"  {name}: {r['rule']} (train Dice {r['train_dice']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
