"""The one checkpoint scheme (retrieval.training_checkpoint): a committed checkpoint stays whole whatever
happens to the next one, including a SIGKILL at any moment of a commit."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from repo_paths import REPO

from retrieval.errors import CXRError
from retrieval.training_checkpoint import STATE_FILE, Checkpoint


def _text(content: str):
    return lambda path: path.write_text(content)


def _folder(content: str):
    def write(path: Path) -> None:
        path.mkdir()
        (path / "a.txt").write_text(content)
        (path / "b.txt").write_text(content[::-1])

    return write


def test_commit_names_its_files_carries_kept_ones_and_removes_the_rest(tmp_path):
    ck = Checkpoint(tmp_path / "ck")
    assert ck.state() is None and ck.path("weights") is None
    ck.commit({"step": 1}, {"weights": ("w1", _text("one")), "model": ("m1", _folder("one"))})
    state = ck.state()
    assert {k: v for k, v in state.items() if k != "sha256"} == {"step": 1, "files": {"weights": "w1", "model": "m1"}}
    assert sorted(ck.state()["sha256"]) == ["m1", "w1"]
    assert ck.path("weights").read_text() == "one" and (ck.path("model") / "b.txt").read_text() == "eno"

    (tmp_path / "ck" / ".w2.abc.tmp").write_text("half")  # what a killed writer leaves
    (tmp_path / "ck" / "m2").mkdir()
    ck.commit({"step": 2}, {"weights": ("w2", _text("two")), "model": ("m2", _folder("two"))}, keep={"best": "w1"})
    assert ck.state()["files"] == {"best": "w1", "weights": "w2", "model": "m2"}
    assert ck.path("best").read_text() == "one" and (ck.path("model") / "a.txt").read_text() == "two"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([STATE_FILE, "w1", "w2", "m2"])

    with pytest.raises(ValueError, match="in use"):  # a committed file is never overwritten
        ck.commit({"step": 3}, {"weights": ("w2", _text("three"))})
    with pytest.raises(ValueError, match="not in"):
        ck.commit({"step": 3}, {}, keep={"best": "nope"})
    assert ck.state()["step"] == 2


def test_a_failing_writer_leaves_the_last_checkpoint(tmp_path):
    ck = Checkpoint(tmp_path / "ck")
    ck.commit({"step": 1}, {"weights": ("w1", _text("one"))})

    def dies(path: Path) -> None:
        path.write_text("par")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ck.commit({"step": 2}, {"model": ("m2", _folder("two")), "weights": ("w2", dies)})
    assert {k: v for k, v in ck.state().items() if k != "sha256"} == {"step": 1, "files": {"weights": "w1"}}
    assert ck.path("weights").read_text() == "one"
    assert not (tmp_path / "ck" / "w2").exists()  # no half-written file under its final name
    ck.commit({"step": 2}, {"weights": ("w2", _text("two"))})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [STATE_FILE, "w2"]  # the stray m2 is gone


def test_an_unreadable_state_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / STATE_FILE).write_text("{half")
    with pytest.raises(CXRError, match="cannot resume from the checkpoint"):
        Checkpoint(tmp_path / "ck").state()
    (tmp_path / "ck" / STATE_FILE).write_text('{"step": 3}')  # an older layout, which names no files
    with pytest.raises(CXRError, match="names no files"):
        Checkpoint(tmp_path / "ck").state()


CHILD = """
import hashlib, sys
from retrieval.training_checkpoint import Checkpoint
ck = Checkpoint(sys.argv[1])
state = ck.state()
step = 0 if state is None else state["step"]
while True:
    step += 1
    data = (str(step) * 200_000).encode()
    def model(path, data=data):
        path.mkdir()
        for i in range(3):
            (path / f"part{i}").write_bytes(data)
    ck.commit({"step": step, "sha": hashlib.sha256(data).hexdigest()},
              {"weights": (f"w{step}", lambda p, d=data: p.write_bytes(d)), "model": (f"m{step}", model)})
"""


def _check_whole(ck: Checkpoint) -> int:
    state = ck.state()
    assert state is not None
    want = state["sha"]
    assert hashlib.sha256(ck.path("weights").read_bytes()).hexdigest() == want
    for i in range(3):
        assert hashlib.sha256((ck.path("model") / f"part{i}").read_bytes()).hexdigest() == want
    return state["step"]


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_whole_checkpoint(tmp_path):
    folder = tmp_path / "ck"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    steps = [0]
    for delay in (0.0, 0.011, 0.023, 0.037, 0.053, 0.071, 0.097, 0.13):  # kills land at different moments
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], env=env)
        while not (folder / STATE_FILE).exists() or Checkpoint(folder).state()["step"] <= steps[-1]:
            assert proc.poll() is None  # wait for a commit of this run (resumed from the last one)
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        steps.append(_check_whole(Checkpoint(folder)))
    assert steps == sorted(set(steps))  # each run resumed from the last committed step and went on
