"""Shared fixtures: a small trained tokenizer and tiny random Llama-family models saved as folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

from compressor.data import embedded_text

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="session", autouse=True)
def _quiet_and_isolated(tmp_path_factory):
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    # Each run keeps its own converted-model cache unless one is given (the embedded model's
    # conversion is reused across runs when COMPRESSOR_CACHE points at a persistent folder).
    os.environ.setdefault("COMPRESSOR_CACHE", str(Path.home() / ".cache" / "compressor"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is faster and immune to other processes competing for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (vocab 512) trained on the embedded text, saved and reloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([embedded_text()[:200_000]], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def tiny_config(family: str, **overrides):
    shape = dict(TINY_SHAPE, vocab_size=512, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    shape.update(overrides)
    if family == "llama":
        return transformers.LlamaConfig(**shape, tie_word_embeddings=True)
    if family == "qwen2":
        return transformers.Qwen2Config(**shape, tie_word_embeddings=False)
    if family == "qwen3":
        return transformers.Qwen3Config(**shape, head_dim=16, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**dict(dict(sliding_window=64), **shape), tie_word_embeddings=False)
    raise ValueError(family)


def build_tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A random model with weights large enough that every unit matters (not near-identity layers)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.02)
    return model


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, tokenizer):
    """family -> folder holding a saved tiny random transformers model with the test tokenizer."""
    folders = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        build_tiny_hf_model(family).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders
