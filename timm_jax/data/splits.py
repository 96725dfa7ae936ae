"""Seeded train / validation / test splits and nested training-data fractions.

All functions sort the case ids first, so the result depends only on the set of ids and the seed,
never on the order in which the ids were listed.

Fractions follow the T-IMM paper's Table 1: a fraction is of the whole *pool* of annotated cases
(training + validation), and the cases it keeps are split 80 / 20 into training and validation —
4 % of 255 = 10 cases (8 / 2), 8 % = 20 (16 / 4). One seeded permutation of the pool is drawn and
fraction ``f`` keeps its first ``round(f n)`` cases, so a smaller fraction is always a subset of a
larger one (:func:`fraction_split`). Fraction 1 is the split itself (the paper's 215 / 40).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from timm_jax.atomic import atomic_write
from timm_jax.config import DataSpec

__all__ = [
    "make_splits",
    "splits_from_manifest",
    "save_splits",
    "load_splits",
    "fraction_subset",
    "fraction_count",
    "fraction_split",
]

_SPLITS = ("train", "val", "test")


def _permuted(ids: Iterable[str], seed: int, salt: int) -> list[str]:
    ids = sorted(set(ids))
    rng = np.random.default_rng([int(seed), salt])
    return [ids[i] for i in rng.permutation(len(ids))]


def make_splits(
    case_ids: Sequence[str],
    seed: int = DataSpec.split_seed,
    val_fraction: float = DataSpec.val_fraction,
    test_fraction: float = DataSpec.test_fraction,
) -> dict[str, list[str]]:
    """Deterministic seeded split into ``{"train", "val", "test"}`` (each list sorted).

    Validation and test get ``round(fraction * n)`` cases each, at least one when the fraction is
    positive, and training keeps at least one case.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("fractions must be in [0, 1) and sum to less than 1")
    order = _permuted(case_ids, seed, salt=1)
    n = len(order)
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case ids must be unique")

    def count(frac):
        return 0 if frac == 0 else max(1, int(round(frac * n)))

    n_test, n_val = count(test_fraction), count(val_fraction)
    if n_test + n_val >= n:
        raise ValueError(
            f"{n} case(s) are too few for val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    return {
        "train": sorted(order[n_test + n_val :]),
        "val": sorted(order[n_test : n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def splits_from_manifest(manifest: Mapping[str, Any], task_key: str) -> dict[str, list[str]]:
    """The ``{"train", "val", "test"}`` case ids recorded for ``task_key`` in a demo manifest."""
    if task_key in manifest.get("splits", {}):
        return {k: sorted(manifest["splits"][task_key][k]) for k in _SPLITS}
    out: dict[str, list[str]] = {s: [] for s in _SPLITS}
    for case in manifest["cases"]:
        if case["task"] == task_key:
            out[case["split"]].append(case["id"])
    if not any(out.values()):
        raise KeyError(f"manifest has no cases for task {task_key!r}")
    return {k: sorted(v) for k, v in out.items()}


def save_splits(path: str | os.PathLike, splits: Mapping[str, Sequence[str]], **extra: Any) -> Path:
    """Write splits (and any extra JSON-able provenance, e.g. ``seed=0``) to a JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: list(v) for k, v in splits.items()}
    if extra:
        payload["_meta"] = extra
    with atomic_write(path) as f:
        f.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def load_splits(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read splits written by :func:`save_splits` (provenance under ``"_meta"`` is dropped)."""
    data = json.loads(Path(path).read_text())
    return {k: list(v) for k, v in data.items() if not k.startswith("_")}


def fraction_count(n: int, fraction: float) -> int:
    """Number of cases kept by :func:`fraction_subset`: ``max(1, round(fraction * n))``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(n, max(1, int(round(fraction * n))))


def fraction_subset(train_ids: Sequence[str], fraction: float, seed: int = DataSpec.split_seed) -> list[str]:
    """A seeded ``fraction`` of ``train_ids`` (sorted; at least one case), nested across fractions."""
    order = _permuted(train_ids, seed, salt=2)
    if not order:
        raise ValueError("no training cases")
    return sorted(order[: fraction_count(len(order), fraction)])


def fraction_split(
    splits: Mapping[str, Sequence[str]],
    fraction: float,
    seed: int = DataSpec.split_seed,
    val_share: float = 0.2,
) -> tuple[list[str], list[str]]:
    """``(train, val)`` ids of a ``fraction`` of the pool ``splits["train"] + splits["val"]``.

    Fraction 1 returns the split's own train and val. A smaller fraction keeps the first
    ``n = max(2, round(fraction * |pool|))`` cases of a seeded permutation of the pool (nested across
    fractions) and takes the last ``max(1, round(val_share * n))`` of them for validation.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return sorted(splits["train"]), sorted(splits["val"])
    order = _permuted([*splits["train"], *splits["val"]], seed, salt=2)
    if len(order) < 2:
        raise ValueError(f"a pool of {len(order)} case(s) cannot give training and validation cases")
    n = max(2, fraction_count(len(order), fraction))
    n_val = max(1, int(round(val_share * n)))
    subset = order[:n]
    return sorted(subset[: n - n_val]), sorted(subset[n - n_val :])
