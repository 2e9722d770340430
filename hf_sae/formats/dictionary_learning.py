"""saprmarks/dictionary_learning (0.1.0): ``ae.pt`` + ``config.json``; AutoEncoder, AutoEncoderNew,
AutoEncoderTopK, BatchTopKSAE and JumpReluAutoEncoder (also as the versions before 0.1.0 computed it)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ..cli_args import DL_CLASSES as _DL_CLASSES  # the one list, also `hf-sae convert --dict-class`'s choices
from ._common import (
    Parts,
    Raw,
    RefOutput,
    _check_jumprelu_tensors,
    _check_keys,
    _check_shape,
    _f64,
    _fail,
    _identity,
    _read_json,
    _torch_load,
)

_DL_KEYS = {
    "AutoEncoder": {"bias", "encoder.weight", "encoder.bias", "decoder.weight"},
    "AutoEncoderNew": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "AutoEncoderTopK": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "BatchTopKSAE": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
}


def _read_dictionary_learning(path: Path, *, dict_class: str | None = None, **_) -> Raw:
    file = path / "ae.pt" if path.is_dir() else path
    sd = _torch_load(file, "a dictionary_learning SAE folder holds ae.pt (and config.json)")
    cfg_path = file.parent / "config.json"
    cfg = _read_json(cfg_path, "") if cfg_path.is_file() else {}
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    cls = dict_class or trainer.get("dict_class")
    if cls is None:
        keys = set(sd)
        matches = [c for c, req in _DL_KEYS.items() if req == keys]
        if len(matches) != 1:
            raise _fail(file, f"cannot tell the dictionary class from the tensors {sorted(keys)} without config.json "
                        f"(candidates: {matches or list(_DL_CLASSES)}); pass dict_class=... (one of {_DL_CLASSES}).")
        cls = matches[0]
    if cls not in _DL_KEYS:
        raise _fail(file, f"dictionary class {cls!r} is not supported (supported: {_DL_CLASSES}; gated and "
                    "cross-coder dictionaries have no exact hf_sae equivalent).")
    _check_keys(file, sd, _DL_KEYS[cls], what=f"dictionary_learning {cls}")
    for key in ("k", "threshold"):
        if key in sd and not isinstance(sd[key], Tensor):
            sd[key] = torch.tensor(sd[key])
    sd = _f64(sd)
    if cls == "JumpReluAutoEncoder":
        d, n = _check_jumprelu_tensors(file, sd, "activation_dim", "dict_size")
    else:
        if sd["encoder.weight"].ndim != 2:
            shape = list(sd["encoder.weight"].shape)
            raise _fail(file, f"encoder.weight must be [dict_size, activation_dim], got {shape}")
        n, d = sd["encoder.weight"].shape
        why = f"encoder.weight [{n}, {d}]"
        for key, shape in (("encoder.bias", (n,)), ("decoder.weight", (d, n)), ("bias", (d,)), ("decoder.bias", (d,)),
                           ("b_dec", (d,)), ("k", ()), ("threshold", ())):
            if key in sd:
                _check_shape(file, sd, key, shape, why)
    for key, value in (("activation_dim", d), ("dict_size", n)):
        if trainer.get(key) is not None and trainer[key] != value:
            raise _fail(file, f"config.json says {key}={trainer[key]} but the tensors have {value}; the file and its "
                        "config disagree.")
    k = int(sd["k"]) if "k" in sd else None
    if k is not None and not 0 < k <= n:
        raise _fail(file, f"k={k} must be in [1, {n}]")
    if trainer.get("k") is not None and k is not None and int(trainer["k"]) != k:
        raise _fail(file, f"config.json says k={trainer['k']} but the k buffer holds {k}.")
    return Raw(file, "dictionary_learning", cfg, sd, {"cls": cls, "k": k, "trainer": trainer,
                                                       "buffer": cfg.get("buffer") or {}})


def _dl_hook(trainer: dict) -> str | None:
    layer = trainer.get("layer")
    if not isinstance(layer, int):
        return None
    sub = trainer.get("submodule_name")
    if sub is None:
        return f"layers.{layer}.resid_post"  # dictionary_learning's default: the output of block `layer`
    for kind in ("resid_post", "resid_pre", "mlp_out", "attn_out"):
        if kind in str(sub):
            return f"layers.{layer}.{kind}"
    return None


def _dl_jumprelu_scaled(raw: Raw, dictionary_learning_version: str | None) -> bool:
    """Whether ``JumpReluAutoEncoder`` latents carry the decoder-row norm. dictionary_learning 0.1.0 (PyPI) encodes
    ``f = relu(pre 1[pre > threshold])`` and decodes ``f W_dec + b_dec``; the git versions before it (until "Fix
    jumprelu training") multiplied f by ||W_dec,i|| and divided it out in decode (same reconstruction, latents
    scaled). The version comes from ``dictionary_learning_version=`` or a ``dictionary_learning_version`` field of
    config.json (top level or ``trainer``); without either, 0.1.0."""
    version = dictionary_learning_version or raw.cfg.get("dictionary_learning_version") \
        or raw.extra["trainer"].get("dictionary_learning_version")
    if version is None:
        return False
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?\S*", str(version))
    if not m:
        raise _fail(raw, f"dictionary_learning_version={version!r} is not a version like '0.1.0'")
    return tuple(int(g or 0) for g in m.groups()) < (0, 1, 0)


def _dl_use_threshold(raw: Raw, use_threshold: bool | None) -> bool:
    if use_threshold is None:  # each class's default encode()
        return raw.extra["cls"] == "BatchTopKSAE"
    return bool(use_threshold)


def _dictionary_learning_to_parts(raw: Raw, *, use_threshold: bool | None = None, apply_b_dec_to_input: bool = False,
                                  dictionary_learning_version: str | None = None, **_) -> Parts:
    sd, e = raw.sd, raw.extra
    cls = e["cls"]
    info = {"format": "dictionary_learning", "dict_class": cls, "layer": e["trainer"].get("layer"),
            "submodule_name": e["trainer"].get("submodule_name"), "dataset": e["buffer"].get("dataset")}
    base = e["trainer"].get("lm_name")
    hook = _dl_hook(e["trainer"])
    if cls == "JumpReluAutoEncoder":  # f = relu(pre 1[pre > t]) (times ||W_dec,i|| before 0.1.0): (F1), (F2), (F3)
        scaled = _dl_jumprelu_scaled(raw, dictionary_learning_version)
        info["latents_times_decoder_norm"] = scaled
        return Parts(W_enc=sd["W_enc"].T, b_enc=sd["b_enc"], W_dec=sd["W_dec"], b_dec=sd["b_dec"],
                      activation="jumprelu", theta=sd["threshold"].clamp_min(0),
                      b_dec_on_input=apply_b_dec_to_input, rescale_by_decoder_norm=scaled, hook_point=hook,
                      base_model=base, info=info)
    W_enc, b_enc, W_dec = sd["encoder.weight"], sd["encoder.bias"], sd["decoder.weight"].T
    if cls == "AutoEncoder":
        return Parts(W_enc, b_enc, W_dec, sd["bias"], "relu", hook_point=hook, base_model=base, info=info)
    if cls == "AutoEncoderNew":  # no bias on the input: (F1)
        return Parts(W_enc, b_enc, W_dec, sd["decoder.bias"], "relu", b_dec_on_input=False, hook_point=hook,
                      base_model=base, info=info)
    t = float(sd["threshold"])
    if _dl_use_threshold(raw, use_threshold):  # (F7)
        if t < 0:
            return Parts(W_enc, b_enc, W_dec, sd["b_dec"], "relu", hook_point=hook, base_model=base, info=info)
        return Parts(W_enc, b_enc, W_dec, sd["b_dec"], "batchtopk", k=e["k"], batch_threshold=t, hook_point=hook,
                      base_model=base, info=info)
    if cls == "BatchTopKSAE":  # top k*N over the batch: hf_sae's BatchTopK in train() mode (eval() uses the threshold)
        return Parts(W_enc, b_enc, W_dec, sd["b_dec"], "batchtopk", k=e["k"], batch_threshold=t, hook_point=hook,
                      base_model=base, info=info)
    return Parts(W_enc, b_enc, W_dec, sd["b_dec"], "topk", k=e["k"], hook_point=hook, base_model=base, info=info)


def _ref_dictionary_learning(raw: Raw, x: Tensor, *, use_threshold: bool | None = None,
                             apply_b_dec_to_input: bool = False, dictionary_learning_version: str | None = None,
                             **_) -> RefOutput:
    """dictionary_learning 0.1.0's dictionary classes (dictionary.py, trainers/top_k.py, trainers/batch_top_k.py):
    encode / decode of each class, as its forward() calls them; JumpReLU also as the versions before 0.1.0."""
    sd, e = raw.sd, raw.extra
    cls = e["cls"]
    if cls == "JumpReluAutoEncoder":
        xin = x - sd["b_dec"] if apply_b_dec_to_input else x
        pre = xin @ sd["W_enc"] + sd["b_enc"]
        f = torch.relu(pre * (pre > sd["threshold"]))
        if not _dl_jumprelu_scaled(raw, dictionary_learning_version):
            return RefOutput(f, f @ sd["W_dec"] + sd["b_dec"], x, _identity)
        norms = sd["W_dec"].norm(dim=1)  # before 0.1.0: encode multiplied, decode divided
        return RefOutput(f * norms, ((f * norms) / norms) @ sd["W_dec"] + sd["b_dec"], x, _identity)
    enc = lambda v: v @ sd["encoder.weight"].T + sd["encoder.bias"]  # noqa: E731
    dec = lambda f: f @ sd["decoder.weight"].T  # noqa: E731
    if cls == "AutoEncoder":
        f = torch.relu(enc(x - sd["bias"]))
        return RefOutput(f, dec(f) + sd["bias"], x, _identity)
    if cls == "AutoEncoderNew":
        f = torch.relu(enc(x))
        return RefOutput(f, dec(f) + sd["decoder.bias"], x, _identity)
    post_relu = torch.relu(enc(x - sd["b_dec"]))
    if _dl_use_threshold(raw, use_threshold):
        f = post_relu * (post_relu > sd["threshold"])
    elif cls == "BatchTopKSAE":  # the k * N largest values over the flattened batch
        v, i = post_relu.flatten().topk(e["k"] * x.shape[0])
        f = torch.zeros_like(post_relu).flatten().scatter(-1, i, v).reshape(post_relu.shape)
        return RefOutput(f, dec(f) + sd["b_dec"], x, _identity, batch_mode=True)
    else:
        v, i = post_relu.topk(e["k"], dim=-1)
        f = torch.zeros_like(post_relu).scatter(-1, i, v)
    return RefOutput(f, dec(f) + sd["b_dec"], x, _identity)
