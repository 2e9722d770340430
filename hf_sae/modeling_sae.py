"""SparseAutoencoder: a transformers PreTrainedModel for TopK / BatchTopK / ReLU / JumpReLU / top-AFA SAEs.

Math (docs/FORMULAS.md §1), in normalized units x = s N(x_caller) (``s = config.input_scale``; N the per-token
``config.input_norm``: identity, or layer_norm (x - mu) / (sigma + eps))::

    pre = W_enc (x - b_dec) + b_enc          # [N, n]  (no b_enc for top-AFA, afa_variant="reference")
    z   = act(pre)                           # k-sparse (values, indices) or dense
    x^  = z W_dec + b_dec                    # only the active rows of W_dec take part

and the reconstruction in the caller's units is x^ / s (times sigma, plus mu, under layer_norm).
``forward`` takes and returns the caller's units; losses are computed in normalized units (FVU and
AuxK are scale-free); ``mse`` is in the caller's units. This file imports only torch, transformers and
its two sibling files, so a saved folder that carries them loads with ``trust_remote_code=True``
without hf_sae installed.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .activations import Latents, get_activation
from .configuration_sae import SAEConfig

_EPS = 1e-12


def _row_dots(a: Tensor, b: Tensor, block_bytes: int = 32 << 20) -> Tensor:
    """[n, 1] dot products of the rows of a and b [n, d]; on CPU in row blocks of ``block_bytes`` through one
    reused buffer (a whole [n, d] product would be a fresh allocation, page faults included). Few large
    blocks: each block's two operations are parallel regions whose thread barriers cost most on a loaded
    machine (benchmarks/RESULTS_speed.md, issue 20)."""
    if a.device.type != "cpu":
        return (a * b).sum(-1, keepdim=True)
    rows = max(1, block_bytes // max(1, a.shape[-1] * a.element_size()))
    out = a.new_empty(a.shape[0], 1)
    buf = a.new_empty(min(rows, a.shape[0]), a.shape[-1])
    for lo in range(0, a.shape[0], rows):
        hi = min(a.shape[0], lo + rows)
        prod = torch.mul(a[lo:hi], b[lo:hi], out=buf[:hi - lo])
        torch.sum(prod, -1, keepdim=True, out=out[lo:hi])
    return out


def l2_norm(t: Tensor) -> Tensor:
    """The L2 norm of a whole tensor (0-d). On CPU in float32/float64 as the square root of BLAS's dot of
    the flattened tensor with itself: one pass, several times faster than ``torch.linalg.vector_norm`` there and
    closer to the float64 value (benchmarks/RESULTS_speed.md, issue 20); elsewhere ``vector_norm``."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous() and t.numel():
        flat = t.view(-1)
        return torch.dot(flat, flat).sqrt_()
    return torch.linalg.vector_norm(t)


@dataclass
class SAEOutput(ModelOutput):
    """Output of :meth:`SparseAutoencoder.forward`. Leading dims ``...`` are the input's."""

    loss: Optional[Tensor] = None
    """scalar training loss: fvu + aux_coef*auxk + l1_coef*l1 + l0_coef*l0 + afa_coef*afa (+ fvu_4k/8)."""
    reconstruction: Optional[Tensor] = None
    """[..., d] reconstruction x^ in the caller's units."""
    latent_values: Optional[Tensor] = None
    """[..., w] active latent values (k-sparse activations); padded slots are 0."""
    latent_indices: Optional[Tensor] = None
    """[..., w] int64 latent ids of ``latent_values``."""
    latents: Optional[Tensor] = None
    """[..., n] dense latents (dense activations, or any activation with ``return_dense=True``)."""
    fvu: Optional[Tensor] = None
    """scalar fraction of variance unexplained: sum||x^ - x||^2 / sum||x - mean(x)||^2 over the batch."""
    mse: Optional[Tensor] = None
    """scalar mean squared error per element, in the caller's units."""
    auxk_loss: Optional[Tensor] = None
    """scalar AuxK loss (FVU of the residual predicted by the top-k_aux dead latents); 0 when none is dead."""
    l1_loss: Optional[Tensor] = None
    """scalar decoder-norm-weighted L1 of the latents (mean over tokens)."""
    l0_loss: Optional[Tensor] = None
    """scalar L0 of the latents with the JumpReLU pseudo-gradient (jumprelu only, else None)."""
    afa_loss: Optional[Tensor] = None
    """scalar AFA loss in the form of ``config.afa_variant`` (:meth:`SparseAutoencoder.afa_loss`; normalized units)."""
    multi_topk_fvu: Optional[Tensor] = None
    """scalar FVU with 4k latents (Multi-TopK), when enabled."""


def _optional(module: str):
    """An hf_sae module if the package is importable (not under trust_remote_code), else None."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _kernels():
    """The fast sparse kernels of hf_sae, if the package is importable (not under trust_remote_code)."""
    return _optional("hf_sae.kernels")


def sparse_decode_reference(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]]: [N, w] x [N, w] x [n, d] -> [N, d] (pure torch)."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


class SparseAutoencoderPreTrainedModel(PreTrainedModel):
    config_class = SAEConfig
    base_model_prefix = "sae"
    main_input_name = "x"
    supports_gradient_checkpointing = False
    _no_split_modules = []


class SparseAutoencoder(SparseAutoencoderPreTrainedModel):
    """A sparse autoencoder over activations of width ``d_in`` with ``n_latents`` latents.

    Parameters: ``W_enc`` [n, d], ``b_enc`` [n], ``W_dec`` [n, d] (rows unit-norm), ``b_dec`` [d];
    JumpReLU adds ``log_threshold`` [n]; BatchTopK keeps the buffer ``batchtopk_threshold`` (scalar,
    -1 until estimated in training).
    """

    def __init__(self, config: SAEConfig):
        super().__init__(config)
        n, d = config.n_latents, config.d_in
        self.W_enc = nn.Parameter(torch.empty(n, d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if config.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n,), math.log(config.jumprelu_init_threshold)))
        if config.activation == "batchtopk":
            self.register_buffer("batchtopk_threshold", torch.tensor(-1.0))
        self.activation = get_activation(config.activation)
        if not self.uses_b_enc:  # top-AFA as its authors define it has no encoder bias: b_enc stays 0
            self.b_enc.requires_grad_(False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved SAE (local folder, Hub repo, ``subfolder=``). Unlike plain transformers, a
        checkpoint whose tensors are missing, extra or of the wrong shape for its config raises a
        ``ValueError`` naming the tensors, and a corrupt weights file raises one naming the file.

        With hf_sae installed, a folder written by another library (SAELens, sparsify, dictionary_learning,
        Gemma Scope, OpenAI) or a ``hf_sae.pretrained.REGISTRY`` id (e.g. ``"gemma-scope-2b-pt-res"`` with
        ``subfolder="layer_20/width_16k/average_l0_71"``) is converted on the fly and cached (see
        ``hf_sae.pretrained``)."""
        foreign = None if kwargs.get("output_loading_info") else _optional("hf_sae.pretrained")
        if foreign is not None:
            sae = foreign.maybe_load(pretrained_model_name_or_path, kwargs.get("subfolder"), kwargs)
            if sae is not None:
                return sae
            try:
                return cls._from_pretrained_checked(pretrained_model_name_or_path, *args, **kwargs)
            except OSError as err:  # no hf_sae config/weights there: perhaps another library's layout
                return foreign.fallback_load(pretrained_model_name_or_path, kwargs.get("subfolder"), kwargs, err)
        return cls._from_pretrained_checked(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_pretrained_checked(cls, pretrained_model_name_or_path, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        where = str(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            where += f" (subfolder {kwargs['subfolder']!r})"
        hub = _optional("hf_sae.hub_layout")  # absent under trust_remote_code: plain errors then
        if hub is not None:
            hub.check_local_sae_path(pretrained_model_name_or_path, kwargs.get("subfolder"))
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except Exception as err:  # safetensors raises its own error type for corrupt files
            if type(err).__name__ == "SafetensorError" or "deserializ" in str(err).lower():
                raise ValueError(
                    f"The SAE weights file in {where} is corrupt or truncated ({err}). Re-save it, or re-download "
                    f"it with force_download=True."
                ) from err
            if hub is None or not isinstance(err, OSError):
                raise
            fallback, message = hub.explain_missing_sae(pretrained_model_name_or_path, kwargs.get("subfolder"),
                                                        kwargs.get("revision"), kwargs.get("token"))
            if fallback is None:
                if message is None:
                    raise
                raise OSError(message) from err
            kwargs = {**kwargs, "subfolder": fallback}  # the SAE of that hook point lives at the root
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        problems = []
        if info.get("missing_keys"):
            problems.append(f"missing tensors {sorted(info['missing_keys'])}")
        if info.get("unexpected_keys"):
            problems.append(f"unexpected tensors {sorted(info['unexpected_keys'])}")
        if info.get("mismatched_keys") and not allow_mismatch:
            problems.extend(
                f"tensor {name!r} has shape {list(ckpt)} in the checkpoint but the config implies {list(want)}"
                for name, ckpt, want in info["mismatched_keys"]
            )
        if problems:
            cfg = model.config
            raise ValueError(
                f"The checkpoint in {where} does not match its config (d_in={cfg.d_in}, n_latents={cfg.n_latents}, "
                f"activation={cfg.activation!r}): " + "; ".join(problems)
                + ". Fix config.json or re-save the SAE with save_pretrained."
            )
        return (model, info) if want_info else model

    def push_to_hub(self, repo_id: str, **kwargs):  # type: ignore[override]  # hf_sae's layout, same call
        """Push this SAE with hf_sae's layout and model card (``hf_sae.hub.push_to_hub``: config, weights,
        modeling code at the root, a card with a model-index of FVU/L0/dead fraction/delta-loss). Without
        hf_sae installed (trust_remote_code), transformers' generic ``push_to_hub`` is used."""
        hub_push = _optional("hf_sae.hub_push")  # absent under trust_remote_code
        if hub_push is None:
            return super().push_to_hub(repo_id, **kwargs)  # type: ignore[arg-type]  # transformers' decorator
        return hub_push.push_to_hub(self, repo_id, **kwargs)

    # ---------------------------------------------------------------- init and decoder geometry
    @torch.no_grad()
    def _init_weights(self, module):
        """Tied init (Gao et al.): W_dec rows random unit vectors, W_enc = W_dec (i.e. W_enc = W_dec^T
        as a map), zero biases."""
        if module is not self:
            return
        W = torch.randn(self.config.n_latents, self.config.d_in, device=self.W_dec.device)
        W /= W.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if hasattr(self, "log_threshold"):
            self.log_threshold.fill_(math.log(self.config.jumprelu_init_threshold))
        if hasattr(self, "batchtopk_threshold"):
            self.batchtopk_threshold.fill_(-1.0)

    def decoder_norms(self) -> Tensor:
        """[n] L2 norm of each decoder row."""
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (call after each optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(_EPS))

    @torch.no_grad()
    def remove_parallel_grad_(self, unit_rows: bool = False) -> Optional[Tensor]:
        """Remove from W_dec.grad its component parallel to each decoder row (call before the step),
        so that the step moves rows along the unit sphere's tangent plane.

        Args:
            unit_rows: the decoder rows are known to have unit norm (``normalize_decoder_`` ran and nothing
                changed W_dec since), so ``||w_i||^2`` is taken as 1 instead of computed (one pass less).
        Returns the L2 norm of the projected gradient (0-d tensor; what the gradient clipping needs), or
        None when W_dec has no gradient."""
        g = self.W_dec.grad
        if g is None:
            return None
        w = self.W_dec.detach()
        coef = _row_dots(g, w)
        if not unit_rows:  # ||w_i||^2 as the square of the row norm: one fused reduction, not a product + a sum
            coef.div_(w.norm(dim=-1, keepdim=True).square_().clamp_min_(_EPS))
        g.addcmul_(coef, w, value=-1)
        return l2_norm(g)

    def release_grad_buffers(self) -> None:
        """Free the memory kept between training steps for W_enc's and W_dec's gradients (two [n, d]
        tensors on CPU, see ``hf_sae.kernels.GradBuffer``); the next fused step allocates it again."""
        kernels = _kernels()
        if kernels is not None:
            kernels.release_grad_buffers(self)

    # ---------------------------------------------------------------- input handling
    def _flatten_input(self, x: Tensor) -> tuple[Tensor, torch.Size, Optional[tuple[Tensor, Tensor]]]:
        """Validate x [..., d], return (x_normalized [N, d], leading shape, per-token stats or None)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"SAE input must be a torch.Tensor of shape [..., {self.config.d_in}], got {type(x)}")
        if not x.is_floating_point():
            raise ValueError(
                f"SAE input has dtype {x.dtype}; expected a floating dtype (float32/bfloat16/float16) "
                f"of shape [..., {self.config.d_in}]. Cast with x.float()."
            )
        if x.ndim == 0 or x.shape[-1] != self.config.d_in:
            raise ValueError(
                f"SAE input has shape {tuple(x.shape)}; expected [..., {self.config.d_in}] (d_in of this SAE"
                f"{', hook point ' + self.config.hook_point if self.config.hook_point else ''})."
            )
        # one reduction first (a NaN/Inf anywhere makes the sum non-finite); the full check only then
        if not torch.isfinite(x.sum(dtype=torch.float32)) and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"SAE input contains {bad} NaN/Inf values; clean the activations before encoding.")
        lead = x.shape[:-1]
        x, stats = self._normalize(x.reshape(-1, self.config.d_in).to(self.W_enc.dtype))
        return x, lead, stats

    def _normalize(self, x: Tensor) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
        """(s N(x) [N, d], (mu, sigma) [N, 1] each or None): the per-token ``input_norm`` N, then ``input_scale``."""
        cfg = self.config
        stats = None
        if cfg.input_norm == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            sigma = x.std(dim=-1, keepdim=True, correction=1 if cfg.input_norm_unbiased else 0)
            x = x / (sigma + cfg.input_norm_eps)
            stats = (mu, sigma)
        if cfg.input_scale != 1.0:
            x = x * cfg.input_scale
        return x, stats

    def _denormalize(self, x_hat: Tensor, stats: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        """Normalized-unit reconstructions [N, d] -> the caller's units (inverse of :meth:`_normalize`)."""
        if self.config.input_scale != 1.0:
            x_hat = x_hat / self.config.input_scale
        if stats is not None:
            x_hat = x_hat * stats[1] + stats[0]
        return x_hat

    def normalize_input(self, x: Tensor) -> Tensor:
        """x [..., d] in the caller's units -> [..., d] in normalized units (what W_enc and the latents see)."""
        xn, lead, _ = self._flatten_input(x)
        return xn.reshape(*lead, self.config.d_in)

    def input_norm_stats(self, x: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """Per-token (mu [..., 1], sigma [..., 1]) of x [..., d] that :meth:`decode` needs under
        ``input_norm="layer_norm"`` to return the caller's units; None when ``input_norm="none"``."""
        _, lead, stats = self._flatten_input(x)
        return None if stats is None else (stats[0].reshape(*lead, 1), stats[1].reshape(*lead, 1))

    @property
    def uses_b_enc(self) -> bool:
        """False for top-AFA in the authors' form (``afa_variant="reference"``): pre = W_enc (x - b_dec)."""
        return not (self.config.activation == "topafa" and self.config.afa_variant == "reference")

    def _pre(self, x: Tensor) -> Tensor:
        """Pre-activations [N, n] of normalized inputs x [N, d]."""
        return F.linear(x - self.b_dec, self.W_enc, self.b_enc if self.uses_b_enc else None)

    def _activate(self, x: Tensor) -> tuple[Tensor, Latents]:
        pre = self._pre(x)
        return pre, self.activation.fn(pre, self, x - self.b_dec)

    def _decode_normalized(self, latents: Latents) -> Tensor:
        """x^ [N, d] in normalized units (with b_dec)."""
        if latents.is_sparse:
            return self._sparse_decode(*latents.sparse_parts()) + self.b_dec
        return latents.dense_part() @ self.W_dec + self.b_dec

    def _sparse_decode(self, values: Tensor, indices: Tensor) -> Tensor:
        kernels = _kernels()  # resolves config.kernel ("dense" included) and the HF_SAE_KERNEL override
        if kernels is not None and hasattr(kernels, "sparse_decode"):
            return kernels.sparse_decode(values, indices, self.W_dec, backend=self.config.kernel)
        if self.config.kernel == "dense":
            dense = values.new_zeros(values.shape[0], self.config.n_latents).scatter_add(-1, indices, values)
            return dense @ self.W_dec
        return sparse_decode_reference(values, indices, self.W_dec)

    def _encode_decode(self, x: Tensor, dead_mask: Optional[Tensor]) -> tuple:
        """``(pre, latents, x_hat, e_hat, x_hat4)`` of normalized inputs x [N, d], whichever path computes them:
        the fused sparse step (``hf_sae.kernels.fused.fused_forward``; ``pre`` is None there) when it applies,
        else :meth:`_forward_eager`. x_hat [N, d] with b_dec; e_hat AuxK's decode of the dead latents (None
        when none is dead); x_hat4 the Multi-TopK reconstruction (None unless enabled and training)."""
        kernels = _kernels() if getattr(self.activation, "sparse_fn", None) is not None else None
        fused = kernels.fused_forward(self, x, dead_mask) if kernels is not None and hasattr(kernels, "fused_forward") \
            else None
        if fused is not None:
            return (None, *fused)
        return self._forward_eager(x, dead_mask)

    def _forward_eager(self, x: Tensor, dead_mask: Optional[Tensor]) -> tuple:
        """The plain-torch reference of :meth:`_encode_decode` (dense pre-activations [N, n] in autograd)."""
        pre, latents = self._activate(x)
        x_hat = self._decode_normalized(latents)
        e_hat = self._auxk_decode(pre, dead_mask)
        x_hat4 = None
        if self.config.multi_topk and self.training:
            v4, i4 = pre.topk(4 * self.config.k, dim=-1, sorted=False)
            x_hat4 = self._decode_normalized(Latents(values=v4.relu(), indices=i4))
        return pre, latents, x_hat, e_hat, x_hat4

    # ---------------------------------------------------------------- public API
    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [..., n] (normalized units) of inputs x [..., d] in the caller's units."""
        xn, lead, _ = self._flatten_input(x)
        _, latents = self._activate(xn)
        return latents.to_dense(self.config.n_latents).reshape(*lead, -1)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values [..., w], indices [..., w]) of the active latents; w = k for topk, the batch's widest
        row otherwise (padded slots have value 0)."""
        xn, lead, _ = self._flatten_input(x)
        _, latents = self._activate(xn)
        values, indices = latents.to_sparse().sparse_parts()
        return values.reshape(*lead, -1), indices.reshape(*lead, -1)

    def decode(self, latents: Tensor, indices: Optional[Tensor] = None,
               norm_stats: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """Reconstruction [..., d] in the caller's units from dense latents [..., n], or from
        ``(values [..., w], indices [..., w])`` when ``indices`` is given. Under ``input_norm="layer_norm"``
        the caller's units depend on each token's statistics: pass ``norm_stats=sae.input_norm_stats(x)``
        (``(mu, sigma)`` [..., 1] each)."""
        if self.config.input_norm != "none" and norm_stats is None:
            raise ValueError(f"decode: this SAE normalises every token (input_norm={self.config.input_norm!r}), so "
                             "the reconstruction in the caller's units needs that token's statistics: pass "
                             "norm_stats=sae.input_norm_stats(x), or use sae(x).reconstruction.")
        if indices is not None:
            if latents.shape != indices.shape:
                raise ValueError(f"decode: values {tuple(latents.shape)} and indices {tuple(indices.shape)} differ")
            lead = latents.shape[:-1]
            code = Latents(values=latents.reshape(-1, latents.shape[-1]).to(self.W_dec.dtype),
                           indices=indices.reshape(-1, indices.shape[-1]).long())
        else:
            if latents.shape[-1] != self.config.n_latents:
                raise ValueError(f"decode: dense latents have shape {tuple(latents.shape)}; "
                                 f"expected [..., {self.config.n_latents}]")
            lead = latents.shape[:-1]
            code = Latents(dense=latents.reshape(-1, self.config.n_latents).to(self.W_dec.dtype))
        x_hat = self._decode_normalized(code)
        stats = None
        if norm_stats is not None and self.config.input_norm != "none":
            mu, sigma = (torch.as_tensor(t, dtype=x_hat.dtype, device=x_hat.device).expand(*lead, 1).reshape(-1, 1)
                         for t in norm_stats)
            stats = (mu, sigma)
        return self._denormalize(x_hat, stats).reshape(*lead, self.config.d_in)

    def forward(self, x: Tensor, dead_mask: Optional[Tensor] = None, return_dense: bool = False) -> SAEOutput:
        """Encode, decode and compute every loss term.

        Args:
            x: [..., d] activations in the caller's units.
            dead_mask: optional bool [n], True for latents that are dead (AuxK uses them).
            return_dense: also return dense ``latents`` [..., n] for k-sparse activations.
        """
        cfg = self.config
        xn, lead, stats = self._flatten_input(x)
        pre, latents, x_hat, e_hat, x_hat4 = self._encode_decode(xn, dead_mask)

        # sums of squares as single fused passes over [N, d] (forward and backward)
        total_var = F.mse_loss(xn, xn.mean(0).expand_as(xn), reduction="sum").clamp_min(_EPS)
        err = F.mse_loss(x_hat, xn, reduction="sum")
        fvu = err / total_var
        loss = fvu
        recon = self._denormalize(x_hat, stats)
        if stats is None:  # caller's units = normalized units / s
            mse = err / (xn.numel() * cfg.input_scale ** 2)
        else:
            mse = F.mse_loss(recon, x.reshape(-1, cfg.d_in).to(recon.dtype))

        auxk = self._auxk_from_decoded(e_hat, xn, x_hat)
        if cfg.aux_coef:
            loss = loss + cfg.aux_coef * auxk

        spec = self.activation
        l1 = l0 = None
        if spec.penalty is not None:
            value = spec.penalty(latents, pre, self)
            if spec.penalty_coef == "l1_coef":
                l1 = value
            else:
                l0 = value
            coef = getattr(cfg, str(spec.penalty_coef))
            if coef:
                loss = loss + coef * value
        # decoder-row norms once for the L1 metric and AFA, with a graph only when AFA is in the loss
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(cfg.afa_coef)):
            norms = self.decoder_norms()
            afa = self.afa_loss(latents, xn, norms=norms)
        if l1 is None:  # reported for every activation: l1_penalty's value, with the norms above
            with torch.no_grad():
                weighted = latents.values * norms[latents.indices] if latents.is_sparse else latents.dense * norms
                l1 = weighted.sum(-1).mean()
        if cfg.afa_coef:
            loss = loss + cfg.afa_coef * afa

        multi = None
        if x_hat4 is not None:
            multi = (x_hat4 - xn).square().sum() / total_var
            loss = loss + multi / 8

        out = SAEOutput(
            loss=loss, reconstruction=recon.reshape(*lead, cfg.d_in), fvu=fvu, mse=mse, auxk_loss=auxk,
            l1_loss=l1, l0_loss=l0, afa_loss=afa, multi_topk_fvu=multi,
        )
        if latents.is_sparse:
            out.latent_values = latents.values.reshape(*lead, -1)
            out.latent_indices = latents.indices.reshape(*lead, -1)
        if not latents.is_sparse or return_dense or not self.activation.k_sparse:  # batchtopk: dense on both paths
            out.latents = latents.to_dense(cfg.n_latents).reshape(*lead, cfg.n_latents)
        return out

    # ---------------------------------------------------------------- loss terms
    def auxk_loss(self, pre: Tensor, x: Tensor, x_hat: Tensor, dead_mask: Optional[Tensor]) -> Tensor:
        """AuxK (docs/FORMULAS.md §1): with e = x - x^.detach(), decode the top-k_aux pre-activations among dead
        latents (ReLU, no b_dec) to e^ and return sum||e^ - e||^2 / sum||e - mean(e)||^2.
        0 when no latent is dead; never NaN. Inputs are normalized units: pre [N, n], x, x_hat [N, d]."""
        return self._auxk_from_decoded(self._auxk_decode(pre, dead_mask), x, x_hat)

    def _auxk_decode(self, pre: Tensor, dead_mask: Optional[Tensor]) -> Optional[Tensor]:
        """e^ [N, d]: the decode (no b_dec) of the top-k_aux ReLU'd pre-activations [N, n] among dead latents;
        None when none is dead."""
        k_aux = self._auxk_width(dead_mask)
        if k_aux == 0:
            return None
        assert dead_mask is not None  # k_aux > 0 only with a dead mask
        masked = pre.masked_fill(~dead_mask.to(pre.device), float("-inf"))
        values, indices = masked.topk(k_aux, dim=-1, sorted=False)
        return self._sparse_decode(values.relu(), indices)

    def _auxk_width(self, dead_mask: Optional[Tensor]) -> int:
        """k_aux capped by the number of dead latents; 0 when dead_mask is None or none is dead."""
        if dead_mask is None:
            return 0
        if dead_mask.shape != (self.config.n_latents,) or dead_mask.dtype != torch.bool:
            raise ValueError(f"dead_mask must be a bool tensor of shape [{self.config.n_latents}], "
                             f"got {dead_mask.dtype} {tuple(dead_mask.shape)}")
        return min(self.config.effective_k_aux, int(dead_mask.sum()))

    def _auxk_from_decoded(self, e_hat: Optional[Tensor], x: Tensor, x_hat: Tensor) -> Tensor:
        """AuxK from e_hat [N, d], the decode (no b_dec) of the dead latents' top-k_aux code; 0 for None."""
        if e_hat is None:
            return x.new_zeros(())
        e = x - x_hat.detach()
        denom = F.mse_loss(e, e.mean(0).expand_as(e), reduction="sum").clamp_min(_EPS)
        return torch.nan_to_num(F.mse_loss(e_hat, e, reduction="sum") / denom, nan=0.0, posinf=0.0)

    def afa_loss(self, latents: Latents, x: Tensor, norms: Optional[Tensor] = None) -> Tensor:
        """The AFA loss (docs/FORMULAS.md §3) on normalized inputs x [N, d], in the form ``config.afa_variant``
        names:

        - ``reference`` (the authors' ``sae.py``): mean over tokens of (||z||_2 - ||x||_2)^2, z the raw
          latents, x the SAE's input (uncentred);
        - ``centred``: mean over tokens of (||z~||_2 - ||x - b_dec||_2)^2, z~_i = z_i ||W_dec,i||.

        ``norms``: the decoder-row norms [n] if already computed (else :meth:`decoder_norms`)."""
        z = latents.sparse_parts()[0] if latents.is_sparse else latents.dense_part()
        if self.config.afa_variant == "reference":
            return (z.norm(dim=-1) - x.norm(dim=-1)).square().mean()
        norms = self.decoder_norms() if norms is None else norms
        scale = norms[latents.indices] if latents.is_sparse else norms
        return ((z * scale).norm(dim=-1) - (x - self.b_dec).norm(dim=-1)).square().mean()


SAEConfig.register_for_auto_class()
SparseAutoencoder.register_for_auto_class("AutoModel")

if __name__ == "hf_sae.modeling_sae":  # the installed library, not a copy loaded through trust_remote_code
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(SAEConfig.model_type, SAEConfig, exist_ok=True)
    AutoModel.register(SAEConfig, SparseAutoencoder, exist_ok=True)
