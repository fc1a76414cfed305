// CUDA kernels of the SelectTokens plugin: four passes per prompt row, all arithmetic from
// select_tokens.cuh (the functions the CPU test checks against the torch selection).
//   1. head_probabilities: per (row, head), the last query's softmax over the row's keys;
//   2. row_scores: heads summed in order, average-pooled, edge tokens forced, padding excluded;
//   3. mark_kept: each position's place in the ranking (ties: lower position first), kept if < keep;
//   4. write_positions: the kept positions in increasing order.
#include "select_tokens.cuh"
#include "select_tokens_kernel.h"

namespace select_tokens
{
namespace
{

constexpr int32_t kThreads = 256;

size_t aligned(size_t bytes)
{
    return (bytes + 255) / 256 * 256;
}

// Reduces `value` over the block (max or sum); every thread gets the result.
template <bool Max>
__device__ float blockReduce(float value, float* shared)
{
    shared[threadIdx.x] = value;
    __syncthreads();
    for (int32_t stride = blockDim.x / 2; stride > 0; stride /= 2)
    {
        if (threadIdx.x < stride)
        {
            float const other = shared[threadIdx.x + stride];
            shared[threadIdx.x] = Max ? fmaxf(shared[threadIdx.x], other) : shared[threadIdx.x] + other;
        }
        __syncthreads();
    }
    float const result = shared[0];
    __syncthreads();
    return result;
}

template <typename T>
__global__ void head_probabilities(Shape shape, T const* query, T const* keys, int64_t const* mask, float* probs)
{
    __shared__ float shared[kThreads];
    int32_t const row = blockIdx.y;
    int32_t const head = blockIdx.x;
    int32_t const n = shape.tokens;
    int32_t const d = shape.headDim;
    int32_t const kvHead = head / (shape.heads / shape.kvHeads);
    T const* q = query + (static_cast<size_t>(row) * shape.heads + head) * d;
    T const* k = keys + (static_cast<size_t>(row) * shape.kvHeads + kvHead) * n * d;
    int64_t const* m = mask + static_cast<size_t>(row) * n;
    float* p = probs + (static_cast<size_t>(row) * shape.heads + head) * n;
    float localMax = -INFINITY;
    for (int32_t t = threadIdx.x; t < n; t += blockDim.x)
    {
        float const logit = m[t] != 0 ? scaled_dot(q, k + static_cast<size_t>(t) * d, d) : -INFINITY;
        p[t] = logit;
        localMax = fmaxf(localMax, logit);
    }
    float const rowMax = blockReduce<true>(localMax, shared);
    float localSum = 0.f;
    for (int32_t t = threadIdx.x; t < n; t += blockDim.x)
    {
        float const e = expf(p[t] - rowMax);
        p[t] = e;
        localSum += e;
    }
    float const total = blockReduce<false>(localSum, shared);
    for (int32_t t = threadIdx.x; t < n; t += blockDim.x)
    {
        p[t] /= total;
    }
}

// One block per row: the head sums, the real tokens' ranks (a block-wide prefix count), the scores.
__global__ void row_scores(Shape shape, float const* probs, int64_t const* mask, float* headSum, float* scores)
{
    __shared__ int64_t prefix[kThreads];
    int32_t const row = blockIdx.x;
    int32_t const n = shape.tokens;
    int64_t const* m = mask + static_cast<size_t>(row) * n;
    float* sums = headSum + static_cast<size_t>(row) * n;
    float* s = scores + static_cast<size_t>(row) * n;
    for (int32_t t = threadIdx.x; t < n; t += blockDim.x)
    {
        float sum = 0.f;
        for (int32_t h = 0; h < shape.heads; ++h)
        {
            sum += probs[(static_cast<size_t>(row) * shape.heads + h) * n + t];
        }
        sums[t] = sum;
    }
    __syncthreads();
    int64_t count = 0;
    for (int32_t t = 0; t < n; ++t)
    {
        count += m[t] != 0 ? 1 : 0;
    }
    int64_t carry = 0;  // real tokens before the current tile
    for (int32_t base = 0; base < n; base += blockDim.x)
    {
        int32_t const t = base + threadIdx.x;
        bool const real = t < n && m[t] != 0;
        prefix[threadIdx.x] = real ? 1 : 0;
        __syncthreads();
        for (int32_t stride = 1; stride < blockDim.x; stride *= 2)  // inclusive scan of the tile
        {
            int64_t const add = threadIdx.x >= stride ? prefix[threadIdx.x - stride] : 0;
            __syncthreads();
            prefix[threadIdx.x] += add;
            __syncthreads();
        }
        if (t < n)
        {
            int64_t const rank = carry + prefix[threadIdx.x] - 1;
            s[t] = ranked_score(real, rank, count, shape.keepFirst, shape.keepLast, pooled(sums, n, t, shape.poolWidth));
        }
        carry += prefix[blockDim.x - 1];
        __syncthreads();
    }
}

__global__ void mark_kept(Shape shape, float const* scores, uint8_t* kept)
{
    int32_t const row = blockIdx.y;
    int32_t const t = blockIdx.x * blockDim.x + threadIdx.x;
    int32_t const n = shape.tokens;
    if (t < n)
    {
        float const* s = scores + static_cast<size_t>(row) * n;
        kept[static_cast<size_t>(row) * n + t] = place(s, n, t) < shape.keepTokens ? 1 : 0;
    }
}

__global__ void write_positions(Shape shape, uint8_t const* kept, int64_t* selected)
{
    int32_t const row = blockIdx.y;
    int32_t const t = blockIdx.x * blockDim.x + threadIdx.x;
    int32_t const n = shape.tokens;
    uint8_t const* k = kept + static_cast<size_t>(row) * n;
    if (t < n && k[t] != 0)
    {
        int32_t before = 0;
        for (int32_t j = 0; j < t; ++j)
        {
            before += k[j];
        }
        selected[static_cast<size_t>(row) * shape.keepTokens + before] = t;
    }
}

} // namespace

size_t workspaceBytes(Shape const& shape)
{
    size_t const cells = static_cast<size_t>(shape.batch) * shape.tokens;
    return aligned(cells * shape.heads * sizeof(float)) + 2 * aligned(cells * sizeof(float)) + aligned(cells);
}

cudaError_t launch(Shape const& shape, bool half, void const* query, void const* keys, int64_t const* attentionMask,
    int64_t* selected, void* workspace, cudaStream_t stream)
{
    if (shape.tokens < shape.keepTokens || shape.heads % shape.kvHeads != 0)
    {
        return cudaErrorInvalidValue;
    }
    size_t const cells = static_cast<size_t>(shape.batch) * shape.tokens;
    char* base = static_cast<char*>(workspace);
    float* probs = reinterpret_cast<float*>(base);
    float* headSum = reinterpret_cast<float*>(base + aligned(cells * shape.heads * sizeof(float)));
    float* scores = reinterpret_cast<float*>(reinterpret_cast<char*>(headSum) + aligned(cells * sizeof(float)));
    uint8_t* kept = reinterpret_cast<uint8_t*>(reinterpret_cast<char*>(scores) + aligned(cells * sizeof(float)));
    dim3 const perHead(shape.heads, shape.batch);
    if (half)
    {
        head_probabilities<__half><<<perHead, kThreads, 0, stream>>>(
            shape, static_cast<__half const*>(query), static_cast<__half const*>(keys), attentionMask, probs);
    }
    else
    {
        head_probabilities<float><<<perHead, kThreads, 0, stream>>>(
            shape, static_cast<float const*>(query), static_cast<float const*>(keys), attentionMask, probs);
    }
    row_scores<<<shape.batch, kThreads, 0, stream>>>(shape, probs, attentionMask, headSum, scores);
    dim3 const perToken((shape.tokens + kThreads - 1) / kThreads, shape.batch);
    mark_kept<<<perToken, kThreads, 0, stream>>>(shape, scores, kept);
    write_positions<<<perToken, kThreads, 0, stream>>>(shape, kept, selected);
    return cudaGetLastError();
}

} // namespace select_tokens
