"""EleutherAI sparsify (1.3.3): ``cfg.json`` + ``sae.safetensors``, one folder per hook point, TopK."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ._common import (
    Parts,
    Raw,
    RefOutput,
    _check_keys,
    _check_shape,
    _f64,
    _fail,
    _hook_from_module_path,
    _identity,
    _int_cfg,
    _read_json,
    _read_safetensors,
)

_SPARSIFY_REFUSED = {"transcode": "transcoders map one hook point to another",
                     "skip_connection": "a linear skip connection is not part of hf_sae's SAE",
                     "embed_skip": "an embedding skip connection is not part of hf_sae's SAE",
                     "gram_lookup": "an n-gram lookup table is not part of hf_sae's SAE",
                     "signed": "signed latents are not supported"}


def _read_sparsify(path: Path, **_) -> Raw:
    cfg_path, w_path = path / "cfg.json", path / "sae.safetensors"
    cfg = _read_json(cfg_path, "a sparsify SAE folder holds cfg.json and sae.safetensors")
    sd = _f64(_read_safetensors(w_path, "a sparsify SAE folder holds cfg.json and sae.safetensors"))
    for key, why in _SPARSIFY_REFUSED.items():
        if cfg.get(key):
            raise _fail(cfg_path, f"{key}=true is not supported: {why}.")
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise _fail(cfg_path, f"activation={act!r} is not supported (only 'topk'; group-max has no hf_sae equivalent).")
    d_in = _int_cfg(cfg_path, cfg, "d_in")
    n = cfg.get("num_latents") or 0
    if not n:
        n = d_in * _int_cfg(cfg_path, cfg, "expansion_factor")
    n = _int_cfg(cfg_path, {"num_latents": n}, "num_latents")
    k = _int_cfg(cfg_path, cfg, "k")
    _check_keys(w_path, sd, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, what="sparsify SAE")
    why = f"cfg.json (d_in={d_in}, num_latents={n})"
    _check_shape(w_path, sd, "encoder.weight", (n, d_in), why)
    _check_shape(w_path, sd, "encoder.bias", (n,), why)
    _check_shape(w_path, sd, "W_dec", (n, d_in), why)
    _check_shape(w_path, sd, "b_dec", (d_in,), why)
    if not 0 < k <= n:
        raise _fail(cfg_path, f"k={k} must be in [1, {n}]")
    run_cfg = {}
    if (path.parent / "config.json").is_file():
        try:
            run_cfg = json.loads((path.parent / "config.json").read_text())
        except ValueError:
            run_cfg = {}
    return Raw(path, "sparsify", cfg, sd, {"k": k, "hookpoint": path.name,
                                           "model": run_cfg.get("model") if isinstance(run_cfg, dict) else None,
                                           "dataset": run_cfg.get("dataset") if isinstance(run_cfg, dict) else None})


def _sparsify_to_parts(raw: Raw, **_) -> Parts:
    sd, e = raw.sd, raw.extra
    return Parts(W_enc=sd["encoder.weight"], b_enc=sd["encoder.bias"], W_dec=sd["W_dec"], b_dec=sd["b_dec"],
                  activation="topk", k=e["k"], hook_point=_hook_from_module_path(e["hookpoint"]),
                  base_model=e["model"], info={"format": "sparsify", "hookpoint": e["hookpoint"],
                                               "dataset": e["dataset"]})


def _ref_sparsify(raw: Raw, x: Tensor, **_) -> RefOutput:
    """sparsify 1.3.3's SparseCoder (sparse_coder.py encode/decode + fused_encoder.py): pre = relu(enc(x - b_dec)),
    top-k of pre, decode = sum of the k rows of W_dec weighted by their values, + b_dec."""
    sd = raw.sd
    pre = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    v, i = pre.topk(raw.extra["k"], dim=-1)
    recon = (v.unsqueeze(-1) * sd["W_dec"][i]).sum(-2) + sd["b_dec"]
    return RefOutput(torch.zeros_like(pre).scatter(-1, i, v), recon, x, _identity)
