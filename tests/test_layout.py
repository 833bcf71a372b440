"""The package's shape: its import graph follows the layers, every environment variable is read in
config.py and documented in the README, every op's three implementations are findable by its name, and
no module grows past the size a reader can hold."""
import ast
import os
import re

import pytest

import kangaroo_ext
from kangaroo_ext import config
from kangaroo_ext.ops import OP_FILES

PACKAGE = os.path.dirname(os.path.abspath(kangaroo_ext.__file__))
ROOT = os.path.dirname(PACKAGE)

# Lowest first: a module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("config",),
    ("io", "_extension", "model_cache"),
    ("ops",),
    ("engine",),
    ("adapter",),
    ("decoding", "default_model"),
    ("benchmarking",),
    ("training",),
    ("info", "cli", "__init__", "__main__"),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 600


def _modules():
    """{dotted module name relative to the package: path} for every .py file of kangaroo_ext."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), PACKAGE)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def _imports(name: str, path: str):
    """Package-internal modules `name` imports (anywhere in the file, function bodies included)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("kangaroo_ext"):
                target = node.module[len("kangaroo_ext."):] if node.module != "kangaroo_ext" else ""
            else:
                continue
            if node.module:  # `from . import x` imports x, not the package around it
                found.add(target)
            found.update(f"{target}.{a.name}" if target else a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("kangaroo_ext."):] for a in node.names if a.name.startswith("kangaroo_ext."))
    return found


def _layer(module: str):
    top = module.split(".")[0] if module else "__init__"
    return LAYER_OF.get(top)


def test_every_module_has_a_layer():
    missing = sorted({m.split(".")[0] for m in _modules() if _layer(m) is None})
    assert not missing, f"modules without a layer in tests/test_layout.py: {missing}"


def test_no_module_imports_a_higher_layer():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target in _imports(name, path):
            if target.split(".")[0] not in LAYER_OF and target:
                continue  # a name imported from a module, not a module
            if _layer(target) is not None and _layer(target) > _layer(name):
                bad.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not bad, "\n".join(sorted(bad))


def test_the_import_graph_has_no_cycles():
    modules = _modules()
    graph = {n: {t for t in _imports(n, p) if t in modules and t != n} for n, p in modules.items()}
    for n in graph:  # a package's __init__ re-exporting its submodules is not a cycle of theirs
        graph[n] = {t for t in graph[n] if not n.startswith(t + ".")}
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for t in graph[n]:
            if state.get(t) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[n] = "done"
    for n in graph:
        if n not in state:
            visit(n, [n])


def test_environment_variables_are_read_in_config_only():
    offenders = []
    for name, path in _modules().items():
        if name == "config":
            continue
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r"(os\.environ|os\.getenv|getenv)\b[^\n]*", text):
            if "KANGAROO_" in m.group(0) or re.search(r"environ\.get\(|getenv\(", m.group(0)):
                offenders.append(f"{name}: {m.group(0).strip()}")
    for folder in ("csrc", os.path.join("csrc", "kernels")):
        for f in os.listdir(os.path.join(ROOT, folder)):
            if f.endswith((".h", ".cuh")) and "getenv" in open(os.path.join(ROOT, folder, f)).read():
                offenders.append(f"{folder}/{f}: getenv in a kernel header (pass switches as launch arguments)")
    assert not offenders, "\n".join(offenders)


def test_readme_documents_every_environment_variable():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    missing = [k for k in config.KNOBS if k not in readme]
    assert not missing, f"README.md does not mention {missing} (config.markdown_table() is the table)"


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("YES", True), ("on", True),
                                            ("0", False), ("false", False), ("", False), ("Off", False)])
def test_one_boolean_parser(monkeypatch, value, expected):
    monkeypatch.setenv("KANGAROO_DISABLE_PDL", value)
    assert config.flag("KANGAROO_DISABLE_PDL") is expected


@pytest.mark.parametrize("value,expected", [("", True), ("1", True), ("0", False), ("off", False)])
def test_a_flag_on_by_default_reads_unset_as_on(monkeypatch, value, expected):
    assert config.KNOBS["KANGAROO_BATCH_INVARIANT_ATTENTION"].on_by_default
    monkeypatch.setenv("KANGAROO_BATCH_INVARIANT_ATTENTION", value)
    assert config.flag("KANGAROO_BATCH_INVARIANT_ATTENTION") is expected
    monkeypatch.delenv("KANGAROO_BATCH_INVARIANT_ATTENTION")
    assert config.flag("KANGAROO_BATCH_INVARIANT_ATTENTION") is True


def test_an_unrecognised_value_fails_loudly(monkeypatch):
    monkeypatch.setenv("KANGAROO_DISABLE_CONDITIONAL_GRAPHS", "flase")
    with pytest.raises(ValueError, match="KANGAROO_DISABLE_CONDITIONAL_GRAPHS='flase' is not a boolean"):
        config.flag("KANGAROO_DISABLE_CONDITIONAL_GRAPHS")
    monkeypatch.setenv("KANGAROO_BACKEND", "cdua")
    with pytest.raises(ValueError, match="KANGAROO_BACKEND='cdua' is not a backend"):
        config.backend()


def test_every_op_is_findable_by_its_name():
    """OP_FILES maps each op to its CUDA launcher, kernel header, Triton file and reference function;
    every file exists and defines the op, and the reference function exists."""
    from kangaroo_ext.ops import reference
    from kangaroo_ext.ops.schemas import OPS
    assert set(OP_FILES) == set(OPS)
    from kangaroo_ext.ops import NO_TRITON
    for op, files in OP_FILES.items():
        if files["triton"] is None:  # says why instead (the Triton backend's reason)
            assert NO_TRITON[op]
            files = dict(files, triton="triton_kernels/__init__.py")
        for key in ("cuda", "kernel", "triton"):
            path = os.path.join(ROOT, files[key])
            assert os.path.isfile(path), f"{op}: {files[key]} does not exist"
        assert op in open(os.path.join(ROOT, files["cuda"])).read(), f"{op} not in {files['cuda']}"
        if op not in NO_TRITON:
            assert f"def {op}(" in open(os.path.join(ROOT, files["triton"])).read(), f"{op} not in {files['triton']}"
        assert callable(getattr(reference, op))


def test_modules_stay_readable():
    long = [f"{n}: {sum(1 for _ in open(p))} lines" for n, p in _modules().items()
            if sum(1 for _ in open(p)) > MAX_LINES]
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_kangaroo_info_reports_an_invalid_variable(monkeypatch):
    from kangaroo_ext import info
    monkeypatch.setenv("KANGAROO_DISABLE_PDL", "maybe")
    assert "KANGAROO_DISABLE_PDL='maybe' is not a boolean" in info.collect()["environment"]
    monkeypatch.delenv("KANGAROO_DISABLE_PDL")
    assert info.collect()["environment"].startswith("every KANGAROO_")
