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

Each entry has ``read`` (files -> raw config + tensors, validated), ``to_parts`` (raw -> the parts :func:`_build`
assembles) and ``reference`` (the source library's own forward, following its released version's code, on the
raw tensors), side by side in one module per library under :mod:`hf_sae.formats`. :func:`convert` checks the
converted SAE against ``reference`` on probe inputs unless ``check=False``. ``SparseAutoencoder.from_pretrained``
and ``hf_sae.hub.load_all`` use this table for other libraries' Hub repos (:mod:`hf_sae.pretrained`).
Pickled ``.pt`` files are read with ``torch.load(weights_only=True)``; ``.npz`` with ``allow_pickle=False``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .cli_args import add_convert_args  # noqa: F401  (the arguments, defined without torch)
from .configuration_sae import SAEConfig
from .formats import dictionary_learning as _dl
from .formats import gemmascope as _gemmascope
from .formats import openai as _openai
from .formats import saelens as _saelens
from .formats import sparsify as _sparsify
from .formats._common import (
    _F64,
    Parts,
    Raw,
    RefOutput,
    _decoder_norms,
    _validated_hook,
    hook_point_from_transformerlens,
    hook_point_to_transformerlens,
)
from .modeling_sae import SparseAutoencoder

_Parts = Parts  # former name
export_saelens = _saelens.export_saelens
openai_layer_norm = _openai.openai_layer_norm
_DL_CLASSES = _dl._DL_CLASSES
_CHECK_MAX_WEIGHTS = 2**26


# ============================================================================================ building the SAE
def _build(p: Parts, dtype: torch.dtype | None, fold_decoder_norms: bool = False) -> SparseAutoencoder:
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


# ============================================================================================ the table
@dataclass(frozen=True)
class SAEFormat:
    """One foreign SAE format: how to recognise, read, convert and re-compute it."""

    name: str
    library: str
    files: str
    detect: Callable[[Path], bool]
    read: Callable[..., Raw]
    to_parts: Callable[..., Parts]
    reference: Callable[..., RefOutput]
    export: Callable[..., Path] | None = None


def _is_file_named(path: Path, *names: str) -> bool:
    return path.is_file() and path.name in names


FORMATS: dict[str, SAEFormat] = {
    "saelens": SAEFormat(
        "saelens", "SAELens (jbloomAus / decoderesearch)", "cfg.json + sae_weights.safetensors",
        lambda p: (p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file(),
        _saelens._read_saelens, _saelens._saelens_to_parts, _saelens._ref_saelens, export_saelens),
    "sparsify": SAEFormat(
        "sparsify", "EleutherAI sparsify", "cfg.json + sae.safetensors (one folder per hook point)",
        lambda p: (p / "cfg.json").is_file() and (p / "sae.safetensors").is_file(),
        _sparsify._read_sparsify, _sparsify._sparsify_to_parts, _sparsify._ref_sparsify),
    "openai": SAEFormat(
        "openai", "openai/sparse_autoencoder", "<name>.pt state dict",
        lambda p: p.is_file() and p.suffix in (".pt", ".pth") and not (p.parent / "config.json").is_file(),
        _openai._read_openai, _openai._openai_to_parts, _openai._ref_openai),
    "gemmascope": SAEFormat(
        "gemmascope", "Gemma Scope (Google DeepMind)", "params.npz",
        lambda p: _is_file_named(p, "params.npz") or (p.is_dir() and (p / "params.npz").is_file()),
        _gemmascope._read_gemmascope, _gemmascope._gemmascope_to_parts, _gemmascope._ref_gemmascope),
    "dictionary_learning": SAEFormat(
        "dictionary_learning", "saprmarks/dictionary_learning", "ae.pt + config.json",
        lambda p: (p.is_dir() and (p / "ae.pt").is_file()) or (p.is_file() and p.suffix == ".pt"
                                                                 and (p.parent / "config.json").is_file()),
        _dl._read_dictionary_learning, _dl._dictionary_learning_to_parts, _dl._ref_dictionary_learning),
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
