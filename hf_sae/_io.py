"""Durable file writes: the one place for atomic writes, checksums, sealed folders and folder swaps.

Used by the activation cache (shards, metadata), the trainer's checkpoints and the exported SAE
folders. The guarantees, for a process killed at any instruction:

* :func:`atomic_write_bytes` / :func:`atomic_write_json`: the file holds the old bytes or the new
  bytes, never a mix (temporary file in the same folder, fsync, ``os.replace``).
* :func:`seal` + :func:`publish_dir`: a folder is written under a temporary name, sealed with a
  ``manifest.json`` (size + sha256 of every file, written last), then swapped in. While an older copy
  is being replaced, a complete copy always exists under one of three names (``NAME``, ``NAME.old``,
  ``.tmp-NAME``); :func:`recover_dir` puts the newest complete one back under ``NAME``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ._faults import fault_point

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
OLD_SUFFIX = ".old"


def sha256_file(path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path) -> None:
    """fsync a file or a folder (so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, data, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (readers see the old or the new file, never a part)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj, indent: Optional[int] = 1) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as JSON (with a trailing newline)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def seal(folder) -> None:
    """Write ``manifest.json`` (size + sha256 of every other file) last, fsyncing every file and the folder."""
    folder = str(folder)
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, folder)
            if rel == MANIFEST:
                continue
            fsync_path(p)
            files[rel] = {"bytes": os.path.getsize(p), "sha256": sha256_file(p)}
    mp = os.path.join(folder, MANIFEST)
    with open(mp, "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(folder)


def is_sealed(folder, verify_checksums: bool = True) -> bool:
    """True when ``folder`` has a manifest and every listed file has the recorded size (and checksum)."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
        for rel, info in files.items():
            p = os.path.join(folder, rel)
            if os.path.getsize(p) != info["bytes"]:
                return False
            if verify_checksums and sha256_file(p) != info["sha256"]:
                return False
        return bool(files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def tmp_name(final_dir) -> str:
    """The temporary folder beside ``final_dir`` in which its next copy is written."""
    final_dir = os.path.abspath(final_dir)
    return os.path.join(os.path.dirname(final_dir), TMP_PREFIX + os.path.basename(final_dir))


def publish_dir(tmp_dir, final_dir, fault: str = "publish.between_renames") -> None:
    """Move the sealed folder ``tmp_dir`` to ``final_dir``, replacing an older copy, and fsync the parent.

    With an older copy the swap is two renames (``final -> final.old``, ``tmp -> final``); a kill between
    them leaves two complete copies that :func:`recover_dir` (called before every read) restores."""
    tmp_dir, final_dir = os.path.abspath(tmp_dir), os.path.abspath(final_dir)
    parent = os.path.dirname(final_dir)
    if os.path.exists(final_dir):
        trash = final_dir + OLD_SUFFIX
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final_dir, trash)
        fault_point(fault)
        os.replace(tmp_dir, final_dir)
        fsync_path(parent)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    fsync_path(parent)


def recover_dir(final_dir, verify_checksums: bool = True) -> bool:
    """Restore ``final_dir`` after a kill inside :func:`publish_dir`; return True if something was restored.

    When ``final_dir`` is missing or not sealed, the newest complete copy among ``.tmp-NAME`` (sealed:
    the new copy) and ``NAME.old`` (the previous one) takes its place. Incomplete leftovers are kept for
    :func:`remove_leftovers`."""
    final_dir = os.path.abspath(final_dir)
    if os.path.isdir(final_dir) and is_sealed(final_dir, verify_checksums):
        return False
    for cand in (tmp_name(final_dir), final_dir + OLD_SUFFIX):
        if os.path.isdir(cand) and is_sealed(cand, verify_checksums):
            if os.path.exists(final_dir):
                shutil.rmtree(final_dir)
            os.replace(cand, final_dir)
            fsync_path(os.path.dirname(final_dir))
            return True
    return False


def remove_leftovers(final_dir) -> None:
    """Delete ``.tmp-NAME`` and ``NAME.old`` beside ``final_dir`` (call :func:`recover_dir` first)."""
    for p in (tmp_name(final_dir), os.path.abspath(final_dir) + OLD_SUFFIX):
        shutil.rmtree(p, ignore_errors=True)
