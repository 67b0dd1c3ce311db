"""The error class for what a user asked for: flags, data, directories, the installed megatron-core.

``ConfigurationError`` is raised on purpose, with a message that says what to change.  The job's
entry point (``python -m megatron_moba.pretrain``) prints it as ``moba-pretrain: error: <message>``
once (rank 0) and exits with status 2, as argparse does for its own errors, without a traceback;
any other exception keeps its traceback.  It is a ``ValueError``; the errors that were another
builtin before (``FileExistsError``, ``FileNotFoundError``, ``ImportError``) subclass both, so
code catching those still catches them.

No imports: the job's flag parsing imports this before torch and megatron-core.
"""
from __future__ import annotations


class ConfigurationError(ValueError):
    """A flag, file, directory or installed release the user chose is wrong; the message says what
    to change (the job prints it without a traceback)."""
