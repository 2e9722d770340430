r"""Import SAEs saved by other libraries (and export to SAELens), from one table of formats.

hf_sae's SAE computes (normalized units, ``s = config.input_scale``)::

    pre = W_enc (s x - b_dec) + b_enc ;  z = act(pre) ;  x^ = (z W_dec + b_dec) / s

with ``W_enc``/``W_dec`` [n, d]. Every converter below maps a source checkpoint onto exactly this
computation, using only the identities proved here, so the converted SAE returns the source's own
reconstruction (and its latents) up to float rounding:

(F1) **No b_dec on the input** (Gemma Scope, dictionary_learning JumpReLU/AutoEncoderNew, SAELens with
     ``apply_b_dec_to_input=False``): the source computes ``pre = W x + b``. Since
     ``W x + b = W (x - b_dec) + (b + W b_dec)``, we store ``b_enc = b + W b_dec``; ``pre`` is unchanged.
(F2) **Decoder-norm rescaling** (SAELens TopK ``rescale_acts_by_decoder_norm``, BatchTopK; the latents of
     dictionary_learning's JumpReLU): the source uses ``pre' = n_i pre_i`` (``n_i = ||W_dec,i||``) and decodes
     ``sum_i z_i W_dec,i / n_i``. With ``W_enc,i <- n_i W_enc,i``, ``b_enc,i <- n_i b_enc,i``,
     ``W_dec,i <- W_dec,i / n_i`` (``n_i = 0``: the row is zero and stays zero, its latent is 0) our ``pre`` *is*
     ``pre'`` and our decode is the source's. Thresholds compared with ``pre'`` are used as they are; a
     threshold compared with ``pre`` (``fold_decoder_norms=True`` on a ReLU/JumpReLU SAE) becomes ``n_i theta_i``
     because ``pre_i > theta_i  <=>  n_i pre_i > n_i theta_i`` for ``n_i > 0``. TopK selection is *not*
     invariant under this rescaling, so it is never applied to a TopK SAE that selects on ``pre``.
(F3) **JumpReLU thresholds** ``theta``: sources compute ``relu(pre) * 1[pre > theta]`` (Gemma Scope,
     SAELens with ``relu(theta)``, dictionary_learning); for ``theta >= 0`` this is ``pre * 1[pre > theta]``,
     ours; for ``theta < 0`` it is ``relu(pre) = pre * 1[pre > 0]``, i.e. ours with ``theta = 0``
     (stored as ``log_threshold = -inf``). Thresholds are stored as ``log(theta)``: exact up to one rounding.
(F4) **A constant input scale** (SAELens ``expected_average_only_in`` with its scaling factor): the source
     SAE sees ``s x``; our ``input_scale = s`` does the same and returns ``x^ / s``, which is SAELens'
     ``fold_activation_norm_scaling_factor(s)`` form (latents identical, reconstruction in the caller's units).
(F5) **A per-latent output scale** (SAELens ``finetuning_scaling_factor`` ``c``): ``sum_i (c_i z_i) W_dec,i
     = sum_i z_i (c_i W_dec,i)``; we store ``c_i W_dec,i`` (reconstruction exact, latents before scaling).
(F6) **ReLU then TopK** (sparsify, dictionary_learning, OpenAI): ``topk(relu(pre)) = relu(topk(pre))``
     value for value since ReLU is monotone (ties aside), which is what hf_sae's TopK computes.
(F7) **Thresholded BatchTopK at inference** (dictionary_learning ``BatchTopKSAE``, SAELens ``topk_threshold``):
     ``relu(pre) * 1[relu(pre) > t]`` is hf_sae's BatchTopK inference with ``batchtopk_threshold = t``
     (``t >= 0``); with ``t < 0`` (never estimated) it is ``relu(pre)``, converted as a ReLU SAE.

(F8) **Per-token layer norm** (OpenAI TopK autoencoders, SAELens ``normalize_activations="layer_norm"``): the
     source computes ``x' = (x - mu) / (sigma + 1e-5)`` (sigma the unbiased std of the token), runs the SAE on
     ``x'`` and returns ``x^' sigma + mu``; hf_sae's ``input_norm="layer_norm"`` (eps 1e-5, unbiased) is that
     computation, so the converted SAE takes and returns the LM's units.

What is *refused* (ValueError naming the fix): SAELens ``constant_norm_rescale`` / ``covariance_whitening``,
gated SAEs, skip connections, transcoders, group-max activations, per-head SAEs, and any tensor the format
does not define.

Format table (:data:`FORMATS`):

===================  =====================================  ==================================================
name                 files                                   variants
===================  =====================================  ==================================================
saelens              cfg.json + sae_weights.safetensors      standard (ReLU), topk, jumprelu, batchtopk; export
sparsify             cfg.json + sae.safetensors              topk (EleutherAI), one folder per hook point
openai               <name>.pt (state dict)                  TopK (with its layer norm), ReLU
gemmascope           params.npz                              JumpReLU (Gemma Scope)
dictionary_learning  ae.pt + config.json                     AutoEncoder, AutoEncoderNew, AutoEncoderTopK,
                                                             BatchTopKSAE, JumpReluAutoEncoder
===================  =====================================  ==================================================

Each entry has ``read`` (files -> raw config + tensors, validated), ``to_sae`` (raw -> hf_sae SAE) and
``reference`` (the source library's own forward, written from its published math, on the raw tensors):
:func:`convert` checks the converted SAE against ``reference`` on probe inputs unless ``check=False``.
Pickled ``.pt`` files are read with ``torch.load(weights_only=True)``; ``.npz`` with ``allow_pickle=False``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from .configuration_sae import SAEConfig
from .modeling_sae import SparseAutoencoder

_F64 = torch.float64
_CHECK_MAX_WEIGHTS = 2**26


# ============================================================================================ common pieces
class RefOutput(NamedTuple):
    """A source format's own forward on inputs x [N, d] (see each ``_ref_*``)."""

    latents: Tensor
    """[N, n] latents as the source library reports them."""
    reconstruction: Tensor
    """[N, d] reconstruction in the source library's output units."""
    sae_input: Tensor
    """[N, d] what to feed the converted hf_sae SAE to compare (x itself unless the source pre-normalizes)."""
    to_source_units: Callable[[Tensor], Tensor]
    """maps the hf_sae SAE's reconstruction of ``sae_input`` to the source's output units (identity mostly)."""
    batch_mode: bool = False
    """the source selects over the whole batch (BatchTopK top k*N): compare with the SAE in ``train()`` mode."""


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class Raw:
    """A checkpoint as read from disk: its config (dict) and tensors (float64, source orientation)."""

    path: Path
    fmt: str
    cfg: dict
    sd: dict[str, Tensor]
    extra: dict = field(default_factory=dict)


@dataclass
class _Parts:
    """hf_sae orientation: W_enc [n, d], b_enc [n], W_dec [n, d], b_dec [d]; all float64."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    activation: str
    k: int | None = None
    theta: Tensor | None = None  # JumpReLU threshold compared with pre (after any fold), >= 0 enforced by (F3)
    batch_threshold: float | None = None
    b_dec_on_input: bool = True
    rescale_by_decoder_norm: bool = False  # (F2): fold decoder norms (the source selects on / reports n_i * pre_i)
    theta_on_rescaled: bool = False  # theta is compared with n_i * pre_i (else with pre_i, and is rescaled by (F2))
    input_scale: float = 1.0
    input_norm: str = "none"  # "layer_norm": (x - mu) / (sigma + 1e-5), unbiased sigma, undone on the output (F8)
    hook_point: str | None = None
    base_model: str | None = None
    info: dict = field(default_factory=dict)


def _fail(raw_or_path, msg: str) -> ValueError:
    where = raw_or_path.path if isinstance(raw_or_path, Raw) else raw_or_path
    return ValueError(f"{where}: {msg}")


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    return path


def _strip_compile_prefix(sd: dict) -> dict:
    return {(k[len("_orig_mod."):] if isinstance(k, str) and k.startswith("_orig_mod.") else k): v for k, v in sd.items()}


def _check_keys(path, sd: dict, required: set[str], optional: set[str] = frozenset(), what: str = "") -> None:
    keys = set(sd)
    missing = sorted(required - keys)
    extra = sorted(keys - required - set(optional))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"tensors this format does not define {extra} (they would change the math, so they are "
                        "not ignored)")
    if problems:
        raise ValueError(f"{path}: {what + ': ' if what else ''}{'; '.join(problems)}. Expected "
                         f"{sorted(required)}{' (+ optional ' + str(sorted(optional)) + ')' if optional else ''}.")


def _check_shape(path, sd: dict, key: str, shape: tuple[int, ...], why: str) -> Tensor:
    t = sd[key]
    if not isinstance(t, Tensor):
        raise ValueError(f"{path}: entry {key!r} is a {type(t).__name__}, expected a tensor of shape {list(shape)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {key!r} has shape {list(t.shape)} but {why} implies {list(shape)}; the file "
                         "and its config disagree (truncated or mismatched checkpoint).")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"{path}: tensor {key!r} contains {int((~torch.isfinite(t)).sum())} NaN/Inf values.")
    return t


def _f64(sd: dict) -> dict:
    return {k: (v.detach().to(_F64) if isinstance(v, Tensor) and v.is_floating_point() else v) for k, v in sd.items()}


def _read_json(path: Path, what: str) -> dict:
    _need_file(path, what)
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}.")
    return cfg


def _read_safetensors(path: Path, what: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    _need_file(path, what)
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, or OSError for unreadable files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-download or re-save it.") from e


def _torch_load(path: Path, what: str) -> dict:
    _need_file(path, what)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(_torch_load_problem(path, e)) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict (a dict of tensors).")
    return _strip_compile_prefix(obj)


_TRUNCATED = re.compile(r"central directory|failed reading|ran out of input|unexpected end|EOF|truncated|"
                        r"file read failed|invalid header|not a zip", re.I)


def _torch_load_problem(path: Path, err: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused ``path``: a pickled object it will not
    unpickle (named), or a truncated / corrupt file, each with its fix."""
    text = f"{type(err).__name__}: {err}"
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported class ([\w.]+)", text)
    if refused:
        name = refused.group(1) or refused.group(2)
        return (f"{path} pickles a {name} object, which torch.load(weights_only=True) refuses: hf_sae only reads plain "
                "state dicts (tensors, numbers, strings) and never unpickles code. Re-save it with "
                "torch.save(model.state_dict(), path).")
    if isinstance(err, (EOFError, OSError)) or _TRUNCATED.search(text):
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        return f"{path} is truncated or corrupt ({first}); download or copy it again."
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return (f"{path} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: {first}); hf_sae only "
            "reads plain state dicts: re-save it with torch.save(model.state_dict(), path).")


def _int_cfg(path, cfg: dict, key: str, *alts: str, default=None) -> int:
    for k in (key, *alts):
        if cfg.get(k) is not None:
            v = cfg[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v <= 0:
                raise ValueError(f"{path}: config field {k!r}={v!r} must be a positive integer.")
            return int(v)
    if default is not None:
        return default
    raise ValueError(f"{path}: the config has no {key!r} field (required).")


def _decoder_norms(W_dec: Tensor) -> Tensor:
    return W_dec.norm(dim=-1)


# ---------------------------------------------------------------------------------- hook-point names
_TL_KIND = {"hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post", "hook_attn_out": "attn_out",
            "hook_mlp_out": "mlp_out", "attn.hook_z": "attn_z"}
_TL_FROM_KIND = {v: k for k, v in _TL_KIND.items()}


def hook_point_from_transformerlens(name: str | None) -> str | None:
    """``blocks.6.hook_resid_post`` -> ``layers.6.resid_post`` (also attn_out, mlp_out, resid_pre, attn.hook_z
    -> attn_z). Other names (e.g. ``hook_embed``, which on GPT-2 excludes position embeddings) -> None."""
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|attn\.hook_z)",
                     name or "")
    return f"layers.{m.group(1)}.{_TL_KIND[m.group(2)]}" if m else None


def hook_point_to_transformerlens(hook_point: str | None) -> str | None:
    """Inverse of :func:`hook_point_from_transformerlens`; ``embed`` -> ``blocks.0.hook_resid_pre`` (same value)."""
    if hook_point is None:
        return None
    if hook_point == "embed":
        return "blocks.0.hook_resid_pre"
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", hook_point)
    if not m or m.group(2) not in _TL_FROM_KIND:
        raise ValueError(f"hook point {hook_point!r} has no TransformerLens name")
    return f"blocks.{m.group(1)}.{_TL_FROM_KIND[m.group(2)]}"


def _hook_from_module_path(name: str) -> str | None:
    """sparsify-style module paths: ``layers.6`` / ``model.layers.6`` / ``transformer.h.6`` -> resid_post,
    ``layers.6.mlp`` -> mlp_out, ``layers.6.self_attn`` / ``.attn`` / ``.attention`` -> attn_out."""
    m = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$", name)
    if not m:
        return None
    kind = {None: "resid_post", "mlp": "mlp_out"}.get(m.group(2), "attn_out")
    return f"layers.{m.group(1)}.{kind}"


def _validated_hook(hook_point: str | None) -> str | None:
    if hook_point is None:
        return None
    from .hooks import parse_hook_point

    parse_hook_point(hook_point)
    return hook_point


# ============================================================================================ building the SAE
def _build(p: _Parts, dtype: torch.dtype | None, fold_decoder_norms: bool = False) -> SparseAutoencoder:
    """Assemble an hf_sae SAE from parts, applying (F1), (F2) and (F3) exactly (float64 arithmetic)."""
    W_enc, b_enc, W_dec, b_dec = (t.to(_F64).clone() for t in (p.W_enc, p.b_enc, p.W_dec, p.b_dec))
    theta = p.theta.to(_F64).clone() if p.theta is not None else None
    if not p.b_dec_on_input:  # (F1)
        b_enc = b_enc + W_enc @ b_dec
    fold = p.rescale_by_decoder_norm or fold_decoder_norms
    if fold_decoder_norms and p.activation not in ("relu", "jumprelu"):
        raise ValueError(f"fold_decoder_norms=True is exact only for ReLU/JumpReLU SAEs (rescaling changes which "
                         f"latents a {p.activation} SAE selects); this SAE is {p.activation}.")
    if fold:  # (F2)
        n = _decoder_norms(W_dec)
        W_enc = W_enc * n[:, None]
        b_enc = b_enc * n
        W_dec = W_dec / torch.where(n > 0, n, torch.ones_like(n))[:, None]
        if theta is not None and not p.theta_on_rescaled:
            theta = theta * n
    cfg_kwargs: dict[str, Any] = {}
    if p.activation in ("topk", "batchtopk"):
        k = int(p.k)
        if not 0 < k <= W_enc.shape[0]:
            raise ValueError(f"k={k} is out of range for {W_enc.shape[0]} latents")
        cfg_kwargs["k"] = k
    else:
        cfg_kwargs["k"] = None
    info = {"converted_from": {k: v for k, v in p.info.items() if v is not None}}
    config = SAEConfig(d_in=W_enc.shape[1], n_latents=W_enc.shape[0], activation=p.activation,
                       input_scale=float(p.input_scale), input_norm=p.input_norm, hook_point=p.hook_point,
                       base_model=p.base_model, training_info=info, **cfg_kwargs)
    sae = SparseAutoencoder(config).to(dtype or torch.float32)
    with torch.no_grad():  # copy_ rounds the float64 results once to the target dtype
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        if p.activation == "jumprelu":  # (F3)
            sae.log_threshold.copy_(theta.clamp_min(0).log())
        if p.activation == "batchtopk":
            sae.batchtopk_threshold.fill_(float(p.batch_threshold))
    sae.eval()
    return sae


# ============================================================================================ SAELens
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


def _saelens_to_parts(raw: Raw, *, input_scale: float | None = None, **_) -> _Parts:
    sd, e = raw.sd, raw.extra
    W_dec = sd["W_dec"]
    if "finetuning_scaling_factor" in sd:  # (F5)
        W_dec = W_dec * sd["finetuning_scaling_factor"][:, None]
    arch = e["arch"]
    parts = _Parts(W_enc=sd["W_enc"].T, b_enc=sd["b_enc"], W_dec=W_dec, b_dec=sd["b_dec"], activation="relu",
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
        xin, mu, std = openai_layer_norm(x)  # the same formula as SAELens' run_time_activation_ln_in
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
                         f"{cfg.input_norm_eps}, input_norm_unbiased={cfg.input_norm_unbiased}, which it cannot express.")
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


# ============================================================================================ sparsify
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


def _sparsify_to_parts(raw: Raw, **_) -> _Parts:
    sd, e = raw.sd, raw.extra
    return _Parts(W_enc=sd["encoder.weight"], b_enc=sd["encoder.bias"], W_dec=sd["W_dec"], b_dec=sd["b_dec"],
                  activation="topk", k=e["k"], hook_point=_hook_from_module_path(e["hookpoint"]),
                  base_model=e["model"], info={"format": "sparsify", "hookpoint": e["hookpoint"],
                                               "dataset": e["dataset"]})


def _ref_sparsify(raw: Raw, x: Tensor, **_) -> RefOutput:
    """sparsify's SparseCoder (sparse_coder.py + fused_encoder.py): pre = relu(enc(x - b_dec)), top-k of pre,
    decode = sum of the k rows of W_dec weighted by their values, + b_dec."""
    sd = raw.sd
    pre = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    v, i = pre.topk(raw.extra["k"], dim=-1)
    recon = (v.unsqueeze(-1) * sd["W_dec"][i]).sum(-2) + sd["b_dec"]
    return RefOutput(torch.zeros_like(pre).scatter(-1, i, v), recon, x, _identity)


# ============================================================================================ OpenAI
def openai_layer_norm(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """The input normalisation of OpenAI's TopK autoencoders: ``((x - mu) / (std + eps), mu, std)`` per token,
    with the unbiased std. Undo on the output with ``x^ * std + mu``. x: [..., d]."""
    mu = x.mean(dim=-1, keepdim=True)
    xc = x - mu
    std = xc.std(dim=-1, keepdim=True)
    return xc / (std + eps), mu, std


def _read_openai(path: Path, **_) -> Raw:
    if path.is_dir():
        pts = sorted(list(path.glob("*.pt")) + list(path.glob("*.pth")))
        if len(pts) != 1:
            raise FileNotFoundError(f"{path}: give the OpenAI autoencoder .pt file itself (found {len(pts)} .pt files).")
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


def _openai_to_parts(raw: Raw, *, layer_norm: bool | None = None, **_) -> _Parts:
    """The layer norm is part of the converted SAE (F8: ``input_norm="layer_norm"``), so it takes and returns the
    LM's activations. ``layer_norm=False`` converts the SAE behind it (inputs already normalized)."""
    ln = _openai_ln(raw, layer_norm)
    sd, e = raw.sd, raw.extra
    return _Parts(W_enc=sd["encoder.weight"], b_enc=sd["latent_bias"], W_dec=sd["decoder.weight"].T, b_dec=sd["pre_bias"],
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


# ============================================================================================ Gemma Scope
def _read_gemmascope(path: Path, **_) -> Raw:
    import numpy as np

    file = path / "params.npz" if path.is_dir() else path
    _need_file(file, "a Gemma Scope SAE is a params.npz file")
    try:
        with np.load(str(file), allow_pickle=False) as data:
            sd = {(("W_" + k[2:]) if k.startswith("w_") else k): torch.from_numpy(np.array(data[k])) for k in data.files}
    except Exception as e:
        raise ValueError(f"{file} is not a readable .npz archive ({e}).") from e
    sd = _f64(sd)
    _check_keys(file, sd, {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}, what="Gemma Scope JumpReLU SAE")
    if sd["W_enc"].ndim != 2:
        raise _fail(file, f"W_enc must be [d_model, d_sae], got {list(sd['W_enc'].shape)}")
    d, n = sd["W_enc"].shape
    why = f"W_enc [{d}, {n}]"
    _check_shape(file, sd, "W_dec", (n, d), why)
    _check_shape(file, sd, "b_enc", (n,), why)
    _check_shape(file, sd, "b_dec", (d,), why)
    _check_shape(file, sd, "threshold", (n,), why)
    return Raw(file, "gemmascope", {}, sd, {})


def _gemmascope_hook(path: Path) -> str | None:
    s = path.as_posix()
    layer = re.search(r"layer_(\d+)", s)
    kind = re.search(r"gemma-scope-[^/]*?-(res|mlp|att)(?:[-/]|$)", s)
    if layer and kind:
        return f"layers.{layer.group(1)}.{ {'res': 'resid_post', 'mlp': 'mlp_out', 'att': 'attn_z'}[kind.group(1)]}"
    return None


def _gemmascope_to_parts(raw: Raw, **_) -> _Parts:
    sd = raw.sd
    return _Parts(W_enc=sd["W_enc"].T, b_enc=sd["b_enc"], W_dec=sd["W_dec"], b_dec=sd["b_dec"], activation="jumprelu",
                  theta=sd["threshold"].clamp_min(0), b_dec_on_input=False, hook_point=_gemmascope_hook(raw.path),
                  info={"format": "gemmascope", "path": raw.path.as_posix()[-200:]})


def _ref_gemmascope(raw: Raw, x: Tensor, **_) -> RefOutput:
    """Gemma Scope's JumpReLUSAE (the tutorial): pre = x W_enc + b_enc; acts = 1[pre > threshold] relu(pre);
    recon = acts W_dec + b_dec (no b_dec on the input)."""
    sd = raw.sd
    pre = x @ sd["W_enc"] + sd["b_enc"]
    acts = (pre > sd["threshold"]) * pre.relu()
    return RefOutput(acts, acts @ sd["W_dec"] + sd["b_dec"], x, _identity)


# ============================================================================================ dictionary_learning
_DL_CLASSES = ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder")
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
        if sd["W_enc"].ndim != 2:
            raise _fail(file, f"W_enc must be [activation_dim, dict_size], got {list(sd['W_enc'].shape)}")
        d, n = sd["W_enc"].shape
        why = f"W_enc [{d}, {n}]"
        _check_shape(file, sd, "W_dec", (n, d), why)
        _check_shape(file, sd, "b_enc", (n,), why)
        _check_shape(file, sd, "b_dec", (d,), why)
        _check_shape(file, sd, "threshold", (n,), why)
    else:
        if sd["encoder.weight"].ndim != 2:
            raise _fail(file, f"encoder.weight must be [dict_size, activation_dim], got {list(sd['encoder.weight'].shape)}")
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
                                  dictionary_learning_version: str | None = None, **_) -> _Parts:
    sd, e = raw.sd, raw.extra
    cls = e["cls"]
    info = {"format": "dictionary_learning", "dict_class": cls, "layer": e["trainer"].get("layer"),
            "submodule_name": e["trainer"].get("submodule_name"), "dataset": e["buffer"].get("dataset")}
    base = e["trainer"].get("lm_name")
    hook = _dl_hook(e["trainer"])
    if cls == "JumpReluAutoEncoder":  # f = relu(pre 1[pre > t]) (times ||W_dec,i|| before 0.1.0): (F1), (F2), (F3)
        scaled = _dl_jumprelu_scaled(raw, dictionary_learning_version)
        info["latents_times_decoder_norm"] = scaled
        return _Parts(W_enc=sd["W_enc"].T, b_enc=sd["b_enc"], W_dec=sd["W_dec"], b_dec=sd["b_dec"],
                      activation="jumprelu", theta=sd["threshold"].clamp_min(0),
                      b_dec_on_input=apply_b_dec_to_input, rescale_by_decoder_norm=scaled, hook_point=hook,
                      base_model=base, info=info)
    W_enc, b_enc, W_dec = sd["encoder.weight"], sd["encoder.bias"], sd["decoder.weight"].T
    if cls == "AutoEncoder":
        return _Parts(W_enc, b_enc, W_dec, sd["bias"], "relu", hook_point=hook, base_model=base, info=info)
    if cls == "AutoEncoderNew":  # no bias on the input: (F1)
        return _Parts(W_enc, b_enc, W_dec, sd["decoder.bias"], "relu", b_dec_on_input=False, hook_point=hook,
                      base_model=base, info=info)
    t = float(sd["threshold"])
    if _dl_use_threshold(raw, use_threshold):  # (F7)
        if t < 0:
            return _Parts(W_enc, b_enc, W_dec, sd["b_dec"], "relu", hook_point=hook, base_model=base, info=info)
        return _Parts(W_enc, b_enc, W_dec, sd["b_dec"], "batchtopk", k=e["k"], batch_threshold=t, hook_point=hook,
                      base_model=base, info=info)
    if cls == "BatchTopKSAE":  # top k*N over the batch: hf_sae's BatchTopK in train() mode (eval() uses the threshold)
        return _Parts(W_enc, b_enc, W_dec, sd["b_dec"], "batchtopk", k=e["k"], batch_threshold=t, hook_point=hook,
                      base_model=base, info=info)
    return _Parts(W_enc, b_enc, W_dec, sd["b_dec"], "topk", k=e["k"], hook_point=hook, base_model=base, info=info)


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


# ============================================================================================ the table
@dataclass(frozen=True)
class SAEFormat:
    """One foreign SAE format: how to recognise, read, convert and re-compute it."""

    name: str
    library: str
    files: str
    detect: Callable[[Path], bool]
    read: Callable[..., Raw]
    to_parts: Callable[..., _Parts]
    reference: Callable[..., RefOutput]
    export: Callable[..., Path] | None = None


def _is_file_named(path: Path, *names: str) -> bool:
    return path.is_file() and path.name in names


FORMATS: dict[str, SAEFormat] = {
    "saelens": SAEFormat(
        "saelens", "SAELens (jbloomAus / decoderesearch)", "cfg.json + sae_weights.safetensors",
        lambda p: (p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file(),
        _read_saelens, _saelens_to_parts, _ref_saelens, export_saelens),
    "sparsify": SAEFormat(
        "sparsify", "EleutherAI sparsify", "cfg.json + sae.safetensors (one folder per hook point)",
        lambda p: (p / "cfg.json").is_file() and (p / "sae.safetensors").is_file(),
        _read_sparsify, _sparsify_to_parts, _ref_sparsify),
    "openai": SAEFormat(
        "openai", "openai/sparse_autoencoder", "<name>.pt state dict",
        lambda p: p.is_file() and p.suffix in (".pt", ".pth") and not (p.parent / "config.json").is_file(),
        _read_openai, _openai_to_parts, _ref_openai),
    "gemmascope": SAEFormat(
        "gemmascope", "Gemma Scope (Google DeepMind)", "params.npz",
        lambda p: _is_file_named(p, "params.npz") or (p.is_dir() and (p / "params.npz").is_file()),
        _read_gemmascope, _gemmascope_to_parts, _ref_gemmascope),
    "dictionary_learning": SAEFormat(
        "dictionary_learning", "saprmarks/dictionary_learning", "ae.pt + config.json",
        lambda p: (p.is_dir() and (p / "ae.pt").is_file()) or (p.is_file() and p.suffix == ".pt"
                                                                 and (p.parent / "config.json").is_file()),
        _read_dictionary_learning, _dictionary_learning_to_parts, _ref_dictionary_learning),
}


def detect_format(path: str | Path) -> str:
    """Name of the format of ``path`` (a folder or file), from :data:`FORMATS`; ValueError if none or several
    match, FileNotFoundError if the path does not exist."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    hits = [name for name, f in FORMATS.items() if f.detect(path)]
    if len(hits) != 1:
        table = "; ".join(f"{n}: {f.files}" for n, f in FORMATS.items())
        raise ValueError(f"{path}: {'no' if not hits else 'more than one'} known SAE format matches "
                         f"{hits if hits else ''}; pass format=... explicitly. Known formats: {table}.")
    return hits[0]


def _format(fmt: str, path: Path) -> SAEFormat:
    name = detect_format(path) if fmt == "auto" else fmt
    if name not in FORMATS:
        raise ValueError(f"Unknown format {name!r}; known: {sorted(FORMATS)} (or 'auto').")
    return FORMATS[name]


def read_checkpoint(path: str | Path, format: str = "auto", **options) -> Raw:
    """Read and validate a foreign checkpoint (config + float64 tensors in the source's orientation)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return _format(format, path).read(path, **options)


def reference_forward(raw: Raw, x: Tensor, **options) -> RefOutput:
    """The source library's own forward (its published math) on x [N, d], in float64."""
    return FORMATS[raw.fmt].reference(raw, x.to(_F64), **options)


def _probe_inputs(sae: SparseAutoencoder, n: int, seed: int) -> Tensor:
    """n probe inputs: half around b_dec, half around 0, at scales spread over three decades around
    1/median|W_enc row| (pre-activations from far below to far above typical thresholds)."""
    g = torch.Generator().manual_seed(seed)
    W = sae.W_enc.detach().to(_F64)
    row = W.norm(dim=-1)
    sigma = 1.0 / float(row[row > 0].median()) if (row > 0).any() else 1.0
    scales = torch.logspace(-2, 1, n, dtype=_F64)[torch.randperm(n, generator=g)][:, None] * sigma
    x = torch.randn(n, sae.config.d_in, generator=g, dtype=_F64) * scales
    x[: n // 2] += sae.b_dec.detach().to(_F64)
    return x / sae.config.input_scale


def verify_conversion(sae: SparseAutoencoder, raw: Raw, *, n_inputs: int | None = None, seed: int = 0,
                      tol: float = 1e-6, **options) -> dict[str, float]:
    """Compare ``sae`` with the source's reference forward on probe inputs, in float64 (a copy of the SAE).

    A sanity check against gross conversion errors (orientation, bias folds, activation); boundary cases
    (inputs right at a threshold) are the tests' job. ``n_inputs`` defaults to 256 for small SAEs and 32 for
    large ones. Returns the max abs errors of latents and reconstruction relative to their scale; raises
    RuntimeError above ``tol``."""
    size = sae.config.n_latents * sae.config.d_in
    x = _probe_inputs(sae, n_inputs or (256 if size <= 2**22 else 32), seed)
    ref = reference_forward(raw, x, **options)
    model = copy.deepcopy(sae).to(_F64).train(ref.batch_mode)
    with torch.no_grad():
        out = model(ref.sae_input, return_dense=True)
        rec = ref.to_source_units(out.reconstruction)
        lat = out.latents
    scale_r = 1.0 + float(ref.reconstruction.abs().max())
    scale_l = 1.0 + float(ref.latents.abs().max())
    err = {"latents": float((lat - ref.latents).abs().max()) / scale_l,
           "reconstruction": float((rec - ref.reconstruction).abs().max()) / scale_r}
    if max(err.values()) > tol:
        raise RuntimeError(f"{raw.path}: the converted SAE disagrees with the {raw.fmt} reference forward "
                           f"(relative max errors {err}); please report this with the checkpoint's config.")
    return err


def convert(path: str | Path, format: str = "auto", *, hook_point: str | None = None, base_model: str | None = None,
            dtype: torch.dtype | None = None, fold_decoder_norms: bool = False, check: bool | str = "auto",
            **options) -> SparseAutoencoder:
    """Convert a foreign SAE checkpoint into an hf_sae :class:`SparseAutoencoder`.

    Args:
        path: the checkpoint folder (or file for ``openai`` / ``gemmascope`` / ``dictionary_learning``).
        format: a key of :data:`FORMATS` or ``"auto"`` (:func:`detect_format`).
        hook_point: hf_sae hook point (default: inferred from the source's hook name where unambiguous).
        base_model: Hub id of the LM (default: the source's model name, when recorded).
        dtype: parameter dtype of the result (default float32; conversion arithmetic is float64).
        fold_decoder_norms: for ReLU/JumpReLU sources, rescale to unit-norm decoder rows (F2); latents then
            change by the factor ||W_dec,i|| while reconstructions stay exact. Default keeps the source's latents.
        check: verify the result against the source's reference forward on probe inputs (float64, see
            :func:`verify_conversion`); ``"auto"`` does so when n_latents * d_in <= 2**26 (the float64 copy
            stays near 1 GB), True / False force it.
        **options: format options — ``input_scale`` (SAELens ``expected_average_only_in``), ``layer_norm``
            (openai: False converts the SAE behind its layer norm; ``accept_layer_norm`` is accepted and ignored),
            ``dict_class``, ``use_threshold``, ``apply_b_dec_to_input``, ``dictionary_learning_version``
            (dictionary_learning; a BatchTopKSAE with ``use_threshold=False`` selects over the batch, which the
            converted SAE does in ``train()`` mode, while ``eval()`` uses its threshold).
    Raises: FileNotFoundError (missing files), ValueError (bad/mismatched tensors, unsupported variants).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    spec = _format(format, path)
    raw = spec.read(path, **options)
    parts = spec.to_parts(raw, **options)
    if hook_point is not None:
        parts.hook_point = _validated_hook(hook_point)
    if base_model is not None:
        parts.base_model = base_model
    sae = _build(parts, dtype, fold_decoder_norms=fold_decoder_norms)
    if check == "auto":
        check = sae.config.n_latents * sae.config.d_in <= _CHECK_MAX_WEIGHTS
    if check:
        if fold_decoder_norms:  # latents are rescaled on purpose: compare reconstructions through a non-folded copy
            verify_conversion(_build(parts, _F64), raw, **options)
        else:
            verify_conversion(sae, raw, **options)
    return sae


def convert_tree(path: str | Path, out: str | Path, format: str = "auto", **kwargs) -> dict[str, Path]:
    """Convert a checkpoint, or every checkpoint found one level below ``path`` (e.g. a sparsify run with one
    folder per hook point), and ``save_pretrained`` each into ``out`` (``out/<hook point>/`` for several).
    Returns {hook point or source folder name: saved path}."""
    path, out = Path(path), Path(out)

    def matches(p: Path) -> bool:
        if format != "auto":
            return _format(format, p).detect(p)
        try:
            return bool(detect_format(p))
        except ValueError:
            return False

    if matches(path):
        sae = convert(path, format, **kwargs)
        sae.save_pretrained(out)
        return {sae.config.hook_point or path.name: out}
    from tqdm.auto import tqdm

    results = {}
    children = [c for c in sorted(path.iterdir()) if matches(c)] if path.is_dir() else []
    for child in tqdm(children, desc=f"converting {path.name}", unit="SAE", disable=len(children) < 2):
        sae = convert(child, format, **kwargs)
        name = sae.config.hook_point or child.name
        if name in results:
            raise ValueError(f"{path}: two checkpoints map to {name!r}; convert them one by one with hook_point=.")
        sae.save_pretrained(out / name)
        results[name] = out / name
    if not results:
        raise ValueError(f"{path}: no SAE checkpoint in a known format here or one level below. Known formats: "
                         + "; ".join(f"{n}: {f.files}" for n, f in FORMATS.items()))
    return results


# ============================================================================================ CLI
def add_convert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``hf-sae convert``."""
    parser.add_argument("src", help="checkpoint folder/file (or an hf_sae folder with --to saelens)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--from", dest="fmt", default="auto", choices=("auto", *FORMATS), help="source format")
    parser.add_argument("--to", dest="to", default="hf_sae", choices=("hf_sae", "saelens"), help="target format")
    parser.add_argument("--hook-point", default=None, help="hf_sae hook point, e.g. layers.6.resid_post")
    parser.add_argument("--base-model", default=None, help="Hub id of the language model")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    parser.add_argument("--input-scale", type=float, default=None,
                        help="SAELens expected_average_only_in: the dataset scaling factor")
    parser.add_argument("--accept-layer-norm", action="store_true",
                        help="(no longer needed: an OpenAI TopK autoencoder's layer norm is part of the converted SAE)")
    parser.add_argument("--no-layer-norm", action="store_true",
                        help="openai TopK: convert the SAE behind its layer norm (it then takes normalized inputs)")
    parser.add_argument("--dictionary-learning-version", default=None,
                        help="dictionary_learning JumpReLU: the library version that wrote ae.pt (default 0.1.0; "
                             "versions before 0.1.0 scale latents by the decoder-row norms)")
    parser.add_argument("--dict-class", default=None, choices=_DL_CLASSES, help="dictionary_learning class")
    parser.add_argument("--use-threshold", default=None, choices=("yes", "no"),
                        help="dictionary_learning TopK/BatchTopK: encode with the stored threshold")
    parser.add_argument("--fold-decoder-norms", action="store_true", help="ReLU/JumpReLU: unit-norm decoder rows")
    parser.add_argument("--no-check", action="store_true", help="skip the check against the source's own forward")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """``hf-sae convert``: foreign format -> hf_sae folder(s), or hf_sae folder -> SAELens folder. A refused or
    unreadable checkpoint prints one line (``hf-sae convert: error: ...``) and returns 2."""
    import sys

    try:
        return _run_convert(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"hf-sae convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _run_convert(args: argparse.Namespace) -> int:
    if args.to == "saelens":
        sae = SparseAutoencoder.from_pretrained(args.src)
        if args.hook_point:
            sae.config.hook_point = _validated_hook(args.hook_point)
        if args.base_model:
            sae.config.base_model = args.base_model
        print(f"wrote SAELens SAE to {export_saelens(sae, args.out)}")
        return 0
    options: dict[str, Any] = {}
    if args.input_scale is not None:
        options["input_scale"] = args.input_scale
    if args.no_layer_norm:
        options["layer_norm"] = False
    if args.dictionary_learning_version:
        options["dictionary_learning_version"] = args.dictionary_learning_version
    if args.dict_class:
        options["dict_class"] = args.dict_class
    if args.use_threshold is not None:
        options["use_threshold"] = args.use_threshold == "yes"
    done = convert_tree(args.src, args.out, args.fmt, hook_point=args.hook_point, base_model=args.base_model,
                        dtype=getattr(torch, args.dtype), fold_decoder_norms=args.fold_decoder_norms,
                        check=not args.no_check, **options)
    for name, p in done.items():
        print(f"{name}: {p}")
    return 0


__all__ = [
    "FORMATS", "SAEFormat", "RefOutput", "Raw", "detect_format", "read_checkpoint", "reference_forward", "convert",
    "convert_tree", "verify_conversion", "export_saelens", "openai_layer_norm", "hook_point_from_transformerlens",
    "hook_point_to_transformerlens", "add_convert_args", "run_convert",
]
