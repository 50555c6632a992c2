"""One exception hierarchy for everything a user can get wrong, and the exit code each one maps to.

Every error carries a one-paragraph message that says what went wrong, why, and how to fix it. The CLI prints the
message and exits with the class's code; nothing else in wina decides exit codes.
"""
from __future__ import annotations


class WinaError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1
    kind = "error"

    def __init__(self, what: str, why: str = "", fix: str = ""):
        self.what, self.why, self.fix = what, why, fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what.rstrip(".") + "."]
        if self.why:
            parts.append(self.why.rstrip(".") + ".")
        if self.fix:
            parts.append("Fix: " + self.fix.rstrip(".") + ".")
        return " ".join(parts)


class ConfigError(WinaError):
    exit_code = 3
    kind = "config"


class ModelError(WinaError):
    exit_code = 4
    kind = "model"


class UnsupportedModelError(WinaError):
    exit_code = 5
    kind = "unsupported-model"


class DataError(WinaError):
    exit_code = 6
    kind = "data"


class OutputExistsError(WinaError):
    exit_code = 7
    kind = "output-exists"


class ArtifactError(WinaError):
    exit_code = 8
    kind = "artifact"


class ValidationError(WinaError):
    """A result failed its own check: a transform changed the function, an export drifted from its reference."""

    exit_code = 9
    kind = "validation"


class PassError(WinaError):
    """A pass's precondition, body or postcondition failed; the message names the pass and the one before it."""

    exit_code = 10
    kind = "pass"


class NotAvailableError(WinaError):
    """The feature exists in the interface but cannot run here (a missing optional component or a later issue)."""

    exit_code = 11
    kind = "not-available"


# The table the README documents; keep the two in step (tests/test_errors.py checks this).
EXIT_CODES = {
    0: "success",
    1: "internal error (a bug in wina: please report it with the traceback from --debug)",
    2: "usage error (unknown option, missing argument)",
    ConfigError.exit_code: "bad configuration (YAML, schema, value out of range)",
    ModelError.exit_code: "model cannot be loaded (missing or corrupt files, hub unreachable)",
    UnsupportedModelError.exit_code: "model architecture not supported",
    DataError.exit_code: "calibration or evaluation text missing, empty or too short",
    OutputExistsError.exit_code: "output exists and --overwrite was not given",
    ArtifactError.exit_code: "artifact missing, incomplete, corrupt or of an unknown format version",
    ValidationError.exit_code: "a result failed verification (transform changed logits, export drifted)",
    PassError.exit_code: "a pipeline pass failed its contract",
    NotAvailableError.exit_code: "feature not available in this build or on this machine",
}
