"""How the model runs: one decoder layer at a time, on the device and in the precision of a
compressor.placement.Placement.

offload: decoder layers whose weights stay on disk (the source's safetensors, or a spill folder for
changed ones) and are placed on the device one at a time. hidden: the calibration hidden states
carried from layer to layer, spilled to disk above a memory budget. layerwise: the layer-major runs
every stage builds on (embedding, one layer over all batches, the output head).
"""
