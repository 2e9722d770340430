"""Gemma Scope (Google DeepMind): ``params.npz`` JumpReLU SAEs, ``layer_{L}/width_{W}/average_l0_{X}`` folders."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ._common import Parts, Raw, RefOutput, _check_jumprelu_tensors, _check_keys, _f64, _identity, _need_file


def _read_gemmascope(path: Path, **_) -> Raw:
    import numpy as np

    file = path / "params.npz" if path.is_dir() else path
    _need_file(file, "a Gemma Scope SAE is a params.npz file")
    try:
        with np.load(str(file), allow_pickle=False) as data:
            sd = {(("W_" + k[2:]) if k.startswith("w_") else k): torch.from_numpy(np.array(data[k]))
                  for k in data.files}
    except Exception as e:
        raise ValueError(f"{file} is not a readable .npz archive ({e}).") from e
    sd = _f64(sd)
    _check_keys(file, sd, {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}, what="Gemma Scope JumpReLU SAE")
    _check_jumprelu_tensors(file, sd, "d_model", "d_sae")
    return Raw(file, "gemmascope", {}, sd, {})


def _gemmascope_hook(path: Path) -> str | None:
    s = path.as_posix()
    layer = re.search(r"layer_(\d+)", s)
    kind = re.search(r"gemma-scope-[^/]*?-(res|mlp|att)(?:[-/]|$)", s)
    if layer and kind:
        return f"layers.{layer.group(1)}.{ {'res': 'resid_post', 'mlp': 'mlp_out', 'att': 'attn_z'}[kind.group(1)]}"
    return None


def _gemmascope_to_parts(raw: Raw, **_) -> Parts:
    sd = raw.sd
    return Parts(W_enc=sd["W_enc"].T, b_enc=sd["b_enc"], W_dec=sd["W_dec"], b_dec=sd["b_dec"], activation="jumprelu",
                  theta=sd["threshold"].clamp_min(0), b_dec_on_input=False, hook_point=_gemmascope_hook(raw.path),
                  info={"format": "gemmascope", "path": raw.path.as_posix()[-200:]})


def _ref_gemmascope(raw: Raw, x: Tensor, **_) -> RefOutput:
    """Gemma Scope's JumpReLUSAE (the tutorial): pre = x W_enc + b_enc; acts = 1[pre > threshold] relu(pre);
    recon = acts W_dec + b_dec (no b_dec on the input)."""
    sd = raw.sd
    pre = x @ sd["W_enc"] + sd["b_enc"]
    acts = (pre > sd["threshold"]) * pre.relu()
    return RefOutput(acts, acts @ sd["W_dec"] + sd["b_dec"], x, _identity)
