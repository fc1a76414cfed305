"""What removing a unit costs, and greedy removal searches built on it.

- `removal_sensitivity`: for every attention and MLP unit, the Jensen-Shannon divergence between
  the final next-token distributions of the full model and of the model without that unit.
- `greedy_removal_order`: removes units one at a time, each time taking the candidate that is
  cheapest *given the removals so far*: by final-logit divergence from the original model
  (`finercut`, FinerCut) or by recomputed input/output cosine redundancy (`iterative`).
Units are switched off with the layers' enable flags during the search and switched back after.
"""

from __future__ import annotations

import contextlib

import torch

from compressor.execution.hidden import HiddenStates
from compressor.execution.layerwise import embedded_batches, final_log_probs, run_block, run_layers
from compressor.execution.offload import placed
from compressor.progress import progress
from compressor.recipe import DEFAULT_BATCH_SIZE



def _unit_flag(kind: str) -> str:
    return "attention_enabled" if kind == "attention" else "mlp_enabled"


@contextlib.contextmanager
def units_switched_off(model, units):
    layers = model.model.layers
    try:
        for layer, kind in units:
            setattr(layers[layer], _unit_flag(kind), False)
        yield
    finally:
        for layer, kind in units:
            setattr(layers[layer], _unit_flag(kind), True)


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Mean Jensen-Shannon divergence (nats) between rows of two log-probability tensors."""
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0))
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return float((0.5 * (kl_pm + kl_qm)).mean())


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Mean KL(p || q) (nats) between rows of two log-probability tensors."""
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


DIVERGENCES = {"js": js_divergence, "kl": kl_divergence}


class Scorer:
    """Final next-token log-probabilities on a fixed batch, with layer-input caching so that a
    candidate in layer l only reruns layers l..L-1 (one layer at a time over every batch)."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int, measure: str = "js"):
        self.model = model
        self.measure = DIVERGENCES[measure]
        self.windows, self.batch_size = windows, batch_size
        self.batches = list(windows.split(batch_size))
        self.reference = self._log_probs(run_layers(model, embedded_batches(model, windows, batch_size)))
        self.layer_inputs = None

    def _log_probs(self, final: HiddenStates) -> HiddenStates:
        out = final.empty_like()
        for h in final:
            out.append(final_log_probs(self.model, h))
        return out

    @torch.no_grad()
    def cache_layer_inputs(self):
        """Hidden states entering every layer under the current removals."""
        self.layer_inputs = []
        run_layers(self.model, embedded_batches(self.model, self.windows, self.batch_size),
                   keep_inputs=self.layer_inputs)

    def divergence(self, start_layer: int = 0) -> float:
        if start_layer and self.layer_inputs is not None:
            final = run_layers(self.model, self.layer_inputs[start_layer], start_layer)
        else:
            final = run_layers(self.model, embedded_batches(self.model, self.windows, self.batch_size))
        total = 0.0
        for reference, h in zip(self.reference, final):
            total += self.measure(reference, final_log_probs(self.model, h))
        return total / len(self.batches)


def present_units(model) -> list[tuple[int, str]]:
    units = []
    for i, layer in enumerate(model.model.layers):
        if layer.self_attn is not None:
            units.append((i, "attention"))
        if layer.mlp is not None:
            units.append((i, "mlp"))
    return units


def removal_sensitivity(model, windows: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE, quiet: bool = False) -> dict:
    """JS divergence of the final distributions with each unit removed alone: {(layer, kind): js}."""
    scorer = Scorer(model, windows, batch_size)
    scorer.cache_layer_inputs()
    scores = {}
    for layer, kind in progress(present_units(model), "removal sensitivity", quiet):
        with units_switched_off(model, [(layer, kind)]):
            scores[(layer, kind)] = scorer.divergence(start_layer=layer)
    return scores


@torch.no_grad()
def analyze_layers_light(model, windows, batch_size) -> list[dict]:
    """Redundancy only: mean token cosine of each enabled unit's residual input and output,
    from hooks on each layer's own forward (no attention probabilities, so SDPA stays fast)."""
    layers = model.model.layers
    sums = [{"attention": 0.0, "mlp": 0.0} for _ in layers]
    residual = {}

    def layer_input(index):
        def hook(module, args):
            residual[index] = args[0]
        return hook

    def unit_output(index, kind):
        def hook(module, args, output):
            x = residual[index]
            residual[index] = x + output  # the next unit of this layer reads this residual
            sums[index][kind] += float(torch.nn.functional.cosine_similarity(x, residual[index], dim=-1).sum())
        return hook

    hidden = embedded_batches(model, windows, batch_size)
    for i in range(len(layers)):
        with placed(model, i) as layer:
            handles = [layer.register_forward_pre_hook(layer_input(i))]
            for kind, unit in (("attention", layer.self_attn), ("mlp", layer.mlp)):
                if unit is not None:
                    handles.append(unit.register_forward_hook(unit_output(i, kind)))
            try:
                hidden = run_block(model, layer, hidden)
            finally:
                for handle in handles:
                    handle.remove()
    tokens = windows.numel()
    return [{k: v / tokens for k, v in s.items()} for s in sums]


def greedy_removal_order(model, windows: torch.Tensor, candidates: list[tuple[int, str]], steps: int,
                         criterion: str, batch_size: int = DEFAULT_BATCH_SIZE, quiet: bool = False) -> list[dict]:
    """The first `steps` units removed greedily from `candidates`; each step records its score."""
    if criterion not in ("finercut", "iterative"):
        raise ValueError(f"unknown greedy criterion {criterion!r}")
    removed: list[tuple[int, str]] = []
    order = []
    remaining = list(candidates)
    scorer = Scorer(model, windows, batch_size) if criterion == "finercut" else None
    bar = progress(range(steps), f"{criterion} search", quiet)
    for _ in bar:
        if not remaining:
            break
        if criterion == "finercut":
            with units_switched_off(model, removed):
                scorer.cache_layer_inputs()
                scores = {}
                for layer, kind in remaining:
                    with units_switched_off(model, [(layer, kind)]):
                        scores[(layer, kind)] = scorer.divergence(start_layer=layer)
            best = min(scores, key=scores.get)
        else:
            with units_switched_off(model, removed):
                cosines = analyze_layers_light(model, windows, batch_size)
            scores = {(layer, kind): cosines[layer][kind] for layer, kind in remaining}
            best = max(scores, key=scores.get)
        removed.append(best)
        remaining.remove(best)
        entry = {"layer": best[0], "unit": best[1], "score": scores[best]}
        if criterion == "finercut":
            entry["js_divergence"] = scores[best]
        else:
            entry["redundancy"] = scores[best]
        order.append(entry)
    return order
