// Launch of the SelectTokens CUDA kernels (select_tokens_kernel.cu), called by the plugin's enqueue.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace select_tokens
{

struct Shape
{
    int32_t batch;
    int32_t heads;    // query heads
    int32_t kvHeads;  // key heads; heads is a multiple of it
    int32_t tokens;   // prompt length, padded
    int32_t headDim;
    int32_t keepTokens;
    int32_t keepFirst;
    int32_t keepLast;
    int32_t poolWidth;
};

// Bytes of scratch memory `launch` needs for this shape.
size_t workspaceBytes(Shape const& shape);

// selected (batch, keepTokens) int64 from query (batch, heads, 1, headDim), keys (batch, kvHeads,
// tokens, headDim) of float (half: false) or half (half: true) and attentionMask (batch, tokens) int64.
cudaError_t launch(Shape const& shape, bool half, void const* query, void const* keys, int64_t const* attentionMask,
    int64_t* selected, void* workspace, cudaStream_t stream);

} // namespace select_tokens
