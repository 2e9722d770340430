"""hf_sae: sparse autoencoders on language-model activations, native to the Hugging Face stack.

Public API::

    from hf_sae import SAEConfig, SparseAutoencoder, SAEOutput
    sae = SparseAutoencoder.from_pretrained("path/or/org-repo", subfolder="layers.6.resid_post")
"""

from transformers import AutoConfig, AutoModel

from .activations import ACTIVATIONS, Latents, get_activation
from .configuration_sae import SAEConfig
from .modeling_sae import SAEOutput, SparseAutoencoder

__version__ = "0.1.0"

AutoConfig.register(SAEConfig.model_type, SAEConfig, exist_ok=True)
AutoModel.register(SAEConfig, SparseAutoencoder, exist_ok=True)

# The short alias users reach for: ``SAE.from_pretrained("org/gpt2-sae-32k")``.
SAE = SparseAutoencoder

__all__ = ["SAE", "SAEConfig", "SAEOutput", "SparseAutoencoder", "Latents", "ACTIVATIONS", "get_activation"]
