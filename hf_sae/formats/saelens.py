"""SAELens (jbloomAus / decoderesearch; read as sae_lens 6.54.12 does, older cfgs included): ``cfg.json`` +
``sae_weights.safetensors``, standard / topk / jumprelu / batchtopk, and the exporter back to SAELens."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._common import (
    _F64,
    Parts,
    Raw,
    RefOutput,
    _check_keys,
    _check_shape,
    _f64,
    _fail,
    _identity,
    _int_cfg,
    _read_json,
    _read_safetensors,
    hook_point_from_transformerlens,
    hook_point_to_transformerlens,
    layer_norm_per_token,
)

if TYPE_CHECKING:
    from ..modeling_sae import SparseAutoencoder

_SAELENS_ARCHS = ("standard", "topk", "jumprelu", "batchtopk")


def _saelens_files(path: Path) -> tuple[Path, Path]:
    return path / "cfg.json", path / "sae_weights.safetensors"


def _read_saelens(path: Path, **_) -> Raw:
    cfg_path, w_path = _saelens_files(path)
    cfg = _read_json(cfg_path, "a SAELens SAE folder holds cfg.json and sae_weights.safetensors")
    sd = _read_safetensors(w_path, "a SAELens SAE folder holds cfg.json and sae_weights.safetensors")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    get = lambda k, *alts: next((src[a] for a in (k, *alts) for src in (cfg, meta) if src.get(a) is not None), None)  # noqa: E731
    arch = _saelens_architecture(cfg_path, cfg, get)
    act_fn = get("activation_fn", "activation_fn_str") or "relu"
    if arch not in _SAELENS_ARCHS:
        raise _fail(cfg_path, f"SAELens architecture {arch!r} is not supported (supported: {_SAELENS_ARCHS}; gated and "
                    "other architectures have no exact hf_sae equivalent).")
    if arch == "standard" and act_fn not in ("relu", None):
        raise _fail(cfg_path, f"activation_fn={act_fn!r} is not supported for a standard SAE (only relu).")
    d_in = _int_cfg(cfg_path, cfg, "d_in")
    d_sae = _int_cfg(cfg_path, cfg, "d_sae")
    norm = cfg.get("normalize_activations")
    norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm)
    if norm == "constant_norm_rescale":
        raise _fail(cfg_path, "normalize_activations='constant_norm_rescale' (x sqrt(d_in) / ||x|| per token) is not "
                    "supported; hf_sae represents 'none', 'expected_average_only_in' and 'layer_norm'.")
    if norm == "covariance_whitening":
        raise _fail(cfg_path, "normalize_activations='covariance_whitening' needs a whitening matrix that is not part "
                    "of the SAE's files; fold it with SAELens' fold_whitening and save again, then convert.")
    if norm not in ("none", "expected_average_only_in", "layer_norm"):
        raise _fail(cfg_path, f"unknown normalize_activations={norm!r}")
    if get("hook_head_index") is not None:
        raise _fail(cfg_path, "per-head SAEs (hook_head_index set) are not supported.")
    sd = _f64(sd)
    if "log_threshold" in sd and "threshold" not in sd:
        sd["threshold"] = sd.pop("log_threshold").exp()
    if "scaling_factor" in sd:  # older name of the fine-tuning scaling factor
        sd["finetuning_scaling_factor"] = sd.pop("scaling_factor")
    required = {"W_enc", "b_enc", "W_dec", "b_dec"}
    optional = {"finetuning_scaling_factor"}
    if arch == "jumprelu":
        required |= {"threshold"}
    if arch == "batchtopk":
        optional |= {"threshold", "topk_threshold"}
    _check_keys(w_path, sd, required, optional, f"SAELens {arch} SAE")
    why = f"cfg.json (d_in={d_in}, d_sae={d_sae})"
    _check_shape(w_path, sd, "W_enc", (d_in, d_sae), why)
    _check_shape(w_path, sd, "b_enc", (d_sae,), why)
    _check_shape(w_path, sd, "W_dec", (d_sae, d_in), why)
    _check_shape(w_path, sd, "b_dec", (d_in,), why)
    if "finetuning_scaling_factor" in sd:
        _check_shape(w_path, sd, "finetuning_scaling_factor", (d_sae,), why)
    if "threshold" in sd:
        _check_shape(w_path, sd, "threshold", (d_sae,), why)
    if arch == "batchtopk":
        if ("threshold" in sd) == ("topk_threshold" in sd):
            raise _fail(w_path, "a SAELens batchtopk SAE needs exactly one of 'threshold' [d_sae] (inference form) "
                        "or 'topk_threshold' (scalar, training form).")
        if "topk_threshold" in sd:
            _check_shape(w_path, sd, "topk_threshold", (), why)
    k = get("k") or (get("activation_fn_kwargs") or {}).get("k")
    if arch == "topk" and k is None:
        raise _fail(cfg_path, "a TopK SAE needs 'k' (or activation_fn_kwargs.k) in cfg.json.")
    extra = {
        "arch": arch, "k": k, "norm": norm,
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        # SAELens' inference TopK defaults to False; its BatchTopK training form (topk_threshold) to True
        "rescale": bool(cfg.get("rescale_acts_by_decoder_norm", arch == "batchtopk" and "topk_threshold" in sd)),
        "hook_name": get("hook_name", "hook_point"), "model_name": get("model_name"),
        "dataset": get("dataset_path"), "context_size": get("context_size"),
    }
    return Raw(path, "saelens", cfg, sd, extra)


def _saelens_version(cfg: dict, meta: dict) -> tuple[int, ...] | None:
    v = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    m = re.match(r"(\d+)\.(\d+)", str(v or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _saelens_architecture(cfg_path: Path, cfg: dict, get) -> str:
    """The architecture as SAELens 6.54.12 decides it (``handle_config_defaulting``): a cfg written by SAELens >= 6
    must name it; an older cfg (no version, or < 6) defaults to ``standard``, or ``topk`` when ``activation_fn``
    (``activation_fn_str``) is ``topk`` with ``activation_fn_kwargs.k``. A cfg with SAELens 6's top-level ``k``
    but no architecture is ambiguous: refused, as by sae_lens."""
    arch = cfg.get("architecture")
    if arch:
        return arch
    version = _saelens_version(cfg, cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {})
    if version is not None and version >= (6, 0):
        raise _fail(cfg_path, f"the config has no 'architecture' field, which SAELens {'.'.join(map(str, version))} "
                    "configs must have (one of standard, topk, jumprelu, batchtopk, ...); add it.")
    if cfg.get("k") is not None:
        raise _fail(cfg_path, "the config has 'k' but no 'architecture' field, so it cannot tell a TopK SAE from a "
                    "standard one; add \"architecture\": \"topk\" (or the right one).")
    if get("activation_fn", "activation_fn_str") == "topk" and (get("activation_fn_kwargs") or {}).get("k"):
        return "topk"  # SAELens < 6 stored TopK SAEs this way
    return "standard"


def _saelens_scale(raw: Raw, input_scale: float | None) -> float:
    if raw.extra["norm"] != "expected_average_only_in":
        if input_scale not in (None, 1.0):
            raise _fail(raw, f"input_scale={input_scale} given but normalize_activations is 'none'.")
        return 1.0
    if input_scale is None:
        raise _fail(raw, "normalize_activations='expected_average_only_in': this SAE expects inputs multiplied by a "
                    "dataset scaling factor that cfg.json does not record. Pass input_scale=<that factor> (SAELens "
                    "lists it per release as norm_scaling_factor; it makes E||s x||^2 = d_in).")
    if not (isinstance(input_scale, (int, float)) and math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"input_scale must be a finite number > 0, got {input_scale!r}")
    return float(input_scale)


def _saelens_to_parts(raw: Raw, *, input_scale: float | None = None, **_) -> Parts:
    sd, e = raw.sd, raw.extra
    W_dec = sd["W_dec"]
    if "finetuning_scaling_factor" in sd:  # (F5)
        W_dec = W_dec * sd["finetuning_scaling_factor"][:, None]
    arch = e["arch"]
    parts = Parts(W_enc=sd["W_enc"].T, b_enc=sd["b_enc"], W_dec=W_dec, b_dec=sd["b_dec"], activation="relu",
                   b_dec_on_input=e["apply_b_dec_to_input"], input_scale=_saelens_scale(raw, input_scale),
                   input_norm="layer_norm" if e["norm"] == "layer_norm" else "none",  # (F8)
                   hook_point=hook_point_from_transformerlens(e["hook_name"]), base_model=e["model_name"],
                   info={"format": "saelens", "architecture": arch, "hook_name": e["hook_name"],
                         "dataset": e["dataset"], "context_size": e["context_size"]})
    if arch == "topk":
        parts.activation, parts.k, parts.rescale_by_decoder_norm = "topk", int(e["k"]), e["rescale"]
    elif arch == "jumprelu":
        parts.activation, parts.theta = "jumprelu", sd["threshold"].clamp_min(0)  # (F3): relu(theta)
    elif arch == "batchtopk" and "threshold" in sd:  # inference form: a JumpReLU on the (rescaled) pre-activations
        parts.activation, parts.theta = "jumprelu", sd["threshold"].clamp_min(0)
        parts.rescale_by_decoder_norm = parts.theta_on_rescaled = e["rescale"]
    elif arch == "batchtopk":
        t = float(sd["topk_threshold"])
        parts.rescale_by_decoder_norm = e["rescale"]
        if t < 0:  # (F7)
            parts.activation = "relu"
        else:
            parts.activation, parts.batch_threshold = "batchtopk", t
            parts.k = max(1, int(round(float(e["k"] or 1))))
    return parts


def _ref_saelens(raw: Raw, x: Tensor, *, input_scale: float | None = None, **_) -> RefOutput:
    """SAELens 6.54.12's inference forward (sae_lens/saes/*_sae.py: ``process_sae_in``, ``encode``, ``decode``),
    with the scaling factor folded as its ``fold_activation_norm_scaling_factor`` does for
    ``expected_average_only_in``, and its ``layer_norm`` run-time normalisation (saes/sae.py)."""
    sd, e = raw.sd, raw.extra
    s = _saelens_scale(raw, input_scale)
    xin = x
    if e["norm"] == "layer_norm":
        xin, mu, std = layer_norm_per_token(x)  # the same formula as SAELens' run_time_activation_ln_in
    sae_in = s * xin - sd["b_dec"] * float(e["apply_b_dec_to_input"])
    hidden_pre = sae_in @ sd["W_enc"] + sd["b_enc"]
    norms = sd["W_dec"].norm(dim=-1)
    rescale = e["rescale"] and e["arch"] in ("topk", "batchtopk")
    if rescale:
        hidden_pre = hidden_pre * norms
    arch = e["arch"]
    if arch == "standard":
        acts = hidden_pre.relu()
    elif arch == "topk":
        v, i = hidden_pre.topk(int(e["k"]), dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, i, v.relu())
    else:  # jumprelu, or batchtopk saved for inference (a JumpReLU with the batch threshold)
        thr = sd["threshold"] if "threshold" in sd else torch.full_like(sd["b_enc"], float(sd["topk_threshold"]))
        acts = hidden_pre.relu() * (hidden_pre > thr.relu())
    dec_acts = acts * sd["finetuning_scaling_factor"] if "finetuning_scaling_factor" in sd else acts
    if rescale:
        dec_acts = dec_acts / norms
    recon = (dec_acts @ sd["W_dec"] + sd["b_dec"]) / s
    if e["norm"] == "layer_norm":
        recon = recon * std + mu  # run_time_activation_ln_out
    return RefOutput(acts, recon, x, _identity)


def export_saelens(sae: SparseAutoencoder, folder: str | Path, *, dataset_path: str | None = None,
                   context_size: int | None = None) -> Path:
    """Write ``sae`` as a SAELens (>= 6) SAE folder: ``cfg.json`` + ``sae_weights.safetensors``.

    Mapping (exact): relu -> ``standard``; topk -> ``topk`` (``rescale_acts_by_decoder_norm=False``); jumprelu ->
    ``jumprelu`` with ``threshold = exp(log_threshold)``; batchtopk -> ``jumprelu`` with the uniform inference
    threshold (SAELens' own inference form of BatchTopK). ``W_enc`` is transposed to [d_in, d_sae]. An
    ``input_scale`` s is folded (SAELens takes raw inputs): ``W_enc <- s W_enc``, ``b_dec <- b_dec / s``,
    ``W_dec <- W_dec / s``. ``input_norm="layer_norm"`` becomes ``normalize_activations="layer_norm"`` (F8; SAELens
    fixes eps = 1e-5 and the unbiased std, so other settings are refused). top-AFA has no SAELens equivalent
    (ValueError), nor does a BatchTopK SAE whose threshold was never estimated.
    """
    from safetensors.torch import save_file

    cfg = sae.config
    if cfg.input_norm == "layer_norm" and (cfg.input_norm_eps != 1e-5 or not cfg.input_norm_unbiased):
        raise ValueError(f"SAELens' layer_norm uses eps=1e-5 and the unbiased std; this SAE has input_norm_eps="
                         f"{cfg.input_norm_eps}, input_norm_unbiased={cfg.input_norm_unbiased}, which it cannot "
                         "express.")
    W_enc, b_enc, W_dec, b_dec = (t.detach().to(_F64).cpu() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    s = float(cfg.input_scale)
    W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
    tensors = {"W_enc": W_enc.T.contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    extra: dict[str, Any] = {}
    if cfg.activation == "relu":
        arch = "standard"
    elif cfg.activation == "topk":
        arch = "topk"
        extra = {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    elif cfg.activation == "jumprelu":
        arch = "jumprelu"
        tensors["threshold"] = sae.log_threshold.detach().to(_F64).cpu().exp()
    elif cfg.activation == "batchtopk":
        t = float(sae.batchtopk_threshold)
        if t < 0:
            raise ValueError("This BatchTopK SAE has no inference threshold yet (batchtopk_threshold = -1, set during "
                             "training); SAELens stores BatchTopK SAEs as JumpReLU with that threshold. Train or "
                             "calibrate it first.")
        arch = "jumprelu"
        tensors["threshold"] = torch.full_like(b_enc, t)
    else:
        raise ValueError(f"activation {cfg.activation!r} has no SAELens architecture (supported: relu, topk, "
                         "jumprelu, batchtopk).")
    dtype = sae.W_enc.dtype
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    hook_name = hook_point_to_transformerlens(cfg.hook_point)
    info = dict(cfg.training_info or {})
    out = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.n_latents,
        "dtype": str(dtype).replace("torch.", ""), "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if cfg.input_norm == "layer_norm" else "none",
        "reshape_activations": "hook_z" if (cfg.hook_point or "").endswith("attn_z") else "none",
        **extra,
        "metadata": {
            "sae_lens_version": "6.0.0", "sae_lens_training_version": "6.0.0", "model_name": cfg.base_model,
            "hook_name": hook_name, "hook_head_index": None, "prepend_bos": True,
            "dataset_path": dataset_path or info.get("dataset"), "context_size": context_size,
            "exported_by": "hf_sae",
        },
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(out, indent=2) + "\n")
    return folder
