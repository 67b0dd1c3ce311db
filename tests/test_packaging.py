"""Packaging: the wheel carries every module of both packages and works outside the source tree;
the triton backend is "unavailable" only when triton itself is missing.

The wheel is built from a copy of the sources (no build/ or egg-info of the checkout can leak in),
without build isolation and without dependencies (nothing is downloaded), installed with
``pip install --target`` into a temporary directory and imported by a separate interpreter that
starts outside the repository with site processing off, so the editable install's finder
(a .pth hook in site-packages) cannot serve the checkout instead.
"""
import importlib.abc
import importlib.machinery
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest
import torch

import moba_kernels
from moba_kernels import api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = {"moba_kernels": os.path.join("kernels", "moba_kernels"), "megatron_moba": "megatron_moba"}


def _copy_sources(dst):
    """What a build needs: the metadata files and the two package trees, nothing generated."""
    for name in ("setup.py", "pyproject.toml", "README.md", "setup.cfg", "MANIFEST.in"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy2(os.path.join(ROOT, name), dst)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for rel in SOURCES.values():
        shutil.copytree(os.path.join(ROOT, rel), os.path.join(dst, rel), ignore=ignore)


def build_wheel(src, out):
    """``pip wheel`` the project in ``src``; returns the wheel's path."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", out, src], capture_output=True, text=True, cwd=src)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = [f for f in os.listdir(out) if f.endswith(".whl")]
    assert len(wheels) == 1, wheels
    return os.path.join(out, wheels[0])


def source_modules():
    """Every module file of both packages in the checkout, as wheel paths (moba_kernels/...)."""
    found = set()
    for pkg, rel in SOURCES.items():
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, rel)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            sub = os.path.relpath(dirpath, os.path.join(ROOT, rel))
            for f in files:
                if f.endswith(".py"):
                    found.add("/".join(p for p in (pkg, sub, f) if p != "."))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    _copy_sources(str(src))
    return build_wheel(str(src), str(tmp_path_factory.mktemp("dist")))


def test_wheel_contains_every_module(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next((z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), "")
    expected = source_modules()
    assert "moba_kernels/triton_backend/__init__.py" in expected        # the subpackage the old wheel lost
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert not [n for n in names if n.startswith(("kernels/", "tests/"))]   # mapped, not copied as-is
    assert "moba-pretrain = megatron_moba.pretrain:main" in entry_points


def _requires(wheel):
    from packaging.requirements import Requirement
    with zipfile.ZipFile(wheel) as z:
        meta = next(z.read(n).decode() for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
            if line.startswith("Requires-Dist:")]
    return {r.name: r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})}


def _constraints():
    pins = {}
    for line in open(os.path.join(ROOT, "constraints.txt")):
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_requirements_are_ranges_and_the_constraints_pin_one_tested_set(wheel):
    from importlib.metadata import version as installed

    from packaging.version import Version
    reqs, pins = _requires(wheel), _constraints()
    for name in ("torch", "triton", "megatron-core"):
        spec = reqs[name].specifier
        assert not any(s.operator in ("==", "===") for s in spec), f"{name} is pinned: {spec}"
        assert pins[name] in spec, f"constraints.txt pins {name}=={pins[name]} outside {spec}"
        assert Version(installed(name)).public in spec            # this environment is a tested one
    # NVIDIA's containers: torch 2.x.0a0+<git>.nvYY.MM fits (pip keeps an installed pre-release that
    # fits the range), so installing the project does not replace it; an untested major does not.
    assert reqs["torch"].specifier.contains("2.9.0a0+50eac811a6.nv25.09", prereleases=True)
    assert not reqs["torch"].specifier.contains("3.0.0")
    assert "megatron-core" in pins and "megatron-moba" not in pins
    for name, req in reqs.items():                                 # every pin satisfies setup.py
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], req)
    assert "2.4.0" not in reqs["numpy"].specifier                  # triton 3.6's interpreter and numpy 2.4


def test_installed_wheel_imports_outside_the_source_tree(wheel, tmp_path):
    pytest.importorskip("triton")
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                        "--target", str(target), wheel], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    code = textwrap.dedent("""
        import json, sys
        import torch
        import moba_kernels, moba_kernels.triton_backend, megatron_moba, megatron_moba.core.attention
        q = torch.randn(1, 64, 2, 16)
        out = moba_kernels.moba_attn(q, q, q, chunk_size=16, topk=2, backend="torch")
        print(json.dumps(dict(
            files=[m.__file__ for m in (moba_kernels, moba_kernels.triton_backend, megatron_moba,
                                        megatron_moba.core.attention)],
            editable=[type(f).__module__ for f in sys.meta_path if "editable" in type(f).__module__.lower()],
            backends=moba_kernels.available_backends(torch.device("cpu")),
            shape=list(out.shape), finite=bool(torch.isfinite(out).all()))))
    """)
    # -S: no site processing, so no .pth file runs (the editable install's finder is one); the
    # dependencies come from this interpreter's site-packages, the project only from the target.
    libs = dict.fromkeys([str(target), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=os.pathsep.join(libs), TRITON_INTERPRET="1", PYTHONNOUSERSITE="1")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    import json
    info = json.loads(r.stdout.strip().splitlines()[-1])
    for f in info["files"]:
        assert os.path.realpath(f).startswith(os.path.realpath(target) + os.sep), f
    assert info["editable"] == []
    assert {"reference", "torch", "triton"} <= set(info["backends"])   # triton: under TRITON_INTERPRET=1
    assert info["shape"] == [1, 64, 2, 16] and info["finite"]


# --- the triton import guard -----------------------------------------------------------------

class _FailingBackend(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves moba_kernels.triton_backend as a module whose execution raises ``error``."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "moba_kernels.triton_backend":
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.error


@pytest.fixture
def backend_import_raises(monkeypatch):
    """Make the next ``from . import triton_backend`` in moba_kernels.api raise the given error."""
    def install(error):
        monkeypatch.delattr(moba_kernels, "triton_backend", raising=False)
        for name in [n for n in sys.modules if n == "moba_kernels.triton_backend"
                     or n.startswith("moba_kernels.triton_backend.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setattr(sys, "meta_path", [_FailingBackend(error)] + sys.meta_path)
    return install


@pytest.mark.parametrize("name", ["triton", "triton.language"])
def test_missing_triton_means_unavailable(backend_import_raises, name):
    backend_import_raises(ModuleNotFoundError(f"No module named '{name}'", name=name))
    assert not api.BACKENDS["triton"].available(torch.device("cpu"))
    assert "triton" not in moba_kernels.available_backends(torch.device("cpu"))
    assert "torch" in moba_kernels.available_backends(torch.device("cpu"))


@pytest.mark.parametrize("error", [
    ImportError("cannot import name 'PAST_INDEX' from 'moba_kernels.triton_backend.tiles'"),   # a bug of ours
    ImportError("cannot import name 'static_range' from 'triton.language'", name="triton.language"),  # old triton
    ModuleNotFoundError("No module named 'moba_kernels._gone'", name="moba_kernels._gone"),   # broken install
    ModuleNotFoundError("No module named 'tritonx'", name="tritonx"),                          # not triton itself
    ModuleNotFoundError("No module named 'triton'"),                                           # name unknown
], ids=["import-name", "old-triton", "missing-own-module", "prefix-only", "no-name"])
def test_any_other_import_error_surfaces(backend_import_raises, error):
    backend_import_raises(error)
    with pytest.raises(ImportError) as caught:
        moba_kernels.available_backends(torch.device("cpu"))
    assert caught.value is error


def test_guard_restores_the_real_backend():
    """After the tests above (monkeypatch undone) the real module is importable and reports in."""
    pytest.importorskip("triton")
    from moba_kernels import triton_backend
    assert sys.modules["moba_kernels.triton_backend"] is triton_backend
    assert api.BACKENDS["triton"].available(torch.device("cpu")) == (os.environ.get("TRITON_INTERPRET") == "1")
