"""openai/sparse_autoencoder (model.py): one ``<layer>.pt`` state dict; TopK autoencoders with their per-token
layer norm, ReLU autoencoders, tied decoders."""

from __future__ import annotations

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
    _identity,
    _torch_load,
    layer_norm_per_token,
)

openai_layer_norm = layer_norm_per_token
"""The input normalisation of OpenAI's TopK autoencoders (model.py ``LN``): see :func:`layer_norm_per_token`."""


def _read_openai(path: Path, **_) -> Raw:
    if path.is_dir():
        pts = sorted(list(path.glob("*.pt")) + list(path.glob("*.pth")))
        if len(pts) != 1:
            raise FileNotFoundError(f"{path}: give the OpenAI autoencoder .pt file itself (found {len(pts)} .pt "
                                    "files).")
        path = pts[0]
    sd = _torch_load(path, "an OpenAI sparse_autoencoder state dict (.pt)")
    # openai/sparse_autoencoder model.py (main, 2024): Autoencoder.state_dict() adds "activation" (class name) and
    # "activation_state_dict"; nn.Module.state_dict() also recurses into the TopK child, whose own state_dict()
    # adds "activation.k" and "activation.postact_fn" -- the released GPT-2 files carry all four.
    activation = sd.pop("activation", "ReLU")
    act_sd = sd.pop("activation_state_dict", {}) or {}
    child = {key[len("activation."):]: sd.pop(key) for key in [k for k in sd if str(k).startswith("activation.")]}
    if not isinstance(act_sd, dict):
        raise _fail(path, f"activation_state_dict is a {type(act_sd).__name__}, expected a dict")
    for key, value in child.items():
        if key not in ("k", "postact_fn"):
            raise _fail(path, f"unknown activation entry 'activation.{key}' (the TopK activation defines k and "
                        "postact_fn)")
        if key in act_sd and act_sd[key] != value:
            raise _fail(path, f"activation.{key}={value!r} disagrees with activation_state_dict[{key!r}]="
                        f"{act_sd[key]!r}; the file is inconsistent.")
        act_sd.setdefault(key, value)
    if "decoder.linear.weight" in sd:  # tied decoder (TiedTranspose): decoder(z) = z @ encoder.weight
        tied = sd.pop("decoder.linear.weight")
        sd["decoder.weight"] = tied.T
    sd = _f64(sd)
    stats = {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"}
    _check_keys(path, sd, {"encoder.weight", "pre_bias", "latent_bias", "decoder.weight"}, stats, "OpenAI autoencoder")
    if sd["encoder.weight"].ndim != 2:
        raise _fail(path, f"encoder.weight must be [n_latents, d], got {list(sd['encoder.weight'].shape)}")
    n, d = sd["encoder.weight"].shape
    why = f"encoder.weight [{n}, {d}]"
    _check_shape(path, sd, "pre_bias", (d,), why)
    _check_shape(path, sd, "latent_bias", (n,), why)
    _check_shape(path, sd, "decoder.weight", (d, n), why)
    if activation == "TopK":
        k = act_sd.get("k")
        if not isinstance(k, int) or not 0 < k <= n:
            raise _fail(path, f"activation TopK needs an integer activation_state_dict['k'] in [1, {n}], got {k!r}")
        post = act_sd.get("postact_fn", "ReLU")
        if post != "ReLU":
            raise _fail(path, f"TopK with postact_fn={post!r} is not supported (only ReLU).")
    elif activation == "ReLU":
        k = None
    else:
        raise _fail(path, f"activation {activation!r} is not supported (TopK or ReLU).")
    return Raw(path, "openai", {"activation": activation, **act_sd}, sd, {"k": k, "layer_norm": activation == "TopK"})


def _openai_ln(raw: Raw, layer_norm: bool | None) -> bool:
    """Whether the autoencoder layer-normalizes its inputs: their ``from_state_dict`` turns it on exactly for
    TopK autoencoders (``normalize = activation_class_name == "TopK"``); ``layer_norm=`` overrides."""
    return raw.extra["layer_norm"] if layer_norm is None else bool(layer_norm)


def _openai_to_parts(raw: Raw, *, layer_norm: bool | None = None, **_) -> Parts:
    """The layer norm is part of the converted SAE (F8: ``input_norm="layer_norm"``), so it takes and returns the
    LM's activations. ``layer_norm=False`` converts the SAE behind it (inputs already normalized)."""
    ln = _openai_ln(raw, layer_norm)
    sd, e = raw.sd, raw.extra
    return Parts(W_enc=sd["encoder.weight"], b_enc=sd["latent_bias"], W_dec=sd["decoder.weight"].T,
                 b_dec=sd["pre_bias"],
                  activation="topk" if e["k"] else "relu", k=e["k"], input_norm="layer_norm" if ln else "none",
                  info={"format": "openai", "file": raw.path.name})


def _ref_openai(raw: Raw, x: Tensor, *, layer_norm: bool | None = None, **_) -> RefOutput:
    """openai/sparse_autoencoder model.py (``Autoencoder.forward``): LN preprocess when ``normalize``, latents =
    act(enc(x - pre_bias) + latent_bias), recons = dec(latents) + pre_bias, LN undone (``recons * std + mu``)."""
    sd, e = raw.sd, raw.extra
    ln = _openai_ln(raw, layer_norm)
    xn, mu, std = openai_layer_norm(x) if ln else (x, None, None)
    pre = (xn - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    if e["k"]:
        v, i = pre.topk(e["k"], dim=-1)
        lat = torch.zeros_like(pre).scatter(-1, i, v.relu())
    else:
        lat = pre.relu()
    rec = lat @ sd["decoder.weight"].T + sd["pre_bias"]
    return RefOutput(lat, rec * std + mu if ln else rec, x, _identity)
