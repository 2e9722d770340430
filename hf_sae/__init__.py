"""hf_sae: sparse autoencoders on language-model activations, native to the Hugging Face stack.

Public API::

    from hf_sae import SAEConfig, SparseAutoencoder, SAEOutput
    sae = SparseAutoencoder.from_pretrained("path/or/org-repo", subfolder="layers.6.resid_post")

The names below are imported on first use (``import hf_sae`` alone loads neither torch nor transformers,
which keeps ``hf-sae --help`` instant). Importing the model classes registers them with
``AutoConfig`` / ``AutoModel`` (see the end of ``modeling_sae.py``).
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "SAEConfig": ".configuration_sae",
    "SparseAutoencoder": ".modeling_sae",
    "SAEOutput": ".modeling_sae",
    "Latents": ".activations",
    "ACTIVATIONS": ".activations",
    "get_activation": ".activations",
}

__all__ = ["SAE", "SAEConfig", "SAEOutput", "SparseAutoencoder", "Latents", "ACTIVATIONS", "get_activation"]


def __getattr__(name: str):
    if name == "SAE":  # the short alias users reach for: ``SAE.from_pretrained("org/gpt2-sae-32k")``
        name = "SparseAutoencoder"
    if name not in _LAZY:
        raise AttributeError(f"module 'hf_sae' has no attribute {name!r}")
    if _LAZY[name] == ".configuration_sae":
        importlib.import_module(".modeling_sae", __name__)  # registers the Auto classes with the config
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
