"""Model compression for transformer language models: analyze, plan, compress, export, evaluate.

Importing the package registers the compressed model classes with transformers, so
`AutoModelForCausalLM.from_pretrained(artifact_folder)` works for artifacts in the toolkit's and the
Nemotron-NAS form (the standard form needs no registration: it is the source family's own class).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from compressor.errors import CompressorError
from compressor.modeling import CompressedConfig, CompressedForCausalLM, NemotronNasConfig, NemotronNasForCausalLM

AutoConfig.register(CompressedConfig.model_type, CompressedConfig, exist_ok=True)
AutoModelForCausalLM.register(CompressedConfig, CompressedForCausalLM, exist_ok=True)
# Artifacts with removed sub-layers are written in vLLM's Nemotron-NAS form (exporters.config_forms);
# registered here, transformers reads them with the toolkit's class instead of the config code in the folder.
AutoConfig.register(NemotronNasConfig.model_type, NemotronNasConfig, exist_ok=True)
AutoModelForCausalLM.register(NemotronNasConfig, NemotronNasForCausalLM, exist_ok=True)

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
