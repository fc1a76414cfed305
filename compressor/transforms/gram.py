"""Running Gram matrices X^T X / tokens of the inputs a linear reads: GPTQ's Hessians and the
activation-aware sharing fit's second moments come from here.

`equal` token weighting scales every token's input to unit norm first; `raw` keeps it as it is
(each caller says why it uses which).
"""

from __future__ import annotations

import torch

# Below this norm a token's input is not rescaled up (an all-zero input stays zero).
MIN_NORM = 1e-6


class GramAccumulator:
    """Sums of x^T x per key over the batches a forward pass shows, in `dtype`."""

    def __init__(self, dtype: torch.dtype, token_weighting: str):
        if token_weighting not in ("equal", "raw"):
            raise ValueError(f"token weighting must be 'equal' or 'raw', got {token_weighting!r}")
        self.dtype, self.token_weighting = dtype, token_weighting
        self.sums: dict = {}
        self.counts: dict = {}

    def add(self, key, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.dtype)
        if self.token_weighting == "equal":
            x = x / x.norm(dim=-1, keepdim=True).clamp(min=MIN_NORM)
        self.sums[key] = self.sums.get(key, 0) + x.T @ x
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]

    def pre_hook(self, key):
        """A forward pre-hook adding the module's input under `key`."""
        def hook(_module, args):
            self.add(key, args[0])
        return hook

    def mean(self, key) -> torch.Tensor:
        return self.sums[key] / self.counts[key]
