"""The project's error types. The CLI maps each to a one-line message and exit code 1."""

from __future__ import annotations

from pathlib import Path


class CXRError(Exception):
    """Base class for every error the tool reports to a user (not a bug)."""


class ImageReadError(CXRError):
    """An image (PNG/JPEG/DICOM) could not be read; names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ManifestError(CXRError):
    """A study manifest is missing, unreadable or has invalid rows."""


class ImportError_(CXRError):
    """An importer could not read its source (named with a trailing underscore to not shadow the builtin)."""


class ModelLoadError(CXRError):
    """A model config or weights could not be resolved or loaded. Never a silent random init."""


class IndexError_(CXRError):
    """An index folder is missing, corrupt, or does not match the model (fingerprint mismatch)."""


class UsageError(CXRError):
    """Bad arguments that the CLI could not catch itself (exit code 2)."""
