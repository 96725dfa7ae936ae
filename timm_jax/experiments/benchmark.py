"""The benchmark that asks "does T-IMM help?": a pre-registered pilot with gates, then the grid.

    python -m timm_jax.experiments.benchmark --out=DIR --stage=pilot|sources|grid|report
        [--prereg=docs/benchmark/preregistration.json] [--shard=K/N] [--quick]

Everything it runs is fixed by the pre-registration file (``--prereg``; the repository's is
``docs/benchmark/preregistration.json``): the data generator and its seed, the network, the
schedule rules, the replicates, the initialisations, the gates, the statistics and the verdict
rules. The file is committed before any transfer cell runs; the report states its commit.

* ``--stage=pilot`` — the sources (M1, M2) and, at every fraction and replicate, the *no transfer*
  cell and the non-learning threshold baseline: only what the gates need, nothing that compares
  the methods. The gates (``gates`` of the file): G1 the sources reach a test Dice, G2 no transfer
  at 100 % beats no transfer at the smallest fraction by a margin (a learning curve), G3 no
  transfer at 100 % beats the best global intensity threshold by a margin (not trivial), G4 few
  runs stop at their step cap (converged). ``raw/gates.json`` records them.
* ``--stage=grid`` — the transfer cells (M1, M2, IMM, mean-IMM, T-IMM; at one fraction the
  All-HCP sources and the variants), the forgetting evaluation, in the order of
  :func:`.benchmark_report.grid_plan`: the cells the verdicts are about first, the All-HCP sources
  trained only when their cells come. It refuses to start unless the pilot's gates are recorded;
  if a gate failed it still runs only with ``--after_failed_gates``, and the report then makes no
  transfer claim. ``--shard=K/N`` runs the plan's cells K, K + N, ... (N machines or GPUs, each
  with the output folder, shared or copied; their ``raw/`` folders merge by copying, each cell
  being its own folder); shards need the sources trained first, once:
* ``--stage=sources`` — every source the grid uses (M1, M2, the All-HCP ones), once.
* ``--stage=report`` — ``DIR/report.md`` from the raw files (:mod:`.benchmark_report`): the gates
  (pending until the pilot has finished), every pilot run's state and the grid's progress, the
  tables, comparisons and figures of whatever has finished.

**The paper on your data**: ``--parcellation_dir`` (FreeSurfer subjects or the parcellation layout,
``--label_map=paper14``) with ``--parcellation_splits`` (two disjoint groups for tasks 1 and 2 and a
shared test group) and ``--tumour_dir`` (BraTS, MSD or nnU-Net) with ``--tumour_splits`` replace
the generated data set; everything else is as pre-registered.

A replicate ``r`` of a fraction has its own training subset (data seed ``r``: the nested fraction of
the pool, :func:`timm_jax.data.splits.fraction_split`) and its own training seed (``train_seed_base
+ r``: initialisation, patch sampling, dropout), so both variances are in the numbers. The sources
are trained once (seed 0), deterministically: a later session rebuilds them and checks their test
Dice against the committed ``raw/sources.csv``.

An epoch is one pass over the training cases, ``patches_per_case`` patches each; the patience of
the learning-rate plateau and of early stopping and the step cap are given in *steps* and turned
into epochs per fraction (:func:`schedule`), so that every fraction gets the same budget of
patience. Each finished cell writes its raw results (per-case Dice, per-epoch curves, configs) to
``DIR/raw/`` at once; an interrupted stage continues where it stopped (finished runs and
evaluations are reused).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

from absl import flags

from timm_jax import cli
from timm_jax.atomic import atomic_write, write_json
from timm_jax.errors import CheckpointError
from timm_jax.experiments.benchmark_report import (
    PREREG,
    by_replicate,
    gates,
    grid_plan,
    machine,
    run_dir,
    write_report,
)
from timm_jax.workflows.report import read_csv as _read_csv
from timm_jax.workflows.report import write_csv

__all__ = ["load_prereg", "replicate_seeds", "run_grid", "run_pilot", "schedule"]

_log = logging.getLogger("timm_jax.experiments.benchmark")
FLAGS = flags.FLAGS


# ------------------------------------------------------------------ the pre-registration
#: ``--quick``: the pre-registration's settings shrunk to a tiny version of every code path, for the
#: tests (not a result; not part of the pre-registration)
QUICK = {
    "data": {
        "spacing": 6.0,
        "counts": {
            "n_parc_task1": 3,
            "n_parc_task2": 3,
            "n_parc_val": 1,
            "n_parc_test": 2,
            "n_brats_train": 4,
            "n_brats_val": 2,
            "n_brats_test": 2,
        },
    },
    "model": {"base_filters": 2, "depth": 2},
    "training": {
        "patch_shape": [16, 16, 16],
        "batch_size": 1,
        "patches_per_case": 1,
        "plateau_steps": 2,
        "stop_steps": 4,
        "cap_steps": 6,
    },
    "fuse": {"fisher_patches": 1},
    "fractions": {"0.5": 1, "1.0": 1},
    "all_hcp": {"fraction": 0.5, "sources": {"All-HCP 1:7": "hcp_1_7"}},
    "variants": {"fraction": 0.5, "settings": {"T-IMM Fisher per layer": {"fisher_normalisation": "layer"}}},
    "gates": {"G2": {"high": "1.0", "low": "0.5"}, "G3": {"fraction": "1.0"}},
    "verdicts": {"claims": [{"claim": "T-IMM > M1", "a": "T-IMM", "b": "M1", "fractions": ["0.5"]}]},
}


def load_prereg(path: str | os.PathLike = PREREG, *, quick: bool = False) -> dict:
    """The pre-registration (JSON); ``quick`` applies :data:`QUICK` (a tiny version for the tests:
    the same code paths, not a result)."""
    from timm_jax.errors import ConfigError

    try:
        with open(path) as f:
            prereg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"--prereg={path}: cannot read the pre-registration ({type(e).__name__}: {e})"
        ) from None
    if prereg.get("format") != "timm_jax.benchmark.prereg":
        raise ConfigError(f"--prereg={path} is not a benchmark pre-registration (no format field)")
    if quick:
        prereg = _merge(prereg, QUICK)
    return prereg


#: dicts of the pre-registration that an override replaces whole (the others are merged key by key)
_REPLACED = ("fractions", "settings", "sources", "counts")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        merge = isinstance(v, dict) and isinstance(base.get(k), dict) and k not in _REPLACED
        out[k] = _merge(base[k], v) if merge else v
    return out


def replicate_seeds(prereg: dict, r: int) -> tuple[int, int]:
    """``(data seed, training seed)`` of replicate ``r``."""
    return r, int(prereg["replicates"]["train_seed_base"]) + r


def schedule(prereg: dict, n_train: int, seed: int, stage: str = "training"):
    """The :class:`~timm_jax.config.TrainConfig` of a run on ``n_train`` training cases: an epoch is
    one pass over them (``patches_per_case`` patches each); the patience and the cap, given in steps,
    become epochs (at least 1 / 2 / the stop)."""
    from timm_jax.config import TrainConfig

    t = {**prereg["training"], **prereg.get(stage, {})} if stage != "training" else prereg["training"]
    spe = max(1, math.ceil(n_train * t["patches_per_case"] / t["batch_size"]))
    plateau = max(1, math.ceil(t["plateau_steps"] / spe))
    stop = max(plateau + 1, math.ceil(t["stop_steps"] / spe))
    cap = max(stop, math.ceil(t["cap_steps"] / spe))
    return TrainConfig(
        learning_rate=t["learning_rate"],
        batch_size=t["batch_size"],
        patch_shape=tuple(t["patch_shape"]),
        steps_per_epoch=spe,
        max_epochs=cap,
        plateau_patience=plateau,
        early_stopping_patience=stop,
        seed=seed,
    )


# ------------------------------------------------------------------ where things are
class Layout:
    """The benchmark's folders: ``data/``, ``runs/`` (not committed: checkpoints) and ``raw/``
    (committed: per-case results, curves, configs)."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        self.data = os.path.join(self.out, "data")
        self.runs = os.path.join(self.out, "runs")
        self.raw = os.path.join(self.out, "raw")

    def source(self, name: str) -> str:
        return os.path.join(self.runs, "sources", name)

    def cell(self, fraction: float, r: int, init: str) -> str:
        return os.path.join(self.out, run_dir(fraction, r, init))

    def raw_cell(self, fraction: float, r: int, init: str) -> str:
        return os.path.join(self.raw, run_dir(fraction, r, init))


#: the paper's tasks on the 14 HCP classes: task -> (class ids, parcellation groups it trains on)
PAPER_TASKS = {
    "task1": (tuple(range(1, 8)), ("task1",)),
    "task2": (tuple(range(8, 15)), ("task2",)),
    "hcp_1_14": (tuple(range(1, 15)), ("task1", "task2")),
    "hcp_1_7": (tuple(range(1, 8)), ("task1", "task2")),
    "hcp_8_14": (tuple(range(8, 15)), ("task1", "task2")),
}


def user_data(lay: Layout, cfg: dict) -> None:
    """Your own data in place of the generated set (``prereg["user_data"]``, from the command's
    ``--parcellation_dir`` ... flags): the parcellation subjects (FreeSurfer or the parcellation
    layout, with a label map to the paper's 14 classes) in two disjoint groups for tasks 1 and 2
    and a shared test group, and a tumour data set (BraTS, MSD or nnU-Net) with its train / val /
    test split. Writes the split file of every task into ``DIR/splits/``."""
    from timm_jax.errors import ConfigError

    os.makedirs(os.path.join(lay.out, "splits"), exist_ok=True)
    try:
        with open(cfg["parcellation_splits"]) as f:
            groups = json.load(f)
        with open(cfg["tumour_splits"]) as f:
            tumour = json.load(f)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--parcellation_splits / --tumour_splits: {type(e).__name__}: {e}") from None
    for name in ("task1", "task2"):
        if not (isinstance(groups.get(name), dict) and groups[name].get("train") and groups[name].get("val")):
            raise ConfigError(
                f"{cfg['parcellation_splits']}: needs {name}: {{train: [...], val: [...]}} (and test: [...])"
            )
    if not groups.get("test") or not all(tumour.get(k) for k in ("train", "val", "test")):
        raise ConfigError("the splits need a parcellation test group and tumour train / val / test lists")
    for task, (_, use) in PAPER_TASKS.items():
        split = {
            "train": sorted({c for g in use for c in groups[g]["train"]}),
            "val": sorted({c for g in use for c in groups[g]["val"]}),
            "test": list(groups["test"]),
        }
        write_json(os.path.join(lay.out, "splits", f"{task}.json"), split)
    write_json(
        os.path.join(lay.out, "splits", "task3.json"), {k: list(tumour[k]) for k in ("train", "val", "test")}
    )


def _spec(lay: Layout, task: str, fraction: float, data_seed: int = 0, user: dict | None = None):
    from timm_jax.config import DataSpec

    if user:  # your own data: the task's labels and split file
        splits = os.path.join(lay.out, "splits", f"{task}.json")
        if task == "task3":
            return DataSpec(
                data_dir=user["tumour_dir"],
                layout=user["tumour_layout"],
                splits_file=splits,
                fraction=fraction,
                split_seed=data_seed,
            )
        return DataSpec(
            data_dir=user["parcellation_dir"],
            layout=user["parcellation_layout"],
            label_map=user.get("label_map", ""),
            labels=PAPER_TASKS[task][0],
            splits_file=splits,
        )
    layout = "brats" if task == "task3" else "parcellation"
    return DataSpec(
        data_dir=os.path.join(lay.data, layout),
        layout=layout,
        task_key=task,
        fraction=fraction,
        split_seed=data_seed,
    )


def _n_train(spec) -> int:
    from timm_jax.data.spec import resolve

    return len(resolve(spec).train_ids)


def export_run(run_dir: str, dest: str, only: tuple[str, ...] = ()) -> None:
    """The committed raw results of one run: its per-case test Dice, per-epoch curves and
    configuration (and an adaption stage's curves), never a checkpoint; ``only``: just those
    files (by their names in ``dest``)."""
    files = [
        ("eval_test/per_case.csv", "per_case.csv"),
        ("eval_test/summary.json", "summary.json"),
        ("metrics.jsonl", "metrics.jsonl"),
        ("config.json", "config.json"),
        ("adaption/metrics.jsonl", "adaption_metrics.jsonl"),
        ("mixing_ratios.json", "mixing_ratios.json"),
        ("forgetting/forgetting.json", "forgetting.json"),
    ]
    for src, name in files:
        path = os.path.join(run_dir, src)
        if os.path.isfile(path) and (not only or name in only):
            with open(path, "rb") as f:
                data = f.read()
            with atomic_write(os.path.join(dest, name), "wb") as f:
                f.write(data)


# ------------------------------------------------------------------ stages
def _prepare(lay: Layout, prereg: dict) -> None:
    import jax

    from timm_jax.experiments.demo_data import build_demo

    os.makedirs(lay.raw, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.join(lay.out, ".jax_cache"))
    if prereg.get("user_data"):
        user_data(lay, prereg["user_data"])
    elif not os.path.isfile(os.path.join(lay.data, "manifest.json")):
        d = prereg["data"]
        _log.info(
            "== building the benchmark data set (generator %s, seed %d) in %s",
            d["generator"],
            d["seed"],
            lay.data,
        )
        build_demo(
            lay.data,
            seed=d["seed"],
            generator=d["generator"],
            progress=False,
            make_preview=False,
            **d.get("counts", {}),
            spacing=d["spacing"],
        )
    write_json(os.path.join(lay.raw, "preregistration.json"), prereg)


def _model(prereg: dict):
    from timm_jax.config import ModelConfig

    return ModelConfig(**prereg["model"])


def _exported(raw_dir: str) -> bool:
    """Whether a run's raw results are in ``raw/`` (finished here, or committed from elsewhere)."""
    return os.path.isfile(os.path.join(raw_dir, "summary.json"))


def provenance(lay: Layout, sources: list[str]) -> dict:
    """What a grid cell ran on (``provenance.json`` beside its raw results, with the cell's wall
    time: training, Fishers, evaluations): the machine, the code and the test Dice of each source
    as built on this machine. Training is bit-identical only
    between machines whose XLA emits the same code, so a grid continued elsewhere starts from
    sources rebuilt there (accepted within the pre-registered ``sources_tolerance``); the report
    groups the cells by what they started from."""
    from timm_jax.experiments.protocol import evaluated
    from timm_jax.runs.bundle_export import code_version

    code = code_version()
    return {
        "machine": machine(),
        "code": (code["git_commit"] or code["version"]) + ("+changes" if code["git_dirty"] else ""),
        "sources": {s: round(evaluated(lay.source(s))["metrics"]["dice_mean"]["mean"], 6) for s in sources},
    }


class SourceMismatchError(CheckpointError):
    """A source rebuilt here is not the committed one: its test Dice is outside the pre-registered
    ``sources_tolerance`` of ``raw/sources.csv``'s."""


def train_sources(lay: Layout, prereg: dict, names, *, checkpoints: bool = True) -> list[dict]:
    """Train (or reuse) the named sources once, evaluate them on their test cases, and record
    ``raw/sources.csv``; a source rebuilt on another machine is checked against the committed Dice.

    ``checkpoints=False`` (the pilot, which needs only the sources' results): a source whose raw
    results are committed is not rebuilt."""
    from timm_jax.config import EvalConfig
    from timm_jax.experiments.protocol import evaluated, finished
    from timm_jax.workflows.evaluate import evaluate_model
    from timm_jax.workflows.train import train_model

    rows = []
    committed = {r["source"]: r for r in _read_csv(os.path.join(lay.raw, "sources.csv"))}
    for name in names:
        task, init_from = prereg["sources"][name]["task"], prereg["sources"][name].get("from", "")
        spec = _spec(lay, task, 1.0, user=prereg.get("user_data"))  # a source: all its task's cases
        run = lay.source(name)
        old = committed.get(name)
        if not checkpoints and old is not None and not finished(run):
            if _exported(os.path.join(lay.raw, "sources", name)):
                _log.info("== source %s: its committed raw results are reused", name)
                rows.append(old)
                continue
        if not finished(run):
            _log.info("== source %s: %s%s", name, task, f" from {init_from}" if init_from else "")
            train_model(
                spec,
                _model(prereg),
                schedule(prereg, _n_train(spec), 0),
                run,
                init="transfer" if init_from else "random",
                init_from=lay.source(init_from) if init_from else "",
            )
        summary = evaluated(run) or evaluate_model(run, EvalConfig(hd95=False))
        m = summary["metrics"]
        row = {"source": name, "task": task, "dice_mean": m["dice_mean"]["mean"]}
        row |= {k[5:]: v["mean"] for k, v in m.items() if k.startswith("dice_") and k != "dice_mean"}
        if old is None or abs(float(old["dice_mean"]) - row["dice_mean"]) < 1e-6:
            if old is None:  # otherwise the same run's results (timings aside) are there already
                export_run(run, os.path.join(lay.raw, "sources", name))
            rows.append(row)
        else:
            # rebuilt on another machine (training is bit-identical on one machine only): its
            # results go beside the committed ones, which stay what the pilot's gates read
            export_run(run, os.path.join(lay.raw, "rebuilds", f"{name}_{row['dice_mean']:.6f}"))
            if abs(float(old["dice_mean"]) - row["dice_mean"]) > prereg["sources_tolerance"]:
                raise SourceMismatchError(
                    f"source {name} was rebuilt with test Dice {row['dice_mean']:.4f}, the committed "
                    f"raw/sources.csv says {float(old['dice_mean']):.4f} (tolerance "
                    f"{prereg['sources_tolerance']}): not the same source, so no grid cell runs on it"
                )
            _log.info(
                "== source %s rebuilt: test Dice %.4f, committed %.4f (within %s)",
                name,
                row["dice_mean"],
                float(old["dice_mean"]),
                prereg["sources_tolerance"],
            )
            rows.append(old)
        # after each source, so that an interrupted stage keeps the rows of those it finished
        _write_csv(
            os.path.join(lay.raw, "sources.csv"), rows, merge_on="source", old=list(committed.values())
        )
    return rows


def run_pilot(out: str, prereg: dict) -> dict:
    """The sources, the no-transfer cells and the threshold baselines; the gates (``raw/gates.json``)."""
    from timm_jax.experiments.baselines import run_baseline
    from timm_jax.experiments.protocol import Init, run_cell

    lay = Layout(out)
    _prepare(lay, prereg)
    t0 = time.time()
    train_sources(lay, prereg, prereg["pilot_sources"], checkpoints=False)
    for f, r in _cells(prereg):
        base = lay.raw_cell(f, r, "threshold")
        if _exported(lay.raw_cell(f, r, "no transfer")) and _exported(base):
            continue  # finished (here, or on another machine and committed)
        data_seed, train_seed = replicate_seeds(prereg, r)
        spec = _spec(lay, "task3", f, data_seed, user=prereg.get("user_data"))
        n = _n_train(spec)
        run = lay.cell(f, r, "no transfer")
        _log.info("== pilot: %s replicate %d: no transfer (%d training cases)", f"{f:.0%}", r, n)
        run_cell(
            Init("random"),
            spec,
            run,
            model=_model(prereg),
            target=schedule(prereg, n, train_seed),
            adapt=schedule(prereg, n, train_seed, "adaption"),
        )
        export_run(run, lay.raw_cell(f, r, "no transfer"))
        if not _exported(base):
            run_baseline(spec, out=base)
    _add_time(lay, "pilot", time.time() - t0)

    result = gates(lay.raw, prereg)
    write_json(os.path.join(lay.raw, "gates.json"), result)
    for g in result["gates"]:
        _log.info("== gate %s: %s (%s)", g["gate"], "met" if g["met"] else "NOT met", g["what"])
    return result


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` with ``0 <= K < N`` (``--shard``)."""
    from timm_jax.errors import ConfigError

    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise ConfigError(f"--shard={text!r}: expected K/N with 0 <= K < N, e.g. 0/2 and 1/2 on two machines")
    return k, n


def _with_origins(prereg: dict, names: list[str]) -> list[str]:
    """``names`` with, before each, the sources it is trained from (M2 from M1), each once."""
    out: list[str] = []
    for s in names:
        origin = prereg["sources"][s].get("from")
        for t in [*(_with_origins(prereg, [origin]) if origin else []), s]:
            if t not in out:
                out.append(t)
    return out


def _grid_sources(prereg: dict) -> list[str]:
    return [*prereg["pilot_sources"], *prereg["all_hcp"]["sources"].values()]


def _check_gates(lay: Layout, after_failed_gates: bool) -> None:
    """Refuse the grid before the pilot's gates, or after a failed one unless told."""
    from timm_jax.errors import ConfigError

    path = os.path.join(lay.raw, "gates.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"no pilot in {lay.out}: run --stage=pilot first (the gates decide whether the grid runs)"
        )
    with open(path) as f:
        failed = [g["gate"] for g in json.load(f)["gates"] if not g["met"]]
    if failed and not after_failed_gates:
        raise ConfigError(
            f"gates {', '.join(failed)} were not met: the benchmark cannot answer the question; pass "
            "--after_failed_gates to run the grid anyway (the report then makes no transfer claim)"
        )


def run_sources(out: str, prereg: dict, *, after_failed_gates: bool = False) -> list[dict]:
    """Every source the grid uses (M1, M2 and the All-HCP ones), trained once: what the shards of
    a grid (``run_grid(shard=...)``) share."""
    lay = Layout(out)
    _check_gates(lay, after_failed_gates)
    _prepare(lay, prereg)
    return train_sources(lay, prereg, _grid_sources(prereg))


def run_grid(
    out: str, prereg: dict, *, after_failed_gates: bool = False, shard: tuple[int, int] = (0, 1)
) -> None:
    """The transfer cells of every fraction and replicate, the variants, and the forgetting.
    ``shard=(K, N)`` runs every N-th cell of the plan from the K-th (:func:`.grid_plan`'s order,
    so each shard starts with the claims); the N shards together run the grid once."""
    from timm_jax.config import EvalConfig, FuseConfig
    from timm_jax.errors import ConfigError
    from timm_jax.experiments.protocol import Init, finished, initialisations, run_cell
    from timm_jax.workflows.evaluate import evaluate_forgetting

    lay = Layout(out)
    _check_gates(lay, after_failed_gates)
    k, n_shards = shard
    if n_shards > 1:
        missing = [s for s in _grid_sources(prereg) if not finished(lay.source(s))]
        if missing:
            raise ConfigError(
                f"--shard={k}/{n_shards}: the sources {', '.join(missing)} are not trained in {out}; "
                "shards share the sources: run --stage=sources once first (then give each shard "
                "this folder, shared or copied)"
            )
    _prepare(lay, prereg)
    t0 = time.time()
    accepted, refused = set(), {}  # sources trained (or reused) and checked here; those refused

    def ready(names: list[str]) -> str:
        """Train (or reuse) the named sources and the sources they start from, in order; the
        error of the first one refused (rebuilt outside the tolerance), "" if all are accepted."""
        for s in _with_origins(prereg, names):
            if s not in accepted and s not in refused:
                try:
                    train_sources(lay, prereg, [s])
                    accepted.add(s)
                except SourceMismatchError as e:
                    refused[s] = str(e)
                    _log.error("%s; the grid goes on with the cells that do not need it", e)
            if s in refused:
                return refused[s]
        return ""

    if not os.path.isfile(os.path.join(lay.raw, "fisher_diagnostics.csv")) and not ready(
        prereg["pilot_sources"]
    ):
        fisher_diagnostics(lay, prereg)
    fuse = FuseConfig(**prereg["fuse"])
    no_hd95 = EvalConfig(hd95=False)
    m1, m2 = lay.source("m1"), lay.source("m2")
    all_hcp = {label: lay.source(s) for label, s in prereg["all_hcp"]["sources"].items()}
    inits = initialisations(m1, m2, fuse, all_hcp)
    inits["mean-IMM"] = Init("fused", sources=(m1, m2), fuse=fuse.replace(method="imm", imm_mode="mean"))
    for name, change in prereg["variants"]["settings"].items():
        inits[name] = Init("fused", sources=(m1, m2), fuse=fuse.replace(method="timm", **change))
    blocked = []  # cells not run: a source they need was refused
    for part, f, r, name in grid_plan(prereg)[k::n_shards]:
        init = inits[name]
        done = os.path.isfile(os.path.join(lay.raw_cell(f, r, name), "provenance.json"))
        if done and init.init == "fused":
            done = os.path.isfile(os.path.join(lay.raw_cell(f, r, name + " fused"), "forgetting.json"))
        if done:
            continue  # finished (here, or on another machine and committed)
        # an All-HCP cell needs its own source only (trained when its first cell comes, after the
        # claims, in the shard that needs it); every other cell needs M1 and M2
        source = prereg["all_hcp"]["sources"].get(name) if part == "All-HCP" else None
        needs = [source] if source else list(prereg["pilot_sources"])
        if ready(needs):
            blocked.append(run_dir(f, r, name))
            continue
        data_seed, train_seed = replicate_seeds(prereg, r)
        spec = _spec(lay, "task3", f, data_seed, user=prereg.get("user_data"))
        n = _n_train(spec)
        run = lay.cell(f, r, name)
        fused_dir = run + "_fused"
        _log.info("== grid (%s): %s replicate %d: %s", part, f"{f:.0%}", r, name)
        t_cell, resumed = time.time(), os.path.isdir(run) or os.path.isdir(fused_dir)
        run_cell(
            init,
            spec,
            run,
            model=_model(prereg),
            target=schedule(prereg, n, train_seed),
            adapt=schedule(prereg, n, train_seed, "adaption"),
            fused_dir=fused_dir,
            evaluation=no_hd95,
        )
        export_run(run, lay.raw_cell(f, r, name))
        if init.init == "fused":
            # forgetting of the fusion (IMM / mean-IMM: one model per build of the sources whatever
            # the replicate; the report counts it once per build)
            if not os.path.isfile(os.path.join(fused_dir, "forgetting", "forgetting.json")):
                evaluate_forgetting(fused_dir, [m1, m2], no_hd95)
            export_run(fused_dir, lay.raw_cell(f, r, name + " fused"))
        # last: a cell is finished once its provenance is there
        prov = provenance(lay, needs)
        prov |= {"wall_s": round(time.time() - t_cell, 1), "resumed": resumed}
        write_json(os.path.join(lay.raw_cell(f, r, name), "provenance.json"), prov)
    for name in ("m1", "m2"):
        if os.path.isfile(os.path.join(lay.raw, "sources", name, "forgetting.json")):
            continue
        if ready(["m1", "m2"]):
            blocked.append(f"sources/{name} (forgetting)")
            continue
        if not os.path.isfile(os.path.join(lay.source(name), "forgetting", "forgetting.json")):
            evaluate_forgetting(lay.source(name), [m1, m2], no_hd95)
        export_run(lay.source(name), os.path.join(lay.raw, "sources", name), only=("forgetting.json",))
    _add_time(lay, "grid", time.time() - t0, shard=shard)
    if blocked:
        raise SourceMismatchError(
            f"{len(blocked)} grid cell(s) not run ({', '.join(blocked)}): "
            + "; ".join(refused.values())
            + ". Every other cell has run; continue the grid on a machine whose rebuilt sources "
            "are accepted (the committed ones were built on the machine in their provenance)"
        )


def fisher_diagnostics(lay: Layout, prereg: dict) -> list[dict]:
    """``raw/fisher_diagnostics.csv``: per transferable layer of M1 and M2, M1's share of the Fisher
    mass, the median over the layer's elements of M1's share F1 / (F1 + F2), and where mode-IMM
    with equal ratios puts the fused weights between the sources (median over elements of
    (θ − θ2) / (θ1 − θ2)), with the Fishers as they are and normalised per layer."""
    import numpy as np

    from timm_jax.core.merge import normalise_fisher_per_layer
    from timm_jax.core.partition import default_is_transferable, to_flat_dict
    from timm_jax.nn.unet import layer_order
    from timm_jax.runs.fisher_cache import source_fisher
    from timm_jax.runs.models import load_model

    path = os.path.join(lay.raw, "fisher_diagnostics.csv")
    if os.path.isfile(path):
        return _read_csv(path)
    per = prereg["fuse"]["fisher_patches"]
    theta = [to_flat_dict(load_model(lay.source(n), kinds=("train",)).params) for n in ("m1", "m2")]
    raw_f = [source_fisher(lay.source(n), patches_per_case=per) for n in ("m1", "m2")]
    fishers = {"as they are": [to_flat_dict(f) for f in raw_f]}
    fishers["per layer"] = [to_flat_dict(normalise_fisher_per_layer(f)) for f in raw_f]
    layers = layer_order(
        sorted({k.split("/")[0] for k in theta[0] if default_is_transferable(tuple(k.split("/")))})
    )
    rows = []
    for layer in layers:
        keys = [k for k in theta[0] if k.split("/")[0] == layer]

        def cat(trees, keys=keys):
            return [np.concatenate([np.ravel(np.asarray(t[k], np.float64)) for k in keys]) for t in trees]

        t1, t2 = cat(theta)
        f1, f2 = cat(fishers["as they are"])
        both = f1 + f2
        row = {
            "layer": layer,
            "M1 mass share": float(f1.sum() / both.sum()) if both.sum() > 0 else float("nan"),
            "M1 median element share": float(np.median(f1[both > 0] / both[both > 0]))
            if (both > 0).any()
            else float("nan"),
        }
        apart = np.abs(t1 - t2) > 1e-8
        for name, (g1, g2) in ((k, cat(v)) for k, v in fishers.items()):
            fused = (g1 * t1 + g2 * t2) / (g1 + g2 + 1e-8)
            pos = (fused[apart] - t2[apart]) / (t1[apart] - t2[apart])
            row[f"fused position ({name})"] = float(np.median(pos)) if pos.size else float("nan")
        rows.append(row)
    _write_csv(path, rows)
    return rows


def _cells(prereg: dict) -> list[tuple[float, int]]:
    """The pilot's ``(fraction, replicate)`` in the order they run (:func:`.by_replicate`)."""
    reps = {float(f): int(n) for f, n in prereg["fractions"].items()}
    return by_replicate(reps, list(reps))


def _add_time(lay: Layout, stage: str, seconds: float, shard: tuple[int, int] = (0, 1)) -> None:
    """Append a stage's wall time and the machine it ran on to ``raw/wall_time.json`` (a shard's: its
    own file, so that shards sharing a folder do not write one file)."""
    name = "wall_time.json" if shard[1] == 1 else f"wall_time_shard{shard[0]}of{shard[1]}.json"
    path = os.path.join(lay.raw, name)
    state = json.load(open(path)) if os.path.isfile(path) else {}
    state.setdefault(stage if shard[1] == 1 else f"{stage} shard {shard[0]}/{shard[1]}", []).append(
        {"ended": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 1), "machine": machine()}
    )
    write_json(path, state)


def _write_csv(path: str, rows: list[dict], *, merge_on: str = "", old: list[dict] = ()) -> None:
    """``rows`` (merged over ``old`` by the key ``merge_on``) as a CSV."""
    if merge_on:
        keep = {r[merge_on]: r for r in old}
        keep.update({r[merge_on]: r for r in rows})
        rows = list(keep.values())
    write_csv(path, rows)


def main() -> None:
    prereg = load_prereg(FLAGS.prereg, quick=FLAGS.quick)
    if FLAGS.parcellation_dir or FLAGS.tumour_dir:
        from timm_jax.errors import ConfigError

        need = [
            "parcellation_dir",
            "parcellation_layout",
            "parcellation_splits",
            "tumour_dir",
            "tumour_layout",
        ]
        need.append("tumour_splits")
        missing = [f"--{n}" for n in need if not FLAGS[n].value]
        if missing:
            raise ConfigError(f"your own data needs {', '.join(missing)} as well")
        prereg["user_data"] = {n: FLAGS[n].value for n in [*need, "label_map"]}
    if FLAGS.stage == "pilot":
        run_pilot(FLAGS.out, prereg)
    elif FLAGS.stage == "sources":
        run_sources(FLAGS.out, prereg, after_failed_gates=FLAGS.after_failed_gates)
    elif FLAGS.stage == "grid":
        run_grid(
            FLAGS.out, prereg, after_failed_gates=FLAGS.after_failed_gates, shard=parse_shard(FLAGS.shard)
        )
    _log.info("report: %s", write_report(FLAGS.out, prereg))


def define_flags() -> None:
    flags.DEFINE_string("out", "benchmark_out", "Output directory (data, runs, raw results, report).")
    flags.DEFINE_enum(
        "stage",
        "report",
        ["pilot", "sources", "grid", "report"],
        "What to run (the report is always written); `sources`: every source of the grid, once, "
        "before its shards (--shard).",
    )
    flags.DEFINE_string("prereg", str(PREREG), "The pre-registration file.")
    flags.DEFINE_bool("quick", False, "A tiny version of every code path (QUICK), for the tests.")
    flags.DEFINE_bool(
        "after_failed_gates", False, "Run the grid although a gate failed (no transfer claim is made)."
    )
    flags.DEFINE_string(
        "shard",
        "0/1",
        "K/N: run the grid's cells K, K+N, K+2N, ... of its plan (N machines or GPUs, one shard each, "
        "each with a copy of the pilot's output; merge their raw/ folders afterwards).",
    )
    # the paper on your data: parcellation subjects (HCP / FreeSurfer) and a tumour data set
    flags.DEFINE_string("parcellation_dir", "", "Your parcellation subjects (instead of the generated set).")
    flags.DEFINE_enum("parcellation_layout", "freesurfer", ["freesurfer", "parcellation"], "Their layout.")
    flags.DEFINE_string(
        "label_map", "paper14", "Label map to the paper's 14 classes (paper14 or a JSON file)."
    )
    flags.DEFINE_string(
        "parcellation_splits",
        "",
        'JSON {"task1": {"train": [...], "val": [...]}, "task2": {...}, "test": [...]}: two disjoint '
        "groups of subjects and a shared test group (paper Table 1).",
    )
    flags.DEFINE_string("tumour_dir", "", "Your tumour data set (BraTS, MSD or nnU-Net layout).")
    flags.DEFINE_enum("tumour_layout", "brats", ["brats", "msd", "nnunet"], "Its layout.")
    flags.DEFINE_string(
        "tumour_splits", "", 'JSON {"train": [...], "val": [...], "test": [...]} of the tumour pool.'
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
