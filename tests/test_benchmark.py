"""The benchmark: its schedule rules, its gates against hand-made raw results, your own data's
specs, and a quick version of the whole pipeline (pilot, grid after failed gates, report)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from timm_jax.experiments import benchmark
from timm_jax.experiments.benchmark_report import design_resolution, gates, grid_plan

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_preregistration_reads_and_its_quick_version_replaces_whole_tables():
    prereg = benchmark.load_prereg()
    assert prereg["fractions"] == {"0.04": 5, "0.08": 5, "1.0": 3}
    assert set(prereg["initialisations"]) >= {"no transfer", "M1", "M2", "IMM", "mean-IMM", "T-IMM"}
    quick = benchmark.load_prereg(quick=True)
    assert quick["fractions"] == {"0.5": 1, "1.0": 1}  # replaced, not merged with the full grid's
    assert list(quick["variants"]["settings"]) == ["T-IMM Fisher per layer"]
    assert quick["training"]["learning_rate"] == prereg["training"]["learning_rate"]  # merged


def test_an_epoch_is_a_pass_over_the_cases_and_patience_is_in_steps():
    prereg = benchmark.load_prereg()
    t = prereg["training"]
    for n in (8, 16, 215):
        cfg = benchmark.schedule(prereg, n, seed=7)
        assert cfg.steps_per_epoch == -(-n * t["patches_per_case"] // t["batch_size"])
        assert cfg.plateau_patience * cfg.steps_per_epoch >= t["plateau_steps"]
        assert cfg.early_stopping_patience * cfg.steps_per_epoch >= t["stop_steps"]
        assert cfg.max_epochs * cfg.steps_per_epoch >= t["cap_steps"] and cfg.seed == 7
        assert cfg.early_stopping_patience > cfg.plateau_patience >= 1
    assert benchmark.replicate_seeds(prereg, 3) == (3, prereg["replicates"]["train_seed_base"] + 3)


def _raw_run(d: Path, cases: dict, epochs: int, max_epochs: int, best: int, patience: int = 5):
    d.mkdir(parents=True)
    with open(d / "per_case.csv", "w") as f:
        f.write("case,dice_mean\n" + "".join(f"{c},{v}\n" for c, v in cases.items()))
    (d / "config.json").write_text(
        json.dumps({"train": {"max_epochs": max_epochs, "early_stopping_patience": patience}})
    )
    hist = [
        {"epoch": e + 1, "val_loss": 1.0 - 0.1 * min(e, best), "val_dice_mean": 0.5} for e in range(epochs)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))


def test_gates_from_raw_results(tmp_path):
    prereg = benchmark.load_prereg()
    raw = tmp_path / "raw"
    (raw / "sources").mkdir(parents=True)
    (raw / "sources.csv").write_text("source,task,dice_mean\nm1,task1,0.85\nm2,task2,0.79\n")
    for name, epochs in (("m1", 40), ("m2", 20)):
        _raw_run(raw / "sources" / name, {"a": 0.8}, epochs, max_epochs=40, best=epochs - 1)  # m1 capped
    cases = [f"c{i}" for i in range(4)]
    for r in range(5):
        _raw_run(
            raw / "runs" / "f004" / f"rep{r}" / "no_transfer",
            dict.fromkeys(cases, 0.50 + 0.01 * r),
            30,
            100,
            20,
        )
        _raw_run(raw / "runs" / "f004" / f"rep{r}" / "threshold", dict.fromkeys(cases, 0.2), 1, 1, 0)
    for r in range(3):
        _raw_run(raw / "runs" / "f100" / f"rep{r}" / "no_transfer", dict.fromkeys(cases, 0.70), 30, 100, 20)
        _raw_run(raw / "runs" / "f100" / f"rep{r}" / "threshold", dict.fromkeys(cases, 0.65), 1, 1, 0)
    for r in range(4):  # 8 % replicate 4 has not run: the gates are pending
        _raw_run(raw / "runs" / "f008" / f"rep{r}" / "no_transfer", dict.fromkeys(cases, 0.6), 30, 100, 20)
        _raw_run(raw / "runs" / "f008" / f"rep{r}" / "threshold", dict.fromkeys(cases, 0.2), 1, 1, 0)
    pending = gates(str(raw), prereg)
    assert not pending["complete"] and not pending["all_met"]
    assert pending["pilot_runs"] == {"finished": 2 + 2 * 12, "planned": 2 + 2 * 13}
    assert all(x["met"] is None for x in pending["gates"])
    assert pending["gates"][1]["value"]["gap"] == pytest.approx(0.70 - 0.52)  # provisional number
    _raw_run(raw / "runs" / "f008" / "rep4" / "no_transfer", dict.fromkeys(cases, 0.6), 30, 100, 20)
    _raw_run(raw / "runs" / "f008" / "rep4" / "threshold", dict.fromkeys(cases, 0.2), 1, 1, 0)
    result = gates(str(raw), prereg)
    assert result["complete"] and not result["all_met"]
    g = {x["gate"]: x for x in result["gates"]}
    assert g["G1"]["value"] == {"m1": 0.85, "m2": 0.79} and g["G1"]["met"] is False
    assert g["G2"]["value"]["gap"] == pytest.approx(0.70 - 0.52) and g["G2"]["met"] is True
    assert g["G3"]["value"]["gap"] == pytest.approx(0.05) and g["G3"]["met"] is False
    # 2 sources + 13 no-transfer runs; m1 ran into its cap (40 of 40 epochs, still improving)
    assert g["G4"]["value"] == {"capped": 1, "runs": 15, "share": pytest.approx(1 / 15)}
    assert g["G4"]["met"] is True
    # what the grid can resolve: 0 where the replicates agree, else from their spread (4 %: 0.50-0.54)
    res = design_resolution(str(raw), prereg)
    assert set(res) == {0.04, 0.08, 1.0} and res[0.08] == (5, pytest.approx(0.0, abs=1e-12))
    assert res[1.0] == (3, pytest.approx(0.0, abs=1e-12))
    assert res[0.04][0] == 5 and 0.005 < res[0.04][1] < 0.04


def test_a_verdict_waits_for_every_pre_registered_replicate(tmp_path):
    """With 1 of 5 M1 replicates the comparison is listed but its verdict is pending; with all 5
    (and all 5 of no transfer) the pre-registered rule decides."""
    from timm_jax.experiments.benchmark_report import _cells_section

    prereg = benchmark.load_prereg()
    raw = tmp_path / "raw"
    cases = [f"c{i}" for i in range(4)]
    for r in range(5):
        values = {c: 0.50 + 0.01 * r + 0.01 * i for i, c in enumerate(cases)}
        _raw_run(raw / "runs" / "f004" / f"rep{r}" / "no_transfer", values, 30, 100, 20)

    def m1_row() -> str:
        text = "\n".join(_cells_section(str(raw), prereg, claims=True))
        return next(ln for ln in text.splitlines() if ln.startswith("| M1 > no transfer | 4%"))

    _raw_run(raw / "runs" / "f004" / "rep0" / "m1", dict.fromkeys(cases, 0.30), 30, 100, 20)
    assert m1_row().endswith("| pending (1 and 5 of 5 replicates) |")
    table2 = "\n".join(_cells_section(str(raw), prereg, claims=True))
    assert "| M1 | 0.300 (n=1) |" in table2  # one replicate: no sd
    assert "| no transfer | 0.535 ± 0.016 (n=5) |" in table2
    for r in range(1, 5):
        _raw_run(raw / "runs" / "f004" / f"rep{r}" / "m1", dict.fromkeys(cases, 0.30 + 0.01 * r), 30, 100, 20)
    assert m1_row().endswith("| contradicted |")


def test_the_grid_runs_the_claims_first_and_every_planned_cell_once():
    prereg = benchmark.load_prereg()
    plan = grid_plan(prereg)
    cells = [(f, r, n) for _, f, r, n in plan]
    assert len(set(cells)) == len(cells)
    main = [n for n in prereg["initialisations"] if n != "no transfer"]
    expected = {(f, r, n) for f, k in (("0.04", 5), ("0.08", 5), ("1.0", 3)) for r in range(k) for n in main}
    expected |= {
        (0.08, r, n)
        for r in range(5)
        for n in [*prereg["all_hcp"]["sources"], *prereg["variants"]["settings"]]
    }
    assert set(cells) == {(float(f), r, n) for f, r, n in expected}
    parts = [p for p, *_ in plan]
    assert parts == sorted(parts, key=["claims", "other fractions", "All-HCP", "variants"].index)
    claims = [(f, r) for p, f, r, _ in plan if p == "claims"]
    assert {f for f, _ in claims} == {0.04, 0.08}
    assert claims[: 2 * len(main)] == [(0.04, 0)] * len(main) + [(0.08, 0)] * len(main)  # replicate 0 first
    assert [r for _, r in claims] == sorted(r for _, r in claims)


def test_your_own_data_gives_each_task_its_labels_and_split(tmp_path):
    from timm_jax.data.spec import resolve
    from timm_jax.data.writers import write_brats_case, write_freesurfer_subject

    rng = np.random.default_rng(0)
    subjects, tumours = tmp_path / "subjects", tmp_path / "brats"
    aseg = np.zeros((16, 16, 16), np.int32)
    aseg[2:8, 2:8, 2:8], aseg[8:14, 8:14, 8:14], aseg[2:6, 10:14, 2:6] = 3, 2, 10  # cortex, WM, thalamus
    for s in range(6):
        write_freesurfer_subject(subjects, f"sub{s}", rng.random((16, 16, 16)).astype(np.float32) + 1, aseg)
    seg = np.zeros((16, 16, 16), np.int32)
    seg[4:9, 4:9, 4:9] = 2
    seg[5:7, 5:7, 5:7] = 4
    for c in range(5):
        write_brats_case(
            tumours, f"BraTS2021_{c:05d}", rng.random((16, 16, 16, 4)).astype(np.float32) + 1, seg
        )
    groups = {"task1": {"train": ["sub0"], "val": ["sub1"]}, "task2": {"train": ["sub2"], "val": ["sub3"]}}
    groups["test"] = ["sub4", "sub5"]
    (tmp_path / "groups.json").write_text(json.dumps(groups))
    split = {"train": ["BraTS2021_00000", "BraTS2021_00001"], "val": ["BraTS2021_00002"]}
    split["test"] = ["BraTS2021_00003", "BraTS2021_00004"]
    (tmp_path / "tumour.json").write_text(json.dumps(split))
    user = {
        "parcellation_dir": str(subjects),
        "parcellation_layout": "freesurfer",
        "label_map": "paper14",
        "parcellation_splits": str(tmp_path / "groups.json"),
        "tumour_dir": str(tumours),
        "tumour_layout": "brats",
        "tumour_splits": str(tmp_path / "tumour.json"),
    }
    lay = benchmark.Layout(str(tmp_path / "out"))
    benchmark.user_data(lay, user)
    t1 = resolve(benchmark._spec(lay, "task1", 1.0, user=user))
    assert t1.train_ids == ["sub0"] and t1.val_ids == ["sub1"] and t1.splits["test"] == ["sub4", "sub5"]
    assert list(t1.task.label_ids) == list(range(1, 8))
    both = resolve(benchmark._spec(lay, "hcp_8_14", 1.0, user=user))
    assert both.train_ids == ["sub0", "sub2"] and list(both.task.label_ids) == list(range(8, 15))
    t3 = resolve(benchmark._spec(lay, "task3", 1.0, 0, user=user))
    assert t3.train_ids == split["train"] and t3.task.channel_names == ("WT", "TC", "ET")
    os.remove(tmp_path / "groups.json")
    from timm_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="parcellation_splits"):
        benchmark.user_data(lay, user)


@pytest.mark.e2e
def test_quick_benchmark_pilot_grid_and_report(tmp_path):
    """The whole pipeline at a tiny scale: the pilot refuses nothing but records failed gates, the
    grid then runs only with --after_failed_gates, and the report says that no claim is made."""
    from timm_jax.errors import ConfigError

    prereg = benchmark.load_prereg(quick=True)
    out = str(tmp_path / "bench")
    result = benchmark.run_pilot(out, prereg)
    assert {g["gate"] for g in result["gates"]} == {"G1", "G2", "G3", "G4"}
    raw = Path(out) / "raw"
    assert (raw / "sources.csv").is_file() and (raw / "gates.json").is_file()
    for f in ("f050", "f100"):
        assert (raw / "runs" / f / "rep0" / "no_transfer" / "per_case.csv").is_file()
        assert (raw / "runs" / f / "rep0" / "threshold" / "summary.json").is_file()
        assert (raw / "runs" / f / "rep0" / "no_transfer" / "metrics.jsonl").is_file()
    assert not list(Path(out, "runs").rglob("*_fused"))  # the pilot runs no transfer cell
    if not result["all_met"]:
        with pytest.raises(ConfigError, match="--after_failed_gates"):
            benchmark.run_grid(out, prereg)
    # the grid in two shards sharing the folder: they refuse to start before the shared sources
    with pytest.raises(ConfigError, match="--stage=sources"):
        benchmark.run_grid(out, prereg, after_failed_gates=True, shard=(1, 2))
    benchmark.run_sources(out, prereg, after_failed_gates=True)
    for k in (0, 1):
        benchmark.run_grid(out, prereg, after_failed_gates=True, shard=(k, 2))
    assert {p.name for p in raw.glob("wall_time*.json")} == {
        "wall_time.json",
        "wall_time_shard0of2.json",
        "wall_time_shard1of2.json",
    }
    from timm_jax.experiments.benchmark_report import machine

    for p in raw.glob("wall_time*.json"):  # each stage's time with the machine it ran on
        assert all(x["machine"] == machine() for v in json.loads(p.read_text()).values() for x in v)
    for init in ("m1", "m2", "imm", "meanimm", "timm", "allhcp_1_7", "timm_fisher_per_layer"):
        assert (raw / "runs" / "f050" / "rep0" / init / "per_case.csv").is_file(), init
    assert (raw / "runs" / "f050" / "rep0" / "timm_fused" / "adaption_metrics.jsonl").is_file()
    assert (raw / "fisher_diagnostics.csv").is_file()
    assert not list(raw.rglob("checkpoints"))  # raw results only
    from timm_jax.experiments.benchmark_report import write_report

    text = Path(write_report(out, prereg)).read_text()
    assert f"- Machine: {machine()}." in text
    for part in (
        "## Gates",
        "## Progress",
        "## Table 2",
        "## Pre-registered comparisons",
        "## Table 3",
        "## Table 4",
    ):
        assert part in text, part
    assert "## Fisher diagnostics" in text and "per replicate" in text
    # the grid's progress lists each finished cell, a T-IMM cell with its adaption stage's epochs
    timm = raw / "runs" / "f050" / "rep0" / "timm"
    row = next(ln for ln in text.splitlines() if ln.startswith("| claims | [runs/f050/rep0/timm]"))
    cols = [c.strip() for c in row.split("|")[1:-1]]
    assert cols[2] == str(len((timm / "metrics.jsonl").read_text().splitlines()))
    adaption = raw / "runs" / "f050" / "rep0" / "timm_fused" / "adaption_metrics.jsonl"
    assert cols[6] == str(len(adaption.read_text().splitlines())) != "0"
    # each cell records what it started from: the machine, the code, the sources' test Dice as
    # built here (equal to raw/sources.csv on the machine that built them first)
    prov = json.loads((timm / "provenance.json").read_text())
    committed = {
        ln.split(",")[0]: float(ln.split(",")[2]) for ln in (raw / "sources.csv").read_text().splitlines()[1:]
    }
    assert prov["machine"] == machine() and prov["sources"] == pytest.approx(
        {s: committed[s] for s in ("m1", "m2")}
    )
    allhcp = json.loads((raw / "runs" / "f050" / "rep0" / "allhcp_1_7" / "provenance.json").read_text())
    assert set(allhcp["sources"]) == {prereg["all_hcp"]["sources"]["All-HCP 1:7"]}  # what it used
    assert cols[10] == "A" and f"- A: {machine()}, sources m1 " in text
    # and its wall time, whole (it ran in one invocation)
    assert prov["resumed"] is False and prov["wall_s"] > 0 and cols[8] == f"{prov['wall_s'] / 3600:.2f}"
    if not result["all_met"]:
        assert "no claim about the transfer methods is made" in text and "no claim (gate failed)" in text
    # an unsharded invocation finds every cell of both shards and reuses it
    before = sorted(str(p) for p in raw.rglob("*"))
    benchmark.run_grid(out, prereg, after_failed_gates=True)
    assert sorted(str(p) for p in raw.rglob("*")) == before
    # a cell without its provenance is not finished: it is completed from its run folder, and its
    # wall time is marked as not whole
    (timm / "provenance.json").unlink()
    benchmark.run_grid(out, prereg, after_failed_gates=True)
    assert json.loads((timm / "provenance.json").read_text())["resumed"] is True
    assert sorted(str(p) for p in raw.rglob("*")) == before
    # another machine with only the committed raw results: the pilot trains nothing, the grid
    # rebuilds only the sources its unfinished cells need (checked against raw/sources.csv) and
    # skips every committed cell; here one claim cell is taken out of the committed results
    import shutil

    out2 = tmp_path / "elsewhere"
    shutil.copytree(raw, out2 / "raw")
    gates_before = json.loads((raw / "gates.json").read_text())
    assert json.loads(json.dumps(benchmark.run_pilot(str(out2), prereg))) == gates_before
    assert not (out2 / "runs").exists()
    benchmark.run_grid(str(out2), prereg, after_failed_gates=True)
    assert not (out2 / "runs").exists()  # every cell committed: nothing to rebuild
    f050 = ("runs", "f050", "rep0")
    shutil.rmtree(out2 / "raw" / Path(*f050) / "timm")
    # M1 rebuilt there differs from the committed one within the tolerance (faked: the committed
    # Dice moved by 0.005): its results go to raw/rebuilds/, the committed ones stay
    csv = (out2 / "raw" / "sources.csv").read_text().splitlines()
    fields = csv[1].split(",")  # source,task,dice_mean,...
    assert fields[0] == "m1"
    m1_dice = float(fields[2])
    csv[1] = ",".join([*fields[:2], f"{m1_dice + 0.005:.6f}", *fields[3:]])
    (out2 / "raw" / "sources.csv").write_text("\n".join(csv) + "\n")
    sources_before = {p: p.read_bytes() for p in (out2 / "raw" / "sources").rglob("*") if p.is_file()}
    benchmark.run_grid(str(out2), prereg, after_failed_gates=True)
    assert sorted(p.name for p in (out2 / "runs" / "sources").iterdir()) == ["m1", "m2"]
    assert (out2 / "raw" / "sources.csv").read_text().splitlines() == csv
    assert {p: p.read_bytes() for p in (out2 / "raw" / "sources").rglob("*") if p.is_file()} == sources_before
    rebuilt = out2 / "raw" / "rebuilds" / f"m1_{m1_dice:.6f}"
    assert (rebuilt / "summary.json").is_file() and (rebuilt / "metrics.jsonl").is_file()
    rel = sorted(str(p.relative_to(raw)) for p in raw.rglob("*"))
    rel2 = sorted(str(p.relative_to(out2 / "raw")) for p in (out2 / "raw").rglob("*"))
    assert [p for p in rel2 if not p.startswith("rebuilds")] == rel
    assert f"| [rebuilds/m1_{m1_dice:.6f}]" in (text2 := Path(write_report(str(out2), prereg)).read_text())
    assert "| -0.0050 | accepted |" in text2
    # the cell, rerun on the rebuilt sources (bit for bit here: the same machine)
    redone = out2 / "raw" / Path(*f050) / "timm"
    committed_cell = raw / Path(*f050) / "timm"
    assert (redone / "per_case.csv").read_bytes() == (committed_cell / "per_case.csv").read_bytes()
    # beyond the tolerance no cell runs on the rebuilt source (nor on M2, trained from it), but
    # the cells that do not need it do: here the All-HCP cell, also taken out
    csv[1] = ",".join([*fields[:2], f"{m1_dice + 0.05:.6f}", *fields[3:]])
    (out2 / "raw" / "sources.csv").write_text("\n".join(csv) + "\n")
    for cell in ("allhcp_1_7", "timm"):
        shutil.rmtree(out2 / "raw" / Path(*f050) / cell)
    shutil.rmtree(out2 / "runs" / "sources" / "m2")
    with pytest.raises(benchmark.SourceMismatchError, match="source m1 was rebuilt") as err:
        benchmark.run_grid(str(out2), prereg, after_failed_gates=True)
    assert "1 grid cell(s) not run (runs/f050/rep0/timm)" in str(err.value)
    assert not (out2 / "runs" / "sources" / "m2").exists()
    assert not (out2 / "raw" / Path(*f050) / "timm").exists()
    redone = out2 / "raw" / Path(*f050) / "allhcp_1_7"
    committed_cell = raw / Path(*f050) / "allhcp_1_7"
    assert (redone / "per_case.csv").read_bytes() == (committed_cell / "per_case.csv").read_bytes()
    assert set(json.loads((redone / "provenance.json").read_text())["sources"]) == {"hcp_1_7"}
    assert "| -0.0500 | refused: no cell runs on it |" in Path(write_report(str(out2), prereg)).read_text()


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/3", "0/0"])
def test_a_bad_shard_names_the_flag(text):
    from timm_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="--shard="):
        benchmark.parse_shard(text)


def test_shards_split_the_plan_into_disjoint_parts_that_cover_it():
    plan = grid_plan(benchmark.load_prereg())
    shards = [plan[k::3] for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(plan)
    assert all(s[0][0] == "claims" for s in shards)
    assert benchmark.parse_shard("1/3") == (1, 3)


def test_table4_counts_imm_once_per_source_build_and_timm_once_per_replicate(tmp_path):
    """IMM's fused weights depend only on the sources: replicates on one build of the sources are
    one model (counted once), a build on another machine is another; T-IMM's adapt per replicate."""
    from timm_jax.experiments.benchmark_report import _table4

    raw = tmp_path / "raw"
    builds = {0: (0.80, 0.2), 1: (0.80, 0.2), 2: (0.70, 0.4)}  # rep 2 ran on other sources
    for r, (m1, v) in builds.items():
        for init in ("imm", "timm"):
            cell = raw / "runs" / "f004" / f"rep{r}" / init
            cell.mkdir(parents=True)
            sources = {"m1": m1, "m2": 0.87}
            (cell / "provenance.json").write_text(
                json.dumps({"machine": "x", "code": f"c{r}", "sources": sources})
            )
            fused = cell.parent / f"{init}_fused"
            fused.mkdir()
            t1 = v + (0.01 * r if init == "timm" else 0.0)
            (fused / "forgetting.json").write_text(json.dumps({"m1": {"mean": t1}, "m2": {"mean": 0.5}}))
    text = "\n".join(_table4(str(raw)))
    imm = next(ln for ln in text.splitlines() if ln.startswith("| IMM |"))
    timm = next(ln for ln in text.splitlines() if ln.startswith("| T-IMM"))
    assert imm.split("|")[2].strip() == "2"  # reps 0 and 1 share a build (the code aside)
    assert imm.split("|")[3].strip().startswith(f"{np.mean([0.2, 0.4]):.3f}")
    assert timm.split("|")[2].strip() == "3"
    assert timm.split("|")[3].strip().startswith(f"{np.mean([0.2, 0.21, 0.42]):.3f}")
