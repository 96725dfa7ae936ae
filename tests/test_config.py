"""One source of configuration: every field of every config has one default and one flag,
derived by timm_jax.cli, and the scripts' flags round-trip into the config objects."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from timm_jax import cli
from timm_jax.config import DeviceConfig, EvalConfig, FuseConfig, ModelConfig, TrainConfig
from timm_jax.data.spec import DataSpec, preprocess_config
from timm_jax.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (ModelConfig, TrainConfig, FuseConfig, EvalConfig, DeviceConfig, DataSpec)
# which configs each script exposes (the rest of its flags are its own run arguments)
SCRIPTS = {
    "train.py": (DataSpec, ModelConfig, TrainConfig, DeviceConfig),
    "fuse.py": (DataSpec, TrainConfig, FuseConfig, DeviceConfig),
    "evaluate.py": (EvalConfig, DeviceConfig),
}


@pytest.fixture
def fv():
    """A private FlagValues (absl's global FLAGS is parsed already in the test process)."""
    return flags.FlagValues()


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_one_default_and_a_help(cls):
    for f in dataclasses.fields(cls):
        assert f.default is not dataclasses.MISSING, f"{cls.__name__}.{f.name} has no default"
        assert f.default_factory is dataclasses.MISSING
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_flags_are_derived_one_per_field_with_the_field_default(cls, fv):
    cli.define_flags(cls, flag_values=fv)
    names = [name for name, _ in cli.flag_fields(cls)]
    assert len(names) == len(set(names))
    derived = [f.name for f in dataclasses.fields(cls) if f.metadata.get("derived")]
    assert len(names) + len(derived) == len(dataclasses.fields(cls))
    assert sorted(fv) == sorted(names)
    fv(["prog"])
    made = cli.from_flags(cls, flag_values=fv) if cls is not DataSpec else None
    for name, f in cli.flag_fields(cls):
        value = fv[name].value
        default = f.default
        if isinstance(default, tuple):
            assert value == [str(v) for v in default]
        elif f.metadata.get("choices") and default not in f.metadata["choices"]:
            assert value is None
        else:
            assert value == default, name
        if made is not None:
            assert getattr(made, f.name) == default


def test_flag_values_reach_the_config(fv):
    cli.define_flags(TrainConfig, flag_values=fv)
    cli.define_flags(ModelConfig, flag_values=fv)
    fv(
        [
            "prog",
            "--patch=16,24,32",
            "--learning_rate=0.01",
            "--noaugment",
            "--loss=ce",
            "--min_learning_rate=1e-7",
            "--dropout=0.1",
            "--conv_impl=native",
        ]
    )
    t, m = cli.from_flags(TrainConfig, flag_values=fv), cli.from_flags(ModelConfig, flag_values=fv)
    assert t.patch_shape == (16, 24, 32) and t.learning_rate == 0.01 and not t.augment
    assert t.loss == "ce" and t.min_learning_rate == 1e-7
    assert m.dropout_rate == 0.1 and m.conv_impl == "native" and m.in_channels == 4


def test_data_flags_and_their_errors(fv):
    cli.define_flags(DataSpec, flag_values=fv)
    fv(["prog", "--layout=parcellation"])
    with pytest.raises(ConfigError, match="missing required flag.*--data_dir"):
        cli.from_flags(DataSpec, flag_values=fv)
    fv["data_dir"].value = "somewhere"
    fv["labels"].value = ["1", "x"]
    with pytest.raises(ConfigError, match="--labels takes int values"):
        cli.from_flags(DataSpec, flag_values=fv)
    fv["labels"].value = ["1", "3"]
    spec = cli.from_flags(DataSpec, flag_values=fv)
    assert spec.labels == (1, 3) and preprocess_config(spec).normalisation == "histogram"


@pytest.mark.parametrize(
    "cls, kw, msg",
    [
        (TrainConfig, {"patch_shape": (16, 16)}, "--patch must be three integers"),
        (TrainConfig, {"loss": "hinge"}, "--loss must be one of"),
        (TrainConfig, {"batch_size": 0}, "--batch_size"),
        (ModelConfig, {"conv_impl": "fast"}, "--conv_impl must be one of"),
        (FuseConfig, {"granularity": "element"}, "--granularity must be one of"),
        (EvalConfig, {"overlap": 1.0}, "--overlap"),
        (ModelConfig, {"precision": "float16"}, "--precision must be one of"),
        (DeviceConfig, {"num_devices": -1}, "--num_devices"),
        (DeviceConfig, {"num_processes": 2, "process_id": 2}, "--process_id must be in 0..1"),
        (DataSpec, {"data_dir": "d", "layout": "nifti"}, "--layout"),
        (DataSpec, {"data_dir": "d", "layout": "brats", "fraction": 0.0}, "--fraction"),
    ],
)
def test_bad_values_are_user_errors_naming_the_flag(cls, kw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        cls(**kw)
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_dict_round_trip(cls):
    obj = cls(data_dir="d", layout="brats") if cls is DataSpec else cls()
    d = obj.to_dict()
    assert cls.from_dict(d) == obj
    assert cls.from_dict({**d, "unknown_key": 1}) == obj


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.e2e
def test_every_config_field_is_a_flag_of_the_script(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / script), "--helpfull"], capture_output=True, text=True, timeout=120
    ).stdout
    for cls in SCRIPTS[script]:
        for name, _ in cli.flag_fields(cls):
            assert f"--{name}:" in out or f"--[no]{name}:" in out, f"{script} lacks --{name}"


# ------------------------------------------------------------------ every default once, in config.py
def _setting_defaults() -> dict[str, list]:
    out: dict[str, list] = {}
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            for name in {f.name, f.metadata.get("flag") or f.name}:
                out.setdefault(name, []).append(f.default)
    return out


#: parameters named like a setting whose literal default means something else (not a copy)
OTHER_MEANING = {
    ("timm_jax/experiments/demo.py", "run_demo", "seed"): "the demo's one seed of data, init and sampling",
    ("timm_jax/experiments/demo_data.py", "build_demo", "seed"): "the generator's seed",
    ("timm_jax/experiments/stats.py", "bootstrap_ci", "seed"): "the bootstrap's resampling seed",
    ("timm_jax/experiments/stats.py", "compare", "seed"): "the bootstrap's resampling seed",
    ("timm_jax/experiments/stats.py", "hierarchical_indices", "seed"): "the bootstrap's resampling seed",
    ("timm_jax/experiments/stats.py", "hierarchical_bootstrap", "seed"): "the bootstrap's resampling seed",
    ("timm_jax/workflows/evaluate.py", "evaluate_model", "data_dir"): "'' = no override of the run's data",
    (
        "timm_jax/workflows/evaluate.py",
        "evaluate_forgetting",
        "data_dir",
    ): "'' = no override of the sources' data",
    ("timm_jax/workflows/predict.py", "predict", "layout"): "'' = the run's own layout",
}


def test_no_setting_default_is_copied_into_a_signature():
    """A library function's parameter that is a setting takes its default from the config class
    (``learning_rate: float = TrainConfig.learning_rate``), never as a second literal: a literal
    default equal to a setting's default of the same name is a copy that can drift."""
    import ast

    settings = _setting_defaults()
    copies = []
    for path in sorted((ROOT / "timm_jax").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "timm_jax/config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos[len(pos) - len(a.defaults) :], a.defaults)) + list(
                zip(a.kwonlyargs, a.kw_defaults)
            )
            for arg, default in pairs:
                if default is None or arg.arg not in settings:
                    continue
                try:
                    value = ast.literal_eval(default)
                except ValueError:
                    continue  # a reference (TrainConfig.learning_rate), not a literal
                if value in settings[arg.arg] and (rel, node.name, arg.arg) not in OTHER_MEANING:
                    copies.append(f"{rel}:{node.lineno} {node.name}({arg.arg}={ast.unparse(default)})")
    assert not copies, "defaults written twice (take them from timm_jax.config):\n" + "\n".join(copies)


def test_library_defaults_equal_the_command_line_defaults():
    """What a notebook gets by calling the library with defaults is what the scripts do by default."""
    import inspect

    from timm_jax.data import pipeline, splits
    from timm_jax.runs import fisher_cache
    from timm_jax.training import inference, loop, parallel, steps

    expect = {
        (steps.make_optimizer, "learning_rate"): TrainConfig().learning_rate,
        (steps.make_adaption_optimizer, "learning_rate"): TrainConfig().learning_rate,
        (steps.make_adaption_optimizer, "logits_learning_rate"): FuseConfig().logits_learning_rate,
        (steps.segmentation_loss, "kind"): TrainConfig().loss,
        (steps.make_train_step, "loss"): TrainConfig().loss,
        (steps.make_adaption_step, "loss"): TrainConfig().loss,
        (steps.make_adaption_step, "granularity"): FuseConfig().granularity,
        (steps.make_adaption_step, "objective"): FuseConfig().adaption_objective,
        (steps.fused_params, "granularity"): FuseConfig().granularity,
        (steps.materialise, "granularity"): FuseConfig().granularity,
        (loop.window_evaluator, "loss"): TrainConfig().loss,
        (inference.sliding_window_predict, "overlap"): EvalConfig().overlap,
        (pipeline.PatchSampler, "foreground_rate"): TrainConfig().foreground_rate,
        (pipeline.PatchSampler, "augment"): TrainConfig().augment,
        (pipeline.make_train_dataset, "foreground_rate"): TrainConfig().foreground_rate,
        (pipeline.make_train_dataset, "augment"): TrainConfig().augment,
        (pipeline.make_train_dataset, "num_workers"): TrainConfig().num_workers,
        (pipeline.make_train_batches, "foreground_rate"): TrainConfig().foreground_rate,
        (splits.make_splits, "seed"): DataSpec.split_seed,
        (splits.make_splits, "val_fraction"): DataSpec.val_fraction,
        (splits.make_splits, "test_fraction"): DataSpec.test_fraction,
        (splits.fraction_split, "seed"): DataSpec.split_seed,
        (parallel.make_mesh, "num_devices"): DeviceConfig().num_devices,
        (fisher_cache.source_fisher, "kind"): FuseConfig().fisher,
        (fisher_cache.source_fisher, "max_examples"): FuseConfig().fisher_examples,
        (fisher_cache.source_fisher, "patches_per_case"): FuseConfig().fisher_patches,
    }
    wrong = []
    for (fn, param), want in expect.items():
        got = inspect.signature(fn).parameters[param].default
        if got != want:
            wrong.append(f"{fn.__qualname__}({param}={got!r}), the scripts use {want!r}")
    assert not wrong, "\n".join(wrong)


def test_granularity_is_not_defaulted_by_the_maths():
    """The pure maths names no default granularity (the command line's is FuseConfig's)."""
    import inspect

    from timm_jax.core import merge

    for fn in (merge.init_logits, merge.expand_logits):
        assert inspect.signature(fn).parameters["granularity"].default is inspect.Parameter.empty
