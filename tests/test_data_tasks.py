"""Tasks: label maps to target channels and back."""

import numpy as np
import pytest

from timm_jax.data.io import DataError
from timm_jax.data.tasks import Task, brats_regions, parcellation_labels, task_from_manifest


def test_brats_targets_are_nested_regions():
    task = brats_regions()
    assert task.num_channels == 3 and task.channel_names == ("WT", "TC", "ET")
    lm = np.array([[[0, 1, 2, 4]]])
    t = task.targets(lm)
    assert t.dtype == np.float32 and t.shape == (1, 1, 4, 3)
    np.testing.assert_array_equal(
        t[0, 0],
        [
            [0, 0, 0],  # background
            [1, 1, 0],  # necrosis: WT, TC
            [1, 0, 0],  # oedema: WT
            [1, 1, 1],
        ],  # enhancing: all
    )


def test_brats_decode_inverts_targets_and_follows_paint_order():
    task = brats_regions()
    lm = np.random.default_rng(0).choice([0, 1, 2, 4], size=(5, 6, 7))
    np.testing.assert_array_equal(task.decode(task.targets(lm)), lm)
    probs = np.array(
        [
            [0.9, 0.2, 0.1],  # WT only -> 2
            [0.9, 0.7, 0.4],  # TC \ ET -> 1
            [0.9, 0.7, 0.6],  # ET -> 4
            [0.4, 0.2, 0.6],  # ET alone still 4 (ET painted last)
            [0.5, 0.5, 0.5],  # threshold is strict
        ]
    )
    np.testing.assert_array_equal(task.decode(probs), [2, 1, 4, 4, 0])


def test_brats_unknown_label_raises():
    with pytest.raises(DataError, match=r"unknown value\(s\) \[3\]"):
        brats_regions().targets(np.array([0, 1, 3]))


def test_parcellation_targets_select_label_ids():
    task = parcellation_labels([3, 7, 12], ["a", "b", "c"])
    lm = np.array([0, 3, 5, 7, 12, 99])
    t = task.targets(lm)
    np.testing.assert_array_equal(t, [[0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    # unlisted labels (5, 99) are background unless known_labels restricts them
    strict = parcellation_labels([3, 7, 12], known_labels=range(0, 15))
    with pytest.raises(DataError, match="99"):
        strict.targets(lm)
    with pytest.raises(DataError, match="-2"):
        task.targets(np.array([0, -2]))


def test_parcellation_decode():
    task = parcellation_labels([8, 9, 14])
    probs = np.array(
        [
            [0.6, 0.7, 0.1],  # argmax 9
            [0.4, 0.3, 0.2],  # nothing above 0.5 -> 0
            [0.1, 0.2, 0.95],  # 14
        ]
    )
    out = task.decode(probs)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [9, 0, 14])
    lm = np.random.default_rng(1).choice([0, 8, 9, 14], size=(4, 4, 4))
    np.testing.assert_array_equal(task.decode(task.targets(lm)), lm)


def test_task_serialisation_roundtrip_and_manifest():
    for task in (
        brats_regions(),
        parcellation_labels([1, 2], ["x", "y"], name="t1", known_labels=[0, 1, 2, 3]),
    ):
        d = task.to_dict()
        assert Task.from_dict(d) == task
    manifest = {"tasks": {"task3": {"task": brats_regions("task3").to_dict()}}}
    assert task_from_manifest(manifest, "task3").name == "task3"
    with pytest.raises(KeyError):
        task_from_manifest(manifest, "task9")


def test_invalid_tasks_are_rejected():
    with pytest.raises(ValueError):
        parcellation_labels([0, 1])
    with pytest.raises(ValueError):
        Task("x", "brats", "regions", (1,), ("a", "b"), regions=((1,),))
    with pytest.raises(ValueError):
        Task("x", "brats", "other", (1,), ("a",))
    with pytest.raises(ValueError):
        parcellation_labels([1, 20], known_labels=range(10))
    with pytest.raises(ValueError):
        brats_regions().decode(np.zeros((2, 2)))
