"""atomic_write under concurrency and crashes: at every moment complete versions only."""

import hashlib
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from common.atomic import atomic_write


def _payload(writer: int) -> bytes:
    """A distinct, self-validating version: a body of varying size, then its SHA-256."""
    body = f"writer {writer}\n".encode() * (1 + writer % 97) * 50
    return body + hashlib.sha256(body).digest()


def _writer_of(data: bytes) -> int:
    """Which writer's complete version ``data`` is; fails on a torn or mixed file."""
    body, digest = data[:-32], data[-32:]
    assert len(data) > 32 and hashlib.sha256(body).digest() == digest, "not a complete version"
    writer = int(body.split(b"\n", 1)[0].split()[1])
    assert data == _payload(writer)
    return writer


def test_concurrent_writers_with_keep_previous_leave_complete_versions(tmp_path):
    path, prev = tmp_path / "state.bin", tmp_path / "state.prev.bin"
    n_writes = 600
    done = threading.Event()
    seen: list[int] = []
    problems: list[BaseException] = []

    def read_while_writing() -> None:
        # once the first write is done, ``path`` must always be there and complete
        while not done.is_set():
            try:
                seen.append(_writer_of(path.read_bytes()))
            except BaseException as exc:  # noqa: BLE001 - reported below
                problems.append(exc)
                return

    def one(writer: int) -> None:
        def write(f):
            data = _payload(writer)
            f.write(data[:100])  # in pieces, as torch.save / np.savez write
            f.write(data[100:])

        atomic_write(path, write, keep_previous=prev)

    one(n_writes)  # the first version, so the reader has something from the start
    reader = threading.Thread(target=read_while_writing)
    reader.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, range(n_writes)))  # re-raises any writer's exception
    finally:
        done.set()
        reader.join()
    assert problems == []
    assert seen, "the reader never ran"
    final, kept = _writer_of(path.read_bytes()), _writer_of(prev.read_bytes())
    assert final in range(n_writes) and kept in range(n_writes + 1)
    assert final != kept  # the kept one is a version the last write replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin", "state.prev.bin"]


def test_a_crash_inside_write_leaves_the_previous_file_and_no_temp_file(tmp_path):
    path, prev = tmp_path / "state.bin", tmp_path / "state.prev.bin"
    atomic_write(path, lambda f: f.write(_payload(1)), keep_previous=prev)
    atomic_write(path, lambda f: f.write(_payload(2)), keep_previous=prev)

    def crash(f):
        f.write(_payload(3)[:500])
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash, keep_previous=prev)
    assert path.read_bytes() == _payload(2) and prev.read_bytes() == _payload(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin", "state.prev.bin"]

    fresh = tmp_path / "sub" / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        atomic_write(fresh, lambda f: (_ for _ in ()).throw(KeyboardInterrupt))
    assert list(fresh.parent.iterdir()) == []  # no half file, no temp file


def test_first_write_with_keep_previous_keeps_nothing(tmp_path):
    path, prev = tmp_path / "a.bin", tmp_path / "a.prev.bin"
    atomic_write(path, lambda f: f.write(b"one"), keep_previous=prev)
    assert path.read_bytes() == b"one" and not prev.exists()
    atomic_write(path, lambda f: f.write(b"two"), keep_previous=prev)
    assert path.read_bytes() == b"two" and prev.read_bytes() == b"one"
    assert os.stat(path).st_ino != os.stat(prev).st_ino  # two files, not one linked twice


@pytest.mark.skipif(os.name != "posix", reason="folders are fsynced on POSIX only")
def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    real_fsync = os.fsync
    synced: list[tuple[bool, int, bytes | None]] = []  # (is a folder, inode, path's content)

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((stat.S_ISDIR(st.st_mode), st.st_ino,
                       path.read_bytes() if path.exists() else None))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(path, lambda f: f.write(b"new"))
    folder = os.stat(tmp_path).st_ino
    # the file's bytes first, then its folder, once the new version is in place
    assert [(d, i == folder) for d, i, _ in synced] == [(False, False), (True, True)]
    assert synced[0][2] is None and synced[1][2] == b"new"


def test_keep_previous_in_another_folder_fsyncs_both(tmp_path, monkeypatch):
    path, prev = tmp_path / "a" / "x.bin", tmp_path / "b" / "x.prev.bin"
    prev.parent.mkdir()
    atomic_write(path, lambda f: f.write(b"one"), keep_previous=prev)
    real_fsync = os.fsync
    folders: list[int] = []

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            folders.append(st.st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(path, lambda f: f.write(b"two"), keep_previous=prev)
    assert prev.read_bytes() == b"one" and path.read_bytes() == b"two"
    if os.name == "posix":
        assert folders == [os.stat(path.parent).st_ino, os.stat(prev.parent).st_ino]
