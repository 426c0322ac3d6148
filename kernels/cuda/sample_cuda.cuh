// The pieces both device implementations of the sample op share (sample_cuda.cu: bisection;
// sample_radix_cuda.cu: radix select): the order-preserving key, the weights, the reductions in
// a fixed order and the bisection's mass sums, which the radix path reproduces to the bit.
#ifndef LQ_SAMPLE_CUDA_CUH
#define LQ_SAMPLE_CUDA_CUH

#include "kernels/cuda/cuda_internal.h"

#include <float.h>
#include <math.h>

namespace lq_sample_device {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr long long kAllTies = 1LL << 40; // "every token whose key is K"

// A row's settings as the kernel reads them: log(min_p) comes from the host's libm, the call
// core/sampler.c makes, so that min-p's threshold is the CPU's to the bit.
struct device_row {
    float temperature, top_p, min_p;
    int top_k;
    double u, log_min_p;
};

// A prefix of the sorted order: every token with key > key, then the `ties` lowest ids with
// key == key (all of them when ties >= their count).
struct prefix {
    unsigned long long key;
    long long ties;
};

struct block_shared {
    double sums[kWarps + 1];
    int counts[kWarps + 1];
    unsigned long long maxes[kWarps + 1];
    int chunk_counts[kThreads];
    int found;
};

__device__ __forceinline__ float clean(float x) {
    return isfinite(x) ? x : -INFINITY; // NaN and +-inf count as -inf, as on the CPU
}

// Order-preserving key of a clean logit: larger logit, larger key; -0 shares +0's key.
__device__ __forceinline__ unsigned key_of(float x) {
    unsigned bits = __float_as_uint(x);
    if (bits == 0x80000000u) bits = 0u;
    return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

__device__ __forceinline__ float value_of(unsigned key) {
    return __uint_as_float((key & 0x80000000u) ? key & 0x7fffffffu : ~key);
}

// core/sampler.c's weight_of, rounded step by step the same way (no contraction).
__device__ __forceinline__ float weight_of(float x, float max, float temperature) {
    return expf(__fdiv_rn(__fsub_rn(x, max), temperature));
}

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        unsigned long long other = __shfl_down_sync(0xffffffffu, v, offset);
        v = other > v ? other : v;
    }
    return v;
}

// Block-wide reductions, in a fixed order (a row's sums are the same on every run). Every
// thread calls them; the leading barrier keeps the previous result until all have read it.
// slots: kWarps + 1 values of block_shared (sums or counts).
template <typename T> __device__ inline T block_sum_in(T v, T *slots) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        T w = threadIdx.x < kWarps ? slots[threadIdx.x] : T(0);
        w = warp_sum(w);
        if (threadIdx.x == 0) slots[kWarps] = w;
    }
    __syncthreads();
    return slots[kWarps];
}

__device__ inline double block_sum(double v, block_shared &s) {
    return block_sum_in(v, s.sums);
}

__device__ inline int block_sum_int(int v, block_shared &s) {
    return block_sum_in(v, s.counts);
}

__device__ inline unsigned long long block_max(unsigned long long v, block_shared &s) {
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s.maxes[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        unsigned long long w = threadIdx.x < kWarps ? s.maxes[threadIdx.x] : 0ull;
        w = warp_max(w);
        if (threadIdx.x == 0) s.maxes[kWarps] = w;
    }
    __syncthreads();
    return s.maxes[kWarps];
}

// logprobs[blockIdx.x] = the log-softmax of the row's `token` under the raw row: log Σ exp(x −
// max) over the finite logits, as core/sampler.c's log_sum_exp (every thread calls it; thread 0
// stores; the same terms in the same order for both sampling kernels).
__device__ inline void store_logprob(const float *row, int vocab, float max, int token,
                                     block_shared &s, float *logprobs) {
    double sum = 0.0;
    if (max > -INFINITY)
        for (int i = threadIdx.x; i < vocab; i += kThreads) {
            float x = clean(row[i]);
            if (x > -INFINITY) sum += (double)expf(__fsub_rn(x, max));
        }
    sum = block_sum(sum, s);
    if (threadIdx.x == 0) {
        float raw = clean(row[token]);
        logprobs[blockIdx.x] = raw > -INFINITY && max > -INFINITY
                                   ? (float)(((double)raw - (double)max) - log(sum))
                                   : -INFINITY;
    }
}

// The lowest key above `above` whose token has weight (the last kept token with weight, where
// u · total rounds up to total and the CPU falls back to it), or 0 when there is none (a clean
// logit's key is never 0). Every thread calls it; all get the answer.
__device__ inline unsigned long long lowest_weighted_key(const float *row, int vocab,
                                                         unsigned long long above, float max,
                                                         float temperature, block_shared &s) {
    unsigned long long lowest = 0; // 2^32 - key of the lowest such key; 0: none
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        float x = clean(row[i]);
        unsigned k = key_of(x);
        if (k > above && weight_of(x, max, temperature) > 0.0f) {
            unsigned long long packed = 0x100000000ull - k;
            lowest = packed > lowest ? packed : lowest;
        }
    }
    lowest = block_max(lowest, s);
    return lowest == 0 ? 0 : 0x100000000ull - lowest;
}

// Σ weight over the tokens with key >= threshold (2^32: none).
__device__ inline double mass_from(const float *row, int vocab, unsigned long long threshold,
                                   float max, float temperature, block_shared &s) {
    double sum = 0.0;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        float x = clean(row[i]);
        if (key_of(x) >= threshold) sum += (double)weight_of(x, max, temperature);
    }
    return block_sum(sum, s);
}

// How many tokens have key >= threshold.
__device__ inline int count_from(const float *row, int vocab, unsigned long long threshold,
                                 block_shared &s) {
    int count = 0;
    for (int i = threadIdx.x; i < vocab; i += kThreads) count += key_of(clean(row[i])) >= threshold;
    return block_sum_int(count, s);
}

// How many tokens have key == key (key < 2^32).
__device__ inline int count_at(const float *row, int vocab, unsigned long long key,
                               block_shared &s) {
    int count = 0;
    for (int i = threadIdx.x; i < vocab; i += kThreads)
        count += (unsigned long long)key_of(clean(row[i])) == key;
    return block_sum_int(count, s);
}

// The draw's token where u · total rounded up to total (rare): the last kept token with weight,
// as core/sampler.c falls back to. That is the last of kept's ties at kept.key when that key has
// weight (at_key: how many tokens have it), else the last token of the lowest key above kept.key
// with weight, else argmax; argmax too where select finds nothing. select(key, j): the j-th
// lowest id among the tokens with key == key, or -1 (select_tie, select_tie_scan). Every thread
// calls it; all get the answer.
template <typename Select>
__device__ inline int last_weighted_token(const float *row, int vocab, prefix kept,
                                          long long at_key, float max, float temperature,
                                          int argmax, block_shared &s, Select select) {
    long long at_boundary = at_key;
    if (at_boundary > kept.ties) at_boundary = kept.ties;
    if (at_boundary > 0 && weight_of(value_of((unsigned)kept.key), max, temperature) > 0.0f) {
        int token = select(kept.key, at_boundary);
        return token >= 0 ? token : argmax;
    }
    const unsigned long long lowest_key =
        lowest_weighted_key(row, vocab, kept.key, max, temperature, s);
    if (lowest_key == 0) return argmax;
    int token = select(lowest_key, count_at(row, vocab, lowest_key, s));
    return token >= 0 ? token : argmax;
}

__device__ __forceinline__ bool passes(double mass, double limit, bool inclusive) {
    return inclusive ? mass >= limit : mass > limit;
}

// The smallest j in [1, count] for which above + w + ... + w (j terms, added one by one as the
// CPU walks a tie group) passes the limit, or 0. Starts near the answer when w > 0, so a flat
// row of 256K equal logits does not walk 256K additions; every thread computes the same.
__device__ inline long long tie_needed(double above, double w, long long count, double limit,
                                       bool inclusive) {
    if (count <= 0) return 0;
    long long j = 0;
    double acc = above;
    if (w > 0.0) {
        double estimate = floor((limit - above) / w) - 2.0;
        if (estimate > 0.0) {
            j = estimate < (double)count ? (long long)estimate : count;
            acc = above + (double)j * w;
            if (passes(acc, limit, inclusive)) j = 0, acc = above; // overshot: walk from 1
        }
    }
    while (j < count) {
        acc += w;
        j++;
        if (passes(acc, limit, inclusive)) return j;
    }
    return 0;
}

// The largest key K in (low, high) whose mass_from(K) passes the limit, or low when none does.
// mass_from(high) must fail (high is past the max key: mass 0).
__device__ inline unsigned long long search_mass(const float *row, int vocab,
                                                 unsigned long long low, unsigned long long high,
                                                 double limit, bool inclusive, float max,
                                                 float temperature, block_shared &s) {
    while (high - low > 1) {
        unsigned long long mid = low + (high - low) / 2;
        if (passes(mass_from(row, vocab, mid, max, temperature, s), limit, inclusive))
            low = mid;
        else
            high = mid;
    }
    return low;
}

__device__ __forceinline__ bool shorter(prefix a, prefix b) {
    return a.key > b.key || (a.key == b.key && a.ties < b.ties);
}

// core/sampler.c's min_p_threshold, with the product and sum rounded separately as the host's
// (FMA-less) code rounds them.
__device__ inline float min_p_threshold(float max, const device_row &p) {
    if (p.min_p <= 0.0f) return -FLT_MAX;
    double threshold = __dadd_rn((double)max, __dmul_rn((double)p.temperature, p.log_min_p));
    if (threshold <= -FLT_MAX) return -FLT_MAX;
    float rounded = __double2float_rn(threshold);
    return (double)rounded < threshold ? nextafterf(rounded, INFINITY) : rounded;
}

} // namespace lq_sample_device

// sample_radix_cuda.cu: launches the radix kernel on cuda's stream for n rows (rows on the
// device); the launch's status, the kernel's own errors surface at the next sync.
cudaError_t lq_cuda_sample_radix_launch(struct lq_cuda *cuda, const float *logits, int n, int vocab,
                                        int stride, const lq_sample_device::device_row *rows,
                                        int *tokens, float *logprobs);

#endif
