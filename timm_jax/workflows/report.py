"""Figures and a Markdown report of an experiment.

Figures are drawn on :class:`matplotlib.figure.Figure` objects and saved as PNG; the global
pyplot state and backend are never touched, so calling these from a notebook leaves its
backend alone.


* :func:`plot_mixing_ratios` — stacked bars of the mixing ratio α_t of every source model
  per transferable layer, like Figure 5 of the T-IMM paper (Appendix B).
* :func:`plot_per_case` — per-case Dice of several methods, and the paired per-case Dice
  difference of a reference method over the others with cases sorted by the reference's
  Dice, like Figure 4 of the paper (Appendix A).
* :func:`plot_prediction` — the slice with the most foreground: image, ground truth and
  prediction overlays.
* :func:`markdown_table`, :func:`write_report` — a report.md with a table and figures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from timm_jax.atomic import atomic_write

__all__ = [
    "markdown_table",
    "read_csv",
    "write_csv",
    "plot_mixing_ratios",
    "plot_per_case",
    "plot_prediction",
    "write_report",
]


def _save(fig: Figure, png_path: str) -> str:
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    return os.fspath(png_path)


def plot_mixing_ratios(
    ratios: Mapping[str, Sequence[float]],
    source_names: Sequence[str],
    png_path: str,
    spread: Mapping[str, Sequence[float]] | None = None,
) -> str:
    """Stacked horizontal bars of the mixing ratios per layer (paper Figure 5).

    One bar per transferable layer, top to bottom in the given (network) order; bar ``i``
    is split into segments of length ``α_t^i`` for the sources ``t`` in ``source_names``
    order (the ratios of a layer sum to 1 after the merge's normalisation). A dashed line
    marks the uniform mixture's boundaries (plain IMM, α = 1/T). Returns ``png_path``.

    ``spread`` (channel granularity: ``ratios`` then holds each layer's mean over its output
    channels) gives per layer and source a standard deviation over the channels, drawn as an
    error bar (± sd) at the end of each source's segment.

    Raises:
      ValueError: if there are no layers or a layer's list length is not ``len(source_names)``.
    """
    names = list(ratios)
    sources = list(source_names)
    if not names:
        raise ValueError("plot_mixing_ratios: no layers given")
    if not sources:
        raise ValueError("plot_mixing_ratios: no source names given")
    alpha = np.zeros((len(names), len(sources)), np.float64)
    for i, n in enumerate(names):
        row = np.asarray(ratios[n], dtype=np.float64).reshape(-1)
        if row.size != len(sources):
            raise ValueError(
                f"plot_mixing_ratios: layer {n!r} has {row.size} ratios, expected one per "
                f"source ({len(sources)}: {sources})"
            )
        alpha[i] = row
    height = max(2.5, 0.28 * len(names) + 1.2)
    fig = Figure(figsize=(7.5, height))
    ax = fig.subplots()
    y = np.arange(len(names))
    left = np.zeros(len(names))
    colors = matplotlib.colormaps["tab10"]
    for t, src in enumerate(sources):
        ax.barh(y, alpha[:, t], left=left, color=colors(t % 10), edgecolor="white", linewidth=0.5, label=src)
        left += alpha[:, t]
    if spread is not None:
        sd = np.asarray([np.asarray(spread[n], np.float64).reshape(-1) for n in names])
        if sd.shape != alpha.shape:
            raise ValueError(f"plot_mixing_ratios: spread has shape {sd.shape}, ratios {alpha.shape}")
        ends = np.cumsum(alpha, axis=1)
        for t in range(len(sources) - 1):
            ax.errorbar(ends[:, t], y, xerr=sd[:, t], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    for t in range(1, len(sources)):
        ax.axvline(t / len(sources), color="black", linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.0, float(left.max())))
    ax.set_xlabel("mixing ratio α")
    ax.set_title(
        "Mixing ratio of each source model per layer"
        + ("\n(mean over output channels; bars: ± sd over channels)" if spread is not None else "")
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="source")
    return _save(fig, png_path)


def plot_per_case(
    per_method: Mapping[str, Sequence[float]], png_path: str, baseline: str | None = None
) -> str:
    """Per-case comparison of methods (paper Figure 4). Returns ``png_path``.

    Left panel: the distribution of per-case mean Dice of every method (box plot with the
    individual cases overlaid as jittered points; nan cases are left out).
    Right panel (when ``baseline`` names a method): for every other method ``m`` the paired
    difference ``Dice_baseline(case) - Dice_m(case)`` per case, with the cases sorted in
    ascending order of the baseline's Dice, as in the paper where the baseline is T-IMM.

    Raises:
      ValueError: if no methods are given, the methods have different numbers of cases, or
        ``baseline`` is not one of the methods.
    """
    methods = list(per_method)
    if not methods:
        raise ValueError("plot_per_case: no methods given")
    values = {m: np.asarray(per_method[m], dtype=np.float64).reshape(-1) for m in methods}
    n = {m: v.size for m, v in values.items()}
    if len(set(n.values())) != 1:
        raise ValueError(f"plot_per_case: methods have different numbers of cases: {n}")
    if baseline is not None and baseline not in values:
        raise ValueError(f"plot_per_case: baseline {baseline!r} is not one of the methods {methods}")
    others = [m for m in methods if m != baseline]
    paired = baseline is not None and bool(others)
    fig = Figure(figsize=(12 if paired else 6, 4.2))
    axes = fig.subplots(1, 2 if paired else 1, squeeze=False)
    colors = matplotlib.colormaps["tab10"]

    ax = axes[0, 0]
    data = [values[m][np.isfinite(values[m])] for m in methods]
    ax.boxplot(data, showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data):
        x = i + 1 + rng.uniform(-0.12, 0.12, size=d.size)
        ax.scatter(x, d, s=12, color=colors(i % 10), alpha=0.8, zorder=3)
    ax.set_xticks(np.arange(1, len(methods) + 1))
    ax.set_xticklabels(methods, rotation=20, ha="right")
    ax.set_ylabel("mean Dice per case")
    ax.set_title("Per-case Dice")

    if paired:
        ax = axes[0, 1]
        base = values[baseline]
        order = np.argsort(np.where(np.isfinite(base), base, np.inf), kind="stable")
        x = np.arange(base.size)
        width = 0.8 / len(others)
        for j, m in enumerate(others):
            diff = (base - values[m])[order]
            ax.bar(
                x - 0.4 + (j + 0.5) * width,
                diff,
                width=width,
                color=colors((methods.index(m)) % 10),
                label=f"vs {m}",
            )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"case (sorted by {baseline} Dice, ascending)")
        ax.set_ylabel(f"Dice({baseline}) − Dice(method)")
        ax.set_title(f"Per-case Dice increase of {baseline}")
        if base.size <= 30:
            ax.set_xticks(x)
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _save(fig, png_path)


def _overlay_cmap(max_label: int) -> ListedColormap:
    base = matplotlib.colormaps["tab10" if max_label <= 10 else "tab20"]
    return ListedColormap([base(i % base.N) for i in range(max(max_label, 1))])


def plot_prediction(image: Any, truth: Any, pred: Any, png_path: str, title: str = "", axis: int = 2) -> str:
    """Three panels of one slice: image, ground-truth overlay, prediction overlay.

    The slice is the one along ``axis`` with the most ground-truth foreground (label > 0;
    if the truth is empty, the prediction's; if both are empty, the middle slice). The
    default ``axis=2`` is the axial slice of arrays in nibabel's (x, y, z) voxel order;
    pass ``axis=0`` for depth-first arrays. Labels share one colour per value in both
    overlays; background is transparent. Returns ``png_path``.

    Raises:
      ValueError: if the three arrays are not 3-D of one shape.
    """
    image = np.asarray(image, dtype=np.float32)
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if image.ndim != 3 or truth.shape != image.shape or pred.shape != image.shape:
        raise ValueError(
            f"plot_prediction: image, truth and pred must be 3-D of one shape; got "
            f"{image.shape}, {truth.shape}, {pred.shape}"
        )
    if axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"plot_prediction: axis must be 0, 1 or 2, got {axis}")
    axis = axis % 3
    other = tuple(a for a in range(3) if a != axis)
    fg = (truth > 0).sum(axis=other)
    if fg.max() == 0:
        fg = (pred > 0).sum(axis=other)
    idx = int(np.argmax(fg)) if fg.max() > 0 else image.shape[axis] // 2

    def take(a):
        return np.take(a, idx, axis=axis).T  # rows = second in-plane axis, shown with origin lower

    img, tru, prd = take(image), take(truth).astype(np.int64), take(pred).astype(np.int64)
    max_label = int(max(truth.max(initial=0), pred.max(initial=0), 1))
    cmap = _overlay_cmap(max_label)
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 3)
    for ax, lab, name in zip(axes, (None, tru, prd), ("image", "ground truth", "prediction")):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
        if lab is not None:
            masked = np.ma.masked_where(lab <= 0, lab)
            ax.imshow(
                masked,
                cmap=cmap,
                vmin=0.5,
                vmax=max_label + 0.5,
                alpha=0.5,
                origin="lower",
                interpolation="nearest",
            )
        ax.set_title(name)
        ax.axis("off")
    axis_name = "xyz"[axis]
    fig.suptitle(f"{title}  ({axis_name} = {idx})".strip())
    fig.tight_layout()
    return _save(fig, png_path)


def _fmt(v: Any, floatfmt: str) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return "n/a" if math.isnan(f) else format(f, floatfmt)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], floatfmt: str = ".3f") -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns`` (in that order).

    Floats are formatted with ``floatfmt`` (nan as ``n/a``), integers and strings as is
    (``|`` escaped), missing keys and ``None`` as empty cells. Numeric columns (every
    present value a number) are right-aligned. Returns the table without a trailing newline.
    """
    columns = list(columns)
    if not columns:
        raise ValueError("markdown_table: no columns given")

    def numeric(c):
        vals = [r[c] for r in rows if r.get(c) is not None]
        return bool(vals) and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            for v in vals
        )

    header = "| " + " | ".join(_fmt(c, floatfmt) for c in columns) + " |"
    sep = "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"
    lines = [header, sep]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), floatfmt) for c in columns) + " |")
    return "\n".join(lines)


def write_report(
    path: str,
    *,
    title: str,
    intro: str,
    table_md: str,
    figures: Sequence[tuple[str, str]],
    notes: str,
) -> None:
    """Writes a Markdown report to ``path``.

    Layout: ``# title``, the ``intro`` paragraph(s), ``## Results`` with ``table_md``,
    ``## Figures`` with one ``![caption](png)`` image link and an italic caption per
    ``(caption, relative png path)`` entry, and ``## Notes`` with ``notes`` (sections with
    empty content are left out). Parent directories are created.
    """
    parts: list[str] = [f"# {title}".rstrip(), ""]
    if intro and intro.strip():
        parts += [intro.strip(), ""]
    if table_md and table_md.strip():
        parts += ["## Results", "", table_md.strip(), ""]
    if figures:
        parts += ["## Figures", ""]
        for caption, png in figures:
            parts += [f"![{caption}]({png})", "", f"*{caption}*", ""]
    if notes and notes.strip():
        parts += ["## Notes", "", notes.strip(), ""]
    with atomic_write(path) as f:
        f.write("\n".join(parts).rstrip() + "\n")


def prediction_slice(image: Any, truth: Any, pred: Any) -> np.ndarray:
    """An (H, 3W, 3) float image for TensorBoard: one slice (the axial one with the most reference
    foreground) of ``image`` in grey, then with the reference labels, then with the predicted
    labels overlaid (one colour per label value)."""
    image, truth, pred = np.asarray(image, np.float32), np.asarray(truth), np.asarray(pred)
    fg = (truth > 0).sum(axis=(0, 1))
    z = int(np.argmax(fg)) if fg.max() > 0 else image.shape[2] // 2
    img = image[:, :, z].T[::-1]
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    grey = np.repeat(np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)[..., None], 3, axis=-1)
    colours = matplotlib.colormaps["tab10"](np.arange(10))[:, :3]

    def overlay(labels):
        lab = labels[:, :, z].T[::-1].astype(np.int64)
        out = grey.copy()
        mask = lab > 0
        out[mask] = 0.5 * out[mask] + 0.5 * colours[lab[mask] % 10]
        return out

    return np.concatenate([grey, overlay(truth), overlay(pred)], axis=1)


def read_csv(path: str) -> list[dict]:
    """The rows of a CSV file as dicts (``[]`` if the file does not exist)."""
    import csv

    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as a CSV file (the union of their keys as columns, in first-seen order; floats with
    6 decimals), written atomically."""
    import csv

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with atomic_write(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
