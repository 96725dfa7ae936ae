"""Peak resident memory of drawing training batches from in-memory vs memory-mapped cases (not a test).

A synthetic BraTS data set (``--shape`` voxels, 4 channels, written with
``timm_jax.data.writers.write_brats_case``) is preprocessed into the cache once; then, in a fresh
subprocess per (number of cases, mode), the cases are loaded the way a workflow does —
``Data.load(ids)`` (every case in memory) or ``Data.load(ids, mmap=True)`` (a lazy sequence of
read-only memory maps) — and the same ``--batches`` training batches are drawn through
``make_train_dataset``. Each child reports, from ``/proc/self/status``:

* ``VmHWM``: the kernel's peak resident set (anonymous memory plus mapped file pages);
* the largest ``RssAnon`` seen after loading and after every batch (memory that cannot be
  dropped: file pages of a memory map are reclaimable page cache, which VmHWM also counts);
* with ``--workers``, the peak resident set of the largest grain worker process (``getrusage``
  of the ended children): an in-memory sampler is pickled into every worker;
* both after the imports and a warm-up on one tiny case (the baseline), so the data's share is the
  difference;

and the batches' checksum, which must be the same for both modes.

With ``--train``, each child instead runs a tiny ``train_model`` (base 2, depth 2, 16³ patches, one
epoch of a few steps, validation of its 20 % validation cases) on the first N cases, as
``train.py`` would (memory-mapped cases), and reports its peak resident set (VmHWM, absolute: the
JIT's own memory is the same for every N).

Usage: python benchmarks/bench_memory.py [--sizes 20,200] [--batches 40] [--workdir DIR] [--train]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure the checkout this script is in


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in kB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def make_data(root: Path, n: int, shape: tuple[int, int, int], cache: Path) -> None:
    """``n`` synthetic BraTS cases (uncompressed NIfTI, quick to write), preprocessed into ``cache``."""
    from timm_jax.data.preprocess import PreprocessConfig, load_preprocessed_lazy
    from timm_jax.data.writers import write_brats_case

    root.mkdir(parents=True, exist_ok=True)
    have = {p.name for p in root.iterdir()}
    rng = np.random.default_rng(0)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = np.asarray(shape) / 2
    head = ((zz - c[0]) / (0.45 * shape[0])) ** 2 + ((yy - c[1]) / (0.45 * shape[1])) ** 2
    head = head + ((xx - c[2]) / (0.45 * shape[2])) ** 2 <= 1
    for i in range(n):
        cid = f"case{i:04d}"
        if cid in have:
            continue
        img = rng.uniform(1, 100, size=(*shape, 4)).astype(np.float32) * head[..., None]
        lab = np.zeros(shape, np.uint8)
        centre = rng.integers(np.asarray(shape) // 3, 2 * np.asarray(shape) // 3)
        r = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) ** 0.5
        lab[r <= 9] = 2
        lab[r <= 5] = 1
        lab[r <= 2] = 4
        write_brats_case(root, cid, img, lab, ext=".nii")
    ids = [f"case{i:04d}" for i in range(n)]
    t = time.perf_counter()
    load_preprocessed_lazy(root, ids, "brats", PreprocessConfig(), cache)
    print(
        f"data: {n} cases of {shape} x 4 in {root}, cached in {time.perf_counter() - t:.1f} s",
        file=sys.stderr,
    )


def child(args) -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
    from timm_jax.data.io import Case
    from timm_jax.data.pipeline import make_train_dataset
    from timm_jax.data.spec import DataSpec, resolve

    spec = DataSpec(data_dir=args.data, layout="brats", cache_dir=args.cache)
    if args.mode == "train":
        train_child(args, spec)
        return
    data = resolve(spec)
    # warm-up, so that the baseline holds every import and grain's own buffers: one tiny case
    tiny = np.ones((args.patch,) * 3 + (4,), np.float32)
    lab = np.zeros((args.patch,) * 3, np.int32)
    lab[1, 1, 1] = 4
    warm = make_train_dataset(
        [Case("w", tiny, lab, np.eye(4), ("a",) * 4)],
        data.task,
        patch_shape=(args.patch,) * 3,
        batch_size=args.batch_size,
        seed=0,
    )
    warm_it = iter(warm)
    for _ in range(3):
        next(warm_it)
    del warm_it, warm
    base = status()
    ids = [f"case{i:04d}" for i in range(args.n)]
    t = time.perf_counter()
    cases = data.load(ids, mmap=args.mode == "mmap")
    load_s = time.perf_counter() - t
    loaded = status()
    anon_max = loaded["RssAnon"]
    ds = make_train_dataset(
        cases,
        data.task,
        patch_shape=(args.patch,) * 3,
        batch_size=args.batch_size,
        seed=0,
        num_workers=args.workers,
    )
    it = iter(ds)
    digest = 0.0
    t = time.perf_counter()
    for _ in range(args.batches):
        b = next(it)
        digest += float(np.sum(b["image"], dtype=np.float64)) + float(np.sum(b["target"], dtype=np.float64))
        anon_max = max(anon_max, status()["RssAnon"])
    batch_s = (time.perf_counter() - t) / args.batches
    if hasattr(it, "close"):
        it.close()
    end = status()
    workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest ended worker
    nbytes = sum(
        int(np.prod(c.image.shape)) * 4 + int(np.prod(c.labels.shape)) * c.labels.dtype.itemsize
        for c in cases
    )
    print(
        json.dumps(
            {
                "n": args.n,
                "mode": args.mode,
                "data_mb": nbytes / 2**20,
                "base_hwm_mb": base["VmHWM"] / 1024,
                "base_anon_mb": base["RssAnon"] / 1024,
                "hwm_mb": end["VmHWM"] / 1024,
                "anon_max_mb": anon_max / 1024,
                "load_s": load_s,
                "batch_ms": 1000 * batch_s,
                "worker_hwm_mb": workers_mb,
                "digest": digest,
            }
        )
    )


def train_child(args, spec) -> None:
    """A tiny train_model over the first ``args.n`` cases (a splits file keeps it to them)."""
    from timm_jax.config import ModelConfig, TrainConfig
    from timm_jax.data.splits import make_splits, save_splits
    from timm_jax.workflows.train import train_model

    work = Path(args.cache).parent / f"train{args.n}"
    ids = [f"case{i:04d}" for i in range(args.n)]
    splits = save_splits(work / "splits.json", make_splits(ids, 0, 0.2, 0.2))
    t = time.perf_counter()
    train_model(
        spec.replace(splits_file=str(splits)),
        ModelConfig(base_filters=2, depth=2, conv_impl="depth2d"),
        TrainConfig(patch_shape=(16, 16, 16), batch_size=2, steps_per_epoch=4, max_epochs=1),
        str(work / "run"),
    )
    end = status()
    print(
        json.dumps(
            {"n": args.n, "mode": "train", "hwm_mb": end["VmHWM"] / 1024, "train_s": time.perf_counter() - t}
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20,200", help="numbers of cases, comma-separated")
    p.add_argument("--shape", default="48,64,48", help="voxels per case")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument(
        "--workers", type=int, default=0, help="grain worker processes (their memory is not counted)"
    )
    p.add_argument("--workdir", default="", help="where the data and cache go (default: a temporary folder)")
    p.add_argument("--train", action="store_true", help="measure a tiny train_model run instead")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="memory", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        data, cache = work / "data", work / "cache"
        make_data(data, max(sizes), shape, cache)
        rows = []
        for n in sizes:
            for mode in ("train",) if args.train else ("memory", "mmap"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    f"--mode={mode}",
                    f"--n={n}",
                    f"--data={data}",
                    f"--cache={cache}",
                    f"--batches={args.batches}",
                    f"--batch_size={args.batch_size}",
                    f"--patch={args.patch}",
                    f"--workers={args.workers}",
                ]
                env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if res.returncode:
                    sys.exit(f"child failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr)
    if args.train:
        print("\n| cases | peak RSS (VmHWM) of a tiny train_model, MB | s |\n|---:|---:|---:|")
        for r in rows:
            print(f"| {r['n']} | {r['hwm_mb']:.0f} | {r['train_s']:.1f} |")
        return
    print(
        f"\n{args.batches} batches of {args.batch_size} x {args.patch}^3 x 4, cases of {shape} x 4 "
        f"(float32 image + int32 labels), grain workers {args.workers}\n"
    )
    header = ["cases", "mode", "data MB", "peak RSS (VmHWM) MB", "over baseline MB", "peak RssAnon MB"]
    header += ["over baseline MB", "load s", "ms/batch"] + (
        ["largest worker VmHWM MB"] if args.workers else []
    )
    print("| " + " | ".join(header) + " |")
    print("|---:|---|" + "---:|" * (len(header) - 2))
    for r in rows:
        cells = [r["n"], r["mode"], f"{r['data_mb']:.0f}", f"{r['hwm_mb']:.0f}"]
        cells += [f"{r['hwm_mb'] - r['base_hwm_mb']:.0f}", f"{r['anon_max_mb']:.0f}"]
        cells += [f"{r['anon_max_mb'] - r['base_anon_mb']:.0f}", f"{r['load_s']:.2f}", f"{r['batch_ms']:.1f}"]
        cells += [f"{r['worker_hwm_mb']:.0f}"] if args.workers else []
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for n in sizes:
        d = {r["mode"]: r["digest"] for r in rows if r["n"] == n}
        same = "identical" if d["memory"] == d["mmap"] else f"DIFFERENT ({d})"
        print(f"\nbatch checksums, {n} cases, memory vs mmap: {same}")


if __name__ == "__main__":
    main()
