"""Bytes of the tensors a stage leaves as they are: what its size prediction adds to what it changes."""

from __future__ import annotations


def other_tensor_bytes(model, changed: set[str]) -> int:
    """Bytes of every stored tensor of `model` not named in `changed` (a tied output head is the
    embedding, stored once)."""
    tied = model.config.tie_word_embeddings
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
               if name not in changed and not (tied and name == "lm_head.weight"))
