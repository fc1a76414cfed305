"""Model compression for transformer language models: analyze, plan, compress, export, evaluate.

Importing the package registers the compressed model class with transformers, so
`AutoModelForCausalLM.from_pretrained(artifact_folder)` works.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from compressor.errors import CompressorError
from compressor.modeling import CompressedConfig, CompressedForCausalLM

AutoConfig.register(CompressedConfig.model_type, CompressedConfig, exist_ok=True)
AutoModelForCausalLM.register(CompressedConfig, CompressedForCausalLM, exist_ok=True)

# `compress` and `load` sit at the top of the package's layers (they import the pipeline, the
# stages and the exporters), so they are resolved on first use: importing a lower module such as
# exporters.safetensors first must not pull the whole pipeline into a half-loaded package.
_TOP_LEVEL = {"compress": "compressor.pipeline", "load": "compressor.runtime"}


def __getattr__(name: str):
    if name in _TOP_LEVEL:
        import importlib

        return getattr(importlib.import_module(_TOP_LEVEL[name]), name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


__all__ = ["compress", "load", "CompressorError", "CompressedConfig", "CompressedForCausalLM"]
