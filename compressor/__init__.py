"""Model compression for transformer language models: analyze, plan, compress, export, evaluate.

Importing the package registers the compressed model class with transformers, so
`AutoModelForCausalLM.from_pretrained(artifact_folder)` works.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from compressor.errors import CompressorError
from compressor.modeling import CompressedConfig, CompressedForCausalLM

AutoConfig.register(CompressedConfig.model_type, CompressedConfig, exist_ok=True)
AutoModelForCausalLM.register(CompressedConfig, CompressedForCausalLM, exist_ok=True)

from compressor.pipeline import compress  # noqa: E402
from compressor.runtime import load  # noqa: E402

__all__ = ["compress", "load", "CompressorError", "CompressedConfig", "CompressedForCausalLM"]
