"""benchmarks/gpu_check.py: the GPU run's arguments parse, so a lent window is not lost to a typo.

The dry run (`make gpu-check DRY=1`, in CI) runs every table with its dry arguments; the GPU arguments only run on
a GPU, so here each table's own parser reads them, and stops before any work."""

from __future__ import annotations

import argparse
import importlib

import pytest

from benchmarks.gpu_check import TABLES


class Parsed(Exception):
    pass


@pytest.mark.parametrize("table", TABLES, ids=[t.name for t in TABLES])
@pytest.mark.parametrize("mode", ["gpu_args", "dry_args"])
def test_every_table_parses_its_arguments(table, mode, monkeypatch):
    real = argparse.ArgumentParser.parse_args
    seen = {}

    def parse_then_stop(self, args=None, namespace=None):
        seen["args"] = real(self, args, namespace)  # argparse exits (SystemExit 2) on a bad or unknown option
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    module = importlib.import_module(f"benchmarks.{table.module}")
    with pytest.raises(Parsed):
        module.main([*getattr(table, mode), "--name", table.name])
    assert seen["args"].name == table.name
    if mode == "gpu_args" and hasattr(seen["args"], "device"):
        assert seen["args"].device == "cuda"
