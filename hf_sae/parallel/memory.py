"""Memory model of latent-sharded SAE training: bytes per rank for (n, d, P, dtype, optimizer, batch).

Per rank, with n/P latent rows of W_enc [n, d], W_dec [n, d], b_enc [n] and the replicated b_dec [d]::

    parameters   (2 d + 1) n / P + d                       elements of ``param_bytes`` each
    gradients    the same elements                         (``param_bytes`` each)
    Adam         2 moments of the same elements            (``state_bytes`` each; SGD: 0)
    counters     2 int64 per local latent                  (tokens since fired, fire counts)
    activations  ``act_factor`` x B_rank x n / P           floats (4 bytes): the local pre-activations
                                                           [B_rank, n/P] and their gradient (2), plus
                                                           AuxK's masked copy while latents are dead:
                                                           ``act_factor`` = 3 (the conservative default)

``largest_n`` inverts it: the most latents (a multiple of P) whose per-rank bytes fit a device.
Measured against this model: ``benchmarks/bench_sharded.py`` (RESULTS_sharded.md).
"""

from __future__ import annotations

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GB = 1e9


def state_bytes_per_rank(n: int, d: int, P: int = 1, dtype: str = "fp32", optimizer: str = "adam",
                         state_dtype: str | None = None) -> dict[str, float]:
    """Bytes per rank of the training state (no activations): params, grads, optimizer, counters."""
    pb = DTYPE_BYTES[dtype]
    sb = DTYPE_BYTES[state_dtype or dtype]
    elements = (2 * d + 1) * n / P + d
    moments = {"adam": 2, "sgd": 0}[optimizer]
    return {"params": elements * pb, "grads": elements * pb, "optimizer": moments * elements * sb,
            "counters": 2 * 8 * n / P}


def bytes_per_rank(n: int, d: int, P: int = 1, dtype: str = "fp32", optimizer: str = "adam",
                   batch_tokens_per_rank: int = 0, act_factor: float = 3.0,
                   state_dtype: str | None = None) -> float:
    """Total bytes per rank: training state + activations of a batch of ``batch_tokens_per_rank``."""
    state = sum(state_bytes_per_rank(n, d, P, dtype, optimizer, state_dtype).values())
    return state + act_factor * batch_tokens_per_rank * (n / P) * 4


def largest_n(device_bytes: float, d: int, P: int = 1, dtype: str = "fp32", optimizer: str = "adam",
              batch_tokens_per_rank: int = 0, act_factor: float = 3.0, headroom: float = 0.9,
              state_dtype: str | None = None) -> int:
    """The largest n (a multiple of P) whose :func:`bytes_per_rank` fits ``headroom`` x ``device_bytes``."""
    per_latent = bytes_per_rank(P, d, P, dtype, optimizer, batch_tokens_per_rank, act_factor, state_dtype) - \
        bytes_per_rank(0, d, P, dtype, optimizer, batch_tokens_per_rank, act_factor, state_dtype)
    fixed = bytes_per_rank(0, d, P, dtype, optimizer, batch_tokens_per_rank, act_factor, state_dtype)
    blocks = int((headroom * device_bytes - fixed) // per_latent)  # per_latent: bytes of P latents on one rank
    return max(0, blocks) * P


def table(ds=(2048, 4096, 8192), Ps=(1, 8, 64), devices=(("80 GB", 80 * GB), ("141 GB", 141 * GB)),
          dtypes=("fp32", "bf16"), batch_tokens: int = 4096) -> str:
    """Markdown table: the largest n per device for each d, P (one TP group) and dtype (params, grads
    and Adam moments all in that dtype), for the training state alone and with the activations of a
    batch of ``batch_tokens`` tokens (every rank of a TP group sees the whole batch of its replica)."""
    head = "| d | dtype (params, grads, Adam) | P | " + " | ".join(
        f"largest n, {name} (state only) | largest n, {name} (+ batch {batch_tokens})" for name, _ in devices) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(devices))]
    for d in ds:
        for dt in dtypes:
            for P in Ps:
                cells = []
                for _, cap in devices:
                    cells.append(_fmt(largest_n(cap, d, P, dt)))
                    cells.append(_fmt(largest_n(cap, d, P, dt, batch_tokens_per_rank=batch_tokens)))
                lines.append(f"| {d} | {dt} | {P} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
