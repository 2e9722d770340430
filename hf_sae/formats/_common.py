"""Pieces every format module shares: the raw checkpoint (:class:`Raw`), the parts an hf_sae SAE is built from
(:class:`Parts`), the reference-forward output (:class:`RefOutput`), validated readers of JSON / safetensors /
``torch.load(weights_only=True)`` files, and hook-point name translation."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

_F64 = torch.float64


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
class Parts:
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
    prefix = "_orig_mod."
    return {(k[len(prefix):] if isinstance(k, str) and k.startswith(prefix) else k): v for k, v in sd.items()}


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


def _check_jumprelu_tensors(path, sd: dict, d_name: str, n_name: str) -> tuple[int, int]:
    """(d, n) of a JumpReLU state dict in the W_enc [d, n] / W_dec [n, d] orientation (Gemma Scope, dictionary_learning
    JumpReluAutoEncoder, SAELens), every tensor's shape checked against W_enc's."""
    if sd["W_enc"].ndim != 2:
        raise _fail(path, f"W_enc must be [{d_name}, {n_name}], got {list(sd['W_enc'].shape)}")
    d, n = sd["W_enc"].shape
    why = f"W_enc [{d}, {n}]"
    for key, shape in (("W_dec", (n, d)), ("b_enc", (n,)), ("b_dec", (d,)), ("threshold", (n,))):
        _check_shape(path, sd, key, shape, why)
    return d, n


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
                        r"file read failed|invalid header|not a zip|Unsupported operand|invalid load key|"
                        r"could not find MARK", re.I)


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
    # the specific line: what follows torch's "WeightsUnpickler error:" header, else the first line
    detail = str(err).split("WeightsUnpickler error:", 1)[-1]
    detail = next((line.strip() for line in detail.splitlines() if line.strip()), type(err).__name__)
    if isinstance(err, (EOFError, OSError)) or _TRUNCATED.search(text):
        return f"{path} is truncated or corrupt ({detail}); download or copy it again."
    return (f"{path} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: {detail}); hf_sae only "
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
    from ..hooks import parse_hook_point

    parse_hook_point(hook_point)
    return hook_point






def layer_norm_per_token(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """``((x - mu) / (std + eps), mu, std)`` per token with the unbiased std: OpenAI sparse_autoencoder's ``LN`` and
    SAELens 6.54.12's ``layer_norm`` run-time normalisation (F8). Undo on the output with ``x^ * std + mu``.
    x: [..., d]."""
    mu = x.mean(dim=-1, keepdim=True)
    xc = x - mu
    std = xc.std(dim=-1, keepdim=True)
    return xc / (std + eps), mu, std
