"""Analysis: what the model is, layer by layer (one instrumented pass, plus costlier scores on request)."""

from compressor.analysis.collect import analyze_layers, weight_statistics
from compressor.analysis.removal import greedy_removal_order, removal_sensitivity

__all__ = ["analyze_layers", "weight_statistics", "greedy_removal_order", "removal_sensitivity"]
