// A C entry to the plugin's CUDA kernels without TensorRT, so a test on a CUDA GPU can run them on
// torch tensors (device pointers) and compare the selection with `select_positions`.
#include "select_tokens_kernel.h"

#include <cuda_runtime_api.h>

extern "C" int select_tokens_cuda(void const* query, void const* keys, int64_t const* mask, int64_t* selected,
    int32_t half, int32_t batch, int32_t heads, int32_t kvHeads, int32_t tokens, int32_t headDim, int32_t keepTokens,
    int32_t keepFirst, int32_t keepLast, int32_t poolWidth)
{
    select_tokens::Shape const shape{batch, heads, kvHeads, tokens, headDim, keepTokens, keepFirst, keepLast, poolWidth};
    void* workspace = nullptr;
    if (cudaMalloc(&workspace, select_tokens::workspaceBytes(shape)) != cudaSuccess)
    {
        return 1;
    }
    cudaError_t status = select_tokens::launch(shape, half != 0, query, keys, mask, selected, workspace, nullptr);
    if (status == cudaSuccess)
    {
        status = cudaDeviceSynchronize();
    }
    cudaFree(workspace);
    return status == cudaSuccess ? 0 : 2;
}
