"""The content-addressed instance cache (retrieval/data/importers/dicom_cache.py) and the keyed pseudonyms
(retrieval/data/pseudonym.py), without an archive."""

from __future__ import annotations

import hashlib
import json

import pytest

from retrieval.data.importers.dicom_cache import MAP_FILE, InstanceCache
from retrieval.data.pseudonym import Pseudonymizer, key_from
from retrieval.errors import ImportError_


def test_files_are_named_by_the_hash_of_their_bytes_and_shared(tmp_path):
    cache = InstanceCache(tmp_path)
    a = cache.put("1.2.3", b"same bytes")
    b = cache.put("1.2.4", b"same bytes")
    assert a == b and a.name == hashlib.sha256(b"same bytes").hexdigest() + ".dcm"
    again = InstanceCache(tmp_path)  # a new process reads the map back
    assert again.get("1.2.3") == a and again.get("1.2.4") == a and again.get("9.9") is None


def test_a_torn_last_line_is_ignored_and_the_next_line_starts_clean(tmp_path):
    cache = InstanceCache(tmp_path)
    cache.put("1.1", b"one")
    with open(tmp_path / MAP_FILE, "a") as f:
        f.write('{"sop": "1.2", "sha')  # a kill in the middle of a line
    reopened = InstanceCache(tmp_path)
    assert reopened.get("1.1") is not None and reopened.get("1.2") is None
    reopened.put("1.3", b"three")
    assert InstanceCache(tmp_path).get("1.3") is not None
    lines = (tmp_path / MAP_FILE).read_text().splitlines()
    assert json.loads(lines[-1])["sop"] == "1.3"


def test_a_changed_or_missing_file_is_not_served(tmp_path):
    cache = InstanceCache(tmp_path)
    path = cache.put("1.1", b"original")
    path.write_bytes(b"changed!")
    assert InstanceCache(tmp_path).get("1.1") is None
    path.unlink()
    assert InstanceCache(tmp_path).get("1.1") is None


def test_a_cache_is_bound_to_its_pseudonymisation_key(tmp_path):
    InstanceCache(tmp_path / "a", Pseudonymizer("k1"))
    InstanceCache(tmp_path / "a", Pseudonymizer("k1"))
    with pytest.raises(ImportError_, match="another"):
        InstanceCache(tmp_path / "a", Pseudonymizer("k2"))
    with pytest.raises(ImportError_, match="another"):
        InstanceCache(tmp_path / "a", None)
    assert "k1" not in (tmp_path / "a" / "cache_info.json").read_text()


def test_pseudonyms(monkeypatch):
    p = Pseudonymizer("s3cret")
    assert p("P1") == p(" P1 ") != Pseudonymizer("other")("P1")
    assert p("P1", "PatientID") != p("P1", "AccessionNumber") and len(p("A1", "AccessionNumber")) == 16
    assert p("") == "" and "s3cret" not in repr(p)
    monkeypatch.delenv("CXR_PSEUDONYM_KEY", raising=False)
    assert key_from(None) is None
    monkeypatch.setenv("CXR_PSEUDONYM_KEY", "s3cret")
    assert key_from(None)("P1") == p("P1")
