"""Training arguments: one dataclass, usable from Python, the command line, JSON or YAML.

Everything is measured in tokens (one token = one activation vector at one hook point):
``train_tokens``, ``batch_size``, ``eval_every_tokens``, ``checkpoint_every_tokens`` and
``dead_tokens_threshold``. ``batch_size`` is the *global* number of tokens per optimizer step;
it is split over processes and gradient-accumulation steps, so one process and N processes run
the same number of steps over the same number of tokens.

Command line (the options transformers' ``HfArgumentParser`` would build, made here without importing
transformers, which imports torch: ``hf-sae train --help`` stays fast)::

    python scripts/train.py --hook_points layers.6.resid_post --train_tokens 2000000 --k 32
    python scripts/train.py run.yaml                      # all values from a file
    python scripts/train.py --config run.yaml --lr 3e-4   # a file, then overrides
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from ..placement import PLACEMENT_HELP, check_device_map, parse_max_memory
from .arguments_cli import _FALSE, _TRUE, add_field_options
from .arguments_cli import sae_source as _sae_source

_K_SPARSE = ("topk", "batchtopk", "topafa")
MIN_MICRO_BATCH = 8
"""Fewest tokens per micro-batch: FVU divides by the batch's variance, which one token does not have."""

# Fields that may differ between a run and its resumption (they do not change the weights).
RESUME_FREE_FIELDS = frozenset({
    "output_dir", "resume", "overwrite_output_dir", "log_with", "log_every_steps", "progress_bar",
    "save_total_limit", "checkpoint_every_tokens", "eval_every_tokens", "eval_tokens", "eval_activations",
    "run_name", "lm_batch_size", "plot_report", "tp_size", "device_map", "max_memory",
    "offload_folder", "streaming",
})


def _sae_default(name: str):
    """The default of an SAE hyperparameter: :class:`~hf_sae.SAEConfig` is its single source of truth."""
    return _sae_source()[1][name]


_ACTIVATIONS, _INPUT_NORMS, _KERNELS = (_sae_source()[0][n] for n in ("ACTIVATIONS", "INPUT_NORMS", "KERNELS"))


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class SAETrainingArguments:
    """All settings of an SAE training run (see the module docstring for units).

    The recipe switches of Gao et al. (docs/FORMULAS.md §1) are on by default for the TopK family:
    ``tied_init``, ``auxk``, ``b_dec_init="geometric_median"`` (zeros for top-AFA), ``normalize_input``,
    ``normalize_decoder``, ``project_decoder_grad``, LR scaled by 1/sqrt(n / 2^14), warmup.
    """

    # ------------------------------------------------------------------ data
    hook_points: list[str] = _help(
        "Hook point(s) to train one SAE each on, e.g. layers.6.resid_post. Several hook points share one "
        "LM pass when streaming live.", default_factory=lambda: ["layers.6.resid_post"])
    model_name_or_path: str = _help(
        "Language model producing the activations ('smollm2-135m' = the embedded offline SmolLM2-135M).",
        default="smollm2-135m")
    activations: Optional[str] = _help(
        "Train from stored activations instead of a live model: a cache folder written by "
        "hf_sae.data.cache (or one pushed to the Hub: hf://datasets/org/name[@rev]), or a .safetensors/.pt file "
        "holding one [N, d] tensor per hook point "
        "(key = hook point). None = stream live from model_name_or_path over `dataset`.", default=None)
    streaming: bool = _help(
        "Read the --activations cache (a folder or hf://datasets/...) through datasets streaming "
        "(load_dataset(..., streaming=True)): no shard is written to local disk, and only the shards of the "
        "current shuffle groups are held in memory. Same batches, same SAE as without.",
        default=False)
    eval_activations: Optional[str] = _help(
        "Held-out activations (same formats as --activations). Default: the validation split of `dataset` "
        "(live) or of the cache when it has one.", default=None)
    dataset: str = _help("Text corpus for live streaming: 'default' (the embedded KJV corpus), a local file or "
                         "folder, a save_to_disk folder, or a datasets name ('name' or 'name:config').",
                         default="default")
    context_length: int = _help("Tokens per LM window when streaming live.", default=256)
    lm_batch_size: int = _help("Windows per LM forward when streaming live.", default=8)
    shuffle_buffer_tokens: int = _help("Shuffle buffer of the live stream in tokens (0 = stream order).",
                                       default=65536)
    device_map: Optional[str] = _help(PLACEMENT_HELP["device_map"] + " (one process only).", default=None)
    max_memory: Optional[str] = _help(PLACEMENT_HELP["max_memory"] + ".", default=None)
    offload_folder: Optional[str] = _help(PLACEMENT_HELP["offload_folder"] + ".", default=None)
    # ------------------------------------------------------------------ SAE
    activation: str = _help(f"SAE activation: one of {_ACTIVATIONS}.", default=_sae_default("activation"))
    n_latents: Optional[int] = _help("Number of latents n (default expansion_factor * d).", default=None)
    expansion_factor: int = _help("n / d when n_latents is not given.", default=8)
    k: Optional[int] = _help("Active latents per token (topk/batchtopk; default 32). For topafa an optional "
                             "cap on k(x); default none (k(x) <= n - 1, the authors' rule).", default=_sae_default("k"))
    k_aux: Optional[int] = _help("Latents in the AuxK loss (default d/2).", default=_sae_default("k_aux"))
    aux_coef: float = _help("Weight of the AuxK loss (paper: 1/32).", default=_sae_default("aux_coef"))
    dead_tokens_threshold: int = _help("A latent is dead after this many tokens without firing.",
                                       default=_sae_default("dead_tokens_threshold"))
    multi_topk: bool = _help("Multi-TopK: also penalise the reconstruction with 4k latents.",
                             default=_sae_default("multi_topk"))
    l1_coef: float = _help("L1 coefficient (relu).", default=_sae_default("l1_coef"))
    l0_coef: float = _help("L0 coefficient (jumprelu).", default=_sae_default("l0_coef"))
    afa_coef: float = _help("AFA loss coefficient (any activation; paper sweeps 1/128..1/16).",
                            default=_sae_default("afa_coef"))
    afa_variant: str = _help("AFA loss / top-AFA form: 'reference' (the authors' code: mean((||z|| - ||x||)^2), "
                             "top-AFA without b_enc) or 'centred' (decoder-norm-weighted ||z~|| vs ||x - b_dec||, "
                             "top-AFA with b_enc).", default=_sae_default("afa_variant"))
    jumprelu_init_threshold: float = _help("Initial JumpReLU threshold (normalized units).",
                                           default=_sae_default("jumprelu_init_threshold"))
    jumprelu_bandwidth: float = _help("JumpReLU pseudo-gradient bandwidth.", default=_sae_default("jumprelu_bandwidth"))
    kernel: str = _help("Sparse decode implementation: auto, torch, triton or dense.", default=_sae_default("kernel"))
    input_norm: str = _help("Per-token input normalisation, undone on the output: none, or layer_norm "
                            "((x - mean) / (std + 1e-5) per token, as OpenAI's and top-AFA's SAEs).",
                            default=_sae_default("input_norm"))
    # ------------------------------------------------------------------ recipe switches
    tied_init: bool = _help("Initialise W_enc = W_dec (transposed map); off = independent random W_enc.",
                            default=True)
    auxk: Optional[bool] = _help("Use the AuxK dead-latent loss (default: on for topk/batchtopk/topafa).",
                                 default=None)
    b_dec_init: Optional[str] = _help(
        "b_dec initialisation: geometric_median, mean or zeros (default: zeros for top-AFA in the authors' form "
        "--afa_variant reference, as their code; geometric_median otherwise).", default=None)
    normalize_input: bool = _help("Scale inputs by a fixed scalar so that E||x||^2 = d (estimated from data).",
                                  default=True)
    normalize_decoder: bool = _help("Renormalise decoder rows to unit norm after every step.", default=True)
    project_decoder_grad: bool = _help("Remove the decoder-gradient component parallel to each row before "
                                       "every step.", default=True)
    init_tokens: int = _help("Tokens sampled for the b_dec / input-scale initialisation.", default=16384)
    # ------------------------------------------------------------------ optimisation
    train_tokens: int = _help("Total training tokens over all processes (rounded up to whole steps).",
                              default=10_000_000)
    batch_size: int = _help("Tokens per optimizer step, over all processes and accumulation steps.", default=4096)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    lr: Optional[float] = _help("Adam learning rate (default 2e-4 / sqrt(n / 2^14)).", default=None)
    lr_schedule: str = _help("constant or cosine (after the warmup).", default="constant")
    lr_warmup_tokens: Optional[int] = _help("Linear LR warmup length (default: 5 percent of train_tokens).",
                                            default=None)
    lr_min_ratio: float = _help("Final LR / peak LR of the cosine schedule.", default=0.0)
    adam_beta1: float = _help("Adam beta1.", default=0.9)
    adam_beta2: float = _help("Adam beta2.", default=0.999)
    adam_epsilon: float = _help("Adam epsilon (Gao et al.: 6.25e-10).", default=6.25e-10)
    max_grad_norm: float = _help("Gradient clipping (global L2 norm per SAE); 0 disables.", default=1.0)
    tp_size: int = _help(
        "Latent (tensor) parallelism: each SAE's latents are split over tp_size processes "
        "(hf_sae.parallel); the processes form (processes / tp_size) data-parallel replicas. "
        "1 = plain data parallelism.",
        default=1,
    )
    mixed_precision: str = _help("auto (bf16 on a GPU that supports it, else fp32), no, or bf16.", default="auto")
    seed: int = _help("Seed of the initialisation and of the data order.", default=0)
    # ------------------------------------------------------------------ evaluation, checkpoints, logging
    output_dir: str = _help("Where SAEs, checkpoints, logs and reports go.", default="sae_out")
    overwrite_output_dir: bool = _help(
        "Start afresh even if output_dir holds checkpoints (deletes them).", default=False
    )
    resume: bool = _help("Continue from the newest valid checkpoint in output_dir.", default=False)
    eval_every_tokens: int = _help("Held-out evaluation period in tokens (0 = only at the end).", default=1_000_000)
    eval_tokens: int = _help("Held-out tokens per evaluation.", default=32768)
    checkpoint_every_tokens: int = _help("Checkpoint period in tokens (0 = only at the end).", default=5_000_000)
    save_total_limit: int = _help("Checkpoints kept (oldest deleted first; >= 1).", default=2)
    log_every_steps: int = _help("Training-metric logging period in optimizer steps.", default=10)
    log_with: list[str] = _help(
        "Trackers: jsonl, tensorboard, wandb, none, or auto (= jsonl + tensorboard when "
        "installed + wandb when installed and WANDB_API_KEY/WANDB_MODE is set).",
        default_factory=lambda: ["auto"],
    )
    run_name: str = _help("Tracker run name.", default="sae")
    progress_bar: bool = _help("Show a progress bar with tokens/s and ETA.", default=True)
    plot_report: bool = _help("Draw training_curves.png beside training_report.json.", default=True)

    def __post_init__(self):
        """Coerce values given as strings (YAML's ``1e-3``, env-style ``"true"``) to the field's type and check
        every field on its own, so a bad value fails at construction with a message naming the flag."""
        for name, annotation in _field_types().items():
            setattr(self, name, _coerce(name, annotation, getattr(self, name)))
        self._check_fields()

    # ------------------------------------------------------------------ derived values
    @property
    def use_auxk(self) -> bool:
        """Whether AuxK is used (``auxk`` or, when None, True for the k-sparse activations)."""
        return (self.activation in _K_SPARSE) if self.auxk is None else bool(self.auxk)

    @property
    def b_dec_init_method(self) -> str:
        """The b_dec initialisation used: ``b_dec_init``, or when None ``zeros`` for top-AFA with
        ``afa_variant="reference"`` and ``geometric_median`` otherwise. The authors start b_dec at 0; their
        AFA loss targets ||x|| while k(x) matches ||x - b_dec||, so a geometric-median b_dec leaves a gap
        (||x|| - ||x - b_dec||)^2 the loss cannot close, and training shrinks L0 towards 1
        (benchmarks/RESULTS_afa.md)."""
        if self.b_dec_init is not None:
            return self.b_dec_init
        return "zeros" if self.activation == "topafa" and self.afa_variant == "reference" else "geometric_median"

    @property
    def warmup_tokens(self) -> int:
        """LR warmup length in tokens."""
        return int(0.05 * self.train_tokens) if self.lr_warmup_tokens is None else self.lr_warmup_tokens

    def to_dict(self) -> dict:
        """A JSON-serializable dict of every field."""
        return asdict(self)

    def to_json_file(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    def sae_config_kwargs(self, d_in: int) -> dict:
        """Keyword arguments of :class:`~hf_sae.SAEConfig` for an input width ``d_in``."""
        kw = dict(
            d_in=d_in,
            activation=self.activation,
            k=self.k,
            k_aux=self.k_aux,
            aux_coef=self.aux_coef if self.use_auxk else 0.0,
            dead_tokens_threshold=self.dead_tokens_threshold,
            multi_topk=self.multi_topk,
            l1_coef=self.l1_coef,
            l0_coef=self.l0_coef,
            afa_coef=self.afa_coef,
            afa_variant=self.afa_variant,
            jumprelu_init_threshold=self.jumprelu_init_threshold,
            jumprelu_bandwidth=self.jumprelu_bandwidth,
            kernel=self.kernel,
            input_norm=self.input_norm,
        )
        if self.n_latents is not None:
            kw["n_latents"] = self.n_latents
        else:
            kw["expansion_factor"] = self.expansion_factor
        return kw

    def _bad(self, name: str, why: str):
        raise ValueError(f"--{name}={getattr(self, name)!r} is invalid: {why}")

    def _check_fields(self) -> None:
        """Field-by-field checks (no files, no processes): ``ValueError`` naming the flag and the fix."""
        self._check_run_fields()
        self._check_sae_fields()
        self._check_optimization_fields()

    def _check_run_fields(self) -> None:
        """Hook points, names, and the token and step counts."""
        bad = self._bad
        if not self.hook_points or not all(isinstance(h, str) and h.strip() and " " not in h for h in self.hook_points):
            bad("hook_points", "give at least one hook point name, e.g. --hook_points layers.6.resid_post")
        if len(set(self.hook_points)) != len(self.hook_points):
            bad("hook_points", "a hook point is listed twice")
        for name in ("model_name_or_path", "dataset", "output_dir", "run_name"):
            if not getattr(self, name).strip():
                bad(name, "must be a non-empty string")
        if self.activation not in _ACTIVATIONS:
            bad("activation", f"choose one of {_ACTIVATIONS}")
        for name in (
            "train_tokens",
            "batch_size",
            "gradient_accumulation_steps",
            "context_length",
            "lm_batch_size",
            "init_tokens",
            "expansion_factor",
            "dead_tokens_threshold",
            "save_total_limit",
            "log_every_steps",
            "tp_size",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be a positive integer")
        for name in ("eval_every_tokens", "eval_tokens", "checkpoint_every_tokens", "shuffle_buffer_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                bad(name, "must be an integer >= 0 (0 disables)")

    def _check_sae_fields(self) -> None:
        """The SAE's hyperparameters (the checks that need no other field first)."""
        bad = self._bad
        if self.n_latents is not None and self.n_latents <= 0:
            bad("n_latents", "must be a positive integer (or omit it and set --expansion_factor)")
        if self.k is not None and self.k <= 0:
            bad("k", "must be a positive integer (omit it for the default: 32, or no cap for topafa)")
        if self.afa_variant not in ("reference", "centred"):
            bad("afa_variant", "must be 'reference' (the top-AFA authors' form) or 'centred'")
        if (
            self.n_latents is not None
            and self.activation in _K_SPARSE
            and self.k is not None
            and self.k > self.n_latents
        ):
            bad("k", f"k must be <= n_latents={self.n_latents}: lower --k or raise --n_latents")
        if self.k_aux is not None and self.k_aux <= 0:
            bad("k_aux", "must be a positive integer (or omit it for d/2)")
        for name in ("aux_coef", "l1_coef", "l0_coef", "afa_coef"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, "must be a finite number >= 0")
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth", "adam_epsilon"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                bad(name, "must be a finite number > 0")
        if self.multi_topk and self.activation != "topk":
            bad("multi_topk", "Multi-TopK needs --activation topk")
        if self.kernel not in _KERNELS:
            bad("kernel", f"choose one of {_KERNELS}")
        if self.input_norm not in _INPUT_NORMS:
            bad("input_norm", f"choose one of {_INPUT_NORMS}")

    def _check_optimization_fields(self) -> None:
        """Batch, parallelism, learning-rate schedule, Adam, precision and trackers."""
        bad = self._bad
        if self.batch_size < MIN_MICRO_BATCH * self.gradient_accumulation_steps:
            bad(
                "batch_size",
                f"must give at least {MIN_MICRO_BATCH} tokens per micro-batch (FVU divides by the "
                f"batch's variance); raise --batch_size to >= "
                f"{MIN_MICRO_BATCH * self.gradient_accumulation_steps}",
            )
        from ..data.hub_cache import is_hub_cache

        if self.streaming and not (self.activations and (os.path.isdir(self.activations)
                                                         or is_hub_cache(self.activations))):
            bad("streaming", "streams an activation cache: give --activations a cache folder or hf://datasets/...")
        if self.device_map is not None and self.activations is not None:
            bad("device_map", "places the live LM, but --activations trains without one: drop --device_map")
        for name in ("max_memory", "offload_folder"):
            if getattr(self, name) is not None and self.device_map is None:
                bad(name, "needs --device_map (e.g. --device_map auto)")
        check_device_map(self.device_map)  # a bad --device_map / --max_memory fails here, before any work
        parse_max_memory(self.max_memory)
        if self.tp_size > 1:
            if self.n_latents is not None and self.n_latents % self.tp_size:
                bad("n_latents", f"must be a multiple of --tp_size={self.tp_size}")
        if self.train_tokens < self.batch_size:
            bad("train_tokens", f"must be >= batch_size={self.batch_size} (at least one step)")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be a finite number > 0 (or omit it for 2e-4 / sqrt(n / 2^14))")
        if self.lr_schedule not in ("constant", "cosine"):
            bad("lr_schedule", "choose constant or cosine")
        if self.lr_warmup_tokens is not None and not (0 <= self.lr_warmup_tokens <= self.train_tokens):
            bad("lr_warmup_tokens", f"must be in [0, train_tokens={self.train_tokens}]")
        if not 0 <= self.lr_min_ratio <= 1:
            bad("lr_min_ratio", "must be in [0, 1]")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1)")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            bad("max_grad_norm", "must be a finite number >= 0 (0 disables clipping)")
        if self.b_dec_init not in (None, "geometric_median", "mean", "zeros"):
            bad("b_dec_init", "choose geometric_median, mean or zeros")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            bad("mixed_precision", "choose auto, no or bf16")
        unknown = [t for t in self.log_with if t not in ("auto", "jsonl", "tensorboard", "wandb", "none")]
        if unknown:
            bad("log_with", f"unknown tracker(s) {unknown}; choose from auto, jsonl, tensorboard, wandb, none")

    def validate(self, num_processes: Optional[int] = 1) -> None:
        """Raise ``ValueError`` naming the argument to change, before any work starts.

        Repeats the field checks (the fields may have been changed since construction), then checks what
        depends on the environment: files, installed trackers, and with ``num_processes`` that
        ``batch_size`` splits evenly over processes and accumulation steps (None = not known yet)."""
        for name, annotation in _field_types().items():
            setattr(self, name, _coerce(name, annotation, getattr(self, name)))
        self._check_fields()

        def bad(name, why):
            raise ValueError(f"--{name}={getattr(self, name)!r} is invalid: {why}")

        if self.device_map is not None and num_processes is not None and num_processes > 1:
            bad("device_map", f"spreads one LM over the devices of one process, but {num_processes} processes run: "
                "cache the activations first (hf-sae cache --device_map auto ...) and train from them with "
                "--activations on any number of processes")
        if self.tp_size > 1 and num_processes is not None and num_processes % self.tp_size:
            bad(
                "tp_size",
                f"must divide the number of processes ({num_processes}); launch a multiple of {self.tp_size} processes",
            )
        # the data is split over data-parallel replicas: processes / tp_size (the tp_size processes of one
        # replica share its micro-batches)
        split = (
            (num_processes or 1) // self.tp_size * self.gradient_accumulation_steps
            if num_processes
            else self.gradient_accumulation_steps
        )
        if self.batch_size % split:
            bad(
                "batch_size",
                f"must be divisible by data-parallel replicas x gradient_accumulation_steps = "
                f"{split // self.gradient_accumulation_steps} x {self.gradient_accumulation_steps} "
                f"= {split} ({num_processes} processes / tp_size {self.tp_size})",
            )
        if self.batch_size < MIN_MICRO_BATCH * split:
            bad(
                "batch_size",
                f"gives {self.batch_size // split} tokens per micro-batch over {split} "
                f"replicas x accumulation steps; raise it to >= {MIN_MICRO_BATCH * split}",
            )
        import importlib.util

        if "wandb" in self.log_with and importlib.util.find_spec("wandb") is None:
            bad("log_with", "wandb is not installed: `pip install wandb`, or drop wandb from --log_with")
        if "tensorboard" in self.log_with and not (
            importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
        ):
            bad("log_with", "tensorboard is not installed: `pip install tensorboard`, or use --log_with auto/jsonl")
        for path_field in ("activations", "eval_activations"):
            p = getattr(self, path_field)
            if p is not None and not p.startswith("hf://datasets/") and not os.path.exists(p):
                raise FileNotFoundError(
                    f"--{path_field} {p!r} does not exist; give a cache folder or a "
                    ".safetensors/.pt activation file, or omit it to stream live"
                )
        # The SAE config checks the remaining fields (coefficients, k vs n_latents); with an expansion
        # factor n depends on d, so the trainer checks again once d is known (still before any work).
        if self.n_latents is not None:
            self.sae_config(d_in=self.n_latents)

    def sae_config(self, d_in: int, **extra):
        """The :class:`~hf_sae.SAEConfig` of one SAE with input width ``d_in``; a bad combination raises
        ``ValueError`` naming the training argument to change."""
        from ..configuration_sae import SAEConfig

        try:
            return SAEConfig(**self.sae_config_kwargs(d_in=d_in), **extra)
        except ValueError as e:
            msg = str(e).replace("SAEConfig.", "--")
            raise ValueError(f"{msg} (change the training argument of that name; inputs have d={d_in})") from None


@functools.cache
def _field_types() -> dict:
    """The fields' resolved types (``dataclasses.Field.type`` is a string here, and HfArgumentParser rewrites
    it in place, so it cannot be relied on)."""
    import typing

    return typing.get_type_hints(SAETrainingArguments)




def _coerce(name: str, annotation, value):
    """``value`` converted to the field's annotated type (``int``, ``float``, ``bool``, ``str``,
    ``list[str]``, each maybe ``Optional``), or ``ValueError`` naming ``--name``."""
    import typing

    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) is typing.Union and type(None) in args
    if optional:
        annotation = next(a for a in args if a is not type(None))
    base = {int: "int", float: "float", bool: "bool", str: "str"}.get(annotation) or (
        "list[str]" if typing.get_origin(annotation) is list else str(annotation)
    )

    def bad(why):
        return ValueError(f"--{name}={value!r} is invalid: {why}")

    if value is None:
        if optional:
            return None
        raise bad(f"a value is required ({base})")
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null"):
        return None
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("must be true or false")
    if base == "int":
        if isinstance(value, bool):
            raise bad("must be an integer, not a boolean")
        if isinstance(value, str):
            try:
                value = float(value.strip()) if any(c in value for c in ".eE") else int(value.strip())
            except ValueError:
                raise bad("must be an integer") from None
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise bad("must be a (finite) integer")
            value = int(value)
        if not isinstance(value, int):
            raise bad("must be an integer")
        return value
    if base == "float":
        if isinstance(value, bool):
            raise bad("must be a number, not a boolean")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad("must be a number") from None
        if not isinstance(value, (int, float)):
            raise bad("must be a number")
        value = float(value)
        if math.isnan(value):
            raise bad("must be a number, not NaN")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise bad("must be a string")
        return value
    if base == "list[str]":
        if isinstance(value, str):
            value = [s for s in value.replace(",", " ").split() if s]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("must be a list of strings")
        return list(value)
    return value


def _load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(f) or {}
        elif path.endswith(".json"):
            data = json.load(f)
        else:
            raise ValueError(f"config file {path!r}: use a .json, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of argument names to values")
    known = {f.name for f in fields(SAETrainingArguments)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"config file {path!r} has unknown keys {unknown}; valid keys are the fields of "
            f"SAETrainingArguments (see --help)"
        )
    return data


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every :class:`SAETrainingArguments` field as a flag (``arguments_cli.add_field_options``; each also
    spelt with dashes), plus ``--config PATH`` and an optional positional ``.json``/``.yaml`` file, to ``parser``.

    Defaults are suppressed in the namespace, so :func:`arguments_from_namespace` can tell flags given
    on the command line (which override the file) from defaults.
    """
    from ..cli import add_flag_aliases

    options = add_field_options(argparse.ArgumentParser(add_help=False), SAETrainingArguments, _field_types())
    for action in options._actions:
        action.help_default, action.default = action.default, argparse.SUPPRESS  # shown by hf_sae.cli's --help
        parser._add_action(action)
    parser.add_argument("--config", default=None, help="JSON or YAML file of arguments (flags override it)")
    parser.add_argument("config_file", nargs="?", default=None, help="optional JSON or YAML file of arguments")
    return add_flag_aliases(parser)


def arguments_from_namespace(ns: argparse.Namespace) -> SAETrainingArguments:
    """Build the arguments from a namespace parsed with :func:`add_arguments`: dataclass defaults, then
    the config file (if any), then the flags given on the command line."""
    given = vars(ns)
    if given.get("config") and given.get("config_file"):
        raise ValueError("give the config file either as --config PATH or as the first argument, not both")
    path = given.get("config") or given.get("config_file")
    values = _load_config_file(path) if path else {}
    values.update({f.name: given[f.name] for f in fields(SAETrainingArguments) if f.name in given})
    return SAETrainingArguments(**values)


def parse_args(argv: Optional[list[str]] = None) -> SAETrainingArguments:
    """Parse command-line arguments (``sys.argv[1:]`` by default) into :class:`SAETrainingArguments`.

    ``argv`` may hold a ``.json``/``.yaml`` path (positional) or ``--config PATH``: values come from the
    file and the other flags override them.
    """
    parser = argparse.ArgumentParser(prog="train.py", description="Train sparse autoencoders (hf_sae).")
    return arguments_from_namespace(add_arguments(parser).parse_args(argv))
