"""Latent-sharded (tensor-parallel) SAEs on a data-parallel x tensor-parallel process mesh.

- :mod:`.mesh`: the DP x TP groups and the autograd-aware collectives.
- :mod:`.sharded`: :class:`ShardedSAE`, the n/P latent rows of one rank, forward = the single-process
  loss of the global batch.
- :mod:`.step`: one optimizer step (the trainer's recipe) on a mesh.
- :mod:`.checkpoint`: sharded, atomic checkpoints; consolidation and re-sharding to any TP size.
"""

from .checkpoint import consolidate, load_full, load_into, save_sharded
from .mesh import Mesh, make_mesh
from .sharded import ShardedSAE, ShardedStep
from .step import sharded_adam, train_step

__all__ = ["Mesh", "ShardedSAE", "ShardedStep", "consolidate", "load_full", "load_into", "make_mesh",
           "save_sharded", "sharded_adam", "train_step"]
