"""Recipes: what the user asks for, as validated data.

A recipe is YAML checked against a strict schema (unknown keys and wrong types are errors that
name the field, the bad value and what is allowed). The recipe is saved beside the artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compressor.errors import CompressorError

Budget = Union[int, float]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibration(Strict):
    text: str = "embedded"
    samples: int = Field(32, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0


class Protect(Strict):
    first: int = Field(1, ge=0)
    last: int = Field(1, ge=0)


class Removal(Strict):
    method: Literal["similarity", "iterative", "finercut"] = "similarity"
    # Counts (int) or fractions of that unit kind in the model (float in [0, 1)).
    attention: Budget = Field(0, ge=0)
    mlp: Budget = Field(0, ge=0)
    any: Budget = Field(0, ge=0)
    protect: Protect = Protect()
    # The greedy methods score candidates on the first `search_samples` calibration windows, cut
    # to `search_seq_len` tokens (scoring every candidate at every step is the costly part).
    search_samples: int = Field(8, ge=1)
    search_seq_len: int = Field(128, ge=8)


class QuantizeBudget(Strict):
    """Exactly one of: `avg_bits`, the mean stored bits per weight of the decoder linears (packed codes,
    scales and zero points included), or `bytes`, the whole model.safetensors (every tensor)."""
    avg_bits: float | None = Field(None, gt=0)
    bytes: int | None = Field(None, gt=0)

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
    layers: list[int] = []


class Quantize(Strict):
    method: Literal["rtn", "gptq"] = "gptq"
    bits: list[Literal[2, 3, 4, 8]] = Field([2, 3, 4, 8], min_length=1)
    group_size: Literal[32, 64, 128, "channel"] = 64
    symmetric: bool = True
    budget: QuantizeBudget = QuantizeBudget(avg_bits=4.0)
    allocate: Literal["sensitivity", "lim", "zd", "uniform"] = "sensitivity"
    # The allocation unit: a whole decoder layer, or its attention and MLP units separately.
    granularity: Literal["layer", "unit"] = "layer"
    embeddings: Literal[2, 3, 4, 8, "keep"] = 8
    protect: QuantizeProtect = QuantizeProtect()
    # GPTQ: damping (a fraction of the mean Hessian diagonal), columns in order of decreasing
    # Hessian diagonal, and how calibration tokens are weighted in the Hessian (`equal`: each
    # token's input scaled to unit norm, so massive-activation tokens do not dominate; `raw`: X^T X).
    damp: float = Field(0.1, gt=0)
    act_order: bool = True
    hessian_tokens: Literal["equal", "raw"] = "equal"
    # Sensitivity: KL divergence of the final next-token distributions with one allocation unit
    # quantized at each width, on the first `sensitivity_samples` calibration windows cut to
    # `sensitivity_seq_len` tokens.
    sensitivity_samples: int = Field(8, ge=1)
    sensitivity_seq_len: int = Field(256, ge=8)

    @model_validator(mode="after")
    def distinct_bits(self):
        if len(set(self.bits)) != len(self.bits):
            raise ValueError(f"bits must not repeat a width, got {self.bits}")
        self.bits = sorted(self.bits)
        return self


class FilterProbe(Strict):
    """The retrieval probe behind `filter_layer: auto`: needles planted in calibration text at
    `samples` depths in prompts of `tokens` tokens; a layer recovers a needle when its selection keeps
    the needle's number; the earliest layer recovering at least `min_recall` of them is chosen."""
    samples: int = Field(8, ge=1)
    tokens: int = Field(4096, ge=64)
    min_recall: float = Field(1.0, gt=0, le=1)
    seed: int = 0


class SparseTokens(Strict):
    """Sparse-token attention for long prompts (see compressor.transforms.sparse_tokens)."""
    method: Literal["gemfilter", "promptdistill"] = "promptdistill"
    filter_layer: Union[Literal["auto"], int] = "auto"
    keep_tokens: int = Field(1024, ge=2)
    keep_first: int = Field(1, ge=0)
    keep_last: int = Field(32, ge=1)
    pool_width: int = Field(5, ge=1)
    probe: FilterProbe = FilterProbe()

    @model_validator(mode="after")
    def consistent(self):
        if isinstance(self.filter_layer, int) and self.filter_layer < 0:
            raise ValueError(f"filter_layer must be 'auto' or a layer index >= 0, got {self.filter_layer}")
        if self.keep_first + self.keep_last > self.keep_tokens:
            raise ValueError(f"keep_first + keep_last ({self.keep_first + self.keep_last}) exceeds "
                             f"keep_tokens ({self.keep_tokens})")
        if self.pool_width % 2 == 0:
            raise ValueError(f"pool_width must be odd, got {self.pool_width}")
        if self.probe.tokens <= self.keep_tokens:
            raise ValueError(f"probe.tokens ({self.probe.tokens}) must exceed keep_tokens ({self.keep_tokens}), "
                             "or every token is kept and the probe measures nothing")
        return self


Projection = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Share(Strict):
    """Cross-layer weight sharing (see compressor.transforms.share): each listed projection is
    grouped across layers; a group stores one basis and per-layer coefficients."""
    projections: list[Projection] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    # Fraction of the listed projections' parameters to remove (0.2: 20 % fewer).
    reduction: float = Field(0.2, gt=0, lt=1)
    # `activation`: whitened by the calibration inputs, coefficients refit by least squares;
    # `weight`: SVD of the stacked weights alone.
    fit: Literal["activation", "weight"] = "activation"
    # `similarity`: contiguous groups chosen to maximize the weight-subspace overlap inside each
    # group (as many groups as `adjacent` would make, each at most twice `group_size`);
    # `adjacent`: consecutive runs of `group_size` layers. group_size 1 is per-layer truncated SVD.
    grouping: Literal["similarity", "adjacent"] = "similarity"
    group_size: int = Field(5, ge=1)
    # `error`: ranks chosen across all groups (an exact knapsack) to minimize the summed per-layer
    # relative fit error within the budget, so a group may stay dense; `uniform`: every group keeps
    # the same fraction of its parameters.
    allocate: Literal["error", "uniform"] = "error"
    # With `allocate: error`, a group may instead give each of its layers its own basis (per-layer
    # truncated SVD) where that costs less fit error for its parameters than sharing. Measured on
    # the embedded model it helps at light reductions (10 %) and hurts at 20-30 % (README).
    per_layer_fallback: bool = False
    # A per-layer low-rank correction of this rank beside the shared part (0: none).
    residual_rank: int = Field(0, ge=0)
    # Ranks are multiples of this (and of the quantization group size when quantizing).
    rank_multiple: int = Field(32, ge=1)

    @model_validator(mode="after")
    def distinct_projections(self):
        if len(set(self.projections)) != len(self.projections):
            raise ValueError(f"projections must not repeat, got {self.projections}")
        return self


class Analysis(Strict):
    removal_sensitivity: bool = False
    batch_size: int = Field(4, ge=1)


class Speed(Strict):
    prompt_tokens: int = Field(512, ge=1)
    new_tokens: int = Field(32, ge=1)
    repeats: int = Field(3, ge=1)


class Needles(Strict):
    """Needle-in-a-haystack cases: `per_cell` for every length x depth, haystack from `text`."""
    text: str = "auto"  # auto: the evaluation text
    lengths: list[int] = Field([4096], min_length=1)
    depths: int = Field(5, ge=1)
    per_cell: int = Field(1, ge=1)
    seed: int = 0
    max_new_tokens: int = Field(12, ge=1)


class Evaluation(Strict):
    text: str = "auto"  # auto: WikiText-2 test when present beside the project, else embedded text
    windows: int = Field(16, ge=1)
    seq_len: int = Field(512, ge=8)
    speed: Speed = Speed()
    compare_original: bool = True
    # Needle retrieval with and without the plan's sparse-token filter (off when absent).
    needles: Needles | None = None


class Recipe(Strict):
    name: str = "recipe"
    description: str = ""
    model: str = "embedded"
    calibration: Calibration = Calibration()
    analysis: Analysis = Analysis()
    remove: Removal | None = None
    quantize: Quantize | None = None
    sparse_tokens: SparseTokens | None = None
    share: Share | None = None
    evaluate: Evaluation = Evaluation()
    # model.safetensors is always written (every other format is exported from it); "onnx" adds onnx/.
    export: list[Literal["safetensors", "onnx"]] = ["safetensors"]


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


def describe_validation_error(error: ValidationError, where: str) -> str:
    lines = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"] if not str(p).startswith(("int", "float", "function"))]
        field = ".".join(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_fields(Recipe, tuple(item["loc"]))
            lines.append(f"unknown key '{field}'; allowed here: {', '.join(allowed)}")
        else:
            lines.append(f"{field}: {item['msg'].lower()} (got {item.get('input')!r})")
    unique = list(dict.fromkeys(lines))
    return f"{where}: " + "; ".join(unique)


def parse_recipe(data, where: str = "recipe") -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CompressorError(f"{where}: expected a mapping of recipe keys at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise CompressorError(describe_validation_error(exc, where)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CompressorError(f"{path}: malformed YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return parse_recipe(data, str(path))


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
