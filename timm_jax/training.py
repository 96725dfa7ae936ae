"""The epoch loop shared by training, T-IMM adaption and fine-tuning.

Validation after every epoch; reduce-on-plateau of the learning rate; early stopping on the
validation loss; ``latest`` and ``best`` checkpoints; progress lines; metrics in
``<workdir>/metrics.jsonl``. A killed run, started again with the same arguments, resumes from its
latest checkpoint and, because the step RNG, the optimiser state (learning rate included) and
the input pipeline position are all restored, ends with the same result as an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from timm_jax.checkpoint import CheckpointError, RunCheckpoints
from timm_jax.config import TrainConfig
from timm_jax.steps import TrainState, learning_rate, scale_learning_rate

PyTree = Any


def state_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def from_state_dict(d: dict) -> TrainState:
    return TrainState(step=d["step"], params=d["params"], opt_state=d["opt_state"], rng=d["rng"])


def pad_to_multiple(x: np.ndarray, divisor: int, spatial_axes=(0, 1, 2)) -> np.ndarray:
    pads = [(0, 0)] * x.ndim
    for a in spatial_axes:
        pads[a] = (0, (-x.shape[a]) % divisor)
    return np.pad(x, pads)


def volume_evaluator(eval_step: Callable, cases: list, task, divisor: int) -> Callable:
    """``evaluate(params) -> {"loss", "dice": [per channel], "dice_mean"}`` over whole volumes.

    Each case is padded (zeros) to a multiple of ``divisor`` and evaluated as a batch of one; the
    loss and the per-channel Dice are averaged over cases.
    """
    if not cases:
        raise ValueError("validation needs at least one case")
    volumes = []
    for c in cases:
        img = pad_to_multiple(np.asarray(c.image, np.float32), divisor)
        tgt = pad_to_multiple(np.asarray(task.targets(c.labels), np.float32), divisor)
        volumes.append({"image": img[None], "target": tgt[None]})

    def evaluate(params) -> dict:
        ls, ds = [], []
        for v in volumes:
            out = eval_step(params, v)
            ls.append(float(out["loss"]))
            ds.append(np.asarray(out["dice"])[0])
        dice = np.mean(ds, axis=0)
        return {"loss": float(np.mean(ls)), "dice": [float(d) for d in dice],
                "dice_mean": float(np.mean(dice))}

    return evaluate


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def fit(*, workdir: str, state: TrainState, train_step: Callable, evaluate: Callable,
        batches_from: Callable[[int], Iterator[dict]], cfg: TrainConfig, meta: dict,
        name: str = "train", log: Callable[[str], None] = print,
        after_epoch: Callable[[int], None] | None = None) -> tuple[TrainState, dict]:
    """Run (or resume) a training loop; returns the final state and the run summary.

    Args:
      workdir: run directory (checkpoints/, metrics.jsonl).
      state: the freshly initialised state (used as-is, or as the structure to restore into).
      train_step: ``(state, batch) -> (state, {"loss"})``.
      evaluate: ``params -> {"loss", "dice", "dice_mean"}`` on the validation set.
      batches_from: ``start_step -> iterator of batches`` from that global step on.
      cfg: schedule (epochs, patience, plateau).
      meta: JSON-able run description (config, split, ...) stored in every checkpoint. A
        workdir whose checkpoints have a different ``meta["run_key"]`` is refused.
      after_epoch: called with the epoch number after each checkpoint (tests use it to crash).
    """
    os.makedirs(workdir, exist_ok=True)
    ckpt = RunCheckpoints(workdir)
    run = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "bad_epochs": 0,
           "plateau_epochs": 0, "history": [], "finished": False}
    try:
        if ckpt.latest_step() is not None:
            old = ckpt.restore_meta()
            if old.get("run_key") != meta.get("run_key"):
                raise CheckpointError(
                    f"{workdir} already holds checkpoints of a different run "
                    f"({old.get('run_key')!r} vs {meta.get('run_key')!r}); use a new --workdir")
            restored, old = ckpt.restore(state_dict(state))
            state = from_state_dict(restored)
            run.update(old["run"])
            log(f"[{name}] resuming from checkpoint at step {int(state.step)} "
                f"(epoch {run['epoch']}) in {workdir}")
            if run["finished"]:
                log(f"[{name}] run already finished (best val loss {run['best_loss']:.4f} "
                    f"at epoch {run['best_epoch']})")
                return state, run
        batches = batches_from(int(state.step))
        voxels = cfg.batch_size * int(np.prod(cfg.patch_shape))
        t_start = time.time()
        epochs_done = 0
        while run["epoch"] < cfg.max_epochs:
            t0 = time.time()
            train_losses = []
            for _ in range(cfg.steps_per_epoch):
                state, m = train_step(state, next(batches))
                train_losses.append(m["loss"])
            train_loss = float(np.mean(jax.device_get(train_losses)))
            if not np.isfinite(train_loss):
                raise FloatingPointError(
                    f"[{name}] training loss is {train_loss} in epoch {run['epoch'] + 1} (step "
                    f"{int(state.step)}); lower the learning rate. The last good checkpoint is in {workdir}")
            t_train = time.time() - t0
            val = evaluate(state.params)
            run["epoch"] += 1
            epochs_done += 1
            lr = learning_rate(state)
            improved = val["loss"] < run["best_loss"] - 1e-6
            if improved:
                run.update(best_loss=val["loss"], best_epoch=run["epoch"], bad_epochs=0, plateau_epochs=0)
            else:
                run["bad_epochs"] += 1
                run["plateau_epochs"] += 1
                if run["plateau_epochs"] >= cfg.plateau_patience:
                    new_lr = max(lr * cfg.plateau_factor, cfg.min_learning_rate)
                    if new_lr < lr:
                        state = scale_learning_rate(state, new_lr / lr, cfg.min_learning_rate)
                        log(f"[{name}] validation loss has not improved for "
                            f"{run['plateau_epochs']} epochs: learning rate {lr:.2e} -> {new_lr:.2e}")
                    run["plateau_epochs"] = 0
            record = {"epoch": run["epoch"], "step": int(state.step), "train_loss": train_loss,
                      "val_loss": val["loss"], "val_dice": val["dice"], "val_dice_mean": val["dice_mean"],
                      "lr": lr, "voxels_per_s": voxels * cfg.steps_per_epoch / max(t_train, 1e-9),
                      "epoch_s": time.time() - t0}
            run["history"].append(record)
            stop = run["bad_epochs"] >= cfg.early_stopping_patience
            run["finished"] = stop or run["epoch"] >= cfg.max_epochs
            ckpt.save(int(state.step), state_dict(state), dict(meta, run=run), best=improved)
            _write_jsonl(os.path.join(workdir, "metrics.jsonl"), run["history"])
            per_epoch = (time.time() - t_start) / epochs_done
            log(f"[{name}] epoch {run['epoch']}/{cfg.max_epochs} step {int(state.step)} "
                f"loss {train_loss:.4f} val_loss {val['loss']:.4f} val_dice {val['dice_mean']:.3f}"
                f"{' *' if improved else ''}  {record['voxels_per_s'] / 1e6:.2f} Mvox/s  "
                f"ETA {_fmt_eta(per_epoch * (cfg.max_epochs - run['epoch']))}")
            if after_epoch is not None:
                after_epoch(run["epoch"])
            if stop:
                log(f"[{name}] early stopping: no improvement for {run['bad_epochs']} epochs")
                break
        return state, run
    finally:
        ckpt.close()


def _write_jsonl(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
