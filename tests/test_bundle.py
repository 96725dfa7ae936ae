"""Model bundles: export, contents, verification, and fusing / fine-tuning from bundles alone.

Two tiny parcellation sources (base 2, depth 2, one step) are trained once per module on a tiny
demo data set; the fusion target is its BraTS task. The required test: bundles of both sources
fuse — with the sources' run directories and data moved away — into exactly the parameters the
run directories fuse into.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _demo import script_env, tiny_demo

from timm_jax.config import FuseConfig, ModelConfig, TrainConfig
from timm_jax.core.partition import to_flat_dict
from timm_jax.data.spec import DataSpec
from timm_jax.errors import CheckpointError, ConfigError
from timm_jax.runs import fisher_cache
from timm_jax.runs.bundle import BundleError, file_sha256, is_bundle, open_bundle
from timm_jax.runs.bundle_export import export_bundle, source_fisher_any
from timm_jax.runs.models import load_model
from timm_jax.training.rundir import load_run
from timm_jax.workflows import fuse
from timm_jax.workflows.train import load_init, train_model

ROOT = Path(__file__).resolve().parents[1]
NET = ModelConfig(base_filters=2, depth=2)
SCHED = TrainConfig(patch_shape=(16, 16, 16), batch_size=2, steps_per_epoch=1, max_epochs=1)
PATCHES = 2  # Fisher patches per case


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    tiny_demo(tmp / "data", n_parc_task1=2, n_parc_task2=2, n_brats_train=2, n_brats_test=1)
    parc = lambda key: DataSpec(
        data_dir=str(tmp / "data" / "parcellation"), layout="parcellation", task_key=key
    )
    m1, m2 = str(tmp / "runs" / "m1"), str(tmp / "runs" / "m2")
    train_model(parc("task1"), NET, SCHED, m1)
    train_model(parc("task2"), NET, SCHED, m2, init="transfer", init_from=m1)
    target = DataSpec(data_dir=str(tmp / "data" / "brats"), layout="brats", task_key="task3")
    out = tmp / "bundles"
    b1 = export_bundle(m1, str(out / "m1"), fishers=("empirical", "adam"), patches_per_case=PATCHES)
    b2 = export_bundle(m2, str(out / "m2"), fishers=("empirical",), patches_per_case=PATCHES)
    return SimpleNamespace(tmp=tmp, m1=m1, m2=m2, b1=b1, b2=b2, target=target, parc=parc)


def flat(tree):
    return {k: np.asarray(v) for k, v in to_flat_dict(tree).items()}


def assert_trees_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def copy_bundle(env, name="copy"):
    dst = env.tmp / "planted" / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(env.b1, dst)
    return dst


def rewrite_checksums(bundle: Path) -> None:
    """What an attacker (or a careless edit) would do: make bundle.json's checksums fit the files."""
    rec = json.loads((bundle / "bundle.json").read_text())
    for name in rec["files"]:
        if (bundle / name).is_file():
            size = (bundle / name).stat().st_size
            rec["files"][name] = {"sha256": file_sha256(bundle / name), "bytes": size}
    (bundle / "bundle.json").write_text(json.dumps(rec))


# ---------------------------------------------------------------------------- contents


def test_bundle_holds_the_params_fishers_and_description_but_no_data(env):
    b = Path(env.b1)
    assert sorted(os.listdir(b)) == [
        "MODEL_CARD.md",
        "bundle.json",
        "fisher_adam.npz",
        "fisher_empirical.npz",
        "params.npz",
    ]
    assert is_bundle(b) and not is_bundle(env.m1)
    rec = json.loads((b / "bundle.json").read_text())
    assert (rec["format"], rec["version"]) == ("timm_jax.bundle", 1)
    assert rec["code"]["version"] and "git_commit" in rec["code"]
    assert rec["data"]["layout"] == "parcellation" and rec["data"]["normalisation"] == "histogram"
    assert "data_dir" not in rec["data"] and rec["data_info"]["root"] == ""
    assert rec["data_info"]["modalities"] == ["t1", "t2"]
    assert rec["train"]["patch_shape"] == [16, 16, 16]
    assert rec["task"]["channel_names"][0] == "thalamus"
    assert rec["model"]["in_channels"] == 2 and rec["model"]["out_channels"] == 7
    settings = rec["fishers"]["empirical"]["settings"]
    assert settings["patches_per_case"] == PATCHES and settings["seed"] == 0
    assert settings["patch_shape"] == [16, 16, 16] and settings["examples"] == "patches"
    assert rec["fishers"]["adam"]["settings"]["kind"] == "adam"
    for name, entry in rec["files"].items():
        assert entry["sha256"] == file_sha256(b / name)
    # no path of the machine, no case id (the default), no image
    meta = load_run(env.m1)[1]
    text = (b / "bundle.json").read_text() + (b / "MODEL_CARD.md").read_text()
    assert str(env.tmp) not in text
    assert not any(cid in text for cid in meta["train_ids"] + meta["val_ids"])
    card = (b / "MODEL_CARD.md").read_text()
    assert "contains no image" in card and "thalamus" in card and "Validation Dice of the best epoch" in card
    # the arrays: the run's best params, the Fishers source_fisher gives (from its cache)
    bundle = open_bundle(b)
    params, _ = load_run(env.m1)
    assert_trees_equal(bundle.params, params)
    assert_trees_equal(
        bundle.fisher("empirical"), fisher_cache.source_fisher(env.m1, patches_per_case=PATCHES)
    )
    assert_trees_equal(bundle.fisher("adam"), fisher_cache.adam_source_fisher(env.m1))
    assert bundle.meta["kind"] == "train" and bundle.meta["run_key"] == meta["run_key"]
    assert bundle.meta["data_info"]["modalities"] == ["t1", "t2"]
    with pytest.raises(CheckpointError, match=r"holds no true Fisher \(it has: empirical, adam\)"):
        bundle.fisher("true")
    # the Fisher of a run or a bundle, one call
    assert_trees_equal(source_fisher_any(env.b1), bundle.fisher("empirical"))
    assert_trees_equal(source_fisher_any(env.m1, patches_per_case=PATCHES), bundle.fisher("empirical"))


def test_case_ids_only_when_asked_and_no_overwrite_by_default(env):
    out = env.tmp / "bundles" / "with_ids"
    export_bundle(env.m1, str(out), fishers=(), include_case_ids=True)
    rec = json.loads((out / "bundle.json").read_text())
    meta = load_run(env.m1)[1]
    assert rec["case_ids"] == {"train": meta["train_ids"], "val": meta["val_ids"]}
    assert rec["fishers"] == {} and "fisher_empirical.npz" not in os.listdir(out)
    with pytest.raises(ConfigError, match="exists; choose another --out or pass --overwrite"):
        export_bundle(env.m1, str(out), fishers=())
    export_bundle(env.m1, str(out), fishers=(), overwrite=True)
    assert "case_ids" not in json.loads((out / "bundle.json").read_text())
    (env.tmp / "not_a_bundle").mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match="is not a model bundle; it is not replaced"):
        export_bundle(env.m1, str(env.tmp / "not_a_bundle"), fishers=(), overwrite=True)


# ---------------------------------------------------------------------------- fusing and training


def test_bundles_fuse_without_their_runs_or_data_into_the_runs_fusion(env):
    cfg = FuseConfig(method="imm", fisher_patches=PATCHES)
    adapt = SCHED.replace(max_epochs=1, steps_per_epoch=1)
    from_runs = str(env.tmp / "fused" / "runs_imm")
    fuse.fuse_models([env.m1, env.m2], env.target, from_runs, cfg, adapt)
    # the sources' data and run directories go away: the bundles are all there is
    away = env.tmp / "away"
    away.mkdir()
    moved = [(env.tmp / "data" / "parcellation", away / "parcellation"), (env.tmp / "runs", away / "runs")]
    for a, b in moved:
        os.rename(a, b)
    try:
        from_bundles = str(env.tmp / "fused" / "bundles_imm")
        fuse.fuse_models([env.b1, env.b2], env.target, from_bundles, cfg, adapt)
        assert_trees_equal(load_run(from_bundles)[0], load_run(from_runs)[0])
        ratios = json.loads((Path(from_bundles) / "mixing_ratios.json").read_text())
        assert ratios["sources"] == ["m1", "m2"]
        # T-IMM from the bundles runs too (adaption stage on the target's data)
        timm = str(env.tmp / "fused" / "bundles_timm")
        timm_cfg = FuseConfig(method="timm", fisher_patches=PATCHES)
        fuse.fuse_models([env.b1, env.b2], env.target, timm, timm_cfg, adapt)
        params, meta = load_run(timm)
        assert meta["kind"] == "fused" and meta["adaption"]["epochs"] == 1
        assert all(np.all(np.isfinite(v)) for v in flat(params).values())
        # a Fisher the bundle does not have: one line naming what it has
        with pytest.raises(CheckpointError, match="holds no adam Fisher .it has: empirical."):
            x = str(env.tmp / "fused" / "x")
            fuse.fuse_models([env.b1, env.b2], env.target, x, FuseConfig(method="imm", fisher="adam"))
    finally:
        for a, b in moved:
            os.rename(b, a)


def test_fine_tuning_from_a_bundle_equals_fine_tuning_from_its_run(env):
    spec = env.parc("task2")
    a, b = str(env.tmp / "ft" / "from_run"), str(env.tmp / "ft" / "from_bundle")
    train_model(spec, NET, SCHED, a, init="transfer", init_from=env.m1)
    train_model(spec, NET, SCHED, b, init="transfer", init_from=env.b1)
    assert_trees_equal(load_run(a)[0], load_run(b)[0])
    with pytest.raises(ConfigError, match="is a model bundle; use --init=transfer"):
        load_init("fused", env.b1, NET)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_init("transfer", env.b1, NET.replace(base_filters=4))
    src = load_model(env.b1, kinds=("train",))
    assert src.path == env.b1 and src.cfg.base_filters == 2


# ---------------------------------------------------------------------------- refusals


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def test_a_pickled_object_array_is_refused_even_with_matching_checksums(env):
    b = copy_bundle(env, "pickled")
    params = dict(np.load(b / "params.npz"))
    key = sorted(params)[0]
    params[key] = np.array([{"x": 1}, None], dtype=object)
    with open(b / "params.npz", "wb") as f:
        np.savez(f, **params)
    rewrite_checksums(b)
    with pytest.raises(BundleError) as e:
        open_bundle(b)
    assert "params.npz: holds a pickled object array" in one_line(e) and str(b) in str(e.value)


@pytest.mark.parametrize("where", ["extra", "replacing"])
def test_an_outward_symlink_is_refused(env, where):
    b = copy_bundle(env, f"link_{where}")
    outside = env.tmp / "planted" / f"outside_{where}.npz"
    shutil.copy(b / "params.npz", outside)
    if where == "extra":
        os.symlink(outside, b / "more.npz")
        name = "more.npz"
    else:  # params.npz itself, pointing to a byte-identical copy outside: checksums all match
        os.unlink(b / "params.npz")
        os.symlink(outside, b / "params.npz")
        name = "params.npz"
    with pytest.raises(BundleError) as e:
        open_bundle(b)
    assert f"{name}: is a symbolic link (to {outside}, outside the bundle)" in one_line(e)


def test_damaged_missing_extra_foreign_and_newer_bundles_are_refused(env):
    cases = []

    def plant(name, change, message):
        b = copy_bundle(env, name)
        change(b)
        cases.append((b, message))

    def flip(b):
        data = bytearray((b / "fisher_empirical.npz").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (b / "fisher_empirical.npz").write_bytes(bytes(data))

    def edit(key, value):
        def change(b):
            rec = json.loads((b / "bundle.json").read_text())
            rec[key] = value
            (b / "bundle.json").write_text(json.dumps(rec))

        return change

    def fisher_shape(b):
        f = dict(np.load(b / "fisher_empirical.npz"))
        k = sorted(f)[0]
        f[k] = np.zeros((*f[k].shape, 2), np.float32)
        with open(b / "fisher_empirical.npz", "wb") as fh:
            np.savez(fh, **f)
        rewrite_checksums(b)

    def params_shape(b):
        p = dict(np.load(b / "params.npz"))
        k = sorted(p)[0]
        p[k] = p[k][..., :1]
        with open(b / "params.npz", "wb") as fh:
            np.savez(fh, **p)
        f = {kk: (v[..., :1] if kk == k else v) for kk, v in np.load(b / "fisher_empirical.npz").items()}
        with open(b / "fisher_empirical.npz", "wb") as fh:
            np.savez(fh, **f)
        f = {kk: (v[..., :1] if kk == k else v) for kk, v in np.load(b / "fisher_adam.npz").items()}
        with open(b / "fisher_adam.npz", "wb") as fh:
            np.savez(fh, **f)
        rewrite_checksums(b)

    def negative_fisher(b):
        f = dict(np.load(b / "fisher_adam.npz"))
        k = sorted(f)[0]
        f[k] = -np.ones_like(f[k])
        with open(b / "fisher_adam.npz", "wb") as fh:
            np.savez(fh, **f)
        rewrite_checksums(b)

    plant("damaged", flip, "fisher_empirical.npz: checksum mismatch")
    plant("missing", lambda b: os.unlink(b / "fisher_adam.npz"), "fisher_adam.npz: is missing")
    plant("extra", lambda b: (b / "notes.txt").write_text("hi"), "notes.txt: is not listed in bundle.json")
    plant("folder", lambda b: (b / "sub").mkdir(), "sub: is a folder")
    plant("newer", edit("version", 2), "is of format version 2; this timm_jax reads version 1")
    plant("foreign", edit("format", "something.else"), "is not a timm_jax.bundle record")
    plant("nojson", lambda b: (b / "bundle.json").write_text("{not json"), "bundle.json: is not JSON")
    plant("fisher_shape", fisher_shape, "fisher_empirical.npz: does not match params.npz")
    plant("params_shape", params_shape, "params.npz: does not hold the parameters of the network")
    plant("negative", negative_fisher, "fisher_adam.npz: array")
    for b, message in cases:
        with pytest.raises(BundleError) as e:
            open_bundle(b)
        assert message in one_line(e), (b.name, str(e.value))
    assert not is_bundle(env.tmp / "planted" / "foreign")


@pytest.mark.e2e
def test_the_bundle_command_exports_and_verify_refuses_in_one_line(env):
    tmp = env.tmp
    e = script_env(tmp, ROOT)
    out = tmp / "bundles" / "cli"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "timm_jax.bundle",
            "export",
            f"--run={env.m2}",
            f"--out={out}",
            "--fisher=adam",
        ],
        env=e,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[bundle] wrote" in p.stdout and sorted(os.listdir(out))[2] == "fisher_adam.npz"
    p = subprocess.run(
        [sys.executable, "-m", "timm_jax.bundle", "verify", str(out)],
        env=e,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0 and json.loads(p.stdout)["fishers"]["adam"]["kind"] == "adam"
    b = copy_bundle(env, "cli_pickled")
    params = dict(np.load(b / "params.npz"))
    params[sorted(params)[-1]] = np.array([object()], dtype=object)
    with open(b / "params.npz", "wb") as f:
        np.savez(f, **params)
    rewrite_checksums(b)
    p = subprocess.run(
        [sys.executable, "-m", "timm_jax.bundle", "verify", str(b)],
        env=e,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "params.npz: holds a pickled object array" in errors[0], p.stderr


def test_predict_with_a_bundle_equals_predict_with_its_run(env):
    """predict.py --run=BUNDLE: the bundle's preprocessing, modalities and task give exactly the run's
    segmentation (here of one case's files; the case is named after its folder)."""
    import nibabel as nib

    from timm_jax.workflows.predict import predict

    data = env.tmp / "data" / "parcellation"
    case = sorted(p for p in data.iterdir() if (p / "t1.nii.gz").is_file())[0]
    files = [str(case / "t1.nii.gz"), str(case / "t2.nii.gz")]
    a, b = env.tmp / "pred" / "run", env.tmp / "pred" / "bundle"
    predict(env.m1, files, str(a))
    (rec,) = predict(env.b1, files, str(b), probabilities=True)
    assert rec["case"] == case.name and (b / f"{case.name}_prob.json").is_file()
    sa, sb = nib.load(a / f"{case.name}_seg.nii.gz"), nib.load(b / f"{case.name}_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(sa.dataobj), np.asarray(sb.dataobj))
    np.testing.assert_array_equal(sa.affine, sb.affine)
    assert sb.shape == nib.load(files[0]).shape


def test_evaluate_and_forgetting_of_bundles_equal_those_of_their_runs(env):
    """evaluate.py --run=BUNDLE and --forgetting=BUNDLES: the same per-case Dice as the runs give,
    given --data_dir (a bundle holds no data) and --out (nothing is written into a bundle)."""
    from timm_jax.config import EvalConfig
    from timm_jax.workflows.evaluate import evaluate_forgetting, evaluate_model

    cfg = EvalConfig(hd95=False, split="train")  # the tiny data set's task 1 has no test split
    data = str(env.tmp / "data" / "parcellation")
    out = env.tmp / "eval"
    before = sorted(os.listdir(env.b1))
    with pytest.raises(ConfigError, match="is a model bundle, which is not written into: give --out"):
        evaluate_model(env.b1, cfg, data_dir=data)
    with pytest.raises(ConfigError, match="holds no data: give --data_dir"):
        evaluate_model(env.b1, cfg, out_dir=str(out / "x"))
    run = evaluate_model(env.m1, cfg, out_dir=str(out / "run"))
    bundle = evaluate_model(env.b1, cfg, out_dir=str(out / "bundle"), data_dir=data)
    assert bundle["metrics"] == run["metrics"] and bundle["n_cases"] == run["n_cases"]
    with pytest.raises(ConfigError, match="--forgetting=.* holds no data: give --data_dir"):
        evaluate_forgetting(env.m2, [env.b1, env.b2], cfg, out_dir=str(out / "y"))
    with pytest.raises(ConfigError, match="--run=.* give --out"):
        evaluate_forgetting(env.b2, [env.b1, env.b2], cfg, data_dir=data)
    f_run = evaluate_forgetting(env.m2, [env.m1, env.m2], cfg, out_dir=str(out / "f_run"))
    f_bundle = evaluate_forgetting(
        env.b2, [env.b1, env.b2], cfg, out_dir=str(out / "f_bundle"), data_dir=data
    )
    assert list(f_bundle) == list(f_run) == ["m1", "m2"]
    for name in f_run:
        assert f_bundle[name]["metrics"] == f_run[name]["metrics"], name
    assert sorted(os.listdir(env.b1)) == before  # nothing written into the bundle
    open_bundle(env.b1)  # still verifies
