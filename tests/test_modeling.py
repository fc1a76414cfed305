"""CompressedForCausalLM against the transformers implementations it replaces.

Every Llama-family model converted with `to_compressed` must compute the same logits as the
transformers model (plain, left-padded, incremental with the KV cache, under generate), and a
model with removed units must carry neither their weights nor their cache slots.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from compressor.errors import CompressorError
from compressor.modeling import CompressedConfig, CompressedForCausalLM, KVCache
from compressor.models.adapters import SUPPORTED_ARCHITECTURES, adapter_for, to_compressed
from compressor.sources import load_model
from compressor.transforms.prune import remove_units
from conftest import FAMILIES, build_tiny_hf_model

TOL = 1e-4
SEQ = 80  # longer than Mistral's sliding window (64), so the window is exercised
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs():
    """family -> (transformers model, converted model)."""
    out = {}
    for family in FAMILIES:
        hf = build_tiny_hf_model(family)
        out[family] = (hf, to_compressed(hf))
    return out


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 512, (batch, length), generator=g)


def left_padded(lengths=(SEQ, 50), seed: int = 2):
    """A left-padded batch (pad id 0) and its attention mask; row i has lengths[i] real tokens."""
    width = max(lengths)
    ids = random_ids(len(lengths), width, seed)
    mask = torch.ones(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, : width - n] = 0
        mask[row, : width - n] = 0
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_keeps_the_family_shape(pairs, family):
    hf, model = pairs[family]
    config = model.config
    assert isinstance(model, CompressedForCausalLM)
    assert config.source_architecture == type(hf).__name__
    assert config.num_hidden_layers == 6 and config.hidden_size == 64 and config.num_key_value_heads == 2
    assert config.attention_bias is (family == "qwen2")
    assert config.qk_norm is (family == "qwen3")
    assert config.attention_window == (64 if family == "mistral" else None)
    assert config.tie_word_embeddings is (family in ("llama", "qwen3"))
    # Same number of parameters (a tied head counted once on both sides).
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_logits_match_transformers_plain_batch(pairs, family):
    hf, model = pairs[family]
    ids = random_ids(2, SEQ)
    expected = hf(ids).logits
    got = model(ids).logits
    assert got.shape == (2, SEQ, 512)
    assert max_diff(got, expected) < TOL


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_logits_match_transformers_left_padded(pairs, family):
    hf, model = pairs[family]
    ids, mask = left_padded()
    # transformers' generate gives left-padded rows positions that count real tokens only; the
    # compressed model derives the same positions from the mask by itself.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = hf(ids, attention_mask=mask, position_ids=positions).logits
    got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert int(real.sum()) == SEQ + 50
    assert max_diff(got[real], expected[real]) < TOL


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone(pairs, family):
    _, model = pairs[family]
    ids, mask = left_padded()
    batched = model(ids, attention_mask=mask).logits
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = model(ids[row][real][None]).logits[0]
        assert alone.shape[0] == int(real.sum())
        assert max_diff(batched[row][real], alone) < TOL


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_incremental_decoding_with_kv_cache_equals_full_forward(pairs, family):
    _, model = pairs[family]
    ids = random_ids(2, SEQ, seed=3)
    full = model(ids).logits
    cache = KVCache()
    prefill = 30
    steps = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    assert cache.get_seq_length() == prefill
    for t in range(prefill, SEQ):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        steps.append(out.logits)
    assert cache.get_seq_length() == SEQ
    assert max_diff(torch.cat(steps, dim=1), full) < TOL


@torch.no_grad()
def test_llama3_rope_scaling_matches_transformers():
    hf = build_tiny_hf_model("llama", rope_parameters=dict(LLAMA3_ROPE))
    model = to_compressed(hf)
    assert model.config.rope_theta == 500000.0
    assert model.config.rope_frequency_scaling["rope_type"] == "llama3"
    assert model.config.rope_frequency_scaling["factor"] == 8.0
    ids = random_ids(2, 120, seed=4)
    expected = hf(ids).logits
    assert max_diff(model(ids).logits, expected) < TOL
    # The scaling really matters here: the same weights with plain RoPE at the same base differ.
    plain = to_compressed(hf)
    plain.config.rope_frequency_scaling = None
    plain.model.rotary._inv_freq = None
    assert max_diff(plain(ids).logits, expected) > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_transformers_generate_on_compressed_model_matches(pairs, family):
    hf, model = pairs[family]
    prompt = random_ids(1, 10, seed=5)
    expected = hf.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    got = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert got.shape == (1, 18)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_transformers_generate_left_padded_batch_matches(pairs, family):
    hf, model = pairs[family]
    ids, mask = left_padded(lengths=(12, 7), seed=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert model.generate(ids, **kwargs).tolist() == hf.generate(ids, **kwargs).tolist()


def test_unsupported_architecture_config_raises_with_supported_list():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    with pytest.raises(CompressorError) as info:
        adapter_for(config)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message or "gpt2" in message
    for name in SUPPORTED_ARCHITECTURES:
        assert name in message
    with pytest.raises(CompressorError, match="LlamaForCausalLM"):
        to_compressed(transformers.GPT2LMHeadModel(config))


def test_unsupported_architecture_folder_raises_with_supported_list(tmp_path, tokenizer):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=512, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(CompressorError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert "unsupported architecture" in message and "GPT2LMHeadModel" in message
    assert all(name in message for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                            "Qwen3ForCausalLM"))


REMOVED_ATTENTION = (1, 3)
REMOVED_MLP = (4,)


def removal_plan(num_layers: int = 6) -> dict:
    return {"layers": [{"layer": i, "attention": "remove" if i in REMOVED_ATTENTION else "keep",
                        "mlp": "remove" if i in REMOVED_MLP else "keep"} for i in range(num_layers)]}


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_removed_units_have_no_parameters_and_no_cache_slots(pairs, family):
    _, full = pairs[family]
    model = remove_units(full, removal_plan())
    config = model.config
    assert [config.has_attention(i) for i in range(6)] == [True, False, True, False, True, True]
    assert [config.has_mlp(i) for i in range(6)] == [True, True, True, True, False, True]
    names = {n for n, _ in model.named_parameters()}
    for i in REMOVED_ATTENTION:
        assert not [n for n in names if n.startswith((f"model.layers.{i}.self_attn.", f"model.layers.{i}.input_layernorm"))]
        assert model.model.layers[i].self_attn is None
    for i in REMOVED_MLP:
        assert not [n for n in names if n.startswith((f"model.layers.{i}.mlp.", f"model.layers.{i}.post_attention_layernorm"))]
        assert model.model.layers[i].mlp is None
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.4.self_attn.o_proj.weight" in names
    assert "model.layers.3.mlp.down_proj.weight" in names
    full_count = sum(p.numel() for p in full.parameters())
    attn_count = sum(p.numel() for p in full.model.layers[1].self_attn.parameters()) + 64  # + input_layernorm
    mlp_count = sum(p.numel() for p in full.model.layers[4].mlp.parameters()) + 64  # + post_attention_layernorm
    assert sum(p.numel() for p in model.parameters()) == full_count - 2 * attn_count - mlp_count

    ids = random_ids(1, 20, seed=7)
    out = model(ids, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, KVCache)
    attention_layers = [i for i in range(6) if i not in REMOVED_ATTENTION]
    assert config.attention_layers() == attention_layers
    assert sorted(cache.keys) == list(range(len(attention_layers))) == sorted(cache.values)
    # Slot s holds the keys of the s-th layer that has attention.
    slots = [model.model.layers[i].self_attn.cache_index for i in attention_layers]
    assert slots == [0, 1, 2, 3]
    for slot in cache.keys:
        assert cache.keys[slot].shape == (1, 2, 20, config.head_dim)
    # Decoding continues correctly on that cache.
    nxt = random_ids(1, 5, seed=8)
    steps = [model(nxt[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(5)]
    full_logits = model(torch.cat([ids, nxt], dim=1)).logits[:, 20:]
    assert max_diff(torch.cat(steps, dim=1), full_logits) < TOL


@pytest.mark.parametrize("family", ("llama", "mistral"))
@torch.no_grad()
def test_transformers_generate_on_model_with_removed_units(pairs, family):
    """transformers' own cache gets one slot per attention layer; greedy output equals the
    no-cache argmax loop."""
    model = remove_units(pairs[family][1], removal_plan())
    prompt = random_ids(1, 10, seed=9)
    got = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = prompt
    for _ in range(8):
        expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got.tolist() == expected.tolist()


def test_block_configs_built_model_has_no_unit_modules():
    blocks = [{"attention": {"no_op": i == 0}, "ffn": {"no_op": i == 1}} for i in range(3)]
    config = CompressedConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, block_configs=blocks)
    model = CompressedForCausalLM(config).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.startswith(("model.layers.0.self_attn", "model.layers.0.input_layernorm"))]
    assert not [n for n in names if n.startswith(("model.layers.1.mlp", "model.layers.1.post_attention_layernorm"))]
    assert len([n for n in names if ".self_attn." in n]) == 2 * 4
    assert len([n for n in names if ".mlp." in n]) == 2 * 3
    with torch.no_grad():
        cache = model(torch.tensor([[1, 2, 3]]), use_cache=True).past_key_values
    assert sorted(cache.keys) == [0, 1]
    with pytest.raises(ValueError, match="block_configs has 2 entries"):
        CompressedConfig(num_hidden_layers=3, block_configs=blocks[:2])
