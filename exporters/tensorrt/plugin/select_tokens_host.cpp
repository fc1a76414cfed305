// The SelectTokens selection on the host, through the same functions as the CUDA kernels
// (select_tokens.cuh), in the same pass order; built as a small shared library so the CPU tests can
// compare the plugin's arithmetic with the torch selection (`sparse_tokens.select_positions`).
#include "select_tokens.cuh"

#include <vector>

extern "C" int select_tokens_host(float const* query, float const* keys, int64_t const* mask, int64_t* selected,
    int32_t batch, int32_t heads, int32_t kvHeads, int32_t n, int32_t d, int32_t keepTokens, int32_t keepFirst,
    int32_t keepLast, int32_t poolWidth)
{
    using namespace select_tokens;
    if (n < keepTokens || kvHeads <= 0 || heads % kvHeads != 0)
    {
        return 1;
    }
    std::vector<float> probs(static_cast<size_t>(heads) * n), sums(n), scores(n);
    for (int32_t row = 0; row < batch; ++row)
    {
        int64_t const* m = mask + static_cast<size_t>(row) * n;
        for (int32_t h = 0; h < heads; ++h)  // 1. each head's softmax over the row's keys
        {
            float const* q = query + (static_cast<size_t>(row) * heads + h) * d;
            float const* k = keys + (static_cast<size_t>(row) * kvHeads + h / (heads / kvHeads)) * n * d;
            float* p = probs.data() + static_cast<size_t>(h) * n;
            float rowMax = -INFINITY;
            for (int32_t t = 0; t < n; ++t)
            {
                p[t] = m[t] != 0 ? scaled_dot(q, k + static_cast<size_t>(t) * d, d) : -INFINITY;
                rowMax = p[t] > rowMax ? p[t] : rowMax;
            }
            float total = 0.f;
            for (int32_t t = 0; t < n; ++t)
            {
                p[t] = expf(p[t] - rowMax);
                total += p[t];
            }
            for (int32_t t = 0; t < n; ++t)
            {
                p[t] /= total;
            }
        }
        int64_t count = 0;  // 2. head sums, pooled, edges forced, padding excluded
        for (int32_t t = 0; t < n; ++t)
        {
            float sum = 0.f;
            for (int32_t h = 0; h < heads; ++h)
            {
                sum += probs[static_cast<size_t>(h) * n + t];
            }
            sums[t] = sum;
            count += m[t] != 0 ? 1 : 0;
        }
        int64_t rank = -1;
        for (int32_t t = 0; t < n; ++t)
        {
            bool const real = m[t] != 0;
            rank += real ? 1 : 0;
            scores[t] = ranked_score(real, rank, count, keepFirst, keepLast, pooled(sums.data(), n, t, poolWidth));
        }
        int32_t written = 0;  // 3 and 4. the kept positions, increasing
        for (int32_t t = 0; t < n; ++t)
        {
            if (place(scores.data(), n, t) < keepTokens)
            {
                selected[static_cast<size_t>(row) * keepTokens + written++] = t;
            }
        }
        if (written != keepTokens)
        {
            return 2;
        }
    }
    return 0;
}
