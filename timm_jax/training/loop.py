"""The epoch loop shared by training, T-IMM adaption and fine-tuning.

Validation after every epoch; reduce-on-plateau of the learning rate; early stopping on the
validation loss; ``latest`` and ``best`` checkpoints of a :class:`~timm_jax.training.rundir.RunDir`;
progress lines (logged); metrics in ``<run>/metrics.jsonl``. A killed run, started again with the
same arguments, resumes from its latest checkpoint and, because the step RNG, the optimiser state
(learning rate included) and the input pipeline position are all restored, ends with the same
result as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timm_jax.config import TrainConfig
from timm_jax.core.losses import probability_loss
from timm_jax.errors import DivergenceError
from timm_jax.faults import fault
from timm_jax.progress import bar
from timm_jax.training.events import Events
from timm_jax.training.metrics import evaluate_case
from timm_jax.training.rundir import RunDir
from timm_jax.training.steps import TrainState, learning_rate, scale_learning_rate

_log = logging.getLogger(__name__)


@jax.jit
def _finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _all_finite(tree) -> bool:
    return bool(_finite(tree))


def state_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def from_state_dict(d: dict) -> TrainState:
    return TrainState(step=d["step"], params=d["params"], opt_state=d["opt_state"], rng=d["rng"])


def pad_to_multiple(x: np.ndarray, divisor: int, spatial_axes=(0, 1, 2)) -> np.ndarray:
    pads = [(0, 0)] * x.ndim
    for a in spatial_axes:
        pads[a] = (0, (-x.shape[a]) % divisor)
    return np.pad(x, pads)


def window_evaluator(
    predict: Callable,
    cases: Sequence,
    task=None,
    *,
    loss: str = TrainConfig.loss,
    prepare: Callable | None = None,
) -> Callable:
    """``evaluate(params) -> {"loss", "dice": [per channel], "dice_mean", "channels"}`` on the
    validation cases, predicted exactly as ``evaluate.py`` predicts them.

    Each case's probabilities come from ``predict(model_params, image)`` (the run's
    :func:`~timm_jax.training.inference.make_predictor`: sliding windows at the training patch);
    its loss is :func:`~timm_jax.core.losses.probability_loss` of those probabilities (``loss``
    is the training loss, or ``"entropy"``: the labels are never read, no Dice) and its Dice per
    channel is :func:`~timm_jax.training.metrics.evaluate_case`'s. Loss and Dice are means over the
    cases. ``prepare(params) -> model_params`` runs once per evaluation (the adaption stage
    materialises its fused parameters there).
    """
    if not cases:
        raise ValueError("validation needs at least one case")
    label_free = loss == "entropy"
    names = [] if label_free else [str(c) for c in task.channel_names]

    def evaluate(params) -> dict:
        model_params = prepare(params) if prepare is not None else params
        losses_, dices = [], []
        for case in cases:
            probs = predict(model_params, case.image)
            targets = None if label_free else np.asarray(task.targets(case.labels), np.float32)
            losses_.append(float(probability_loss(probs[None], None if label_free else targets[None], loss)))
            if not label_free:
                row = evaluate_case(probs, targets, names, compute_hd95=False)
                dices.append([row[f"dice_{c}"] for c in names])
        dice = np.mean(dices, axis=0) if dices else np.zeros(0)
        return {
            "channels": names,
            "loss": float(np.mean(losses_)),
            "dice": [float(d) for d in dice],
            "dice_mean": float(np.mean(dice)) if dices else math.nan,
        }

    return evaluate


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def fit(
    run: RunDir,
    *,
    state: TrainState,
    train_step: Callable,
    evaluate: Callable,
    batches_from: Callable[[int], Iterator[dict]],
    cfg: TrainConfig,
    name: str = "train",
    epoch_scalars: Callable[[TrainState], dict[str, float]] | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> tuple[TrainState, dict]:
    """Run (or resume) a training loop in ``run``; returns the final state and the run summary.

    Args:
      run: the run directory, opened with :meth:`RunDir.create` (which checked that its
        checkpoints, if any, are of this configuration). ``run.meta`` is stored in every
        checkpoint, with the loop's progress under ``"run"``.
      state: the freshly initialised state (used as-is, or as the structure to restore into).
      train_step: ``(state, batch) -> (state, {"loss"})``.
      evaluate: ``params -> {"loss", "dice", "dice_mean"}`` on the validation set.
      batches_from: ``start_step -> iterator of batches`` from that global step on.
      cfg: schedule (epochs, patience, plateau).
      name: the tag of the progress lines (``[train]``, ``[adapt]``).
      epoch_scalars: extra TensorBoard scalars from the state after each epoch (the adaption
        stage logs its mixing ratios).
      after_epoch: called with the epoch number after each checkpoint (tests use it to crash).
    """
    progress = {
        "epoch": 0,
        "best_loss": math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "plateau_epochs": 0,
        "history": [],
        "finished": False,
    }
    resumed = run.restore_newest(state_dict(state))
    if resumed is not None:
        restored, old = resumed
        state = from_state_dict(restored)
        progress.update(old["run"])
        run.check_best(state_dict(state))
        _log.info(
            "[%s] resuming from checkpoint at step %d (epoch %d) in %s",
            name,
            int(state.step),
            progress["epoch"],
            run.path,
        )
        if progress["finished"]:
            _log.info(
                "[%s] run already finished (best val loss %.4f at epoch %d)",
                name,
                progress["best_loss"],
                progress["best_epoch"],
            )
            return state, progress
    events = Events(run.path, purge_step=int(state.step) + 1 if resumed is not None else None)
    try:
        return _epochs(
            run,
            state,
            progress,
            events,
            train_step,
            evaluate,
            batches_from,
            cfg,
            name,
            epoch_scalars,
            after_epoch,
        )
    finally:
        events.close()


def _epochs(
    run, state, progress, events, train_step, evaluate, batches_from, cfg, name, epoch_scalars, after_epoch
):
    batches = batches_from(int(state.step))
    voxels = cfg.batch_size * int(np.prod(cfg.patch_shape))
    t_start = time.time()
    epochs_done = 0
    while progress["epoch"] < cfg.max_epochs:
        t0 = time.time()
        train_losses = []
        skip = cfg.skip_nonfinite_steps
        fault(f"{name}.epoch")  # nothing is written within an epoch: a kill here is one mid-epoch
        with bar(cfg.steps_per_epoch, f"[{name}] epoch {progress['epoch'] + 1}", "step") as steps:
            for i in range(cfg.steps_per_epoch):
                backup = jax.tree_util.tree_map(jnp.copy, state) if skip else None  # the step donates it
                new_state, m = train_step(state, next(batches))
                loss = float(m["loss"])  # one scalar per step: a non-finite step is named, not averaged
                finite = math.isfinite(loss) and (not skip or _all_finite(new_state.params))
                if not finite:
                    where = (
                        f"in epoch {progress['epoch'] + 1}, step {i + 1}/{cfg.steps_per_epoch} "
                        f"(global step {int(new_state.step)})"
                    )
                    if not skip:
                        raise DivergenceError(
                            f"[{name}] training loss is {loss} {where} (the loss or the previous step's "
                            "gradient is not finite); lower the learning rate. The last good checkpoint "
                            f"is in {run.path}"
                        )
                    # keep step counter and RNG (the input pipeline moves on), drop the update
                    new_state = new_state.replace(params=backup.params, opt_state=backup.opt_state)
                    progress["skipped_steps"] = progress.get("skipped_steps", 0) + 1
                    _log.warning("[%s] skipped a non-finite step %s (loss %s)", name, where, loss)
                else:
                    train_losses.append(loss)
                state = new_state
                steps.update()
        train_loss = float(np.mean(train_losses)) if train_losses else math.nan
        if not math.isfinite(train_loss) or not _all_finite(state.params):
            raise DivergenceError(
                f"[{name}] training produced non-finite parameters in epoch {progress['epoch'] + 1} "
                f"(global step {int(state.step)}; the last step's gradient was not finite); lower the "
                f"learning rate. The last good checkpoint is in {run.path}"
            )
        t_train = time.time() - t0
        fault(f"{name}.validate")
        val = evaluate(state.params)
        progress["epoch"] += 1
        epochs_done += 1
        lr = learning_rate(state)
        improved = val["loss"] < progress["best_loss"] - 1e-6
        if improved:
            progress.update(
                best_loss=val["loss"], best_epoch=progress["epoch"], bad_epochs=0, plateau_epochs=0
            )
        else:
            progress["bad_epochs"] += 1
            progress["plateau_epochs"] += 1
            if progress["plateau_epochs"] >= cfg.plateau_patience:
                new_lr = max(lr * cfg.plateau_factor, cfg.min_learning_rate)
                if new_lr < lr:
                    state = scale_learning_rate(state, new_lr / lr, cfg.min_learning_rate)
                    _log.info(
                        "[%s] validation loss has not improved for %d epochs: learning rate %.2e -> %.2e",
                        name,
                        progress["plateau_epochs"],
                        lr,
                        new_lr,
                    )
                progress["plateau_epochs"] = 0
        record = {
            "epoch": progress["epoch"],
            "step": int(state.step),
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_dice": val["dice"],
            "val_dice_mean": val["dice_mean"],
            "lr": lr,
            "voxels_per_s": voxels * cfg.steps_per_epoch / max(t_train, 1e-9),
            "epoch_s": time.time() - t0,
        }
        if skip:
            record["skipped_steps"] = progress.get("skipped_steps", 0)
        progress["history"].append(record)
        stop = progress["bad_epochs"] >= cfg.early_stopping_patience
        progress["finished"] = stop or progress["epoch"] >= cfg.max_epochs
        run.save(int(state.step), state_dict(state), dict(run.meta, run=progress), best=improved)
        run.write_metrics(progress["history"])
        channels = val.get("channels") or [str(k) for k in range(len(val["dice"]))]
        events.scalars(
            int(state.step),
            {
                "train/loss": train_loss,
                "val/loss": val["loss"],
                "val/dice_mean": val["dice_mean"],
                **{f"val/dice/{c}": d for c, d in zip(channels, val["dice"])},
                "lr": lr,
                "perf/step_time_s": t_train / cfg.steps_per_epoch,
                "perf/voxels_per_s": record["voxels_per_s"],
                **(epoch_scalars(state) if epoch_scalars is not None else {}),
            },
        )
        per_epoch = (time.time() - t_start) / epochs_done
        _log.info(
            "[%s] epoch %d/%d step %d loss %.4f val_loss %.4f val_dice %.3f%s  %.2f Mvox/s  ETA %s",
            name,
            progress["epoch"],
            cfg.max_epochs,
            int(state.step),
            train_loss,
            val["loss"],
            val["dice_mean"],
            " *" if improved else "",
            record["voxels_per_s"] / 1e6,
            _fmt_eta(per_epoch * (cfg.max_epochs - progress["epoch"])),
        )
        if after_epoch is not None:
            after_epoch(progress["epoch"])
        if stop:
            _log.info("[%s] early stopping: no improvement for %d epochs", name, progress["bad_epochs"])
            break
    return state, progress
