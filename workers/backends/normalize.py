"""L2 normalisation, the sentence-transformers ``Normalize`` module.

Applied only when the folder's modules.json lists Normalize (or a caller overrides it):
cosine-similarity models ship it, dot-product models must not get it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def l2_normalize(vectors: Tensor) -> Tensor:
    """Rows scaled to unit length; all-zero rows stay zero (eps 1e-12, as torch/ST do)."""
    return torch.nn.functional.normalize(vectors, p=2.0, dim=-1)
