"""Loading an artifact for use: `compressor.load(folder)` gives generate / score on a chosen backend."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from compressor.errors import CompressorError

BACKENDS = ("torch", "auto")


class Artifact:
    """A loaded artifact: the compressed model, its tokenizer, and the plan and report beside it."""

    def __init__(self, folder: Path, model, tokenizer):
        self.folder = folder
        self.model = model
        self.tokenizer = tokenizer
        self.plan = _optional_json(folder / "plan.json")
        self.report = _optional_json(folder / "report.json")

    def _encode(self, prompt: str, chat: bool) -> torch.Tensor:
        if chat and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = prompt
        return torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])

    def sparse_settings(self, sparse_tokens: bool | None = None):
        """The artifact's sparse-token filter settings, or None when off (for this call)."""
        from compressor.transforms.sparse_tokens import SparseTokenSettings

        stored = getattr(self.model.config, "sparse_tokens", None)
        if sparse_tokens is True and not stored:
            raise CompressorError(f"{self.folder}: sparse_tokens=True but this artifact has no sparse-token filter "
                                  "(its plan has no sparse_tokens section)")
        if sparse_tokens is False or not stored:
            return None
        return SparseTokenSettings.from_dict(stored, f"{self.folder / 'config.json'} sparse_tokens")

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_token_ids: list[int] | None = None,
                 chat: bool = False, sparse_tokens: bool | None = None, return_selection: bool = False):
        """Continues `prompt` (or answers it as a chat turn with chat=True); returns the new text.

        A long prompt goes through the artifact's sparse-token filter unless `sparse_tokens=False`.
        With `return_selection=True` the result is a dict: the text, and the prompt positions the
        filter kept with the kept text (None when the prompt ran whole)."""
        ids = self._encode(prompt, chat)
        new, selected = self._generate(ids, max_new_tokens, do_sample, temperature, top_k, seed, stop_token_ids,
                                       sparse_tokens)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if not return_selection:
            return text
        return {"text": text, **self._selection_record(ids[0].tolist(), selected)}

    def select(self, prompt: str, chat: bool = False) -> dict:
        """What the sparse-token filter keeps of `prompt`: positions and text (spans joined by [...])."""
        ids = self._encode(prompt, chat)
        settings = self.sparse_settings(True)
        from compressor.transforms.sparse_tokens import sparse_prefill

        state = sparse_prefill(self.model, ids, settings)
        return self._selection_record(ids[0].tolist(), state.selected)

    def _selection_record(self, ids: list[int], selected) -> dict:
        from compressor.transforms.sparse_tokens import kept_text

        if selected is None:
            return {"prompt_tokens": len(ids), "selected_positions": None, "kept_text": None}
        return {"prompt_tokens": len(ids), "selected_positions": selected[0].tolist(),
                "kept_text": kept_text(self.tokenizer, ids, selected[0])}

    @torch.no_grad()
    def generate_ids(self, ids: torch.Tensor, max_new_tokens: int = 64, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, seed: int | None = None,
                     stop_token_ids: list[int] | None = None, sparse_tokens: bool | None = None) -> list[int]:
        return self._generate(ids, max_new_tokens, do_sample, temperature, top_k, seed, stop_token_ids,
                              sparse_tokens)[0]

    def _generate(self, ids, max_new_tokens, do_sample, temperature, top_k, seed, stop_token_ids, sparse_tokens):
        from compressor.transforms.sparse_tokens import decode_step, full_prefill, sparse_prefill

        if stop_token_ids is None:
            eos = self.model.config.eos_token_id
            stop_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        settings = self.sparse_settings(sparse_tokens)
        state = sparse_prefill(self.model, ids, settings) if settings is not None else full_prefill(self.model, ids)
        selected, logits = state.selected, state.logits
        out: list[int] = []
        for _ in range(max_new_tokens):
            if do_sample:
                scores = logits.float() / max(temperature, 1e-5)
                if top_k:
                    kth = torch.topk(scores, top_k).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
            else:
                token = int(logits.argmax(-1))
            if token in stop_token_ids:
                break
            out.append(token)
            if len(out) < max_new_tokens:
                logits = decode_step(self.model, torch.tensor([token]), state)
        return out, selected

    @torch.no_grad()
    def score(self, text: str) -> dict:
        """Negative log-likelihood of `text` under the model: total, per token, and perplexity."""
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        if ids.shape[1] < 2:
            raise CompressorError("score: the text must have at least two tokens")
        logits = self.model(ids).logits[0, :-1].float()
        nll = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        tokens = ids.shape[1] - 1
        return {"tokens": tokens, "nll": nll, "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens)}


def _optional_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def load(folder: str | Path, backend: str = "torch") -> Artifact:
    from exporters.safetensors import read_model

    if backend not in BACKENDS:
        raise CompressorError(f"backend {backend!r} is not available; allowed: {', '.join(BACKENDS)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise CompressorError(f"artifact folder not found: {folder}")
    model, tokenizer = read_model(folder)
    return Artifact(folder, model, tokenizer)
