"""Activations from real LMs: the default model and corpus, tokenization, live streaming, cached shards.

See ``models`` (SmolLM2 and any HF causal LM), ``corpus`` (texts, windows, token mask),
``stream`` (``ActivationStream``) and ``cache`` (``cache_activations``, ``CachedActivations``).
"""
from .cache import (
                    CachedActivations,
                    CorruptShardError,
                    cache_activations,
                    load_windows,
                    norm_stats_to_input_scale,
                    write_activations,
)
from .corpus import VALIDATION_BOOKS, iter_windows, load_texts, special_token_ids, token_mask, tokenize_windows
from .models import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, load_default_model, load_model
from .stream import ActivationStream

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_HUB_ID", "load_default_model", "load_model", "load_texts",
           "tokenize_windows", "iter_windows", "token_mask", "special_token_ids", "VALIDATION_BOOKS",
           "ActivationStream", "cache_activations", "CachedActivations", "CorruptShardError", "load_windows",
           "norm_stats_to_input_scale", "write_activations"]
