"""Loading an artifact for use: `compressor.load(folder)` gives generate / score on a chosen backend.

Backends: "torch" (the compressed model in PyTorch), "onnxruntime" (the artifact's `onnx/` export in
ONNX Runtime sessions; CUDA execution provider first when onnxruntime-gpu is installed), "tensorrt"
(the engines of `tensorrt/` on a CUDA GPU; exporters.tensorrt.runtime, not run anywhere yet) and "auto"
(onnxruntime when the artifact has an ONNX export and onnx and onnxruntime are installed, else
torch). Both run the same decode loop (greedy or sampling, stop tokens, max tokens) and give the
same answers. Only the onnxruntime backend imports onnx, onnxruntime and the ONNX loader.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from compressor.artifact import read_json
from compressor.errors import CompressorError
from compressor.manifest import verify_manifest
from compressor.transforms.sparse_tokens import (SparseTokenSettings, decode_step, full_prefill, kept_text,
                                                 sparse_prefill)
from exporters.onnx import RUNTIME_REQUIRED, missing, require
from exporters.onnx.files import DECODER_FILE, ONNX_DIR
from exporters.safetensors import read_config, read_model, read_tokenizer

BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")


class Artifact:
    """A loaded artifact: the compressed model (torch backend) or its ONNX Runtime sessions, its
    tokenizer, and the plan and report beside it."""

    def __init__(self, folder: Path, model, tokenizer, config=None, onnx=None, backend: str | None = None):
        self.folder = folder
        self.model = model  # None on the onnxruntime and tensorrt backends
        # exporters.onnx.loader.OnnxDecoder (onnxruntime) or exporters.tensorrt.runtime.TensorRTDecoder
        # (tensorrt): the same interface, run by the same decode loop.
        self.onnx = onnx
        self.backend = backend or ("torch" if onnx is None else "onnxruntime")
        self.config = model.config if model is not None else config
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
        stored = getattr(self.config, "sparse_tokens", None)
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
        if ids.shape[1] <= settings.keep_tokens:
            return self._selection_record(ids[0].tolist(), None)
        return self._selection_record(ids[0].tolist(), self._prefill(ids, settings)[1])

    def _selection_record(self, ids: list[int], selected) -> dict:
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

    def _prefill(self, ids: torch.Tensor, settings):
        """(state, kept positions or None, next-token logits (1, vocab)) after the prompt."""
        if self.onnx is not None:
            sparse = settings is not None and ids.shape[1] > settings.keep_tokens
            state = self.onnx.prefill(ids.numpy(), sparse=sparse)
            selected = [torch.from_numpy(k) for k in state.selected] if state.selected is not None else None
            return state, selected, torch.from_numpy(state.logits)
        state = sparse_prefill(self.model, ids, settings) if settings is not None else full_prefill(self.model, ids)
        return state, state.selected, state.logits

    def _decode(self, token: int, state) -> torch.Tensor:
        if self.onnx is not None:
            return torch.from_numpy(self.onnx.decode(np.array([token], dtype=np.int64), state))
        return decode_step(self.model, torch.tensor([token]), state)

    def _generate(self, ids, max_new_tokens, do_sample, temperature, top_k, seed, stop_token_ids, sparse_tokens):
        if stop_token_ids is None:
            eos = self.config.eos_token_id
            stop_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        settings = self.sparse_settings(sparse_tokens)
        state, selected, logits = self._prefill(ids, settings)
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
                logits = self._decode(token, state)
        return out, selected

    @torch.no_grad()
    def score(self, text: str) -> dict:
        """Negative log-likelihood of `text` under the model: total, per token, and perplexity."""
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        if ids.shape[1] < 2:
            raise CompressorError("score: the text must have at least two tokens")
        if self.onnx is not None:
            logits = torch.from_numpy(self.onnx.logits(ids.numpy())[0, :-1])
        else:
            logits = self.model(ids).logits[0, :-1].float()
        nll = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        tokens = ids.shape[1] - 1
        return {"tokens": tokens, "nll": nll, "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens)}


def _optional_json(path: Path):
    return read_json(path, path.name) if path.is_file() else None


def load(folder: str | Path, backend: str = "torch", providers: list[str] | None = None, threads: int | None = None,
         optimization: str = "all", matmul_accuracy: str | None = None, verify: bool = True, packed: bool = True,
         fused_attention: bool = True) -> Artifact:
    """Loads an artifact folder. With `verify` (the default) every file is first checked against the
    artifact's manifest (sizes and SHA-256; about 1 s per GB); verify=False skips that for speed.
    Either way config.json and the weights are checked against each other. `providers`, `threads`
    (intra-op; None: ONNX Runtime's default), `optimization` ("disable" | "basic" | "extended" |
    "all") and `matmul_accuracy` ("fp32" | "int8": activations quantized in fused MatMulNBits; None:
    what the export's manifest records, else fp32) and `fused_attention` (on CPU, RoPE and attention
    as ONNX Runtime's fused kernels; False: their standard-op bodies) apply to the onnxruntime backend. On the torch backend quantized weights stay their codes (`packed`,
    the default) and each is dequantized when it is used: about a quarter of their float32 memory
    and the same logits, but decoding is several times slower on a CPU; `packed=False` holds them as
    float32 tensors, for speed where memory allows (bench/results/packed_memory.md)."""
    if backend not in BACKENDS:
        raise CompressorError(f"backend {backend!r} is not available; allowed: {', '.join(BACKENDS)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise CompressorError(f"artifact folder not found: {folder}")
    if verify:
        verify_manifest(folder)
    if backend == "auto":
        has_export = (folder / ONNX_DIR / DECODER_FILE).is_file()
        backend = "onnxruntime" if has_export and not missing(RUNTIME_REQUIRED) else "torch"
    if backend == "torch":
        model, tokenizer = read_model(folder, packed=packed)
        return Artifact(folder, model, tokenizer)
    if backend == "tensorrt":
        from exporters.tensorrt.runtime import TensorRTDecoder  # imports TensorRT only when it runs

        decoder = TensorRTDecoder(folder, verify)
        return Artifact(folder, None, read_tokenizer(folder), config=read_config(folder), onnx=decoder,
                        backend="tensorrt")
    require(RUNTIME_REQUIRED, "backend 'onnxruntime'")
    # Here, not at the top: the loader's checks and sessions import onnx and onnxruntime, optional
    # packages that the torch backend (and "auto" without them) must not need.
    from exporters.onnx.loader import OnnxDecoder

    if not (folder / "config.json").is_file():
        raise CompressorError(f"{folder}: not an artifact folder (needs config.json)")
    config = read_config(folder)
    decoder = OnnxDecoder(folder / ONNX_DIR, providers, threads, optimization, matmul_accuracy,
                          fused_attention=fused_attention)
    return Artifact(folder, None, read_tokenizer(folder), config=config, onnx=decoder)
