"""The `cxr` entry point: help, usage errors and error mapping."""

from __future__ import annotations

import subprocess
import sys

from run_python import run_python

from cli.main import main


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("data", "train", "eval", "index", "query", "generate", "demo"):
        assert name in out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["no-such-command"]) == 2


def test_console_script_exit_code():
    cmd = [sys.executable, "-m", "cli.main", "data", "import", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_quiet_transformers_turns_its_progress_bars_off():
    from transformers.utils import logging as hf_logging

    from cli.quiet import quiet_transformers

    was = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        quiet_transformers()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_help_imports_no_heavy_library():
    """`cxr --help` stays fast (issue 25): no torch, pandas, faiss or open_clip, and no rich markdown for the help."""
    code = (
        "import sys\nfrom cli.main import main\nassert main(['--help']) == 0\n"
        "print(sorted(m for m in ('torch', 'pandas', 'faiss', 'open_clip', 'rich.markdown') if m in sys.modules))"
    )
    proc = run_python(code)
    assert proc.stdout.strip().splitlines()[-1] == "[]"
