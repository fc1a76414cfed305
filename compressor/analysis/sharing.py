"""What the planner needs to share weights across layers (compressor.transforms.share).

For every projection the recipe shares: the layers that have it, the similarity between layers
(how much of one layer's weight lies in the other's leading input subspace), the groups the
recipe's grouping makes from it, and each group's cost curve: at every rank, the sum over the
group's layers of each layer's relative error after the fit (`compressor.transforms.share.cost_curve`;
measured on the calibration inputs for the activation fit), which the planner trades against
parameters. The calibration second moments are returned beside the record (not stored):
the fit reuses them in the same run.
"""

from __future__ import annotations

import math

import torch

from compressor.analysis.tensor_bytes import other_tensor_bytes
from compressor.modeling import FactoredLinear
from compressor.progress import progress
from compressor.execution.layerwise import placement_of
from compressor.transforms.share import cost_curve, input_second_moments, module_name, projection_weights, unit_of

# The leading input subspace compared between layers holds this fraction of the singular directions.
SUBSPACE_FRACTION = 0.5


def sharing_key(share, calibration) -> dict:
    """What a recorded sharing analysis must match to be reused by a plan."""
    key = {k: getattr(share, k) for k in ("projections", "fit", "grouping", "group_size", "per_layer_fallback")}
    if share.fit == "activation":
        key["calibration"] = calibration.model_dump()
    return key


def shareable_layers(model, projection: str) -> list[int]:
    """Layers that keep this projection's unit and whose projection is still dense."""
    layers = []
    for i, block in enumerate(model.model.layers):
        unit = block.self_attn if unit_of(projection) == "attention" else block.mlp
        if unit is not None and not isinstance(getattr(unit, projection), FactoredLinear):
            layers.append(i)
    return layers


@torch.no_grad()
def subspace_similarity(weights: list[torch.Tensor]) -> list[list[float]]:
    """sim[a][b]: the mean of the shares of W_b's energy inside W_a's leading input subspace and of
    W_a's inside W_b's (1: same subspace; about SUBSPACE_FRACTION for unrelated random matrices)."""
    k = max(1, math.ceil(SUBSPACE_FRACTION * min(weights[0].shape)))
    subspaces = [torch.linalg.svd(w.double(), full_matrices=False)[2][:k].T for w in weights]
    energy = [float(w.double().pow(2).sum()) for w in weights]
    n = len(weights)
    share = [[float((weights[b].double() @ subspaces[a]).pow(2).sum()) / energy[b] for b in range(n)] for a in range(n)]
    return [[round((share[a][b] + share[b][a]) / 2, 6) for b in range(n)] for a in range(n)]


def share_groups(layers: list[int], similarity: list[list[float]], grouping: str, group_size: int) -> list[list[int]]:
    """Contiguous groups of `layers`: runs of `group_size` (adjacent), or (similarity) as many groups
    as that makes, each at most twice `group_size` long, placed to minimize the summed dissimilarity
    of each member to the rest of its group (a layer alone counts as wholly dissimilar)."""
    n = len(layers)
    if grouping == "adjacent" or group_size == 1 or n <= 1:
        return [layers[i:i + group_size] for i in range(0, n, group_size)]
    count, longest = math.ceil(n / group_size), 2 * group_size

    def cost(start: int, stop: int) -> float:
        if stop - start == 1:
            return 1.0
        members = range(start, stop)
        return sum(1 - sum(similarity[a][b] for b in members if b != a) / (stop - start - 1) for a in members)

    best = {(0, 0): (0.0, None)}  # (groups made, layers covered) -> (cost, previous cover)
    for made in range(1, count + 1):
        for stop in range(1, n + 1):
            options = [(best[(made - 1, start)][0] + cost(start, stop), start)
                       for start in range(max(0, stop - longest), stop) if (made - 1, start) in best]
            if options:
                best[(made, stop)] = min(options)
    groups, stop = [], n
    for made in range(count, 0, -1):
        start = best[(made, stop)][1]
        groups.append(layers[start:stop])
        stop = start
    return groups[::-1]


def rounded(curve: list[float]) -> list[float]:
    return [round(c, 7) for c in curve]


def sharing_analysis(model, share, calibration, windows: torch.Tensor, batch_size: int, quiet: bool = False,
                     moments: dict | None = None) -> tuple[dict, dict | None]:
    """(the analysis record, the calibration second moments or None for the weight fit).
    `moments` already measured on these windows (every wanted layer and projection) are reused."""
    layers_of = {p: shareable_layers(model, p) for p in share.projections}
    if share.fit == "weight":
        moments = None
    elif moments is None:
        wanted = {(layer, p) for p, layers in layers_of.items() for layer in layers}
        moments = input_second_moments(model, windows, batch_size, wanted, quiet)
    projections, groups = {}, []
    for projection in progress(share.projections, "sharing analysis", quiet):
        layers = layers_of[projection]
        if not layers:
            projections[projection] = {"layers": [], "shape": None, "similarity": []}
            continue
        # Every layer's weight at once: the similarity compares each pair of layers.
        weights = projection_weights(model, layers, projection)
        similarity = subspace_similarity([weights[layer] for layer in layers])
        projections[projection] = {"layers": layers, "shape": list(weights[layers[0]].shape),
                                   "similarity": similarity}
        for members in share_groups(layers, similarity, share.grouping, share.group_size):
            hessians = [moments[(layer, projection)] for layer in members] if moments is not None else None
            curve = cost_curve([weights[layer] for layer in members], share.fit, hessians)
            entry = {"projection": projection, "layers": members, "cost": rounded(curve)}
            if share.per_layer_fallback and len(members) > 1:  # each layer alone: the per-layer fallback
                entry["layer_costs"] = [rounded(cost_curve([weights[layer]], share.fit, None if hessians is None
                                                           else [hessians[i]])) for i, layer in enumerate(members)]
            groups.append(entry)
    in_scope = {f"{module_name(layer, p)}.weight" for p, layers in layers_of.items() for layer in layers}
    other = other_tensor_bytes(model, in_scope)
    record = {"key": sharing_key(share, calibration), "projections": projections, "groups": groups,
              "other_tensor_bytes": other, "bytes_per_parameter": placement_of(model)[1].itemsize}
    return record, moments
