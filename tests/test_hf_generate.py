"""transformers' `generate()` on artifacts loaded with `AutoModelForCausalLM` (after `import compressor`).

transformers hands the KV cache to the model under a name that depends on its version
(`past_key_values` in 5.0, `cache` in later 5.x releases), and creates that cache itself (a
`DynamicCache`) or leaves it to the model. Whatever it does, greedy `generate()` must give exactly
the tokens of the toolkit's own greedy loop (`compressor.load(folder).generate_ids`, which runs on
the toolkit's `KVCache`) and of a loop with no cache at all (a full forward per token), for:

- an unchanged model,
- models with attention units removed (their cache slots are compact: one per attention layer),
  a Mistral one with its sliding window crossed, and one with no attention left at all,
- a quantized model (packed 4-bit linears, 8-bit tied embedding), and one with its embedding kept.

Each artifact is written in the form compressor.serving picks, so transformers builds its own class
for the standard form (LlamaForCausalLM) and the toolkit's for the Nemotron-NAS and toolkit forms.

The CI also runs this file under the oldest transformers the project allows (see the Makefile's
`test-oldest-transformers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import compressor
from compressor.data import embedded_text
from compressor.manifest import write_manifest
from compressor.modeling import KVCache
from compressor.models.adapters import to_compressed
from compressor.transforms.prune import remove_units
from compressor.transforms.quantize import QuantFormat, rtn_quantize
from compressor.transforms.quantize_model import EMBEDDING, quantize_embedding, set_weight
from helpers import decoder_linears
from conftest import build_tiny_hf_model
from exporters.safetensors import write_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_LAYERS = 6
NEW_TOKENS = 12
MISTRAL_WINDOW = 64  # the tiny Mistral's sliding window (conftest)


@dataclass(frozen=True)
class Variant:
    family: str
    removed_attention: tuple[int, ...] = ()
    removed_mlp: tuple[int, ...] = ()
    quantized: bool = False
    embedding_kept: bool = False
    prompt_tokens: int = 16
    model_class: str = "CompressedForCausalLM"


VARIANTS = {
    "unchanged": Variant("llama", model_class="LlamaForCausalLM"),
    "attention-removed": Variant("llama", removed_attention=(1, 3), removed_mlp=(4,),
                                 model_class="NemotronNasForCausalLM"),
    # Untied head, grouped KV heads; the prompt plus new tokens run past the 64-token window (which
    # keeps it in the toolkit's form: vLLM's Nemotron-NAS class has no sliding window).
    "mistral-window-attention-removed": Variant("mistral", removed_attention=(0, 2),
                                                prompt_tokens=MISTRAL_WINDOW - NEW_TOKENS // 2),
    "no-attention": Variant("llama", removed_attention=tuple(range(NUM_LAYERS)), model_class="NemotronNasForCausalLM"),
    "quantized": Variant("llama", quantized=True),
    "quantized-embedding-kept": Variant("llama", quantized=True, embedding_kept=True, model_class="LlamaForCausalLM"),
}


def removal_plan(variant: Variant) -> dict:
    return {"layers": [{"layer": i, "attention": "remove" if i in variant.removed_attention else "keep",
                        "mlp": "remove" if i in variant.removed_mlp else "keep"} for i in range(NUM_LAYERS)]}


def quantize_all(model, embedding: bool = True) -> dict:
    """Round-to-nearest: 4-bit groups of 32 for every decoder linear, 8 bits for the embedding."""
    quantized = {}
    for name, module in decoder_linears(model):
        quantized[name] = rtn_quantize(module.weight.data, QuantFormat(4, 32))
        set_weight(module, quantized[name])
    if embedding:
        quantized[EMBEDDING] = quantize_embedding(model, QuantFormat(8, 32))
    return quantized


def write_artifact(variant: Variant, tokenizer, folder: Path) -> Path:
    model = to_compressed(build_tiny_hf_model(variant.family))
    if variant.removed_attention or variant.removed_mlp:
        model = remove_units(model, removal_plan(variant))
    write_model(model, tokenizer, folder,
                quantize_all(model, not variant.embedding_kept) if variant.quantized else None)
    write_manifest(folder)  # what compress() writes last; compressor.load checks the files against it
    return folder


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer):
    """Variant name -> artifact folder, written on first use."""
    folders = {}

    def get(name: str) -> Path:
        if name not in folders:
            folders[name] = write_artifact(VARIANTS[name], tokenizer, tmp_path_factory.mktemp(name) / "artifact")
        return folders[name]

    return get


def prompt_ids(tokenizer, tokens: int) -> torch.Tensor:
    ids = tokenizer(embedded_text()[:2000], add_special_tokens=False)["input_ids"][:tokens]
    assert len(ids) == tokens
    return torch.tensor([ids])


def hf_model(folder: Path, model_class: str):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == model_class
    return model


@torch.no_grad()
def hf_generate(model, ids: torch.Tensor, **kwargs) -> list[int]:
    # No stop token: every call runs the full NEW_TOKENS steps, so all three loops are compared whole.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def no_cache_greedy(model, ids: torch.Tensor, steps: int = NEW_TOKENS) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence at each step."""
    for _ in range(steps):
        nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0, -steps:].tolist()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_generate_equals_toolkit_loop_and_no_cache_loop(artifacts, tokenizer, name):
    folder = artifacts(name)
    ids = prompt_ids(tokenizer, VARIANTS[name].prompt_tokens)
    model = hf_model(folder, VARIANTS[name].model_class)
    expected = no_cache_greedy(model, ids)
    assert len(set(expected)) > 1, "degenerate reference: the test would not see a broken cache"
    toolkit = compressor.load(folder).generate_ids(ids, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert toolkit == expected
    assert hf_generate(model, ids) == expected


@pytest.mark.parametrize("name", ("attention-removed", "mistral-window-attention-removed"))
def test_generate_with_a_dynamic_cache_uses_compact_slots(artifacts, tokenizer, name):
    """transformers' own DynamicCache (asked for explicitly, so every 5.x version makes one): the
    attention layers fill slots 0..n-1 and nothing else; the answer is the no-cache one."""
    folder = artifacts(name)
    ids = prompt_ids(tokenizer, VARIANTS[name].prompt_tokens)
    model = hf_model(folder, VARIANTS[name].model_class)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0, cache_implementation="dynamic",
                             return_dict_in_generate=True)
    assert out.sequences[0, ids.shape[1]:].tolist() == no_cache_greedy(model, ids)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    assert isinstance(cache, DynamicCache)
    slots = len(model.config.attention_layers())
    # The last token generated is never fed back, so the cache holds one token less than the output.
    cached = ids.shape[1] + NEW_TOKENS - 1
    lengths = [cache.get_seq_length(slot) for slot in range(len(cache.layers))]
    assert lengths[:slots] == [cached] * slots
    assert not any(lengths[slots:])


@torch.no_grad()
def test_left_padded_batch_generate_equals_each_prompt_alone(artifacts, tokenizer):
    folder = artifacts("attention-removed")
    model = hf_model(folder, VARIANTS["attention-removed"].model_class)
    toolkit = compressor.load(folder)
    long, short = prompt_ids(tokenizer, 16), prompt_ids(tokenizer, 24)[:, 13:]
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.cat([torch.ones_like(long), torch.cat([torch.zeros(1, pad), torch.ones_like(short)], dim=1)]).long()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    for row, alone in enumerate((long, short)):
        expected = toolkit.generate_ids(alone, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
        assert out[row, ids.shape[1]:].tolist() == expected == no_cache_greedy(model, alone)


@pytest.mark.parametrize("keyword", ("past_key_values", "cache"))
@torch.no_grad()
def test_forward_takes_the_cache_under_either_name(artifacts, tokenizer, keyword):
    """The toolkit's KVCache and transformers' DynamicCache, passed under the old or the new name,
    give the logits of a full forward; the cache comes back as the one passed in."""
    model = compressor.load(artifacts("attention-removed")).model
    ids = prompt_ids(tokenizer, 20)
    full = model(ids).logits
    for cache in (KVCache(), DynamicCache()):
        first = model(ids[:, :14], use_cache=True, **{keyword: cache})
        assert first["cache" if "cache" in first else "past_key_values"] is cache
        steps = [first.logits] + [model(ids[:, t : t + 1], use_cache=True, **{keyword: cache}).logits
                                  for t in range(14, 20)]
        assert cache.get_seq_length() == 20
        assert float((torch.cat(steps, dim=1) - full).abs().max()) < 1e-4


def test_forward_refuses_two_different_caches(artifacts):
    model = compressor.load(artifacts("unchanged")).model
    with pytest.raises(ValueError, match="past_key_values.*cache"):
        model(torch.tensor([[1, 2, 3]]), past_key_values=KVCache(), cache=KVCache(), use_cache=True)

