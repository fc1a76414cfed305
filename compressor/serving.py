"""Which serving stacks load an artifact, decided from what it holds, and the form its config.json takes.

An artifact is written in the most standard form its contents allow (`config_form`):

- "standard": the source family's own class and model_type (LlamaForCausalLM / llama, Mistral,
  Qwen2, Qwen3), so transformers and vLLM load it without this package;
- "nemotron-nas": sub-layers removed; vLLM's DeciLMForCausalLM (Nemotron-NAS) form, with the config
  class shipped in the folder (vLLM needs trust_remote_code=True for that config code);
- "toolkit": CompressedForCausalLM / compressor_decoder, which only this toolkit reads.

The standard forms are written only when a reader that knows nothing of this toolkit computes the
toolkit's model exactly: weights kept exactly beside a packed matrix (super weights), a quantized
embedding (transformers' Llama fails on it; vLLM's lookup kernel for it is Triton-only), asymmetric
weights (transformers refuses their zero points), shared weights and a sparse-token filter keep an
artifact in the toolkit form. `stack_support` says per stack whether it loads the artifact and why
not; `serve:` in a recipe (compressor.recipe) keeps a plan to what its targets load.

The config is read duck-typed (a CompressedConfig, or anything with its fields), so this module
sits below the model classes and the exporters that use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from compressor.errors import CompressorError

STACKS = ("toolkit", "onnxruntime", "transformers", "vllm")
STACK_TITLES = {"toolkit": "toolkit (torch)", "onnxruntime": "ONNX Runtime",
                "transformers": "transformers without this package", "vllm": "vLLM"}
# The stacks a recipe can name in `serve:` (the toolkit and ONNX Runtime read every artifact).
SERVE_TARGETS = ("transformers", "vllm")
FORMS = ("standard", "nemotron-nas", "toolkit")
STANDARD_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
EMBEDDING = "model.embed_tokens"
# vLLM's compressed-tensors WNA16 kernels: 4 and 8 bits on GPUs; its CPU backend runs 4 bits only,
# and only in AVX-512 builds.
VLLM_BITS = (4, 8)
VLLM_CPU_BITS = (4,)


@dataclass(frozen=True)
class Support:
    loads: bool
    # Why it does not load (loads False), or what loading it takes (loads True); may be empty.
    notes: tuple[str, ...] = ()

    def text(self) -> str:
        head = "yes" if self.loads else "no"
        return f"{head} ({'; '.join(self.notes)})" if self.notes else head


def quantized_formats(config) -> dict[str, tuple[int, bool]]:
    """Module name -> (bits, symmetric) from config.json's compressed-tensors quantization_config."""
    formats = {}
    for group in ((getattr(config, "quantization_config", None) or {}).get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        for target in group.get("targets") or []:
            formats[target] = (weights.get("num_bits"), bool(weights.get("symmetric", True)))
    return formats


def _blocks(config) -> list[dict]:
    return list(getattr(config, "block_configs", None) or [])


def removed_units(config) -> list[tuple[int, str]]:
    """(layer, "attention" | "mlp") of every sub-layer the artifact does not have."""
    removed = []
    for layer, block in enumerate(_blocks(config)):
        if block["attention"]["no_op"]:
            removed.append((layer, "attention"))
        if block["ffn"]["no_op"]:
            removed.append((layer, "mlp"))
    return removed


def toolkit_only(config) -> list[str]:
    """What no reader but this toolkit computes as the toolkit does (empty: a standard form applies)."""
    reasons = []
    family = getattr(config, "source_architecture", None)
    if family not in STANDARD_FAMILIES:
        reasons.append(f"a source architecture ({family!r}) without a standard form here")
    if getattr(config, "weight_sharing", None):
        reasons.append("shared weights (only this toolkit has a class for them)")
    if getattr(config, "sparse_tokens", None):
        reasons.append("a sparse-token filter (only this toolkit runs it)")
    exact = getattr(config, "exact_weights", None) or {}
    if exact:
        reasons.append(f"{sum(exact.values())} weights kept exactly beside packed matrices (only this toolkit "
                       "restores them; protect.outliers: pin protects by width instead)")
    formats = quantized_formats(config)
    if EMBEDDING in formats:
        reasons.append(f"an embedding quantized to {formats[EMBEDDING][0]} bits (transformers' model classes cannot load a "
                       "quantized embedding; quantize.embeddings: keep)")
    if any(not symmetric for _, symmetric in formats.values()):
        reasons.append("asymmetric weights (transformers refuses their zero points; quantize.symmetric: true)")
    return reasons


def nemotron_blockers(config) -> list[str]:
    """What vLLM's Nemotron-NAS (DeciLM) class cannot express of a model with removed sub-layers."""
    reasons = []
    if getattr(config, "qk_norm", False):
        reasons.append("q/k norms (Qwen3), which vLLM's Nemotron-NAS class does not have")
    if bool(getattr(config, "attention_bias", False)) != bool(getattr(config, "attention_output_bias", False)):
        reasons.append("q/k/v biases without an o_proj bias (Qwen2), which vLLM's Nemotron-NAS class cannot express")
    window = getattr(config, "attention_window", None)
    if window is not None and window < getattr(config, "max_position_embeddings", 0):
        reasons.append(f"a {window}-token sliding window, which vLLM's Nemotron-NAS class does not apply")
    return reasons


def config_form(config) -> str:
    """The form config.json is written in (see the module docstring)."""
    if toolkit_only(config):
        return "toolkit"
    if not removed_units(config):
        return "standard"
    return "toolkit" if nemotron_blockers(config) else "nemotron-nas"


def vllm_layer_problem(config) -> str | None:
    """vLLM's Nemotron-NAS forward starts its residual stream at the first attention it runs: a first
    layer that runs an MLP without attention before it gives that MLP no residual (it fails)."""
    for layer, block in enumerate(_blocks(config)):
        if not block["attention"]["no_op"]:
            return None
        if not block["ffn"]["no_op"]:
            return (f"layer {layer} runs its MLP with no attention before it, which vLLM's Nemotron-NAS forward "
                    "cannot run (keep that layer's attention)")
    return None


def stack_support(config, has_onnx: bool, form: str | None = None) -> dict[str, Support]:
    """Stack name (STACKS) -> whether it loads an artifact with this config, and why not. `form` is
    the form config.json is in, when known (an artifact written before the standard forms existed is
    in the toolkit's form whatever it holds); by default the form it would be written in."""
    written = form
    form = form or config_form(config)
    formats = quantized_formats(config)
    widths = sorted({bits for bits, _ in formats.values()})
    support = {"toolkit": Support(True)}
    support["onnxruntime"] = (Support(True, ("onnx/ export",)) if has_onnx else
                              Support(False, ("no onnx/ export (compress export --format onnx)",)))
    if form == "standard":
        support["transformers"] = Support(True, ("with compressed-tensors installed",) if formats else ())
    elif form == "nemotron-nas":
        support["transformers"] = Support(False, ("sub-layers removed: transformers has no class for that "
                                                  "(it loads after `import compressor`)",))
    else:
        old_form = [f"config.json is in the toolkit's form (written before the {config_form(config)} form existed; "
                    "compress it again)"] if written == "toolkit" and config_form(config) != "toolkit" else []
        removed = ["sub-layers removed: transformers has no class for that (it loads after `import compressor`)"] \
            if removed_units(config) else []
        support["transformers"] = Support(False, tuple(toolkit_only(config) or removed or old_form))
    if form == "toolkit":
        support["vllm"] = Support(False, tuple(toolkit_only(config) or nemotron_blockers(config) or old_form))
    else:
        problems = []
        beyond = [b for b in widths if b not in VLLM_BITS]
        if beyond:
            problems.append(f"{'/'.join(map(str, beyond))}-bit weights (vLLM's kernels take "
                            f"{' and '.join(map(str, VLLM_BITS))} bits)")
        layer = vllm_layer_problem(config) if form == "nemotron-nas" else None
        if layer:
            problems.append(layer)
        if problems:
            support["vllm"] = Support(False, tuple(problems))
        else:
            notes = ["trust_remote_code=True (the Nemotron-NAS config class shipped in the folder)"] \
                if form == "nemotron-nas" else []
            if formats:
                notes.append(f"its CPU backend runs {'/'.join(map(str, VLLM_CPU_BITS))}-bit weights only, with "
                             "16-bit activations (dtype bfloat16)")
            support["vllm"] = Support(True, tuple(notes))
    return support


def unmet_targets(config, targets, has_onnx: bool = False) -> list[str]:
    """One line per `serve:` target that would not load an artifact with this config."""
    support = stack_support(config, has_onnx)
    return [f"{STACK_TITLES[t]}: {'; '.join(support[t].notes)}" for t in targets if not support[t].loads]



def require_source(config, targets, removes: bool) -> None:
    """Before any work: one error when something about the source model keeps a `serve:` target from
    loading the artifact (a family without a standard form; for vLLM with removal, what its
    Nemotron-NAS class cannot express)."""
    if not targets:
        return
    problems = toolkit_only(config) + (nemotron_blockers(config) if removes and "vllm" in targets else [])
    if problems:
        raise CompressorError(f"serve: [{', '.join(targets)}] cannot be met for this model, which has "
                              f"{'; '.join(problems)}")


def require_targets(config, targets) -> None:
    """Before an artifact is written: one error when a `serve:` target would not load it (a plan edited by
    hand, or applied to another model)."""
    unmet = unmet_targets(config, targets)
    if unmet:
        raise CompressorError(f"serve: [{', '.join(targets)}] cannot be met by this plan: {'; '.join(unmet)}")
