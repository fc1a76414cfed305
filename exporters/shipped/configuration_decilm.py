"""Configuration class of a Nemotron-NAS (DeciLM) checkpoint written by a model-compression toolkit.

config.json names this file in `auto_map`, so vLLM (with trust_remote_code=True) and transformers
build the config without the toolkit installed. It holds configuration only, no modeling code:
vLLM's own DeciLMForCausalLM runs the model. Each `block_configs` entry reads as attributes, as
vLLM's class reads it (`block_config.attention.no_op`, `.n_heads_in_group`, `block_config.ffn.no_op`,
`.intermediate_size`); the file needs nothing but transformers.
"""

from transformers import PretrainedConfig


class BlockFields(dict):
    """A block_configs part ({"no_op": ..., ...}) whose keys also read as attributes; saved as a plain dict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, rope_parameters=None, rope_theta=None, **kwargs):
        self.block_configs = [BlockFields({part: BlockFields(block.get(part) or {}) for part in ("attention", "ffn")})
                              for block in block_configs or []]
        self.rope_theta = rope_theta
        self.rope_parameters = rope_parameters
        super().__init__(**kwargs)
