"""The supported megatron-core releases (megatron_moba/core/versions.py): the installed one passes, any
other fails with an error that names it and the supported range, before the CPU shims patch anything;
the patches (megatron_moba/training/compat.py) are applied by entry points, never by library code."""
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_moba.core import versions as compat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository


@pytest.fixture
def reported_version(monkeypatch):
    """Make the imported megatron-core report another version (and forget the cached check)."""
    from megatron.core import package_info
    monkeypatch.setattr(compat, "_CHECKED", None)
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)

    def report(version):
        monkeypatch.setattr(package_info, "__version__", version)
    return report


def test_the_installed_release_is_supported():
    assert compat.is_supported(compat.check_megatron_core())


@pytest.mark.parametrize("version,expected", [
    ("0.16.1", (0, 16, 1)), ("0.17.0", (0, 17, 0)), ("0.19.2+3fb98a9", (0, 19, 2)), ("0.19.9", (0, 19, 9))])
def test_supported_releases(version, expected):
    assert compat.check_megatron_core(version) == expected


@pytest.mark.parametrize("version", ["0.15.3", "0.16.0", "0.16.0rc2", "0.20.0", "0.20.0rc1", "1.0.0"])
def test_unsupported_release_is_a_clear_error(reported_version, version):
    reported_version(version)
    with pytest.raises(compat.UnsupportedMegatronCoreError) as e:
        compat.megatron_core_version()
    assert f"megatron-core {version} is installed" in str(e.value)
    assert "0.16.1 to 0.19.x" in str(e.value) and "megatron-core>=0.16.1,<0.20" in str(e.value)
    assert isinstance(e.value, ImportError)


def test_cpu_shims_refuse_an_unsupported_release(reported_version):
    from megatron_moba.training import compat as cpu_shim
    reported_version("0.20.1")
    for apply in (cpu_shim.apply_cpu_shim, cpu_shim.apply_cpu_optimizer_shim):
        with pytest.raises(compat.UnsupportedMegatronCoreError, match=r"megatron-core 0\.20\.1 is installed.*0\.19\.x"):
            apply()


def test_override_warns_instead(reported_version, monkeypatch):
    reported_version("0.20.0")
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    with pytest.warns(RuntimeWarning, match=r"megatron-core 0\.20\.0 is installed"):
        assert compat.megatron_core_version() == (0, 20, 0)


def test_setup_py_declares_the_same_range():
    setup_py = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    declared = re.search(r'"(megatron-core[^"]*)"', setup_py).group(1).replace(" ", "")
    assert declared == compat.REQUIREMENT


_UNPATCHED = """
import sys
from types import SimpleNamespace
import torch
from megatron_moba.training import compat
assert not torch.cuda.is_available()
if sys.argv[1] == "initialize_distributed":
    from megatron_moba.training.parallel import initialize_distributed
    initialize_distributed(SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                           context_parallel_size=1, seed=0))
else:
    compat.require_cpu_optimizer_shim("--optimizer-impl megatron")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shims are needed without CUDA only")
@pytest.mark.parametrize("entry", ["initialize_distributed", "optimizer"])
def test_library_code_does_not_patch_but_names_apply_patches(entry):
    """Without the entry point's apply_patches(), library code fails clearly instead of patching megatron."""
    r = subprocess.run([sys.executable, "-c", _UNPATCHED, entry], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "RuntimeError" in r.stderr and "megatron_moba.training.compat.apply_patches()" in r.stderr, r.stderr[-2000:]


def test_apply_patches_reports_what_it_applied():
    from megatron_moba.training import compat as patches
    active = patches.apply_patches()           # idempotent: the test session applied them already
    assert active == ([] if torch.cuda.is_available() else ["cpu_shim", "cpu_optimizer_shim"])
    assert torch.cuda.is_available() or torch.cuda.current_device() == "cpu"
