"""SAEConfig: the single source of truth for a sparse autoencoder's shape, activation and loss.

This file is self-contained (it imports only transformers) so that a folder saved by hf_sae can be
loaded with ``trust_remote_code=True`` by people who do not have the package.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu", "topafa")
KERNELS = ("auto", "torch", "triton", "dense")
AFA_VARIANTS = ("reference", "centred")
DEFAULT_K = 32
"""k when none is given, for the activations with a fixed k (top-AFA has none: its k(x) is per token)."""
INPUT_NORMS = ("none", "layer_norm")


def input_scale_for(mean_sq_norm: float, d: int) -> float:
    """The SAE's input scale: the scalar ``s`` with ``E||s x||^2 = d``, i.e. ``sqrt(d / E||x||^2)``.

    Args:
        mean_sq_norm: ``E||x||^2`` in the activation's units squared (finite, > 0).
        d: the input width.
    """
    if not (isinstance(d, int) and d > 0):
        raise ValueError(f"d must be a positive int, got {d!r}.")
    if not (isinstance(mean_sq_norm, (int, float)) and math.isfinite(mean_sq_norm) and mean_sq_norm > 0):
        raise ValueError(f"cannot derive an input scale from E||x||^2 = {mean_sq_norm!r}: the activations are all "
                         "zero or not finite")
    return math.sqrt(d / mean_sq_norm)


def _num(value) -> bool:
    """A finite real number (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(cond: bool, field: str, value, allowed: str) -> None:
    if not cond:
        raise ValueError(f"SAEConfig.{field}={value!r} is invalid: {field} must be {allowed}.")


def _check_settings(*, n_latents, activation, k, k_aux, aux_coef, dead_tokens_threshold, multi_topk, l1_coef, l0_coef,
                    afa_coef, afa_variant, jumprelu_init_threshold, jumprelu_bandwidth, batchtopk_threshold_momentum,
                    input_scale, input_norm, input_norm_eps, input_norm_unbiased, hook_point, base_model, kernel,
                    training_info, d_in) -> None:
    """Raise a ValueError naming the first :class:`SAEConfig` argument that is out of range (sizes resolved)."""
    _check(activation in ACTIVATIONS, "activation", activation, f"one of {ACTIVATIONS}")
    if activation in ("topk", "batchtopk"):
        _check(_int(k) and 0 < k <= n_latents, "k", k, f"an integer in [1, n_latents={n_latents}]")
    elif activation == "topafa":
        _check(k is None or (_int(k) and 0 < k <= n_latents), "k", k,
               f"None (no cap) or an integer in [1, n_latents={n_latents}] for topafa")
    if k_aux is not None:
        _check(_int(k_aux) and 0 < k_aux <= n_latents, "k_aux", k_aux,
               f"None or an integer in [1, n_latents={n_latents}]")
    for name, value in (("aux_coef", aux_coef), ("l1_coef", l1_coef), ("l0_coef", l0_coef),
                        ("afa_coef", afa_coef)):
        _check(_num(value) and value >= 0, name, value, "a finite number >= 0")
    _check(_int(dead_tokens_threshold) and dead_tokens_threshold > 0, "dead_tokens_threshold",
           dead_tokens_threshold, "a positive integer (tokens)")
    _check(_num(jumprelu_init_threshold) and jumprelu_init_threshold > 0, "jumprelu_init_threshold",
           jumprelu_init_threshold, "a finite number > 0")
    _check(_num(jumprelu_bandwidth) and jumprelu_bandwidth > 0, "jumprelu_bandwidth", jumprelu_bandwidth,
           "a finite number > 0")
    _check(_num(batchtopk_threshold_momentum) and 0 <= batchtopk_threshold_momentum < 1,
           "batchtopk_threshold_momentum", batchtopk_threshold_momentum, "in [0, 1)")
    _check(_num(input_scale) and 1e-12 < input_scale < 1e12, "input_scale", input_scale,
           "a finite number in (1e-12, 1e12) (1.0 = identity; sqrt(d / E||x||^2) normalises)")
    _check(input_norm in INPUT_NORMS, "input_norm", input_norm, f"one of {INPUT_NORMS}")
    _check(_num(input_norm_eps) and input_norm_eps > 0, "input_norm_eps", input_norm_eps,
           "a finite number > 0 (a constant token has sigma = 0)")
    _check(isinstance(input_norm_unbiased, bool), "input_norm_unbiased", input_norm_unbiased, "True or False")
    _check(input_norm == "none" or d_in > 1, "input_norm", input_norm, "'none' when d_in = 1")
    _check(kernel in KERNELS, "kernel", kernel, f"one of {KERNELS}")
    _check(afa_variant in AFA_VARIANTS, "afa_variant", afa_variant, f"one of {AFA_VARIANTS}")
    _check(isinstance(multi_topk, bool), "multi_topk", multi_topk, "True or False")
    _check(hook_point is None or (isinstance(hook_point, str) and hook_point.strip() != ""), "hook_point",
           hook_point, "None or a hook point name such as 'layers.6.resid_post'")
    _check(base_model is None or isinstance(base_model, str), "base_model", base_model, "None or a string")
    _check(training_info is None or isinstance(training_info, dict), "training_info", training_info,
           "None or a dict")
    if multi_topk:
        _check(activation == "topk" and 4 * k <= n_latents, "multi_topk", multi_topk,
               "used only with activation='topk' and 4*k <= n_latents")


class SAEConfig(PretrainedConfig):
    r"""Configuration of a :class:`~hf_sae.SparseAutoencoder`.

    Shapes: inputs are vectors of size ``d_in`` (one token's activation at ``hook_point``); the
    dictionary has ``n_latents`` rows (give either ``n_latents`` or ``expansion_factor``, then
    ``n_latents = expansion_factor * d_in``).

    Args:
        d_in: input width d (e.g. 576 for SmolLM2-135M's residual stream).
        n_latents: number of latents n. Defaults to ``expansion_factor * d_in``.
        expansion_factor: n / d, used when ``n_latents`` is not given (default 8).
        activation: one of ``topk``, ``batchtopk``, ``relu``, ``jumprelu``, ``topafa``.
        k: active latents per token for ``topk``; average active latents per token for ``batchtopk``
            (default 32 for both); an optional compute cap on k(x) for ``topafa`` (default ``None`` = no
            cap, the authors' rule k(x) <= n - 1); unused for relu/jumprelu.
        k_aux: latents used by the AuxK loss (default ``d_in // 2``, capped by the number of dead latents).
        aux_coef: weight alpha of the AuxK loss (paper: 1/32). 0 disables it.
        dead_tokens_threshold: a latent that has not fired for this many training tokens is dead (paper: 10M).
        multi_topk: also penalise the reconstruction with ``4k`` latents (Gao et al. Multi-TopK), weight 1/8.
        l1_coef: weight of the decoder-norm-weighted L1 penalty (``relu``).
        l0_coef: weight of the L0 penalty (``jumprelu``, with the straight-through threshold gradient).
        afa_coef: weight of the AFA loss (any activation may use it; paper sweeps 1/128 .. 1/16). Its form
            is set by ``afa_variant``.
        afa_variant: ``reference`` (default) = the top-AFA authors' code (SewoongLee/top-afa-sae, ``sae.py``):
            AFA loss mean((||z||_2 - ||x||_2)^2) on the raw latents z and the SAE's (preprocessed,
            uncentred) input x, and ``topafa`` pre-activations without b_enc (W_enc (x - b_dec); b_enc
            stays 0). ``centred`` = hf_sae's earlier form: loss mean((||z * ||W_dec,i|| || - ||x - b_dec||)^2)
            and ``topafa`` pre-activations with b_enc. Both agree with unit decoder rows, b_dec = 0, b_enc = 0.
        jumprelu_init_threshold: initial JumpReLU threshold theta (normalized units).
        jumprelu_bandwidth: width epsilon of the rectangle kernel in the threshold pseudo-gradient.
        batchtopk_threshold_momentum: EMA momentum of the inference threshold estimated during training.
        input_scale: fixed scalar s applied to inputs (x -> s x) and undone on outputs; chosen so that
            E||s x||^2 = d_in. 1.0 is the identity. Applied after ``input_norm``.
        input_norm: per-token input normalisation, applied before ``input_scale`` and undone on the
            reconstruction. ``"none"``; or ``"layer_norm"``: ``x -> (x - mu) / (sigma + eps)`` with mu, sigma
            the mean and standard deviation of the token's d_in entries, undone as ``x^ sigma + mu``
            (sigma, not sigma + eps, exactly as OpenAI's sparse_autoencoder ``LN``, SAELens
            ``normalize_activations="layer_norm"`` and the top-AFA / BatchTopK ``input_unit_norm`` do).
        input_norm_eps: the eps of ``layer_norm``, added to sigma (not under the square root); 1e-5 in all
            three sources.
        input_norm_unbiased: sigma with Bessel's correction (divide by d_in - 1; ``torch.std``'s default,
            used by all three sources) or without (divide by d_in).
        hook_point: where the inputs come from, e.g. ``layers.6.resid_post``.
        base_model: the LM the SAE was trained on (Hub id or path).
        kernel: implementation of the sparse decode/backward: ``auto`` (Triton on GPU, fused torch on
            CPU), ``torch``, ``triton`` or ``dense`` (reference; materialises [B, n]).
        training_info: free-form record written by the trainer (dataset, tokens trained, final metrics).
    """

    model_type = "hf_sae"

    def __init__(
        self,
        d_in: int = 576,
        n_latents: int | None = None,
        expansion_factor: int | None = None,
        activation: str = "topk",
        k: int | None = None,
        k_aux: int | None = None,
        aux_coef: float = 1.0 / 32,
        dead_tokens_threshold: int = 10_000_000,
        multi_topk: bool = False,
        l1_coef: float = 0.0,
        l0_coef: float = 0.0,
        afa_coef: float = 0.0,
        afa_variant: str = "reference",
        jumprelu_init_threshold: float = 1e-3,
        jumprelu_bandwidth: float = 1e-3,
        batchtopk_threshold_momentum: float = 0.99,
        input_scale: float = 1.0,
        input_norm: str = "none",
        input_norm_eps: float = 1e-5,
        input_norm_unbiased: bool = True,
        hook_point: str | None = None,
        base_model: str | None = None,
        kernel: str = "auto",
        training_info: dict | None = None,
        **kwargs,
    ):
        _check(_int(d_in) and d_in > 0, "d_in", d_in, "a positive integer")
        if n_latents is None:
            factor = 8 if expansion_factor is None else expansion_factor
            _check(_num(factor) and factor > 0, "expansion_factor", factor, "a finite number > 0")
            n_latents = int(round(factor * d_in))
            _check(n_latents > 0, "expansion_factor", factor, "large enough that expansion_factor * d_in >= 1")
        _check(_int(n_latents) and n_latents > 0, "n_latents", n_latents, "a positive integer")
        if k is None and activation != "topafa":
            k = DEFAULT_K
        _check_settings(
            n_latents=n_latents, activation=activation, k=k, k_aux=k_aux, aux_coef=aux_coef,
            dead_tokens_threshold=dead_tokens_threshold, multi_topk=multi_topk, l1_coef=l1_coef, l0_coef=l0_coef,
            afa_coef=afa_coef, afa_variant=afa_variant, jumprelu_init_threshold=jumprelu_init_threshold,
            jumprelu_bandwidth=jumprelu_bandwidth, batchtopk_threshold_momentum=batchtopk_threshold_momentum,
            input_scale=input_scale, input_norm=input_norm, input_norm_eps=input_norm_eps,
            input_norm_unbiased=input_norm_unbiased, hook_point=hook_point, base_model=base_model, kernel=kernel,
            training_info=training_info, d_in=d_in,
        )

        self.d_in = d_in
        self.n_latents = n_latents
        self.expansion_factor = n_latents / d_in
        self.activation = activation
        self.k = k
        self.k_aux = k_aux
        self.aux_coef = float(aux_coef)
        self.dead_tokens_threshold = dead_tokens_threshold
        self.multi_topk = bool(multi_topk)
        self.l1_coef = float(l1_coef)
        self.l0_coef = float(l0_coef)
        self.afa_coef = float(afa_coef)
        self.afa_variant = afa_variant
        self.jumprelu_init_threshold = float(jumprelu_init_threshold)
        self.jumprelu_bandwidth = float(jumprelu_bandwidth)
        self.batchtopk_threshold_momentum = float(batchtopk_threshold_momentum)
        self.input_scale = float(input_scale)
        self.input_norm = input_norm
        self.input_norm_eps = float(input_norm_eps)
        self.input_norm_unbiased = input_norm_unbiased
        self.hook_point = hook_point
        self.base_model = base_model
        self.kernel = kernel
        self.training_info = dict(training_info or {})
        super().__init__(**kwargs)

    @property
    def effective_k_aux(self) -> int:
        """k_aux before capping by the number of dead latents (default d_in // 2)."""
        return self.k_aux if self.k_aux is not None else max(1, min(self.d_in // 2, self.n_latents))
