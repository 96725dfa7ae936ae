"""Property-based tests of the readers of the newer layouts: dataset.json, 4-D NIfTI and .mgz headers.

Each example copies a valid data set — an MSD task (4-D images), an nnU-Net v2 raw data set, or a
parcellation set stored as ``.mgz`` — and damages it: random JSON in ``dataset.json`` (any JSON
value, a valid file with one entry replaced, removed or added, random bytes, a cut file), random
bytes in the header of a 4-D NIfTI image or of an ``.mgz``, a cut ``.mgz``. The validator and the
loader must then either succeed or report :class:`~timm_jax.data.io.DataError` problems of one line
each; no other exception, and no file is written or changed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fuzz_record import FUZZ, Tally
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_jax.data.io import DataError, dataset_info, list_cases, load_case
from timm_jax.data.validate import validate_dataset
from timm_jax.data.writers import write_msd_task, write_nnunet_dataset, write_parcellation_case

TALLY = Tally("layout readers (timm_jax/data/layouts.py dataset_info, io.py inspect_case)")
SHAPE = (6, 7, 5)
NIFTI1_HEADER, MGH_HEADER = 348, 284
UNCHANGED = "none (read-only; the files are unchanged)"


@pytest.fixture(scope="module", autouse=True)
def _record():
    yield
    TALLY.write()


def _image(seed, channels):
    rng = np.random.default_rng(seed)
    img = rng.uniform(1, 100, size=SHAPE + (channels,)).astype(np.float32)
    img[0] = 0.0
    return img


def _labels(top=3):
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:5, 1:6, 1:4] = 1
    lab[2:4, 2:4, 2:3] = min(2, top)
    lab[3, 3, 2] = top
    return lab


_TEMPLATES: dict[str, Path] = {}


def template(kind: str) -> Path:
    """A valid data set per kind, written once and copied per example."""
    if kind not in _TEMPLATES:
        root = Path(tempfile.mkdtemp(prefix=f"fuzz_{kind}_")) / "data"
        if kind == "msd":
            cases = {"BRATS_001": (_image(0, 4), _labels()), "BRATS_002": (_image(1, 4), _labels())}
            cases["BRATS_003"] = (_image(2, 4), None)
            write_msd_task(root, cases)
        elif kind == "nnunet":
            cases = {f"c{i}": (_image(i, 2), _labels(2)) for i in range(2)}
            cases["t0"] = (_image(5, 2), None)
            labels = {"background": 0, "whole": [1, 2], "core": 2}
            write_nnunet_dataset(
                root, cases, channel_names={"0": "T1", "1": "T2"}, labels=labels, regions_class_order=[1, 2]
            )
        else:
            for i in range(2):
                write_parcellation_case(root, f"s{i}", _image(i, 2), _labels(), ext=".mgz")
        assert not validate_dataset(root, LAYOUT[kind])[1]
        _TEMPLATES[kind] = root
    return _TEMPLATES[kind]


LAYOUT = {"msd": "msd", "nnunet": "nnunet", "mgz": "parcellation"}


@pytest.fixture(scope="module", autouse=True)
def _remove_templates():
    yield
    for root in _TEMPLATES.values():
        shutil.rmtree(root.parent, ignore_errors=True)


def digest(root):
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*")) if p.is_file()
    }


def check_never_raises(root: Path, layout: str) -> str:
    """The contract: DataError (one line per problem) or success, files unchanged; the outcome's name."""
    before = digest(root)
    summaries, problems = validate_dataset(root, layout)
    for p in problems:
        assert str(p).strip() and "\n" not in str(p) and "Traceback" not in str(p), str(p)
    try:
        info = dataset_info(root, layout)
    except DataError as err:
        assert problems and not summaries
        assert all("\n" not in str(p) for p in err.problems)
        outcome = "reported: the data set refused in one line naming the file"
    else:
        for subset in ("train", "test"):
            for cid in list_cases(root, layout, info=info, subset=subset):
                try:
                    load_case(root, cid, layout, info=info, require_labels=subset == "train")
                except DataError as err:
                    assert all("\n" not in str(p) for p in err.problems)
        outcome = (
            "reported: one line per problem naming the file" if problems else "accepted: every case loads"
        )
    assert digest(root) == before
    return outcome


# ----------------------------------------------------------------------------------- dataset.json
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
#: strings that look like what the files hold: channel numbers, paths in and out of the data set
PATHISH = st.sampled_from(
    [
        "0",
        "1",
        "2",
        "4",
        "./imagesTr/BRATS_001.nii.gz",
        "../x.nii.gz",
        "/etc/passwd",
        "./labelsTr",
        "",
        "²",
        "imagesTs/t0_0000.nii.gz",
        "a" * 300,
        ".nii.gz",
        "ignore",
        "background",
    ]
)
VALUE = JSON | PATHISH | st.lists(PATHISH, max_size=3) | st.dictionaries(PATHISH, JSON | PATHISH, max_size=3)


def _paths(tree, prefix=()):
    """Every (path of keys/indices) in a JSON tree, the root included."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


def _mutate(tree, path, how, value):
    if not path:
        return value
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if how == "replace":
        parent[last] = value
    elif how == "remove":
        del parent[last]
    elif isinstance(parent, dict):
        parent[str(value)[:12] if not isinstance(value, str) else value] = value
    else:
        parent.insert(last, value)
    return tree


def check_dataset_json(kind, how, pick, value, seed):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(template(kind), root)
        path = root / "dataset.json"
        text = path.read_text()
        rng = np.random.default_rng(seed)
        if how == "any JSON":
            path.write_text(json.dumps(value))
        elif how == "random bytes":
            raw = bytearray(text.encode())
            for pos in rng.choice(len(raw), int(rng.integers(1, 8)), replace=False):
                raw[pos] = int(rng.integers(256))
            path.write_bytes(bytes(raw))
        elif how == "cut":
            path.write_text(text[: int(rng.integers(0, len(text)))])
        else:
            tree = json.loads(text)
            paths = list(_paths(tree))
            target = paths[pick % len(paths)]
            path.write_text(json.dumps(_mutate(tree, target, how, value)))
        outcome = check_never_raises(root, LAYOUT[kind])
    TALLY.add(f"dataset.json: {how} ({kind})", outcome, UNCHANGED)


@settings(FUZZ, max_examples=80)
@given(
    kind=st.sampled_from(["msd", "nnunet"]),
    how=st.sampled_from(["replace", "remove", "add", "any JSON", "random bytes", "cut"]),
    pick=st.integers(0, 10_000),
    value=VALUE,
    seed=st.integers(0, 2**32 - 1),
)
def test_any_dataset_json_is_reported_or_accepted(kind, how, pick, value, seed):
    check_dataset_json(kind, how, pick, value, seed)


@pytest.mark.slow
@settings(FUZZ, max_examples=600)
@given(
    kind=st.sampled_from(["msd", "nnunet"]),
    how=st.sampled_from(["replace", "remove", "add", "any JSON", "random bytes", "cut"]),
    pick=st.integers(0, 10_000),
    value=VALUE,
    seed=st.integers(0, 2**32 - 1),
)
def test_any_dataset_json_is_reported_or_accepted_long(kind, how, pick, value, seed):
    check_dataset_json(kind, how, pick, value, seed)


# ----------------------------------------------------------------------------------- headers
def _header_file(root: Path, kind: str, pick: int) -> tuple[Path, int]:
    if kind == "msd":  # a 4-D NIfTI image
        files = sorted((root / "imagesTr").glob("*.nii.gz")) + sorted((root / "imagesTs").glob("*.nii.gz"))
        return files[pick % len(files)], NIFTI1_HEADER
    files = sorted(root.rglob("*.mgz"))
    return files[pick % len(files)], MGH_HEADER


def check_header(kind, pick, n_bytes, cut, seed):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(template(kind), root)
        path, size = _header_file(root, kind, pick)
        raw = bytearray(gzip.decompress(path.read_bytes()))
        for pos in rng.choice(size, n_bytes, replace=False):
            raw[pos] = int(rng.integers(256))
        data = gzip.compress(bytes(raw))
        if cut:
            data = data[: int(len(data) * rng.uniform(0.05, 0.95))]
        path.write_bytes(data)
        outcome = check_never_raises(root, LAYOUT[kind])
    what = "4-D NIfTI" if kind == "msd" else ".mgz"
    TALLY.add(f"random header bytes{' and a cut file' if cut else ''} ({what})", outcome, UNCHANGED)


@settings(FUZZ, max_examples=60)
@given(
    kind=st.sampled_from(["msd", "mgz"]),
    pick=st.integers(0, 10),
    n_bytes=st.integers(1, 12),
    cut=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_header_bytes_of_4d_nifti_and_mgz_never_raise(kind, pick, n_bytes, cut, seed):
    check_header(kind, pick, n_bytes, cut, seed)


@pytest.mark.slow
@settings(FUZZ, max_examples=500)
@given(
    kind=st.sampled_from(["msd", "mgz"]),
    pick=st.integers(0, 10),
    n_bytes=st.integers(1, 40),
    cut=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_header_bytes_of_4d_nifti_and_mgz_never_raise_long(kind, pick, n_bytes, cut, seed):
    check_header(kind, pick, n_bytes, cut, seed)


def test_4d_image_with_another_channel_count_in_its_header(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(template("msd"), root)
    path = root / "imagesTr" / "BRATS_001.nii.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[48:50] = np.int16(2).tobytes()  # dim[4]: 4 channels -> 2 (the file is then longer than declared)
    path.write_bytes(gzip.compress(bytes(raw)))
    summaries, problems = validate_dataset(root, "msd")
    (p,) = problems
    assert p.path == str(path) and "has 2 channels" in p.message and "expected 4" in p.message
    TALLY.add("4-D NIfTI with another channel count (msd)", "reported: one line naming the file", UNCHANGED)


# ----------------------------------------------------------------------------------- label maps
LABEL_MAP = st.dictionaries(
    st.text(max_size=8) | st.sampled_from(["background", "unmapped", "1", "0", "²", "3"]),
    JSON
    | st.lists(
        st.integers(-3, 2**32) | st.sampled_from(["1000-1035", "9-3", "1-", "a-b", "0-0"]), max_size=5
    ),
    max_size=5,
)


@settings(FUZZ, max_examples=150)
@given(content=LABEL_MAP | JSON)
def test_any_label_map_json_is_reported_or_accepted(content):
    from timm_jax.data.labelmaps import LabelMap, load_label_map

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "map.json"
        path.write_text(json.dumps(content))
        try:
            lm = load_label_map(path)
        except DataError as err:
            assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
            outcome = "reported: one line naming the file"
        else:
            assert isinstance(lm, LabelMap) and lm.classes
            assert lm.apply(np.arange(40).reshape(2, 4, 5)).dtype == np.int32
            outcome = "accepted: a label map"
    TALLY.add("label map: any JSON (--label_map=FILE)", outcome, UNCHANGED)
