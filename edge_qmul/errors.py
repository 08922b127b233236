"""Typed errors and the exit codes the CLI maps them to.

Every error names the offending file or value and says how to fix it. Exit codes are grouped by area
so scripts can react without parsing messages; ``EXIT_CODES`` documents each one and a test checks that
every code in use has help text.
"""

from __future__ import annotations

EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error (a bug: please report it with the traceback)",
    2: "usage or configuration error: a flag, TOML option or value is invalid, or the install lacks the extra "
       "a verb needs (pip install 'edge-qmul[server]')",
    3: "data error: a dataset directory or file is missing or malformed",
    4: "checkpoint or artifact error: a model file is missing, corrupt or stale",
    5: "forget-request error: a request names samples that cannot be forgotten",
    6: "unlearning error: a method name is unknown or a method failed",
    7: "ledger error: the SQLite forget ledger cannot be read or written",
    8: "export error: a model is not valid ONNX, breaks the I/O contract, or is not fully int8",
    9: "validation failed: at least one check is over its budget (see validation.json)",
    10: "bundle or rollout error: no fresh passing validation to bundle, a bad key, or a refused bundle",
}


class EdgeQmulError(Exception):
    """Base class: a message naming the file or value, plus the fix."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message}\n  fix: {fix}" if fix else message)


class ConfigError(EdgeQmulError, ValueError):
    exit_code = 2


class DataError(EdgeQmulError):
    exit_code = 3


class CheckpointError(EdgeQmulError):
    exit_code = 4


class ForgetRequestError(EdgeQmulError, ValueError):
    exit_code = 5


class UnlearningError(EdgeQmulError):
    exit_code = 6


class LedgerError(EdgeQmulError):
    exit_code = 7


class ExportError(EdgeQmulError):
    exit_code = 8


class ValidationFailed(EdgeQmulError):
    """Raised by the CLI layer when a validation ran correctly and a check is over budget."""

    exit_code = 9


class BundleError(EdgeQmulError):
    """Bundling, signing, certificates or rollout cannot go ahead (e.g. the validation is stale)."""

    exit_code = 10
