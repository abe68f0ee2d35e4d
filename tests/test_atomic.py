"""ip2p.atomic: writes that a crash or a kill never leaves half-done, and the cleanup of what killed writers left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ip2p import atomic


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _left_by(pid: int, path: Path, kind: str, host: str | None = None) -> Path:
    host = atomic._host_tag() if host is None else host
    return path.parent / f".{path.name}.{kind}-{pid}-{host}-deadbeef"


def test_write_json_replaces_the_file_with_the_umasks_mode(tmp_path):
    path = tmp_path / "sub" / "m.json"
    old_mask = os.umask(0o022)
    try:
        atomic.write_json(path, {"a": 1})
        with atomic.writing_file(path) as tmp:
            tmp.write_text("{}")
            os.chmod(tmp, 0o600)  # as safetensors does
    finally:
        os.umask(old_mask)
    assert json.loads(path.read_text()) == {}
    assert path.stat().st_mode & 0o777 == 0o644
    assert _siblings(path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = atomic.write_text(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.writing_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert _siblings(path) == []


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    with atomic.writing_folder(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(OSError):
        with atomic.writing_folder(target) as tmp:
            (tmp / "weights").write_text("v2 (half")
            raise OSError("killed")
    assert (target / "weights").read_text() == "v1"
    assert _siblings(target) == []
    with atomic.writing_folder(target) as tmp:
        (tmp / "other").write_text("v3")
    assert sorted(p.name for p in target.iterdir()) == ["other"]  # replaced whole, nothing of v1 left


def test_leftovers_of_dead_writers_go_and_those_of_live_or_foreign_ones_stay(tmp_path):
    path = atomic.write_text(tmp_path / "f.txt", "v1")
    dead = _left_by(_dead_pid(), path, "tmp")
    dead.write_text("half")
    dead_dir = _left_by(_dead_pid(), path, "tmp")
    (dead_dir / "sub").mkdir(parents=True)
    live = _left_by(os.getpid(), path, "tmp")
    live.write_text("being written")
    foreign = _left_by(_dead_pid(), path, "tmp", host="0badc0de")  # another machine on a shared disk
    foreign.write_text("maybe being written there")
    unrelated = tmp_path / ".f.txt.notes"
    unrelated.write_text("keep")
    atomic.write_text(path, "v2")
    assert path.read_text() == "v2"
    assert _siblings(path) == sorted([live.name, foreign.name, unrelated.name])


def test_a_kill_between_the_two_renames_is_undone_by_the_next_write(tmp_path):
    target = tmp_path / "model"
    moved_aside = _left_by(_dead_pid(), target, "old")
    moved_aside.mkdir()
    (moved_aside / "weights").write_text("v1")
    atomic.remove_stale(target)
    assert (target / "weights").read_text() == "v1"
    assert _siblings(target) == []
    # The same through a writer that then fails: the previous version is back and stays.
    target.rename(moved_aside)
    with pytest.raises(OSError):
        with atomic.writing_folder(target):
            raise OSError("killed again")
    assert (target / "weights").read_text() == "v1"


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_writer_killed_midway_loses_nothing(tmp_path, kind):
    target = tmp_path / ("f.bin" if kind == "file" else "model")
    if kind == "file":
        atomic.write_bytes(target, b"v1")
    else:
        with atomic.writing_folder(target) as tmp:
            (tmp / "w").write_bytes(b"v1")
    body = "tmp.write_bytes(b'v2' * 1000)" if kind == "file" else "(tmp / 'w').write_bytes(b'v2' * 1000)"
    script = textwrap.dedent(f"""
        import os, signal
        from ip2p import atomic
        with atomic.{"writing_file" if kind == "file" else "writing_folder"}({str(target)!r}) as tmp:
            {body}
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env)
    assert done.returncode == -signal.SIGKILL
    assert len(_siblings(target)) == 1  # the killed writer's temporary, and the target untouched
    assert (target if kind == "file" else target / "w").read_bytes() == b"v1"
    if kind == "file":
        atomic.write_bytes(target, b"v3")
    else:
        with atomic.writing_folder(target) as tmp:
            (tmp / "w").write_bytes(b"v3")
    assert (target if kind == "file" else target / "w").read_bytes() == b"v3"
    assert _siblings(target) == []


def test_a_sweep_under_a_folder_removes_what_dead_writers_left_anywhere_in_it(tmp_path):
    # Files written with clean=False (a latent cache: thousands per folder) are swept once, not at each write.
    a, b = tmp_path / "0000" / "1.safetensors", tmp_path / "0001" / "7.safetensors"
    for path in (a, b):
        with atomic.writing_file(path, clean=False) as tmp:
            tmp.write_bytes(b"v1")
    dead = _left_by(_dead_pid(), a, "tmp")
    dead.write_bytes(b"half")
    orphan = _left_by(_dead_pid(), tmp_path / "0001" / "9.safetensors", "tmp")  # its target was never written
    orphan.write_bytes(b"half")
    live = _left_by(os.getpid(), b, "tmp")
    live.write_bytes(b"being written")
    moved_aside = _left_by(_dead_pid(), tmp_path / "0002" / "model", "old")
    (moved_aside / "sub").mkdir(parents=True)
    atomic.remove_stale_under(tmp_path)
    assert _siblings(a) == [] and [p.name for p in (tmp_path / "0001").iterdir() if p.name.startswith(".")] == [
        live.name]
    assert (tmp_path / "0002" / "model" / "sub").is_dir()  # put back: its save was killed between the two renames
    assert a.read_bytes() == b.read_bytes() == b"v1"
