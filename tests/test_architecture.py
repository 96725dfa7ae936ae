"""The package's shape: no import cycles, and each layer imports only from the layers it may use.

The rules are those of docs/architecture.md. Imports are read from the source (module level and
inside functions alike), so a lazy import cannot hide a dependency.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "timm_jax"

# the layer of a module is the first component after ``timm_jax`` (or the module itself)
LEAVES = {"config", "errors", "faults", "atomic", "progress"}  # usable by every layer but core
ALLOWED = {
    "errors": set(),
    "faults": set(),
    "atomic": {"errors", "faults"},
    "config": {"errors"},
    "cli": {"errors"},
    "progress": set(),
    # the `python -m timm_jax.bundle` command: parses flags, calls the bundle workflows
    "bundle": {"runs", "workflows", "cli"} | LEAVES,
    "core": {"core"},
    "nn": {"nn", "core"} | LEAVES,
    "data": {"data", "cli"} | LEAVES,
    "training": {"training", "nn", "core"} | LEAVES,
    "runs": {"runs", "training", "nn", "core", "data"} | LEAVES,
    "workflows": {"workflows", "runs", "training", "nn", "core", "data"} | LEAVES,
    "experiments": {"experiments", "workflows", "runs", "training", "nn", "core", "data", "cli"} | LEAVES,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """The ``timm_jax`` modules ``path`` imports (resolving relative imports and
    ``from timm_jax.x import y`` where ``y`` is a submodule)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("timm_jax")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("timm_jax"):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if _exists(sub) else mod)
    out.discard(name)
    return out


def _exists(mod: str) -> bool:
    p = PKG.parent.joinpath(*mod.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in PKG.rglob("*.py")}


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "timm_jax"


def test_the_graph_sees_the_package():
    g = _graph()
    assert {
        "timm_jax.core.merge",
        "timm_jax.nn.unet",
        "timm_jax.training.rundir",
        "timm_jax.workflows.fuse",
        "timm_jax.experiments.demo",
    } <= set(g)
    assert "timm_jax.training.rundir" in g["timm_jax.workflows.fuse"]
    assert "timm_jax.nn.ops" in g["timm_jax.nn.cpu_kernels"]


def test_no_import_cycles():
    g = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
            if n in g and not state.get(n):
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if not state.get(m):
            visit(m)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_what_they_may(layer):
    bad = []
    for mod, deps in _graph().items():
        if _layer(mod) != layer:
            continue
        for d in deps:
            target = _layer(d)
            if target != "timm_jax" and target not in ALLOWED[layer] | {layer}:
                bad.append(f"{mod} imports {d}")
    assert not bad, "\n".join(bad)


def test_pure_maths_imports_nothing_but_itself():
    for mod, deps in _graph().items():
        if _layer(mod) == "core":
            assert all(_layer(d) == "core" for d in deps), (mod, deps)


def test_ops_never_import_the_cpu_kernels():
    assert "timm_jax.nn.cpu_kernels" not in _graph()["timm_jax.nn.ops"]


def test_public_api_is_importable_from_the_top():
    import timm_jax

    for name in (
        "imm_merge",
        "mixing_ratios",
        "fisher_diagonal",
        "UNet3D",
        "split",
        "join",
        "make_train_step",
        "make_adaption_step",
        "materialise",
        "uniform_logits",
    ):
        assert callable(getattr(timm_jax, name)), name
    assert set(timm_jax.__all__) <= set(dir(timm_jax))
    with pytest.raises(AttributeError):
        timm_jax.no_such_thing  # noqa: B018


def test_workflows_do_not_import_each_other():
    """A workflow (what one script calls) imports no other workflow: what two of them share lives
    below them (``timm_jax.runs``) or in the figures module ``workflows.report``."""
    g = _graph()
    workflows = {
        m for m in g if _layer(m) == "workflows" and m.rsplit(".", 1)[-1] not in ("report", "workflows")
    }
    bad = [f"{m} imports {d}" for m in workflows for d in g[m] if d in workflows]
    assert not bad, "\n".join(bad)


def test_files_are_renamed_into_place_only_by_the_atomic_writer():
    """One atomic write (timm_jax/atomic.py): no other module renames a file over another."""
    offenders = [
        str(p.relative_to(PKG.parent))
        for p in PKG.rglob("*.py")
        if p.name != "atomic.py" and ("os.replace(" in p.read_text() or "tempfile.mkstemp(" in p.read_text())
    ]
    assert not offenders, offenders


def test_no_fault_point_inside_the_step_loop():
    """Fault points sit at I/O and named stages: none inside the epoch loop's per-step loop or the
    validation's per-case loop."""
    tree = ast.parse((PKG / "training" / "loop.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.For):
            calls = [
                n for n in ast.walk(node) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "fault"
            ]
            assert not calls, f"faults.fault called inside the loop at line {node.lineno}"
