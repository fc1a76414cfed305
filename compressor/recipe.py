"""Recipes: what the user asks for, as validated data.

A recipe is YAML checked against a strict schema (unknown keys and wrong types are errors that
name the field, the bad value and what is allowed). The recipe is saved beside the artifact.

The file is read within the limits of `compressor.safe_load` (size, nesting, alias expansion,
UTF-8); numbers must be finite and stay below bounds far above any real run (the constants
below), so that a typo cannot ask for terabytes of calibration tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, \
    model_validator

from compressor.errors import CompressorError, one_line, shorten
from compressor.placement import DEVICE_PATTERN, DEVICE_RULE
from compressor.models.adapters import ATTENTION_LINEARS, PROJECTIONS
from compressor.safe_load import RECIPE_MAX_BYTES, read_yaml
from compressor.serving import SERVE_TARGETS, VLLM_BITS

# Upper bounds of numeric fields (far above real runs; they stop absurd allocations, not experiments).
MAX_WINDOWS = 65_536                # calibration / evaluation / search windows, probe cases
MAX_SEQ_LEN = 131_072               # tokens per window or prompt
MAX_CALIBRATION_TOKENS = 1 << 25    # samples x seq_len (33.5M tokens)
MAX_PROMPT_TOKENS = 1 << 20         # sparse-token prompts and probes
MAX_NEW_TOKENS = 4_096
MAX_LAYERS = 10_000                 # layer indices, protected layers, group sizes
MAX_UNITS = 2 * MAX_LAYERS          # removal budgets (counts)
MAX_BATCH = 4_096
MAX_SEED = 2**32 - 1
MAX_RANK = 65_536
MAX_BYTES = 1 << 50
MAX_REPEATS = 1_000
MAX_LIST = 64                       # entries of short lists (widths, lengths, projections, formats)
MAX_TEXT = 4_096                    # characters of a path, a model source or a description

# A recipe's name is the default output folder out/NAME and the name in reports: one path
# component, nothing that walks out of out/ (no "/", "\\", "." or ".."), no hidden folder.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = ("1 to 100 characters: letters, digits, '.', '_' and '-', starting with a letter or digit "
             "(it becomes the folder out/NAME)")


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{shorten(name, 60)} is not a recipe name; allowed: {NAME_RULE}")
    return name


def _plain_text(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"must not contain control characters (newline, tab, NUL), got {shorten(value, 60)}")
    return value


# A file path, a model source or a dataset spec: one line of at most MAX_TEXT characters.
PathText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT), AfterValidator(_plain_text)]
LayerIndex = Annotated[int, Field(ge=0, lt=MAX_LAYERS)]
Budget = Union[int, float]


class Strict(BaseModel):
    # Unknown keys are errors; floats must be finite (.inf and .nan are refused).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Calibration(Strict):
    text: PathText = "embedded"
    samples: int = Field(32, ge=1, le=MAX_WINDOWS)
    seq_len: int = Field(512, ge=8, le=MAX_SEQ_LEN)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def bounded_tokens(self):
        if self.samples * self.seq_len > MAX_CALIBRATION_TOKENS:
            raise ValueError(f"samples x seq_len is {self.samples * self.seq_len} tokens; allowed: at most "
                             f"{MAX_CALIBRATION_TOKENS}")
        return self


class Protect(Strict):
    first: int = Field(1, ge=0, le=MAX_LAYERS)
    last: int = Field(1, ge=0, le=MAX_LAYERS)


class Removal(Strict):
    method: Literal["similarity", "iterative", "finercut"] = "similarity"
    # Counts (int) or fractions of that unit kind in the model (float in [0, 1)).
    attention: Budget = Field(0, ge=0, le=MAX_UNITS)
    mlp: Budget = Field(0, ge=0, le=MAX_UNITS)
    any: Budget = Field(0, ge=0, le=MAX_UNITS)
    protect: Protect = Protect()
    # The greedy methods score candidates on the first `search_samples` calibration windows, cut
    # to `search_seq_len` tokens (scoring every candidate at every step is the costly part).
    search_samples: int = Field(8, ge=1, le=MAX_WINDOWS)
    search_seq_len: int = Field(128, ge=8, le=MAX_SEQ_LEN)


# Stored code widths. 5 and 6 bits are packed densely by compressed-tensors (90 and 108 int32 per
# 576-wide row) and ride in int8 containers in ONNX.
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QuantBits = Literal[QUANT_BITS]
QUANT_GROUP_SIZES = (32, 64, 128, "channel")
GroupSize = Literal[QUANT_GROUP_SIZES]
# Quantization methods; the last two quantize on calibration windows. `signround` is GPTQ refined by
# learned rounding (compressor.transforms.signround); its sensitivity is measured with GPTQ.
QUANT_METHODS = ("rtn", "gptq", "signround")
CALIBRATED_METHODS = ("gptq", "signround")


def sensitivity_method(method: str) -> str:
    """The method a quantization sensitivity is measured with (one refinement per unit and width
    would cost the refinement's minutes that many times)."""
    return "gptq" if method == "signround" else method


class QuantizeBudget(Strict):
    """Exactly one of: `avg_bits`, the mean stored bits per weight of the decoder linears (packed codes,
    scales and zero points included; with `embeddings: auto`, of the linears and the embedding), or
    `bytes`, the whole model.safetensors (every tensor, over all shards)."""
    avg_bits: float | None = Field(None, gt=0, le=32)
    bytes: int | None = Field(None, gt=0, le=MAX_BYTES)

    @model_validator(mode="after")
    def exactly_one(self):
        if (self.avg_bits is None) == (self.bytes is None):
            raise ValueError("give exactly one of avg_bits or bytes")
        return self


class QuantizeProtect(Strict):
    # Super-weight candidates of the analysis: `keep` stores them exactly beside the packed matrix,
    # `pin` gives their layer (and layers where massive activations appear) the highest width,
    # `auto` is `keep`, `none` does nothing.
    outliers: Literal["auto", "keep", "pin", "none"] = "auto"
    layers: list[LayerIndex] = Field([], max_length=MAX_LAYERS)


class SignRound(Strict):
    """Learned rounding after GPTQ (method: signround): `steps` signed gradient steps per decoder
    layer, each on `windows` calibration windows drawn at random (the learning rate, by default
    1 / steps, decays linearly to zero)."""
    steps: int = Field(200, ge=1, le=10_000)
    windows: int = Field(1, ge=1, le=MAX_WINDOWS)
    learning_rate: float | None = Field(None, gt=0, le=1)


class Quantize(Strict):
    method: Literal[QUANT_METHODS] = "gptq"
    bits: list[QuantBits] = Field([2, 3, 4, 8], min_length=1, max_length=MAX_LIST)
    # One group size for every weight, or a list of them: then each unit's options are every width
    # at every group size (their sensitivity measured), and the knapsack trades scale bytes against
    # widths. The first listed is the primary: the fixed-width embedding's and the equalization
    # search's, and the one whose sensitivity scores are keyed by width alone.
    group_size: GroupSize | list[GroupSize] = 64
    symmetric: bool = True
    # Symmetric scales: `signed` lets a group's largest-magnitude weight land on the most negative
    # code whatever its sign (a negative scale when it is positive: every code in use); `positive`
    # keeps every scale positive, as TensorRT requires (the range then spans max/7 or -min/8).
    scales: Literal["signed", "positive"] = "signed"
    budget: QuantizeBudget = QuantizeBudget(avg_bits=4.0)
    allocate: Literal["sensitivity", "lim", "zd", "uniform"] = "sensitivity"
    # The allocation unit: a whole decoder layer, or its attention and MLP units separately.
    granularity: Literal["layer", "unit"] = "layer"
    # The token embedding (tied to the output head where the model ties them): a fixed width, kept
    # unquantized, or `auto`: one more unit of the knapsack, at each of `bits`, costed by its own
    # measured sensitivity (needs allocate: sensitivity).
    embeddings: QuantBits | Literal["keep", "auto"] = 8
    protect: QuantizeProtect = QuantizeProtect()
    # GPTQ: damping (a fraction of the mean Hessian diagonal), columns in order of decreasing
    # Hessian diagonal, and how calibration tokens are weighted in the Hessian (`equal`: each
    # token's input scaled to unit norm, so massive-activation tokens do not dominate; `raw`: X^T X).
    damp: float = Field(0.1, gt=0, le=100)
    act_order: bool = True
    hessian_tokens: Literal["equal", "raw"] = "equal"
    # Each group's range: `minmax` (the whole range of its weights) or `search` (the range shrunk by
    # up to 20 %, per group, to the least squared rounding error weighted by the Hessian diagonal;
    # compressor.transforms.quantize.group_parameters). The sensitivity is measured with min-max.
    clip: Literal["minmax", "search"] = "minmax"
    signround: SignRound = SignRound()
    # Sensitivity: KL divergence of the final next-token distributions with one allocation unit
    # quantized at each width, on the first `sensitivity_samples` calibration windows cut to
    # `sensitivity_seq_len` tokens.
    sensitivity_samples: int = Field(8, ge=1, le=MAX_WINDOWS)
    sensitivity_seq_len: int = Field(256, ge=8, le=MAX_SEQ_LEN)

    @property
    def group_sizes(self) -> list:
        """The group sizes the allocation may choose, the primary first."""
        return list(self.group_size) if isinstance(self.group_size, list) else [self.group_size]

    @model_validator(mode="after")
    def distinct_bits(self):
        if len(set(self.bits)) != len(self.bits):
            raise ValueError(f"bits must not repeat a width, got {shorten(self.bits)}")
        self.bits = sorted(self.bits)
        if isinstance(self.group_size, list):
            if not self.group_size or len(set(self.group_size)) != len(self.group_size):
                raise ValueError(f"group_size must list distinct group sizes, got {shorten(self.group_size)}")
            if len(self.group_size) == 1:
                self.group_size = self.group_size[0]
        if isinstance(self.group_size, list) and self.allocate != "sensitivity":
            raise ValueError(f"a list of group sizes is chosen per unit by measured sensitivity; it needs "
                             f"allocate: sensitivity, got allocate: {self.allocate}")
        if self.embeddings == "auto" and self.allocate != "sensitivity":
            raise ValueError(f"embeddings: auto allocates the embedding by its measured sensitivity; it needs "
                             f"allocate: sensitivity, got allocate: {self.allocate}")
        return self


class Equalize(Strict):
    """Activation-aware equalization (AWQ) before quantization (compressor.transforms.equalize): per
    input channel scales folded exactly into the preceding norm or linear, their exponent alpha
    searched per group of linears on `samples` calibration windows (the first `tokens` rows of each
    group's input score round-to-nearest at `bits` in the quantize section's format, `grid` steps)."""
    method: Literal["awq"] = "awq"
    bits: QuantBits = 4
    grid: int = Field(20, ge=2, le=100)
    samples: int = Field(8, ge=1, le=MAX_WINDOWS)
    tokens: int = Field(2048, ge=16, le=MAX_SEQ_LEN)


class FilterProbe(Strict):
    """The retrieval probe behind `filter_layer: auto`: needles planted in calibration text at
    `samples` depths in prompts of `tokens` tokens; a layer recovers a needle when its selection keeps
    the needle's number; the earliest layer recovering at least `min_recall` of them is chosen."""
    samples: int = Field(8, ge=1, le=MAX_WINDOWS)
    tokens: int = Field(4096, ge=64, le=MAX_PROMPT_TOKENS)
    min_recall: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)


# The sparse-token filter's numbers: bounds and the rules between them, for recipes, plans, configs
# and the filter itself (compressor.transforms.sparse_tokens).
SPARSE_METHODS = ("gemfilter", "promptdistill")
SPARSE_BOUNDS = {"keep_tokens": (2, MAX_PROMPT_TOKENS), "keep_first": (0, MAX_PROMPT_TOKENS),
                 "keep_last": (1, MAX_PROMPT_TOKENS), "pool_width": (1, 1025)}


def sparse_settings_problem(keep_tokens, keep_first, keep_last, pool_width) -> str | None:
    """What is wrong with these filter numbers (None: nothing)."""
    values = {"keep_tokens": keep_tokens, "keep_first": keep_first, "keep_last": keep_last, "pool_width": pool_width}
    for name, (low, high) in SPARSE_BOUNDS.items():
        value = values[name]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"{name} must be an integer {low}..{high}, got {shorten(value, 40)}"
    if keep_first + keep_last > keep_tokens:
        return f"keep_first + keep_last ({keep_first + keep_last}) exceeds keep_tokens ({keep_tokens})"
    if pool_width % 2 == 0:
        return f"pool_width must be odd, got {pool_width}"
    return None


def _sparse_field(name: str, default: int):
    low, high = SPARSE_BOUNDS[name]
    return Field(default, ge=low, le=high)


class SparseTokens(Strict):
    """Sparse-token attention for long prompts (see compressor.transforms.sparse_tokens)."""
    method: Literal[SPARSE_METHODS] = "promptdistill"
    filter_layer: Union[Literal["auto"], Annotated[int, Field(lt=MAX_LAYERS)]] = "auto"
    keep_tokens: int = _sparse_field("keep_tokens", 1024)
    keep_first: int = _sparse_field("keep_first", 1)
    keep_last: int = _sparse_field("keep_last", 32)
    pool_width: int = _sparse_field("pool_width", 5)
    probe: FilterProbe = FilterProbe()

    @model_validator(mode="after")
    def consistent(self):
        if isinstance(self.filter_layer, int) and self.filter_layer < 0:
            raise ValueError(f"filter_layer must be 'auto' or a layer index >= 0, got {self.filter_layer}")
        problem = sparse_settings_problem(self.keep_tokens, self.keep_first, self.keep_last, self.pool_width)
        if problem:
            raise ValueError(problem)
        if self.probe.tokens <= self.keep_tokens:
            raise ValueError(f"probe.tokens ({self.probe.tokens}) must exceed keep_tokens ({self.keep_tokens}), "
                             "or every token is kept and the probe measures nothing")
        return self


Projection = Literal[PROJECTIONS]


class Share(Strict):
    """Cross-layer weight sharing (see compressor.transforms.share): each listed projection is
    grouped across layers; a group stores one basis and per-layer coefficients."""
    projections: list[Projection] = Field(list(ATTENTION_LINEARS), min_length=1, max_length=MAX_LIST)
    # Fraction of the listed projections' parameters to remove (0.2: 20 % fewer).
    reduction: float = Field(0.2, gt=0, lt=1)
    # `activation`: whitened by the calibration inputs, coefficients refit by least squares;
    # `weight`: SVD of the stacked weights alone.
    fit: Literal["activation", "weight"] = "activation"
    # `similarity`: contiguous groups chosen to maximize the weight-subspace overlap inside each
    # group (as many groups as `adjacent` would make, each at most twice `group_size`);
    # `adjacent`: consecutive runs of `group_size` layers. group_size 1 is per-layer truncated SVD.
    grouping: Literal["similarity", "adjacent"] = "similarity"
    group_size: int = Field(5, ge=1, le=MAX_LAYERS)
    # `error`: ranks chosen across all groups (an exact knapsack) to minimize the summed per-layer
    # relative fit error within the budget, so a group may stay dense; `uniform`: every group keeps
    # the same fraction of its parameters.
    allocate: Literal["error", "uniform"] = "error"
    # With `allocate: error`, a group may instead give each of its layers its own basis (per-layer
    # truncated SVD) where that costs less fit error for its parameters than sharing. Measured on
    # the embedded model it helps at light reductions (10 %) and hurts at 20-30 % (README).
    per_layer_fallback: bool = False
    # A per-layer low-rank correction of this rank beside the shared part (0: none).
    residual_rank: int = Field(0, ge=0, le=MAX_RANK)
    # Ranks are multiples of this (and of the quantization group size when quantizing).
    rank_multiple: int = Field(32, ge=1, le=MAX_RANK)

    @model_validator(mode="after")
    def distinct_projections(self):
        if len(set(self.projections)) != len(self.projections):
            raise ValueError(f"projections must not repeat, got {shorten(self.projections)}")
        return self


class Analysis(Strict):
    removal_sensitivity: bool = False
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)


class Speed(Strict):
    prompt_tokens: int = Field(512, ge=1, le=MAX_SEQ_LEN)
    new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    repeats: int = Field(3, ge=1, le=MAX_REPEATS)


class Needles(Strict):
    """Needle-in-a-haystack cases: `per_cell` for every length x depth, haystack from `text`."""
    text: PathText = "auto"  # auto: the evaluation text
    lengths: list[Annotated[int, Field(ge=64, le=MAX_PROMPT_TOKENS)]] = Field([4096], min_length=1, max_length=MAX_LIST)
    depths: int = Field(5, ge=1, le=MAX_REPEATS)
    per_cell: int = Field(1, ge=1, le=MAX_REPEATS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    max_new_tokens: int = Field(12, ge=1, le=MAX_NEW_TOKENS)


class Evaluation(Strict):
    text: PathText = "auto"  # auto: WikiText-2 test when present beside the project, else embedded text
    windows: int = Field(16, ge=1, le=MAX_WINDOWS)
    seq_len: int = Field(512, ge=8, le=MAX_SEQ_LEN)
    speed: Speed = Speed()
    compare_original: bool = True
    # Needle retrieval with and without the plan's sparse-token filter (off when absent).
    needles: Needles | None = None


Profile = Annotated[list[Annotated[int, Field(ge=0, le=MAX_PROMPT_TOKENS)]], Field(min_length=3, max_length=3)]


class TensorRT(Strict):
    """How `export: [tensorrt]` builds its engines (exporters.tensorrt): the library, the token
    selection's form, the activations' precision, and min / opt / max of each optimization profile axis (batch, new tokens per
    call, cached tokens)."""
    library: Literal["auto", "tensorrt", "tensorrt-rtx"] = "auto"  # auto: full TensorRT when installed
    # The sparse prefill graph's token selection: the SelectTokens plugin (needs nvcc and TensorRT's
    # C++ headers to compile it) or the inlined standard layers; auto: the plugin when it can be built.
    token_selection: Literal["auto", "plugin", "inlined"] = "auto"
    # The matrix products' activations and the KV cache (exporters.tensorrt.precision): 16-bit runs
    # int4/int8 weights as W4A16 / W8A16; norms, rotary angles and softmax stay float32.
    precision: Literal["float16", "bfloat16", "float32"] = "float16"
    batch: Profile = [1, 1, 4]
    sequence: Profile = [1, 128, 2048]
    past: Profile = [0, 512, 2048]

    @field_validator("batch", "sequence", "past")
    @classmethod
    def _ordered(cls, value: list[int], info):
        low, opt, high = value
        if not low <= opt <= high or (info.field_name != "past" and low < 1):
            raise ValueError(f"must be [min, opt, max] with min <= opt <= max"
                             f"{' and min >= 1' if info.field_name != 'past' else ''}, got {value}")
        return value


class OnnxExport(Strict):
    """How `export: [onnx]` records the graphs' compute (exporters.onnx.export): `matmul_accuracy` is what
    the toolkit's ONNX Runtime loader computes fused DequantizeLinear -> MatMul (MatMulNBits) in when
    its caller names none. `fp32` gives the torch model's logits (within the export tolerance); `int8`
    quantizes activations on the fly, as ONNX Runtime itself does by default for this fusion and as
    llama.cpp's dot products do: about twice as fast to decode on a CPU, logits not equal."""
    matmul_accuracy: Literal["fp32", "int8"] = "fp32"


class Recipe(Strict):
    # The default output folder is out/NAME. A recipe read from a file or the command line must have
    # a NAME_RULE name: 1 to 100 of letters, digits, '.', '_', '-', starting with a letter or digit
    # (so no path separators, no '.', '..' or hidden folder, no spaces or control characters).
    name: str = "recipe"
    description: str = Field("", max_length=MAX_TEXT)
    model: PathText = "embedded"
    calibration: Calibration = Calibration()
    analysis: Analysis = Analysis()
    remove: Removal | None = None
    quantize: Quantize | None = None
    sparse_tokens: SparseTokens | None = None
    share: Share | None = None
    equalize: Equalize | None = None
    evaluate: Evaluation = Evaluation()
    # model.safetensors is always written (every other format is exported from it); "onnx" adds onnx/,
    # "tensorrt" adds tensorrt/ (its engines are built from the ONNX graphs, so onnx/ is written too).
    export: list[Literal["safetensors", "onnx", "tensorrt"]] = Field(["safetensors"], max_length=MAX_LIST)
    onnx: OnnxExport = OnnxExport()
    tensorrt: TensorRT = TensorRT()
    # Weights above this many bytes are written as shards model-0000k-of-0000n.safetensors with
    # model.safetensors.index.json (exporters.shards); the default is the hub's customary 5 GB.
    max_shard_bytes: int = Field(5_000_000_000, ge=1_000_000, le=MAX_BYTES)
    # Serving stacks the artifact must load in without this package (compressor.serving); the recipe
    # is kept to what they run (see keep_to_serving), or refused.
    serve: list[Literal[SERVE_TARGETS]] = Field([], max_length=len(SERVE_TARGETS))
    # Where the model computes (compressor.placement): auto (the first CUDA device, else the CPU), cpu,
    # cuda or cuda:N; `compress --device` overrides it. compute_dtype auto: bfloat16 on CUDA, float32 on
    # the CPU (sums that need the range stay float32/float64 whatever this is).
    device: str = Field("auto", max_length=16)
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # memory: every weight loaded; disk: the decoder layers read from the source's safetensors one at a
    # time (compressor.execution); auto: disk when the model would take over a quarter of the memory.
    weights: Literal["auto", "memory", "disk"] = "auto"

    @field_validator("device")
    @classmethod
    def a_device(cls, device: str) -> str:
        if not DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"{shorten(device, 40)} is not a device; allowed: {DEVICE_RULE}")
        return device

    @field_validator("name")
    @classmethod
    def a_name(cls, name: str, info: ValidationInfo) -> str:
        # Checked for recipes read from input (parse_recipe); `Recipe(name=...)` built by code (the
        # evaluation of an artifact folder without recipe.yaml uses the folder's name) is left alone.
        if (info.context or {}).get("input"):
            check_name(name)
        return name

    @model_validator(mode="after")
    def equalize_before_quantizing(self):
        if self.equalize is not None and self.quantize is None:
            raise ValueError("equalize: searches scales for the quantize section's format; add a quantize section "
                             "or drop equalize")
        if self.equalize is not None and self.share is not None:
            raise ValueError("equalize: cannot scale projections that share factors (share); drop one of them")
        return self

    @model_validator(mode="after")
    def servable(self):
        return keep_to_serving(self)


def keep_to_serving(recipe: Recipe) -> Recipe:
    """A recipe with `serve:` targets, kept to what they load and run: no shared weights or sparse-token
    filter (toolkit-only), no removal for plain transformers (it has no class for it), symmetric
    weights, the embedding kept (a quantized one loads in neither), super weights protected by width
    (`pin`) instead of stored exactly, and for vLLM only the widths it has kernels for. What cannot be
    kept to raises one error naming the field."""
    targets = list(dict.fromkeys(recipe.serve))
    recipe.serve = targets
    if not targets:
        return recipe
    named = f"serve [{', '.join(targets)}]"
    for section, what in (("share", "shared weights"), ("sparse_tokens", "a sparse-token filter")):
        if getattr(recipe, section) is not None:
            raise ValueError(f"{named} cannot be met with a {section} section: {what} load only in this toolkit; "
                             f"drop {section} or serve")
    if "transformers" in targets and recipe.remove is not None:
        raise ValueError(f"{named} cannot be met with a remove section: transformers without this package has no "
                         "class for a model with removed sub-layers (vLLM serves it: serve: [vllm])")
    quantize = recipe.quantize
    if quantize is None:
        return recipe
    if not quantize.symmetric:
        raise ValueError(f"{named} needs quantize.symmetric: true (transformers refuses asymmetric zero points)")
    if quantize.protect.outliers == "keep":
        raise ValueError(f"{named} cannot be met with quantize.protect.outliers: keep (weights stored beside the "
                         "packed matrices, which only this toolkit restores); use pin or auto")
    if "embeddings" in quantize.model_fields_set and quantize.embeddings != "keep":
        raise ValueError(f"{named} cannot be met with quantize.embeddings: {quantize.embeddings} (transformers' "
                         "model classes cannot load a quantized embedding, vLLM's CPU backend cannot run one); "
                         "use keep")
    bits = quantize.bits
    if "vllm" in targets:
        bits = [b for b in bits if b in VLLM_BITS]
        if not bits:
            raise ValueError(f"{named} cannot be met with quantize.bits {quantize.bits}: vLLM has kernels for "
                             f"{' and '.join(map(str, VLLM_BITS))} bits")
    outliers = "pin" if quantize.protect.outliers == "auto" else quantize.protect.outliers
    recipe.quantize = quantize.model_copy(update={
        "bits": bits, "embeddings": "keep", "protect": quantize.protect.model_copy(update={"outliers": outliers})})
    return recipe


def default(section: type[BaseModel], field: str):
    """The recipe schema's default for a field. Library functions take their defaults from here, so
    that a call without a recipe does what a recipe leaving the field out does."""
    return section.model_fields[field].default


DEFAULT_BATCH_SIZE = default(Analysis, "batch_size")


def _allowed_fields(model_cls, loc) -> list[str]:
    cls = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            break
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            break
        cls = candidates[0]
    return list(cls.model_fields)


# pydantic's names for the branches of a union (remove.attention.int), not part of a field's path.
_BRANCH_NAMES = ("int", "float", "str", "bool")
_BRANCH_PREFIXES = ("function-", "literal[", "constrained-")
# An error line names at most this many characters of problems (then "and N more").
MESSAGE_LIMIT = 280


def _path_part(part) -> str:
    text = str(part)
    if len(text) > 40 or not text.isprintable():
        text = shorten(text, 40)
    return text


def _field_path(loc: tuple, prefix: str = "", user_key_last: bool = False) -> str:
    """The dotted path of an error's location, without pydantic's union branch names (the last part
    of an unknown-key error is the user's key, kept whatever it is)."""
    parts = [_path_part(p) for i, p in enumerate(loc)
             if (user_key_last and i == len(loc) - 1)
             or not (isinstance(p, str) and (p in _BRANCH_NAMES or p.startswith(_BRANCH_PREFIXES)))]
    return ".".join(([prefix] if prefix else []) + parts) or "(top level)"


def describe_validation_error(error: ValidationError, where: str, model_cls=None, prefix: str = "") -> str:
    """One line for all of a validation's problems: each names the field, says what is allowed and
    quotes the bad value (shortened); past MESSAGE_LIMIT characters the rest are counted."""
    model_cls = model_cls or Recipe
    lines, by_field = [], {}
    for item in error.errors(include_url=False):
        field = _field_path(tuple(item["loc"]), prefix, item["type"] == "extra_forbidden")
        if item["type"] == "extra_forbidden":
            allowed = _allowed_fields(model_cls, tuple(item["loc"]))
            lines.append(f"unknown key '{field}'; allowed here: {', '.join(allowed)}")
        elif item["type"] == "value_error":  # our own validators quote what they refuse
            message = str(item["msg"]).removeprefix("Value error, ")
            lines.append(one_line(f"{field}: {message}", MESSAGE_LIMIT))
        else:  # the branches of a union (a count or a fraction) are one problem of one field
            if field not in by_field:
                by_field[field] = ([], shorten(item.get("input"), 60))
                lines.append(field)
            by_field[field][0].append(str(item["msg"]).lower())
    lines = [one_line(f"{line}: {' or '.join(dict.fromkeys(by_field[line][0]))} (got {by_field[line][1]})",
                      MESSAGE_LIMIT) if line in by_field else line for line in lines]
    unique = list(dict.fromkeys(lines))
    shown = unique[:1]
    for line in unique[1:]:
        if len("; ".join(shown + [line])) > MESSAGE_LIMIT:
            break
        shown.append(line)
    more = f"; and {len(unique) - len(shown)} more" if len(unique) > len(shown) else ""
    return f"{where}: " + "; ".join(shown) + more


def parse_recipe(data, where: str = "recipe") -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CompressorError(f"{where}: expected a mapping of recipe keys at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data, context={"input": True})
    except ValidationError as exc:
        raise CompressorError(describe_validation_error(exc, where)) from None
    except RecursionError:  # data built by code, nested past Python's stack (files are depth-limited)
        raise CompressorError(f"{where}: nested too deeply to be a recipe") from None


def load_recipe(path: str | Path) -> Recipe:
    """A recipe file: at most RECIPE_MAX_BYTES of UTF-8 YAML (see compressor.safe_load), validated."""
    return parse_recipe(read_yaml(path, "recipe", RECIPE_MAX_BYTES), str(path))


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
