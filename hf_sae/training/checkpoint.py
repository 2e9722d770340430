"""Atomic checkpoints: write to a temporary folder, fsync, rename; find the newest valid one; retention.

Layout (``<output_dir>/checkpoints/``)::

    checkpoint-000000409600/     one folder per checkpoint, named by tokens trained (12 digits)
      model.safetensors, optimizer.bin, random_states_*.pkl   (``accelerator.save_state``)
      trainer_state.json         step, tokens, data position, SAE configs, metric history
      trainer_tensors.safetensors   dead-latent counters
      manifest.json              every file with its size and sha256 (written last)
    .tmp-checkpoint-.../         a checkpoint being written (ignored; removed by the next save)

A folder counts as a checkpoint only if its ``manifest.json`` parses and every listed file has the
recorded size and checksum, so a run killed at any moment resumes from the last complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Optional

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{12})$")
MANIFEST = "manifest.json"


def checkpoint_name(tokens: int) -> str:
    """Folder name of the checkpoint taken after ``tokens`` training tokens."""
    return f"checkpoint-{tokens:012d}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(tmp_dir: str) -> None:
    """Write ``manifest.json`` (sizes + sha256 of every file) and fsync every file and the folder."""
    files = {}
    for root, _, names in os.walk(tmp_dir):
        for name in names:
            if name == MANIFEST:
                continue
            p = os.path.join(root, name)
            _fsync_path(p)
            rel = os.path.relpath(p, tmp_dir)
            files[rel] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
    mp = os.path.join(tmp_dir, MANIFEST)
    with open(mp, "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp_dir)


def publish(tmp_dir: str, final_dir: str) -> None:
    """Atomically move a sealed temporary folder to ``final_dir`` (replacing an older copy) and fsync
    the parent folder so the rename itself is durable."""
    if os.path.exists(final_dir):
        trash = final_dir + ".old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_path(os.path.dirname(os.path.abspath(final_dir)))


def is_valid(path: str, verify_checksums: bool = True) -> bool:
    """True when ``path`` is a complete checkpoint (manifest present, files intact)."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
        for rel, info in files.items():
            p = os.path.join(path, rel)
            if os.path.getsize(p) != info["bytes"]:
                return False
            if verify_checksums and _sha256(p) != info["sha256"]:
                return False
        return bool(files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """``[(tokens, path)]`` of the folders named like checkpoints under ``root``, oldest first (unverified)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = CHECKPOINT_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def newest_valid(root: str) -> Optional[str]:
    """Path of the newest valid checkpoint under ``root`` (invalid ones are skipped), or None."""
    for _, path in reversed(list_checkpoints(root)):
        if is_valid(path):
            return path
    return None


def apply_retention(root: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints (and stale temporary folders); return deleted paths."""
    deleted = []
    ckpts = list_checkpoints(root)
    for _, path in ckpts[:-keep] if keep > 0 else ckpts:
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def clean_temporaries(root: str) -> None:
    """Remove temporary folders left by a killed save."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith(".tmp-") or name.endswith(".old"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
