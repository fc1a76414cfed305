"""Sparse-token attention (GemFilter, PromptDistill) on tiny random models, against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.errors import CompressorError
from compressor.models.adapters import to_compressed
from helpers import greedy_generate
from compressor.transforms.sparse_tokens import (SparseTokenSettings, check_settings, decode_step, full_prefill,
                                                 kept_text, select_positions, sparse_prefill,
                                                 token_scores)
from conftest import build_tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
FILTER_LAYER = 2


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(family: str):
        if family not in built:
            # Mistral's sliding window is refused by the filter (tested below); these use full attention.
            overrides = {"sliding_window": None} if family == "mistral" else {}
            built[family] = to_compressed(build_tiny_hf_model(family, **overrides))
        return built[family]

    return get


def random_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def settings(method: str, keep: int = 40, first: int = 1, last: int = 4, layer: int = FILTER_LAYER):
    return SparseTokenSettings(method, layer, keep, first, last, 5)


@torch.no_grad()
def brute_force_selection(model, ids: torch.Tensor, s: SparseTokenSettings) -> tuple[list[float], list[int]]:
    """The filter layer's real attention probabilities of the last query (from the model's own
    explicit attention path), summed over heads, pooled and ranked with plain Python."""
    captured = {}
    attn = model.model.layers[s.filter_layer].self_attn
    attn.probability_observer = lambda probs: captured.setdefault("p", probs)
    try:
        model(ids)
    finally:
        attn.probability_observer = None
    last = captured["p"][0, :, -1, :].sum(0).tolist()  # (keys,)
    n, w = len(last), s.pool_width
    pooled = [sum(last[j] for j in range(i - w // 2, i + w // 2 + 1) if 0 <= j < n) / w for i in range(n)]
    forced = set(range(s.keep_first)) | set(range(n - s.keep_last, n))
    rest = sorted((i for i in range(n) if i not in forced), key=lambda i: -pooled[i])
    chosen = sorted(forced | set(rest[: s.keep_tokens - len(forced)]))
    return pooled, chosen


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_and_selection_equal_a_brute_force_reference(models, family):
    model = models(family)
    ids = random_ids(120, 1)
    s = settings("gemfilter")
    pooled, chosen = brute_force_selection(model, ids, s)
    positions = torch.arange(120)[None]
    mask = torch.ones_like(ids)
    h = model.model.run_layers(model.model.embed_tokens(ids), positions, mask, None, 0, s.filter_layer)
    scores = token_scores(model, h, positions, mask, s.filter_layer, s.pool_width)
    assert torch.allclose(scores[0], torch.tensor(pooled), atol=1e-5)
    assert select_positions(scores, mask, s)[0].tolist() == chosen
    state = sparse_prefill(model, ids, s)
    assert state.selected[0].tolist() == chosen


def test_selection_is_ordered_and_keeps_the_first_and_last_tokens():
    torch.manual_seed(3)
    s = SparseTokenSettings("gemfilter", 0, keep_tokens=20, keep_first=3, keep_last=5)
    scores = torch.rand(4, 90)
    scores[:, :3] = -1.0  # the lowest scores: kept only because they are forced
    scores[:, -5:] = -1.0
    mask = torch.ones(4, 90, dtype=torch.long)
    mask[1, :30] = 0  # left padding
    mask[2, :75] = 0  # 15 real tokens: fewer than keep_tokens, all kept
    for row, kept in enumerate(select_positions(scores, mask, s)):
        real = torch.nonzero(mask[row]).flatten().tolist()
        kept = kept.tolist()
        assert kept == sorted(kept) and len(set(kept)) == len(kept)
        assert set(kept) <= set(real)
        if len(real) <= 20:
            assert kept == real
            continue
        assert len(kept) == 20
        assert set(real[:3]) <= set(kept) and set(real[-5:]) <= set(kept)
        others = [p for p in real[3:-5]]
        best = sorted(others, key=lambda p: -float(scores[row, p]))[:12]
        assert set(kept) - set(real[:3]) - set(real[-5:]) == set(best)


@pytest.mark.parametrize("method", ("gemfilter", "promptdistill"))
@torch.no_grad()
def test_prompts_not_longer_than_keep_tokens_run_unchanged(models, method):
    model = models("llama")
    ids = random_ids(40, 2)
    s = settings(method, keep=40)
    state, full = sparse_prefill(model, ids, s), full_prefill(model, ids)
    assert state.selected is None
    assert torch.equal(state.logits, full.logits)
    # Perplexity-style: next-token NLL at every prefix of an ordinary text is the same.
    logits = model(ids).logits[0]
    for end in (8, 20, 39):
        prefix = ids[:, :end]
        got = sparse_prefill(model, prefix, s).logits[0]
        assert torch.allclose(got, logits[end - 1], atol=1e-5)
        nll = torch.nn.functional.cross_entropy(got[None], ids[0, end:end + 1])
        ref = torch.nn.functional.cross_entropy(logits[end - 1][None], ids[0, end:end + 1])
        assert math.isclose(float(nll), float(ref), abs_tol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_gemfilter_is_the_full_model_on_the_kept_tokens(models, family):
    model = models(family)
    ids = random_ids(150, 4)
    s = settings("gemfilter")
    tokens, state = greedy_generate(model, ids, 4, s)
    kept = state.selected[0]
    assert len(kept) == s.keep_tokens
    short = ids[:, kept]
    assert torch.allclose(state.logits, model(torch.cat([short, tokens[:, :3]], 1)).logits[:, -1], atol=1e-4)
    assert torch.equal(tokens, greedy_generate(model, short, 4)[0])


@torch.no_grad()
def promptdistill_reference(model, ids: torch.Tensor, kept: list[int], new_token: int, r: int) -> torch.Tensor:
    """Next-token logits after `new_token`, built layer by layer without a cache: layers 0..r see the
    kept tokens' full-prompt hidden states; layers r+1.. run on the kept tokens at their original
    positions; the new token sits at position n and attends to kept tokens only."""
    inner = model.model
    n = ids.shape[1]
    positions = torch.arange(n)[None]
    ones = torch.ones_like(ids)
    h_full = inner.embed_tokens(ids)
    h_new = inner.embed_tokens(torch.tensor([[new_token]]))
    seq_positions = torch.tensor([kept + [n]])
    for layer in range(r + 1):
        both = torch.cat([h_full[:, kept], h_new], 1)
        h_new = inner.run_layers(both, seq_positions, None, None, layer, layer + 1)[:, -1:]
        h_full = inner.run_layers(h_full, positions, ones, None, layer, layer + 1)
    both = torch.cat([h_full[:, kept], h_new], 1)
    out = inner.run_layers(both, seq_positions, None, None, r + 1, None)
    return model.output_logits(inner.norm(out[:, -1:]))[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_promptdistill_equals_a_layer_by_layer_reference(models, family):
    model = models(family)
    ids = random_ids(150, 5)
    s = settings("promptdistill")
    state = sparse_prefill(model, ids, s)
    kept = state.selected[0].tolist()
    assert int(state.next_positions[0]) == 150 and state.attention_mask.shape[1] == len(kept)
    prefill_logits = state.logits
    token = int(prefill_logits.argmax(-1))
    logits = decode_step(model, torch.tensor([token]), state)
    reference = promptdistill_reference(model, ids, kept, token, s.filter_layer)
    assert torch.allclose(logits, reference, atol=1e-4)
    # The prefill's own logits: layers r+1.. on the kept tokens at their original positions.
    inner = model.model
    h = inner.run_layers(inner.embed_tokens(ids), torch.arange(150)[None], torch.ones_like(ids), None, 0,
                         s.filter_layer + 1)
    out = inner.run_layers(h[:, kept], torch.tensor([kept]), None, None, s.filter_layer + 1, None)
    assert torch.allclose(prefill_logits, model.output_logits(inner.norm(out[:, -1:]))[:, -1], atol=1e-4)


@pytest.mark.parametrize("method", ("gemfilter", "promptdistill"))
@pytest.mark.parametrize("family", ("llama", "qwen3"))
def test_padded_batch_gives_the_answers_of_one_by_one(models, method, family):
    model = models(family)
    lengths = (150, 33, 97)  # 33 is below keep_tokens: that row runs whole
    rows = [random_ids(n, 10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    s = settings(method)
    batch_tokens, batch_state = greedy_generate(model, ids, 6, s, mask)
    for i, row in enumerate(rows):
        tokens, state = greedy_generate(model, row[None], 6, s)
        assert torch.equal(batch_tokens[i], tokens[0]), f"row {i}"
        assert torch.allclose(batch_state.logits[i], state.logits[0], atol=1e-4)
        expected = state.selected[0] if state.selected is not None else torch.arange(len(row))
        assert torch.equal(batch_state.selected[i], expected)


def test_kept_text_marks_the_gaps(tokenizer):
    ids = tokenizer("one two three four five six seven", add_special_tokens=False)["input_ids"]
    text = kept_text(tokenizer, ids, torch.tensor([0, 1, len(ids) - 1]))
    assert text.startswith(tokenizer.decode(ids[:2]))
    assert " [...] " in text and text.endswith(tokenizer.decode(ids[-1:]))
    assert kept_text(tokenizer, ids, torch.arange(len(ids))) == tokenizer.decode(ids)


def test_bad_settings_fail_with_one_clear_error(models):
    model = models("llama")
    with pytest.raises(CompressorError, match="outside the model's layers 0..5"):
        check_settings(settings("gemfilter", layer=6), model.config)
    with pytest.raises(CompressorError, match="method: 'snapkv' is not a method"):
        check_settings(settings("snapkv"), model.config)
    with pytest.raises(CompressorError, match="exceeds keep_tokens"):
        check_settings(SparseTokenSettings("gemfilter", 1, 8, 4, 5), model.config)
    windowed = to_compressed(build_tiny_hf_model("mistral"))
    with pytest.raises(CompressorError, match="sliding window of 64"):
        check_settings(settings("promptdistill"), windowed.config)
    from compressor.stages import sparse_tokens as sparse_stage
    from compressor.stages.run import Run
    from compressor.stages.sparse_tokens import sparse_settings
    from compressor.transforms.prune import remove_units

    plan = {"layers": [{"layer": i, "attention": "remove" if i == FILTER_LAYER else "keep", "mlp": "keep"}
                       for i in range(6)],
            "sparse_tokens": dict(settings("gemfilter").as_dict())}
    assert sparse_settings(plan)["filter_layer"] == FILTER_LAYER
    with pytest.raises(CompressorError, match=f"layer {FILTER_LAYER} has no attention unit"):
        sparse_stage.apply(remove_units(model, plan), plan, Run(None))
