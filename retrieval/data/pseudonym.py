"""Keyed pseudonyms for the identifiers a DICOM import would otherwise store (PatientID, AccessionNumber).

`Pseudonymizer(key)` maps a PatientID to ``"hmac-" + HMAC-SHA256(key, field + value)[:32 hex]`` and an
AccessionNumber to the first 16 hex digits alone (its DICOM type, SH, holds 16 characters): the same value under
the same key always gives the same pseudonym (so studies of one patient stay together and a later sync matches),
different fields never collide, and without the key nobody can test a guessed PatientID against the stored one
(unlike a plain hash). Empty values stay empty. The key comes from `--pseudonymize KEY` or the environment variable
`CXR_PSEUDONYM_KEY` (`key_from`), and is never logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os

ENV_KEY = "CXR_PSEUDONYM_KEY"
PREFIX = "hmac-"
DIGITS = 32  # 128 bits of the HMAC: no collisions among any realistic number of patients
SHORT_FIELDS = {"AccessionNumber": 16}  # fields whose DICOM type is short: the digest alone, cut to fit


class Pseudonymizer:
    """HMAC-SHA256 pseudonyms under one secret key (never shown in repr)."""

    def __init__(self, key: str | bytes):
        if not key:
            raise ValueError("a pseudonymisation key must not be empty")
        self._key = key.encode() if isinstance(key, str) else bytes(key)

    def __repr__(self) -> str:
        return "Pseudonymizer(key=<hidden>)"

    def __call__(self, value: str | None, field: str = "PatientID") -> str:
        """The pseudonym of `value` in `field` ('' for an empty value)."""
        text = str(value or "").strip()
        if not text:
            return ""
        digest = hmac.new(self._key, f"{field}\x1f{text}".encode(), hashlib.sha256).hexdigest()
        if field in SHORT_FIELDS:
            return digest[: SHORT_FIELDS[field]]
        return PREFIX + digest[:DIGITS]


def key_from(option: str | None, env: str = ENV_KEY) -> Pseudonymizer | None:
    """The pseudonymizer for `--pseudonymize KEY`, else for the `CXR_PSEUDONYM_KEY` environment variable, else
    None (identifiers are stored as they are)."""
    key = option or os.environ.get(env, "")
    return Pseudonymizer(key) if key else None


# Identifying header tags a pseudonymised cache does not keep (PatientID / AccessionNumber are replaced instead).
REMOVED_TAGS = (
    "PatientName",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "ReferringPhysicianName",
    "InstitutionName",
    "InstitutionAddress",
)


def pseudonymize_dataset(ds, pseudonymize: Pseudonymizer):
    """`ds` (a pydicom Dataset, changed in place and returned) with PatientID and AccessionNumber replaced by their
    pseudonyms and the other identifying patient tags (REMOVED_TAGS) deleted; pixels and UIDs untouched."""
    for name in ("PatientID", "AccessionNumber"):
        if name in ds:
            setattr(ds, name, pseudonymize(str(ds.get(name) or ""), name))
    for name in REMOVED_TAGS:
        if name in ds:
            delattr(ds, name)
    return ds
