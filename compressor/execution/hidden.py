"""The hidden states a layer-major run carries from one decoder layer to the next: one tensor per
calibration batch, kept where the model computes until their bytes pass a budget, then written to a
spill folder and read back one batch at a time.

A run holds two of these at a time (a layer's inputs and its outputs), so the budget is the most
one set may keep in memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

# Bytes one set of hidden states keeps in memory before the rest goes to disk: COMPRESSOR_HIDDEN_BYTES
# when set, else 1 GiB (the CPU) or 8 GiB (a CUDA device: a 70B model's 128 x 2048-token batches in
# bfloat16 are 4 GiB).
DEFAULT_BUDGET = {"cpu": 1 << 30, "cuda": 8 << 30}


def default_budget(device: torch.device) -> int:
    configured = os.environ.get("COMPRESSOR_HIDDEN_BYTES")
    if configured:
        return int(configured)
    return DEFAULT_BUDGET.get(device.type, DEFAULT_BUDGET["cpu"])


class HiddenStates:
    """Batches of hidden states in order; `append` keeps or spills, iteration gives them on the device."""

    def __init__(self, device: torch.device | str = "cpu", budget: int | None = None, spill_root: str | None = None):
        self.device = torch.device(device)
        self.budget = default_budget(self.device) if budget is None else budget
        self.spill_root = spill_root
        self._items: list[torch.Tensor | Path] = []
        self._resident = 0
        self._folder: str | None = None

    def append(self, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._resident + size <= self.budget:
            self._items.append(tensor)
            self._resident += size
            return
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="compressor-hidden-", dir=self.spill_root)
        path = Path(self._folder) / f"batch-{len(self._items):06d}.pt"
        torch.save(tensor.detach().to("cpu"), path)
        self._items.append(path)

    @property
    def spilled(self) -> int:
        return sum(1 for item in self._items if isinstance(item, Path))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self._items[index]
        if isinstance(item, Path):
            return torch.load(item, weights_only=True).to(self.device)
        return item

    def __iter__(self):
        for index in range(len(self._items)):
            yield self[index]

    def empty_like(self) -> "HiddenStates":
        """A new set with the same device, budget and spill folder parent."""
        return HiddenStates(self.device, self.budget, self.spill_root)

    def close(self) -> None:
        self._items = []
        self._resident = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __del__(self):
        self.close()


def carried(tensors, device: torch.device | str = "cpu", budget: int | None = None) -> HiddenStates:
    """HiddenStates holding the given batches (in order)."""
    states = HiddenStates(device, budget)
    for tensor in tensors:
        states.append(tensor)
    return states
