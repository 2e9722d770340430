"""Atomic checkpoints: write to a temporary folder, fsync, rename; find the newest valid one; retention.

Layout (``<output_dir>/checkpoints/``)::

    checkpoint-000000409600/     one folder per checkpoint, named by tokens trained (12 digits)
      model.safetensors, optimizer.bin, random_states_*.pkl   (``accelerator.save_state``)
      trainer_state.json         step, tokens, data position, SAE configs, metric history
      trainer_tensors.safetensors   dead-latent counters
      manifest.json              every file with its size and sha256 (written last)
    .tmp-checkpoint-.../         a checkpoint being written (restored by :func:`recover` if it was sealed)
    checkpoint-....old/          the previous copy while a checkpoint of the same name is replaced

A folder counts as a checkpoint only if its ``manifest.json`` parses and every listed file has the
recorded size and checksum, so a run killed at any moment resumes from the last complete one. Replacing
a checkpoint of the same name never hides the newest complete copy: a kill between the two renames of
:func:`publish` leaves it as ``.old`` or sealed ``.tmp-``, which :func:`recover` restores.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Optional

from .. import _io
from .._io import MANIFEST, seal  # noqa: F401  (re-exported: the checkpoint API)

CHECKPOINTS_DIR = "checkpoints"
"""The folder of a run's ``output_dir`` that holds its checkpoints."""
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{12})$")
_LEFTOVER_RE = re.compile(r"^(?:\.tmp-(checkpoint-\d{12})|(checkpoint-\d{12})\.old)$")


def checkpoint_name(tokens: int) -> str:
    """Folder name of the checkpoint taken after ``tokens`` training tokens."""
    return f"checkpoint-{tokens:012d}"


def publish(tmp_dir: str, final_dir: str) -> None:
    """Atomically move a sealed temporary folder to ``final_dir`` (see :func:`hf_sae._io.publish_dir`)."""
    _io.publish_dir(tmp_dir, final_dir)


def recover(root: str) -> list[str]:
    """After a kill inside :func:`publish`: put complete copies left as ``.tmp-checkpoint-*`` (sealed) or
    ``checkpoint-*.old`` back under their checkpoint name when that name holds no complete copy.
    Returns the restored paths. Call it (one process) before looking for a checkpoint to resume."""
    restored = []
    if not os.path.isdir(root):
        return restored
    names = set()
    for name in os.listdir(root):
        m = _LEFTOVER_RE.match(name)
        if m:
            names.add(m.group(1) or m.group(2))
    for name in sorted(names):
        final = os.path.join(root, name)
        if _io.recover_dir(final):
            restored.append(final)
    return restored


def is_valid(path: str, verify_checksums: bool = True) -> bool:
    """True when ``path`` is a complete checkpoint (manifest present, files intact)."""
    return _io.is_sealed(path, verify_checksums)


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


def holds_run(output_dir: str) -> bool:
    """True when the run in ``output_dir`` has a checkpoint or a leftover of one (``.tmp-checkpoint-*``,
    ``checkpoint-*.old``): something to resume. Callers that resume only when there is something to resume
    (the quickstart) pass ``resume=holds_run(output_dir)``, so a first run starts without a resume notice."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    return os.path.isdir(root) and any(CHECKPOINT_RE.match(n) or _LEFTOVER_RE.match(n) for n in os.listdir(root))


def apply_retention(root: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints (and stale temporary folders); return deleted paths."""
    deleted = []
    ckpts = list_checkpoints(root)
    for _, path in ckpts[:-keep] if keep > 0 else ckpts:
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def clean_temporaries(root: str) -> None:
    """Remove temporary folders left by a killed save, after :func:`recover` has restored complete ones."""
    if not os.path.isdir(root):
        return
    recover(root)
    for name in os.listdir(root):
        if name.startswith(".tmp-") or name.endswith(".old"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
