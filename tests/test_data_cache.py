"""The preprocessing cache as memory-mappable .npy files, lazy cases, and the pipeline over memory maps."""

import itertools
import json
import pickle

import numpy as np
import pytest

from timm_jax.data import preprocess
from timm_jax.data.pipeline import PatchSampler, make_train_dataset
from timm_jax.data.preprocess import LazyCases, PreprocessConfig, load_preprocessed, load_preprocessed_lazy
from timm_jax.data.spec import DataSpec, resolve
from timm_jax.data.tasks import brats_regions
from timm_jax.data.writers import write_brats_case

SHAPE = (20, 18, 16)


def _data(root, n=4, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.zeros(SHAPE + (4,), np.float32)
        img[2:18, 2:16, 2:14] = rng.uniform(1, 100, size=(16, 14, 12, 4))
        lab = np.zeros(SHAPE, np.uint8)
        lab[6:12, 5:11, 4:9] = 2
        lab[8:10, 7:9, 5:8] = 1
        lab[9, 8, 6] = 4
        write_brats_case(root, f"case{i}", img, lab, np.diag([-1.0, -1.0, 1.0, 1.0]))  # LPS, as BraTS
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _data(tmp_path_factory.mktemp("brats") / "data")


def test_cache_entry_is_npy_files_and_a_record_and_mmap_gives_read_only_views(data, tmp_path):
    cfg = PreprocessConfig(shape_multiple=8)
    case = load_preprocessed(data, "case0", "brats", cfg, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and not [n for n in names if n.startswith(".")]  # no temporary left
    (rec,) = [n for n in names if n.endswith(".json")]
    stem = rec[: -len(".json")]
    assert names == sorted([rec, f"{stem}.image.npy", f"{stem}.labels.npy"])
    record = json.loads((tmp_path / rec).read_text())
    assert record["arrays"]["image"] == {
        "file": f"{stem}.image.npy",
        "shape": [*case.shape, 4],
        "dtype": "float32",
    }
    assert record["meta"]["convention"] == "brats2018" and record["version"] == 2
    mapped = load_preprocessed(data, "case0", "brats", cfg, tmp_path, mmap=True)
    for arr in (mapped.image, mapped.labels):
        assert isinstance(arr, np.memmap) and not arr.flags.writeable
    np.testing.assert_array_equal(mapped.image, case.image)
    np.testing.assert_array_equal(mapped.labels, case.labels)
    assert mapped.meta == case.meta and mapped.paths == case.paths
    plain = load_preprocessed(data, "case0", "brats", cfg, tmp_path)  # a cache hit, read into memory
    assert not isinstance(plain.image, np.memmap) and plain.image.flags.writeable


def test_old_npz_entries_are_not_read_the_case_is_preprocessed_again(data, tmp_path, monkeypatch):
    # a version-1 entry of the same case: <case>-<key>.npz with other content
    np.savez(tmp_path / "case0-0123456789abcdef0123.npz", image=np.zeros((2, 2, 2, 4), np.float32))
    calls = []
    real = preprocess.preprocess_case
    monkeypatch.setattr(preprocess, "preprocess_case", lambda c, cfg: calls.append(1) or real(c, cfg))
    case = load_preprocessed(data, "case0", "brats", PreprocessConfig(), tmp_path)
    assert calls == [1] and case.image.shape[-1] == 4 and case.shape != (2, 2, 2)
    assert len(list(tmp_path.glob("*.json"))) == 1 and len(list(tmp_path.glob("*.npz"))) == 1  # left alone


def test_mmap_needs_a_cache_dir(data):
    with pytest.raises(ValueError, match="cache_dir"):
        load_preprocessed(data, "case0", "brats", mmap=True)


def test_lazy_cases_open_one_case_per_access(data, tmp_path):
    ids = ["case0", "case1", "case2"]
    lazy = load_preprocessed_lazy(
        data, ids, "brats", PreprocessConfig(), tmp_path, check=brats_regions().check_labels
    )
    assert isinstance(lazy, LazyCases) and len(lazy) == 3 and lazy.ids == ids
    assert len(list(tmp_path.glob("*.json"))) == 3  # all cached up front
    cases = list(lazy)
    assert [c.case_id for c in cases] == ids and all(isinstance(c.image, np.memmap) for c in cases)
    assert [c.case_id for c in lazy[1:]] == ids[1:]
    assert len(pickle.dumps(lazy)) < 20_000  # ids and settings, no voxels


def _take(ds, n):
    it = iter(ds)
    try:
        return list(itertools.islice(it, n))
    finally:
        if hasattr(it, "close"):
            it.close()


def test_memory_mapped_and_in_memory_cases_give_bit_identical_batches(data, tmp_path):
    cfg = PreprocessConfig(shape_multiple=8)
    ids = ["case0", "case1", "case2", "case3"]
    in_memory = [load_preprocessed(data, c, "brats", cfg, tmp_path) for c in ids]
    lazy = load_preprocessed_lazy(data, ids, "brats", cfg, tmp_path)
    task = brats_regions()
    kw = dict(patch_shape=(8, 8, 8), batch_size=3, seed=4, foreground_rate=0.5)
    a = _take(make_train_dataset(in_memory, task, **kw), 12)
    b = _take(make_train_dataset(lazy, task, **kw), 12)
    c = _take(make_train_dataset(lazy, task, num_workers=2, **kw), 12)  # the sampler pickled to workers
    for x, y, z in zip(a, b, c):
        for k in ("image", "target"):
            assert np.array_equal(x[k], y[k]) and np.array_equal(x[k], z[k])
    sampler = PatchSampler(lazy, task, (8, 8, 8), seed=4)
    assert not any(isinstance(v, np.ndarray) for v in sampler.images + sampler.labels)  # file refs only
    assert len(pickle.dumps(sampler)) < 20_000
    held = PatchSampler(in_memory, task, (8, 8, 8), seed=4)
    assert len(pickle.dumps(held)) > sum(c.image.nbytes for c in in_memory)


def test_cases_smaller_than_the_patch_are_padded_in_memory_from_a_memory_map(data, tmp_path):
    lazy = load_preprocessed_lazy(data, ["case0"], "brats", PreprocessConfig(shape_multiple=1), tmp_path)
    big = (32, 8, 8)
    mapped = PatchSampler(lazy, brats_regions(), big, seed=1, augment=False)
    held = PatchSampler([lazy[0]], brats_regions(), big, seed=1, augment=False)
    assert isinstance(mapped.images[0], np.ndarray)
    for i in range(6):
        x, y = mapped.sample(i)[0], held.sample(i)[0]
        assert x["image"].shape == (*big, 4) and np.array_equal(x["image"], y["image"])


def test_data_load_mmap_through_the_spec(data, tmp_path):
    spec = DataSpec(
        data_dir=str(data), layout="brats", cache_dir=str(tmp_path), val_fraction=0.25, test_fraction=0.25
    )
    d = resolve(spec)
    assert d.info.convention == "brats2018" and d.in_channels == 4
    lazy = d.load(d.train_ids, mmap=True)
    eager = d.load(d.train_ids)
    assert isinstance(lazy, LazyCases) and len(lazy) == len(eager) == len(d.train_ids)
    for x, y in zip(lazy, eager):
        assert isinstance(x.image, np.memmap)
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.labels, y.labels)
