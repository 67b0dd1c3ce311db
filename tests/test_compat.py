"""The supported megatron-core releases (megatron_moba/compat.py): the installed one passes, any other
fails with an error that names it and the supported range, before the CPU shims patch anything."""
import os
import re

import pytest

from megatron_moba.core import versions as compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    from megatron_moba.training.trainer import compat as cpu_shim
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
