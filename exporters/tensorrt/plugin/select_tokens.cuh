// The arithmetic of `compressor.SelectTokens`, shared by the CUDA kernels (select_tokens_kernel.cu)
// and the host build (select_tokens_host.cpp), so the CPU test checks the functions the GPU runs.
//
// The selection is the one of `sparse_tokens.token_scores` + `select_positions` (and of the ONNX
// function body in exporters/onnx/token_filter.py): per row, the last query's attention
// probabilities over the prompt's keys, summed over heads, average-pooled (odd width, zero padded,
// divided by the full width); the row's first `keep_first` and last `keep_last` real tokens forced
// (+inf), left padding excluded (-inf); the top `keep_tokens`, in increasing position order.
// Ties rank the lower position first, as ONNX TopK does.
#pragma once

#include <cstdint>
#include <math.h>

#if !defined(__CUDACC__)
#define SELECT_TOKENS_FN inline
#else
#define SELECT_TOKENS_FN __host__ __device__ inline
#include <cuda_fp16.h>
#endif

namespace select_tokens
{

SELECT_TOKENS_FN float to_float(float x)
{
    return x;
}
#if defined(__CUDACC__)
SELECT_TOKENS_FN float to_float(__half x)
{
    return __half2float(x);
}
#endif

// q . k / sqrt(d), accumulated in float.
template <typename T>
SELECT_TOKENS_FN float scaled_dot(T const* q, T const* k, int32_t d)
{
    float sum = 0.f;
    for (int32_t i = 0; i < d; ++i)
    {
        sum += to_float(q[i]) * to_float(k[i]);
    }
    return sum / sqrtf(static_cast<float>(d));
}

// The average pool at position t of a row of n head sums (zero padded, divided by the width).
SELECT_TOKENS_FN float pooled(float const* head_sum, int32_t n, int32_t t, int32_t width)
{
    int32_t const half = width / 2;
    float sum = 0.f;
    for (int32_t j = t - half; j <= t + half; ++j)
    {
        if (j >= 0 && j < n)
        {
            sum += head_sum[j];
        }
    }
    return sum / static_cast<float>(width);
}

// The score that ranks position t: -inf for padding, +inf for a forced edge token, else `value`.
// `rank` is t's index among the row's real tokens, `count` their number.
SELECT_TOKENS_FN float ranked_score(bool real, int64_t rank, int64_t count, int32_t keep_first, int32_t keep_last,
    float value)
{
    if (!real)
    {
        return -INFINITY;
    }
    if (rank < keep_first || rank >= count - keep_last)
    {
        return INFINITY;
    }
    return value;
}

// Whether position a (score sa) ranks before position b (score sb).
SELECT_TOKENS_FN bool outranks(float sa, int32_t a, float sb, int32_t b)
{
    return sa > sb || (sa == sb && a < b);
}

// Position t's place in the ranking of a row of n scores (0: first).
SELECT_TOKENS_FN int32_t place(float const* scores, int32_t n, int32_t t)
{
    int32_t ahead = 0;
    for (int32_t j = 0; j < n; ++j)
    {
        ahead += outranks(scores[j], j, scores[t], t) ? 1 : 0;
    }
    return ahead;
}

} // namespace select_tokens
