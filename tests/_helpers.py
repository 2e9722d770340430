"""Helpers shared by several test modules (import as ``from _helpers import ...``)."""

import torch

from hf_sae import SAEConfig, SparseAutoencoder


def identity_sae(d: int, hook_point=None) -> SparseAutoencoder:
    """A ReLU SAE that reconstructs exactly: W_enc = W_dec = [I; -I], zero biases, so that
    relu(x) - relu(-x) = x. In eval mode."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=2 * d, activation="relu", hook_point=hook_point))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()
