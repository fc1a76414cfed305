"""What the stages of one run share: the tokenizer, the calibration windows (drawn once), the batch
size and whether to show progress; and `Applied`, what a stage's apply returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from compressor.data import TokenWindows, calibration_windows
from compressor.recipe import DEFAULT_BATCH_SIZE


class Applied(NamedTuple):
    """A stage's result: the model, and the quantized codes when the stage produced them."""

    model: object
    codes: dict | None = None


@dataclass
class Run:
    tokenizer: object
    batch_size: int = DEFAULT_BATCH_SIZE
    quiet: bool = False
    drawn: dict = field(default_factory=dict)

    def calibration(self, settings: dict) -> TokenWindows:
        """The calibration windows of these settings (text, samples, seq_len, seed); drawn on the first
        request, the same tensor for every later stage that asks for the same settings."""
        key = (settings["text"], settings["samples"], settings["seq_len"], settings["seed"])
        if key not in self.drawn:
            self.drawn[key] = calibration_windows(self.tokenizer, *key)
        return self.drawn[key]
