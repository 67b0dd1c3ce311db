"""The package boundaries (README, "Layout"): read every import statement (module level and inside
functions) of the source tree and check the one dependency direction:

    moba_kernels  <-  megatron_moba.core  <-  megatron_moba.training  <-  megatron_moba.eval
                                                      ^---- megatron_moba.hf
and that tools/, examples/ and tests/ reach the packages as installed (no sys.path edits, no loading
files by path), while megatron_moba uses moba_kernels' public names only."""
import ast
import os

import pytest

import moba_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _py_files(*parts):
    top = os.path.join(ROOT, *parts)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in sorted(filenames):
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def _module_name(path):
    rel = os.path.relpath(path, ROOT)
    if rel.startswith("kernels" + os.sep):
        rel = rel[len("kernels") + 1:]
    name = rel[:-3].replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def imports(path):
    """[(imported module, [names], line)] with relative imports resolved."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    module = _module_name(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((base, [a.name for a in node.names], node.lineno))
    return found


def _within(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


FORBIDDEN = {      # package -> what it must not import
    "moba_kernels": ["megatron_moba", "megatron", "tools", "examples"],
    "megatron_moba.core": ["megatron_moba.training", "megatron_moba.eval", "megatron_moba.hf",
                           "megatron_moba.pretrain"],
    "megatron_moba.training": ["megatron_moba.eval", "megatron_moba.hf"],
    "megatron_moba": ["tools", "examples"],
}


def _violations():
    out = []
    for path in list(_py_files("kernels", "moba_kernels")) + list(_py_files("megatron_moba")):
        module = _module_name(path)
        for name, _names, line in imports(path):
            for package, banned in FORBIDDEN.items():
                if _within(module, package):
                    out += [f"{module}:{line} imports {name}" for b in banned if _within(name, b)]
    return out


def test_packages_import_in_one_direction():
    assert _violations() == []


def test_megatron_moba_uses_moba_kernels_public_names_only():
    public = set(moba_kernels.__all__)
    bad = []
    for path in _py_files("megatron_moba"):
        for name, names, line in imports(path):
            if _within(name, "moba_kernels") and (name != "moba_kernels" or not set(names) <= public):
                bad.append(f"{_module_name(path)}:{line} imports {name} {names}")
    assert bad == []


@pytest.mark.parametrize("tree", ["megatron_moba", "tools", "examples", "tests", "benchmarks"])
def test_code_reaches_packages_as_installed(tree):
    """No sys.path edits and no modules loaded from file paths: the packages are installed (editable),
    tools are run as commands, and tests import helpers through pyproject's pythonpath."""
    bad = []
    for path in _py_files(tree):
        text = open(path, encoding="utf-8").read()
        for needle in ("sys.path.insert", "sys.path.append", "spec_from_file_location"):
            if needle in text and not path.endswith("test_import_rules.py"):
                bad.append(f"{os.path.relpath(path, ROOT)}: {needle}")
    assert bad == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rule test itself: a core module importing the trainer is caught (relative imports too)."""
    fake = tmp_path / "megatron_moba" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from ..training import trainer\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    assert _violations() == ["megatron_moba.core.bad:2 imports megatron_moba.training"]


def test_ruff_finds_nothing():
    """`make lint`'s Python check (rules in pyproject.toml) passes on the tree."""
    import shutil
    import subprocess
    import sys
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (make install installs it)")
    r = subprocess.run([ruff, "check", "--output-format", "concise", "kernels", "megatron_moba", "tools", "examples",
                        "tests", "benchmarks", "setup.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
