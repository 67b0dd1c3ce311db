"""The megatron-core releases megatron_moba supports, in one place.

Supported: 0.16.1 up to the newest 0.19.x (``>=0.16.1,<0.20``, as setup.py declares).  0.16.1 is
tested by ``make test``; 0.19.2 by ``make test-mcore-latest`` (the megatron tests), 0.18.2 and 0.17.1
by ``make test-mcore-018`` / ``make test-mcore-017`` (a subset of them), all in CI.  On Python 3.11:
megatron-core >= 0.17 ships cp312+ wheels only, and these targets install the wheel's pure-Python
code with its one C++ extension rebuilt, see .ci/mcore_latest_venv.sh.

``check_megatron_core()`` runs when ``megatron_moba.core.config`` is imported (every module that builds a
model goes through it) and before the CPU shims patch megatron's internals: another release fails
there with an error naming the installed version and the supported range.
``MEGATRON_MOBA_ALLOW_UNSUPPORTED_MCORE=1`` turns that error into a warning (to try a new release;
the CPU shims then apply the patches of the nearest supported release).

``megatron_core_version()`` is the ``(major, minor, patch)`` that version-specific code keys on;
``hybrid_model_available()`` says whether the release has HybridModel (--hybrid-layer-pattern).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Optional, Tuple

from megatron_moba.core.errors import ConfigurationError

OLDEST = (0, 16, 1)          # the oldest supported release
NEWEST_MINOR = (0, 19)       # the newest supported release line: every 0.19.x
REQUIREMENT = "megatron-core>=0.16.1,<0.20"      # as in setup.py (tests/training/test_compat.py compares)
SUPPORTED_RANGE = f"0.16.1 to 0.19.x ({REQUIREMENT})"
ALLOW_ENV = "MEGATRON_MOBA_ALLOW_UNSUPPORTED_MCORE"

Version = Tuple[int, int, int]


class UnsupportedMegatronCoreError(ConfigurationError, ImportError):
    """The installed megatron-core is outside ``SUPPORTED_RANGE`` (an ``ImportError``, and a
    ``ConfigurationError``: the job prints it without a traceback)."""


def installed_version() -> str:
    """megatron-core's version string, as the imported package reports it (0.17+ append ``+<git hash>``
    when they sit inside a git work tree)."""
    try:
        from megatron.core import package_info
        return str(package_info.__version__)
    except ImportError:         # megatron-core's own imports failed: what does pip say is installed?
        from importlib.metadata import version
        return version("megatron-core")


def parse_version(version: str) -> Version:
    """``"0.19.2+3fb98a9"`` -> ``(0, 19, 2)``; ``"0.20.0rc1"`` -> ``(0, 20, 0)``."""
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not m:
        raise UnsupportedMegatronCoreError(f"cannot read megatron-core's version {version!r}; megatron-moba "
                                           f"supports megatron-core {SUPPORTED_RANGE}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def is_supported(version: Version) -> bool:
    return OLDEST <= tuple(version) and tuple(version[:2]) <= NEWEST_MINOR


def check_megatron_core(version: Optional[str] = None) -> Version:
    """The installed (or given) megatron-core version as ``(major, minor, patch)``; raises
    ``UnsupportedMegatronCoreError`` (an ``ImportError``) naming it and the supported range when it is
    outside, unless ``MEGATRON_MOBA_ALLOW_UNSUPPORTED_MCORE=1`` (then a warning)."""
    version = installed_version() if version is None else version
    parsed = parse_version(version)
    if not is_supported(parsed):
        message = (f"megatron-core {version} is installed, but megatron-moba supports megatron-core "
                   f"{SUPPORTED_RANGE}.  Install a supported release, e.g. "
                   f"pip install '{REQUIREMENT}' (or set {ALLOW_ENV}=1 to try this one anyway)")
        if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
            warnings.warn(message + f"; continuing since {ALLOW_ENV} is set", RuntimeWarning, stacklevel=2)
        else:
            raise UnsupportedMegatronCoreError(message)
    return parsed


_CHECKED: Optional[Version] = None


def megatron_core_version() -> Version:
    """The installed megatron-core's ``(major, minor, patch)``, checked once per process."""
    global _CHECKED
    if _CHECKED is None:
        _CHECKED = check_megatron_core()
    return _CHECKED


def hybrid_model_available() -> bool:
    """Whether the installed megatron-core has ``HybridModel`` (``megatron.core.models.hybrid``, 0.19+)."""
    from importlib.util import find_spec
    try:
        return find_spec("megatron.core.models.hybrid") is not None
    except ImportError:
        return False


def require_hybrid_model(flag: str = "--hybrid-layer-pattern") -> None:
    """A ValueError naming ``flag`` and the installed release where megatron-core has no HybridModel."""
    if not hybrid_model_available():
        raise ValueError(f"{flag} builds megatron-core's HybridModel (megatron.core.models.hybrid), which "
                         f"megatron-core {installed_version()} does not have (0.19 and later do): upgrade "
                         f"megatron-core, or leave {flag} out to train a GPTModel")
