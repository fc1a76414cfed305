"""Cross-layer weight sharing: one basis per group of layers, per-layer coefficients (training-free).

For a projection (say `q_proj`) in a group of n layers with weights W_1..W_n (out x in; the layer
computes y = x W^T), the toolkit finds a shared basis B (in x r) and per-layer coefficients C_i
(r x out) with W_i^T ~ B C_i, so the layer computes y = (x B) C_i and stores in*r + n*r*out
numbers instead of n*in*out (Basis Sharing; MASA's shared matrix atoms in their factored form).
Optionally each layer adds a small low-rank correction P_i Q_i of rank s.

Two fits:
- `weight`: truncated SVD of the stack [W_1^T ... W_n^T] (in x n*out): B is its leading left
  singular vectors, C_i the matching blocks of Sigma V^T. It minimizes the weight error.
- `activation`: the error that matters is X_i (W_i^T - B C_i), X_i being layer i's calibration
  inputs. With H_i = X_i^T X_i / tokens and H the mean of the group's H_i, write H = S S^T; the SVD
  of S^T [W_1^T ... W_n^T] gives B = S^-T U_r (the whitened fit), then each C_i is refit by least
  squares on its own layer's inputs: C_i = (B^T H_i B)^-1 B^T H_i W_i^T.

With n = 1 the same code is per-layer truncated SVD, plain (`weight`) or whitened (`activation`),
the baselines the benchmark compares against. At full rank (r = min(in, n*out)) every fit is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from compressor.errors import CompressorError
from compressor.execution.layerwise import embedded_batches, placement_of, run_block
from compressor.execution.offload import StoredTensor, offload_of, placed, read_tensors, rebuilt, set_tensor
from compressor.modeling import FactoredLinear, build_with_weights, config_with
from compressor.models.adapters import ATTENTION_LINEARS
from compressor.models.adapters import PROJECTIONS as PROJECTIONS  # re-exported: the names a group may share
from compressor.progress import progress
from compressor.transforms.gram import GramAccumulator

FITS = ("weight", "activation")
# Relative damping added to each second moment (a fraction of its mean diagonal): calibration
# inputs never span every direction, and an exactly singular H has no inverse square root.
DAMP = 1e-4


@dataclass
class SharedFit:
    """One group's factors, in float64: y_i = x @ basis @ coefficients[i] (+ x @ P_i @ Q_i)."""
    basis: torch.Tensor  # (in, r)
    coefficients: list[torch.Tensor]  # per layer (r, out)
    residuals: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (in, s), (s, out)

    def reconstruct(self, i: int) -> torch.Tensor:
        """Layer i's approximated weight, out x in (the nn.Linear orientation)."""
        approx = self.basis @ self.coefficients[i]
        if self.residuals is not None:
            p, q = self.residuals[i]
            approx = approx + p @ q
        return approx.T


def full_rank(in_features: int, out_features: int, layers: int) -> int:
    return min(in_features, layers * out_features)


def shared_parameters(in_features: int, out_features: int, layers: int, rank: int, residual_rank: int = 0) -> int:
    return in_features * rank + layers * rank * out_features + layers * residual_rank * (in_features + out_features)


def rank_for_budget(in_features: int, out_features: int, layers: int, kept_fraction: float,
                    residual_rank: int = 0, multiple: int = 1) -> int:
    """The largest rank (a multiple of `multiple`) whose factors hold at most `kept_fraction` of the
    group's dense parameters; 0 when even rank `multiple` does not fit."""
    budget = kept_fraction * layers * in_features * out_features
    budget -= layers * residual_rank * (in_features + out_features)
    rank = int(budget // (in_features + layers * out_features))
    rank = min(rank, full_rank(in_features, out_features, layers))
    return max(rank - rank % multiple, 0)


def damped(h: torch.Tensor) -> torch.Tensor:
    h = h.double()
    return h + DAMP * h.diagonal().mean().clamp(min=1e-12) * torch.eye(h.shape[0], dtype=h.dtype)


def whitening(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S S^T = H (damped), from the symmetric eigendecomposition."""
    values, vectors = torch.linalg.eigh(damped(h))
    root = values.clamp(min=values.max() * 1e-12).sqrt()
    return vectors * root, (vectors / root).T


def fit_shared(weights: list[torch.Tensor], rank: int, fit: str = "activation",
               hessians: list[torch.Tensor] | None = None, residual_rank: int = 0) -> SharedFit:
    """Shared basis of rank `rank` for the given layers' weights (each out x in).

    `hessians` (the `activation` fit): each layer's input second moment X^T X / tokens (in x in)."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if fit == "activation" and (hessians is None or len(hessians) != len(weights)):
        raise ValueError("the activation fit needs one input second moment per layer")
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1:
        raise ValueError(f"a group's weights must share one shape, got {sorted(shapes)}")
    out_features, in_features = weights[0].shape
    if not 1 <= rank <= full_rank(in_features, out_features, len(weights)):
        raise ValueError(f"rank must be in 1..{full_rank(in_features, out_features, len(weights))}, got {rank}")
    transposed = [w.detach().double().T for w in weights]
    stack = torch.cat(transposed, dim=1)
    if fit == "weight":
        u, sigma, vh = torch.linalg.svd(stack, full_matrices=False)
        basis = u[:, :rank]
        coefficients = list((sigma[:rank, None] * vh[:rank]).split(out_features, dim=1))
    else:
        mean_h = sum(h.double() for h in hessians) / len(hessians)
        s, s_inv = whitening(mean_h)
        u, _, _ = torch.linalg.svd(s.T @ stack, full_matrices=False)
        basis = s_inv.T @ u[:, :rank]
        coefficients = [least_squares_coefficients(basis, damped(h), w) for h, w in zip(hessians, transposed)]
    result = SharedFit(basis, coefficients)
    if residual_rank:
        result.residuals = [low_rank_residual(w - basis @ c, residual_rank, h if fit == "activation" else None)
                            for w, c, h in zip(transposed, coefficients, hessians or [None] * len(weights))]
    return result


def least_squares_coefficients(basis: torch.Tensor, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """argmin_C ||X (target - basis C)||^2 = (B^T H B)^-1 B^T H target, with H = X^T X."""
    gram = basis.T @ h @ basis
    return torch.linalg.solve(gram, basis.T @ h @ target)


def low_rank_residual(residual: torch.Tensor, rank: int, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` (P, Q) with P Q ~ residual (in x out), whitened by H when given."""
    rank = min(rank, *residual.shape)
    if h is None:
        u, sigma, vh = torch.linalg.svd(residual, full_matrices=False)
        return u[:, :rank], sigma[:rank, None] * vh[:rank]
    s, s_inv = whitening(h)
    u, sigma, vh = torch.linalg.svd(s.T @ residual, full_matrices=False)
    return s_inv.T @ u[:, :rank], sigma[:rank, None] * vh[:rank]


@torch.no_grad()
def cost_curve(weights: list[torch.Tensor], fit: str, hessians: list[torch.Tensor] | None = None) -> list[float]:
    """cost[r] for every rank r = 0..full: the sum over the group's layers of each layer's relative
    error ||X_i (W_i - W~_i)^T||^2 / ||X_i W_i^T||^2 (plain Frobenius for the weight fit) after
    fitting at rank r, coefficients refit included, from one decomposition per layer.

    In whitened coordinates the basis of rank r is the first r columns of U, and the least-squares
    refit explains ||y_[:r]||^2 of layer i's energy, where y = L^-1 F with L the Cholesky factor of
    U^T G_i U and F = U^T S^-1 H_i W_i^T: the leading block of a Cholesky factor is the factor of
    the leading block, so every rank reads off one cumulative sum."""
    transposed = [w.detach().double().T for w in weights]
    stack = torch.cat(transposed, dim=1)
    layers_explained = []
    if fit == "weight":
        u, _, _ = torch.linalg.svd(stack, full_matrices=False)
        for w in transposed:
            explained = (u.T @ w).pow(2).sum(dim=1)
            layers_explained.append((explained, float(w.pow(2).sum())))
    else:
        s, s_inv = whitening(sum(h.double() for h in hessians) / len(hessians))
        u, _, _ = torch.linalg.svd(s.T @ stack, full_matrices=False)
        for w, h in zip(transposed, hessians):
            h = damped(h)
            rotated = u.T @ s_inv
            gram = rotated @ h @ rotated.T
            y = torch.linalg.solve_triangular(torch.linalg.cholesky(gram), rotated @ h @ w, upper=False)
            layers_explained.append((y.pow(2).sum(dim=1), float(torch.einsum("io,ij,jo->", w, h, w))))
    cost = torch.zeros(u.shape[1] + 1, dtype=torch.float64)
    for explained, total in layers_explained:
        captured = torch.cat([torch.zeros(1, dtype=torch.float64), explained.cumsum(0)])
        cost += (1 - captured / total).clamp(min=0)
    return [float(c) for c in cost]


# --- the model side -------------------------------------------------------------------------------

# Which calibration input each projection reads (q, k and v read the same normed hidden state).
INPUT_OF = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "o_proj",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down_proj"}
ATTENTION_PROJECTIONS = ATTENTION_LINEARS


def unit_of(projection: str) -> str:
    return "attention" if projection in ATTENTION_PROJECTIONS else "mlp"


def dense_projection(model, layer: int, projection: str) -> torch.nn.Linear:
    block = model.model.layers[layer]
    unit = block.self_attn if unit_of(projection) == "attention" else block.mlp
    return getattr(unit, projection)


class SecondMoments(Mapping):
    """(layer, projection) -> X^T X / tokens of the input that projection reads, in float64; the
    projections reading one input (q, k and v) share one matrix. A model with its layers on disk
    keeps these in its spill folder, one file per layer, read back when asked for: they are as large
    as its layers (Llama-3.2-3B: about 0.9 GB a layer for all seven projections)."""

    def __init__(self, wanted: set[tuple[int, str]], offload=None, device=None):
        self.wanted, self.offload, self.device = sorted(wanted), offload, device
        self.held: dict[tuple[int, str], torch.Tensor | StoredTensor] = {}

    def put(self, layer: int, by_input: dict[str, torch.Tensor]) -> None:
        if self.offload is None:
            self.held.update({(layer, kind): m for kind, m in by_input.items()})
            return
        names = {kind: f"moments:{layer}:{kind}" for kind in by_input}
        self.offload.replace({names[kind]: m for kind, m in by_input.items()})  # the spill folder, as codes go
        self.held.update({(layer, kind): self.offload.stored[name] for kind, name in names.items()})

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        layer, projection = key
        value = self.held[(layer, INPUT_OF[projection])]
        return value.load().to(self.device) if isinstance(value, StoredTensor) else value

    def __iter__(self):
        return iter(self.wanted)

    def __len__(self) -> int:
        return len(self.wanted)


@torch.no_grad()
def input_second_moments(model, windows: torch.Tensor, batch_size: int, wanted: set[tuple[int, str]],
                         quiet: bool = False, token_weighting: str = "raw") -> SecondMoments:
    """X^T X / tokens of the inputs each (layer, projection) in `wanted` reads, on the calibration
    windows, in float64, one decoder layer at a time (up to the last layer wanted).

    `raw` is the fit's true objective. `equal` scales each token's input to unit norm first (as
    GPTQ's Hessians here do); measured on the embedded model it fits worse: per-layer whitened SVD
    at 20 % fewer attention parameters scored 35.52 against 34.53 with `raw` (8 WikiText-2
    windows), shared groups of 5 33.53 against 33.3."""
    readers: dict[int, dict[str, str]] = {}
    for layer, projection in sorted(wanted):
        readers.setdefault(layer, {}).setdefault(INPUT_OF[projection], projection)
    offload = offload_of(model)
    moments = SecondMoments(wanted, offload, placement_of(model)[0])
    if not readers:
        return moments
    hidden = embedded_batches(model, windows, batch_size)
    for layer in progress(range(max(readers) + 1), "input second moments", quiet):
        with placed(model, layer) as block:
            gram = GramAccumulator(torch.float64, token_weighting)
            hooks = [dense_projection(model, layer, projection).register_forward_pre_hook(gram.pre_hook(kind))
                     for kind, projection in readers.get(layer, {}).items()]
            try:
                hidden = run_block(model, block, hidden)
            finally:
                for handle in hooks:
                    handle.remove()
        if layer in readers:
            moments.put(layer, {kind: gram.mean(kind) for kind in readers[layer]})
    return moments


def projection_weights(model, layers: list[int], projection: str) -> dict[int, torch.Tensor]:
    """The dense weight of `projection` in each of `layers` (out x in); a model with its layers on
    disk reads them from its store as stored (the fits compute in float64 from them: the same values)."""
    offload = offload_of(model)
    if offload is None:
        return {layer: dense_projection(model, layer, projection).weight for layer in layers}
    names = [f"{module_name(layer, projection)}.weight" for layer in layers]
    device = offload.placement.device
    return {layer: value.to(device) for layer, value in zip(layers, read_tensors([offload.stored[n] for n in names]))}


def basis_key(projection: str, index: int) -> str:
    return f"{projection}_g{index}"


def module_name(layer: int, projection: str) -> str:
    unit = "self_attn" if unit_of(projection) == "attention" else "mlp"
    return f"model.layers.{layer}.{unit}.{projection}"


@torch.no_grad()
def share_weights(model, groups: list[dict], fit: str, moments: Mapping[tuple[int, str], torch.Tensor] | None,
                  quiet: bool = False):
    """A new model whose projections in `groups` ({"projection", "layers", "rank", "residual_rank",
    "basis"}) are factored as the fit finds; every other tensor is taken over unchanged. A model with
    its layers on disk gives one too: the coefficients go to its spill folder group by group, the
    shared bases (read by several layers) stay in memory."""
    entries = [{k: group[k] for k in ("projection", "layers", "rank", "residual_rank", "basis")} for group in groups]
    config = config_with(model.config, weight_sharing=(model.config.weight_sharing or []) + entries or None)
    offload = offload_of(model)
    if offload is None:
        state, dtype = dict(model.state_dict()), model.model.embed_tokens.weight.dtype
    else:  # the layers' tensors keep the precision a placed layer holds
        new, dtype = rebuilt(model, config), offload.placement.dtype
    for group in progress(groups, f"fitting shared bases ({fit})", quiet):
        projection, layers = group["projection"], group["layers"]
        modules = [dense_projection(model, layer, projection) for layer in layers]
        factored = [layer for layer, m in zip(layers, modules) if isinstance(m, FactoredLinear)]
        if factored:
            raise CompressorError(f"sharing: {projection} of layers {factored} is already factored (a shared "
                                  f"artifact); share the original model instead")
        hessians = [moments[(layer, projection)] for layer in layers] if fit == "activation" else None
        weights = list(projection_weights(model, layers, projection).values())
        result = fit_shared(weights, group["rank"], fit, hessians, group.get("residual_rank") or 0)
        del weights
        tensors, renamed = {}, {}
        for i, (layer, module) in enumerate(zip(layers, modules)):
            name = module_name(layer, projection)
            if module.bias is not None:
                renamed[f"{name}.coefficients.bias"] = f"{name}.bias"
            tensors[f"{name}.coefficients.weight"] = result.coefficients[i].T.to(dtype).contiguous()
            if result.residuals is not None:
                p, q = result.residuals[i]
                tensors[f"{name}.residual_down.weight"] = p.T.to(dtype).contiguous()
                tensors[f"{name}.residual_up.weight"] = q.T.to(dtype).contiguous()
        basis = {f"model.shared_bases.{group['basis']}.weight": result.basis.T.to(dtype).contiguous()}
        if offload is None:
            for new_name, old_name in renamed.items():
                state[new_name] = state.pop(old_name)
            for layer in layers:
                del state[f"{module_name(layer, projection)}.weight"]
            state.update(tensors | basis)
        else:
            stored = offload_of(new)
            stored.stored.update({new_name: offload.stored[old_name] for new_name, old_name in renamed.items()})
            stored.replace(tensors)
            for name, t in basis.items():
                set_tensor(new, name, t.to(stored.placement.device))
    if offload is not None:
        return new
    return build_with_weights(config, state, "weight sharing")
