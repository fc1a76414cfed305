"""SignRound (Cheng et al. 2023, the method of Intel's AutoRound): learned rounding and clipping on
top of GPTQ, one decoder layer at a time.

For each quantized linear of a layer, with GPTQ's scales s, zero points z and codes c, the codes
become clamp(round(W / s' + d + V) + z) with s' = alpha * s and d = c - z - round(W / s) (GPTQ's
codes as whole steps from round-to-nearest): V in [-0.5, 0.5] (one per weight) moves each weight
to either of the two codes nearest its GPTQ position, alpha in ALPHA_RANGE (one per group) shrinks
or widens the group's range. Both are learned by signed gradient descent (each step moves every parameter by the
learning rate times the sign of its gradient, the rate decaying linearly to zero; round passes its
gradient straight through) so that the layer's output on the inputs the quantized earlier layers
give matches the full-precision layer's output on full-precision inputs (squared error, each
token's relative to its target's mean square: token_loss).

V starts at 0 and alpha at 1, so step 0 is exactly the GPTQ solution. The parameters after the
last step replace GPTQ's only if their loss over all calibration windows is lower: the refinement
never leaves a layer worse than GPTQ on the calibration data. (AutoRound keeps the parameters of
the least step loss; with one window a step that picks the easiest window, not the best rounding.)
"""

from __future__ import annotations

import torch

from compressor.transforms.quantize import SCALE_DTYPE, QuantizedWeight, code_range

ALPHA_RANGE = (0.5, 1.5)


class _Rounding:
    """The learnable codes and scales of one linear, started at its GPTQ solution."""

    def __init__(self, weight: torch.Tensor, quantized: QuantizedWeight):
        self.fmt = quantized.fmt
        self.quantized = quantized
        out_features, in_features = weight.shape
        self.width = self.fmt.width(in_features)
        self.in_features = in_features
        self.weight = weight.float()
        self.scale = self._expand(quantized.scale.float())
        self.zero = self._expand(quantized.zero_point.float()) if quantized.zero_point is not None else None
        self.qmin, self.qmax = code_range(self.fmt.bits)
        target = quantized.codes.float() - (self.zero if self.zero is not None else 0.0)
        # GPTQ's codes as whole steps from round-to-nearest (error feedback moves some by more than
        # one), so that V = 0 reproduces them and V keeps each weight's fractional position.
        self.shift = target - torch.round(self.weight / self.scale)
        self.offset = torch.zeros_like(self.weight).requires_grad_(True)
        self.alpha = torch.ones_like(quantized.scale, dtype=torch.float32).requires_grad_(True)
        self.exact = None
        if quantized.exact_index is not None:
            self.exact = torch.zeros(out_features * in_features, dtype=torch.bool, device=weight.device)
            self.exact[quantized.exact_index] = True
            self.exact = self.exact.view(out_features, in_features)

    def _expand(self, per_group: torch.Tensor) -> torch.Tensor:
        return per_group.repeat_interleave(self.width, dim=1)[:, :self.in_features]

    def codes(self, scale: torch.Tensor) -> torch.Tensor:
        """Codes (zero point included), with round's gradient passed straight through."""
        x = self.weight / scale + self.shift + self.offset
        rounded = x + (torch.round(x) - x).detach()
        if self.zero is not None:
            rounded = rounded + self.zero
        return torch.clamp(rounded, self.qmin, self.qmax)

    def dequantized(self) -> torch.Tensor:
        scale = self.scale * self._expand(self.alpha)
        codes = self.codes(scale)
        value = (codes - (self.zero if self.zero is not None else 0.0)) * scale
        if self.exact is not None:
            value = torch.where(self.exact, self.weight, value)
        return value

    def parameters(self) -> list[torch.Tensor]:
        return [self.offset, self.alpha]

    def result(self) -> QuantizedWeight:
        """The stored form of the current parameters: codes from the learned scale, the scale in float16."""
        with torch.no_grad():
            scale = (self.quantized.scale.float() * self.alpha).to(SCALE_DTYPE)
            codes = self.codes(self._expand(scale.float()))
        q = self.quantized
        return QuantizedWeight(codes.to(torch.int8), scale, q.zero_point, q.fmt, q.exact_index, q.exact_value)


def token_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of each token's squared error relative to its target's mean square. Plain
    MSE of the residual stream is dominated by the few tokens carrying massive activations
    (norms hundreds of times the median), as GPTQ's raw Hessian is (see hessian_tokens)."""
    target = target.float()
    scale = target.pow(2).mean(-1, keepdim=True).clamp(min=1e-12)
    return ((output.float() - target).pow(2) / scale).mean()


def refine_layer(block, rotary: tuple, inputs, targets: list[torch.Tensor], originals: dict[str, torch.Tensor],
                 quantized: dict[str, QuantizedWeight], modules: dict[str, torch.nn.Linear], steps: int,
                 learning_rate: float | None = None, windows: int = 1, seed: int = 0) -> tuple[dict[str, QuantizedWeight], dict]:
    """Refines the GPTQ solution `quantized` of this layer's linears (`modules`, holding the GPTQ
    weights; `originals`: their float weights) on calibration batches `inputs` (from the quantized
    earlier layers) against `targets` (the float layer's outputs on float inputs), `windows` rows
    of one batch drawn at random per step.
    Returns the stored results (GPTQ's own when refinement did not lower the loss) and a record."""
    rate = learning_rate if learning_rate is not None else 1.0 / steps
    roundings = {name: _Rounding(originals[name], quantized[name]) for name in quantized}
    cos, sin, mask = rotary

    def set_weights(values: dict[str, torch.Tensor]) -> None:
        for name, module in modules.items():
            if name in values:
                del module.weight  # a plain tensor attribute while refining: F.linear reads it as it is
                module.weight = values[name]

    def total_loss() -> float:
        with torch.no_grad():
            set_weights({name: r.dequantized() for name, r in roundings.items()})
            losses = [token_loss(block(h, cos, sin, mask, None), t).item() for h, t in zip(inputs, targets)]
        return sum(losses) / len(losses)

    generator = torch.Generator().manual_seed(seed)
    saved = {name: module.weight for name, module in modules.items() if name in roundings}
    try:
        start_loss = total_loss()
        params = [p for r in roundings.values() for p in r.parameters()]
        for step in range(steps):
            index = int(torch.randint(len(targets), (1,), generator=generator))
            rows = torch.randperm(len(targets[index]), generator=generator)[:windows]
            with torch.enable_grad():
                set_weights({name: r.dequantized() for name, r in roundings.items()})
                loss = token_loss(block(inputs[index][rows], cos, sin, mask, None), targets[index][rows])
                grads = torch.autograd.grad(loss, params)
            step_rate = rate * (1.0 - step / steps)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(step_rate * torch.sign(g))
                for r in roundings.values():
                    r.offset.clamp_(-0.5, 0.5)
                    r.alpha.clamp_(*ALPHA_RANGE)
        end_loss = total_loss()
    finally:
        for name, module in modules.items():
            if name in saved:
                del module.weight
                module.weight = saved[name]
    improved = end_loss < start_loss
    results = {name: r.result() for name, r in roundings.items()} if improved else dict(quantized)
    changed = sum(int((results[n].codes != quantized[n].codes).sum()) for n in quantized)
    weights = sum(q.codes.numel() for q in quantized.values())
    return results, {"gptq_loss": start_loss, "refined_loss": end_loss, "kept": "refined" if improved else "gptq",
                     "codes_changed": changed / weights}
