"""Automatic interpretation of SAE latents: an LM explains each latent from its contexts (taken from a
feature-browser site), and the explanation is scored by detection and fuzzing against a
shuffled-explanation baseline. Backends: a local HF causal LM (default: the embedded SmolLM2-135M-Instruct)
or any OpenAI-compatible chat endpoint, with a cache of answers. ``hf-sae autointerp`` is the CLI.
"""

from .backends import Backend, Cached, LocalLM, OpenAIChat, make_backend
from .run import add_autointerp_args, autointerp_site, run_autointerp

__all__ = [
    "Backend",
    "Cached",
    "LocalLM",
    "OpenAIChat",
    "make_backend",
    "add_autointerp_args",
    "autointerp_site",
    "run_autointerp",
]
