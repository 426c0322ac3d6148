// The sample op (kernels/backend.h) on the device: core/sampler.c's rules without a sort, one
// CTA per row, so only a token and a logprob per row cross to the host instead of the logits.
//
// The sorted order of core/sampler.h (descending logit, ties by lower id) is the order of a
// 32-bit key that preserves the order of floats (-0 mapped onto +0, as the CPU's comparisons
// see them) with ties broken by id. Every cut the CPU makes in that order (top-k's k-th token,
// top-p's boundary, min-p's threshold, the inverse-CDF draw) is a prefix: all tokens whose key
// is above some K, plus the lowest `ties` ids of those whose key equals K. The cut is found by
// bisection on K, each step one pass over the row that counts or sums (in double, in a fixed
// order, so a row gives the same token on every run) the tokens with key >= K; then the
// running sum inside the tie group at K says how many of its ids are in, and one more pass
// finds the id. About 100 passes over a row in the worst case (top-k, top-p and a draw), each
// reading the row from L2 after the first.
//
// Against the CPU: the weights exp((x - max) / T) come from CUDA's expf (2 ulp) rather than
// glibc's, and the sums add the same terms in another order, so where u lands within rounding
// (~1e-7 relative) of a boundary of the cumulative distribution the two may pick neighbouring
// tokens. Greedy (temperature 0) and everything decided by comparisons of logits (top-k,
// min-p's threshold, ties) are exact.
#include "kernels/cuda/cuda_internal.h"

extern "C" {
#include "core/sampler.h"
}

#include <float.h>
#include <math.h>
#include <stdlib.h>

namespace {

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

__device__ __forceinline__ double warp_sum(double v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
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
__device__ double block_sum(double v, block_shared &s) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s.sums[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        double w = threadIdx.x < kWarps ? s.sums[threadIdx.x] : 0.0;
        w = warp_sum(w);
        if (threadIdx.x == 0) s.sums[kWarps] = w;
    }
    __syncthreads();
    return s.sums[kWarps];
}

__device__ int block_sum_int(int v, block_shared &s) {
    v = warp_sum_int(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s.counts[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        int w = threadIdx.x < kWarps ? s.counts[threadIdx.x] : 0;
        w = warp_sum_int(w);
        if (threadIdx.x == 0) s.counts[kWarps] = w;
    }
    __syncthreads();
    return s.counts[kWarps];
}

__device__ unsigned long long block_max(unsigned long long v, block_shared &s) {
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

// Σ weight over the tokens with key >= threshold (2^32: none).
__device__ double mass_from(const float *row, int vocab, unsigned long long threshold, float max,
                            float temperature, block_shared &s) {
    double sum = 0.0;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        float x = clean(row[i]);
        if (key_of(x) >= threshold) sum += (double)weight_of(x, max, temperature);
    }
    return block_sum(sum, s);
}

// How many tokens have key >= threshold.
__device__ int count_from(const float *row, int vocab, unsigned long long threshold,
                          block_shared &s) {
    int count = 0;
    for (int i = threadIdx.x; i < vocab; i += kThreads) count += key_of(clean(row[i])) >= threshold;
    return block_sum_int(count, s);
}

// How many tokens have key == key (key < 2^32).
__device__ int count_at(const float *row, int vocab, unsigned long long key, block_shared &s) {
    int count = 0;
    for (int i = threadIdx.x; i < vocab; i += kThreads)
        count += (unsigned long long)key_of(clean(row[i])) == key;
    return block_sum_int(count, s);
}

// The id of the j-th lowest id (j >= 1) among the tokens with key == key, or -1. Each thread
// counts a contiguous chunk of ids; thread 0 walks the chunk counts, then the one chunk.
__device__ int select_tie(const float *row, int vocab, unsigned long long key, long long j,
                          block_shared &s) {
    int chunk = (vocab + kThreads - 1) / kThreads;
    int begin = threadIdx.x * chunk, end = min(begin + chunk, vocab);
    int count = 0;
    for (int i = begin; i < end; i++) count += (unsigned long long)key_of(clean(row[i])) == key;
    __syncthreads(); // the previous select's `found` has been read
    s.chunk_counts[threadIdx.x] = count;
    __syncthreads();
    if (threadIdx.x == 0) {
        long long before = 0;
        int t = 0;
        while (t < kThreads && before + s.chunk_counts[t] < j) before += s.chunk_counts[t++];
        int found = -1;
        if (t < kThreads && j >= 1) {
            int chunk_end = min(t * chunk + chunk, vocab);
            for (int i = t * chunk; i < chunk_end; i++)
                if ((unsigned long long)key_of(clean(row[i])) == key && ++before == j) {
                    found = i;
                    break;
                }
        }
        s.found = found;
    }
    __syncthreads();
    return s.found;
}

__device__ __forceinline__ bool passes(double mass, double limit, bool inclusive) {
    return inclusive ? mass >= limit : mass > limit;
}

// The smallest j in [1, count] for which above + w + ... + w (j terms, added one by one as the
// CPU walks a tie group) passes the limit, or 0. Starts near the answer when w > 0, so a flat
// row of 256K equal logits does not walk 256K additions; every thread computes the same.
__device__ long long tie_needed(double above, double w, long long count, double limit,
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
__device__ unsigned long long search_mass(const float *row, int vocab, unsigned long long low,
                                          unsigned long long high, double limit, bool inclusive,
                                          float max, float temperature, block_shared &s) {
    while (high - low > 1) {
        unsigned long long mid = low + (high - low) / 2;
        if (passes(mass_from(row, vocab, mid, max, temperature, s), limit, inclusive))
            low = mid;
        else
            high = mid;
    }
    return low;
}

// Where, inside the tie group at key (its first max_ties ids at most), the running mass first
// passes the limit: (key, j), j = 0 when it never does.
__device__ prefix cut_in_group(const float *row, int vocab, unsigned long long key,
                               long long max_ties, double limit, bool inclusive, float max,
                               float temperature, block_shared &s) {
    double above = mass_from(row, vocab, key + 1, max, temperature, s);
    long long count = count_at(row, vocab, key, s);
    if (count > max_ties) count = max_ties;
    double w = count > 0 ? (double)weight_of(value_of((unsigned)key), max, temperature) : 0.0;
    return prefix{key, tie_needed(above, w, count, limit, inclusive)};
}

__device__ double prefix_mass(const float *row, int vocab, prefix p, float max, float temperature,
                              block_shared &s) {
    double mass = mass_from(row, vocab, p.key + 1, max, temperature, s);
    long long count = count_at(row, vocab, p.key, s);
    if (count > p.ties) count = p.ties;
    if (count > 0)
        mass += (double)count * (double)weight_of(value_of((unsigned)p.key), max, temperature);
    return mass;
}

__device__ __forceinline__ bool shorter(prefix a, prefix b) {
    return a.key > b.key || (a.key == b.key && a.ties < b.ties);
}

// core/sampler.c's min_p_threshold, with the product and sum rounded separately as the host's
// (FMA-less) code rounds them.
__device__ float min_p_threshold(float max, const device_row &p) {
    if (p.min_p <= 0.0f) return -FLT_MAX;
    double threshold = __dadd_rn((double)max, __dmul_rn((double)p.temperature, p.log_min_p));
    if (threshold <= -FLT_MAX) return -FLT_MAX;
    float rounded = __double2float_rn(threshold);
    return (double)rounded < threshold ? nextafterf(rounded, INFINITY) : rounded;
}

// The tempered draw (temperature > 0, some logit finite; max_key the largest key).
__device__ int sample_tempered(const float *row, int vocab, const device_row &p, unsigned max_key,
                               int argmax, block_shared &s) {
    float max = value_of(max_key), t = p.temperature;
    unsigned long long past_max = (unsigned long long)max_key + 1; // mass 0 from here
    // top-k: S = the first top_k tokens (all of them when off or fewer are finite)
    prefix candidates = {0, kAllTies}; // key 0 is below -inf's: every token
    unsigned long long finite_key = key_of(-FLT_MAX);
    if (p.top_k > 0 && p.top_k < vocab && count_from(row, vocab, finite_key, s) >= p.top_k) {
        unsigned long long low = finite_key, high = past_max; // count(low) >= k > count(high)
        while (high - low > 1) {
            unsigned long long mid = low + (high - low) / 2;
            if (count_from(row, vocab, mid, s) >= p.top_k)
                low = mid;
            else
                high = mid;
        }
        candidates = prefix{low, (long long)p.top_k - count_from(row, vocab, low + 1, s)};
    }
    // top-p over S, renormalised over S (over the whole vocabulary when top-k is off)
    prefix nucleus = candidates;
    if (p.top_p < 1.0f) {
        double limit = (double)p.top_p * prefix_mass(row, vocab, candidates, max, t, s);
        unsigned long long key =
            search_mass(row, vocab, candidates.key, past_max, limit, true, max, t, s);
        if (key > candidates.key) {
            nucleus = cut_in_group(row, vocab, key, kAllTies, limit, true, max, t, s);
            if (nucleus.ties == 0) nucleus.ties = kAllTies; // short by rounding: the whole group
        } else {
            nucleus = cut_in_group(row, vocab, key, candidates.ties, limit, true, max, t, s);
            if (nucleus.ties == 0) nucleus = candidates; // the limit lies beyond S: keep S
        }
    }
    // min-p: every token at or above the threshold (never -inf; the max always passes)
    prefix kept = prefix{key_of(min_p_threshold(max, p)), kAllTies};
    if (shorter(nucleus, kept)) kept = nucleus;

    double target = p.u * prefix_mass(row, vocab, kept, max, t, s);
    unsigned long long key = search_mass(row, vocab, kept.key, past_max, target, false, max, t, s);
    if (key > kept.key) {
        prefix cut = cut_in_group(row, vocab, key, kAllTies, target, false, max, t, s);
        long long j = cut.ties > 0 ? cut.ties : count_at(row, vocab, key, s);
        int token = select_tie(row, vocab, key, j, s);
        return token >= 0 ? token : argmax;
    }
    prefix cut = cut_in_group(row, vocab, kept.key, kept.ties, target, false, max, t, s);
    if (cut.ties > 0) {
        int token = select_tie(row, vocab, kept.key, cut.ties, s);
        return token >= 0 ? token : argmax;
    }
    // u · total rounded up to total: the last kept token with weight, as the CPU falls back to.
    long long at_boundary = count_at(row, vocab, kept.key, s);
    if (at_boundary > kept.ties) at_boundary = kept.ties;
    if (at_boundary > 0 && weight_of(value_of((unsigned)kept.key), max, t) > 0.0f) {
        int token = select_tie(row, vocab, kept.key, at_boundary, s);
        return token >= 0 ? token : argmax;
    }
    unsigned long long lowest = 0; // 2^32 - key + 1 of the lowest kept key with weight; 0: none
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        float x = clean(row[i]);
        unsigned k = key_of(x);
        if (k > kept.key && weight_of(x, max, t) > 0.0f) {
            unsigned long long packed = 0x100000000ull - k;
            lowest = packed > lowest ? packed : lowest;
        }
    }
    lowest = block_max(lowest, s);
    if (lowest == 0) return argmax;
    unsigned long long lowest_key = 0x100000000ull - lowest;
    int token = select_tie(row, vocab, lowest_key, count_at(row, vocab, lowest_key, s), s);
    return token >= 0 ? token : argmax;
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float *logits, int vocab, long long stride, const device_row *rows,
                  int *tokens, float *logprobs) {
    __shared__ block_shared s;
    const float *row = logits + (long long)blockIdx.x * stride;
    const device_row p = rows[blockIdx.x];
    // the max key with the lowest id among ties (ids complemented so that max prefers low)
    unsigned long long best = 0;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        unsigned long long packed =
            ((unsigned long long)key_of(clean(row[i])) << 32) | (0xffffffffu - (unsigned)i);
        best = packed > best ? packed : best;
    }
    best = block_max(best, s);
    unsigned max_key = (unsigned)(best >> 32);
    int argmax = (int)(0xffffffffu - (unsigned)(best & 0xffffffffu));
    float max = value_of(max_key);
    int token = argmax; // greedy, and every logit -inf (then id 0, the lowest)
    if (max > -INFINITY && p.temperature > 0.0f)
        token = sample_tempered(row, vocab, p, max_key, argmax, s);
    if (logprobs) {
        // log Σ exp(x - max) over the finite logits, as core/sampler.c's log_sum_exp
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
    if (threadIdx.x == 0) tokens[blockIdx.x] = token;
}

int rows_check(int n, int vocab, int stride, const struct lq_sample_row *rows, const int *tokens,
               const float *logits) {
    if (n < 1 || vocab < 1 || stride < vocab || !rows || !tokens || !logits) return LQ_EINVAL;
    for (int i = 0; i < n; i++) {
        struct lq_sampler_params params;
        lq_sampler_params_default(&params);
        params.temperature = rows[i].temperature;
        params.top_k = rows[i].top_k;
        params.top_p = rows[i].top_p;
        params.min_p = rows[i].min_p;
        if (lq_sampler_params_validate(&params, NULL) || !(rows[i].u >= 0.0 && rows[i].u < 1.0))
            return LQ_EINVAL;
    }
    return LQ_OK;
}

// Lock held.
int sample(struct lq_cuda *cuda, const float *logits, int n, int vocab, int stride,
           const struct lq_sample_row *rows, int *tokens, float *logprobs) {
    int rc = rows_check(n, vocab, stride, rows, tokens, logits);
    if (rc) return rc;
    device_row *host = (device_row *)malloc((size_t)n * sizeof *host);
    if (!host) return LQ_ENOMEM;
    for (int i = 0; i < n; i++)
        host[i] = device_row{
            rows[i].temperature, rows[i].top_p,
            rows[i].min_p,       rows[i].top_k,
            rows[i].u,           rows[i].min_p > 0.0f ? log((double)rows[i].min_p) : 0.0};
    void *device_rows = NULL, *out = NULL;
    size_t token_bytes = ((size_t)n * sizeof(int) + 15) & ~(size_t)15;
    rc = lq_cuda_stage(cuda, LQ_CUDA_STAGE_0, host, (size_t)n * sizeof *host, &device_rows);
    if (!rc)
        rc = lq_cuda_slot(cuda, LQ_CUDA_STAGE_1, token_bytes + (size_t)n * sizeof(float), &out);
    if (rc) {
        free(host);
        return rc;
    }
    int *device_tokens = (int *)out;
    float *device_logprobs = logprobs ? (float *)((char *)out + token_bytes) : NULL;
    sample_kernel<<<n, kThreads, 0, cuda->stream>>>(
        logits, vocab, stride, (const device_row *)device_rows, device_tokens, device_logprobs);
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess)
        status = cudaMemcpyAsync(tokens, device_tokens, (size_t)n * sizeof(int),
                                 cudaMemcpyDeviceToHost, cuda->stream);
    if (status == cudaSuccess && logprobs)
        status = cudaMemcpyAsync(logprobs, device_logprobs, (size_t)n * sizeof(float),
                                 cudaMemcpyDeviceToHost, cuda->stream);
    if (status == cudaSuccess) status = cudaStreamSynchronize(cuda->stream);
    free(host); // staged through the pinned ring (or copied before the sync above)
    return status == cudaSuccess ? LQ_OK : lq_cuda_fail(status, "sampling", NULL);
}

} // namespace

int lq_cuda_op_sample(struct lq_backend *backend, const float *logits, int n, int vocab, int stride,
                      const struct lq_sample_row *rows, int *tokens, float *logprobs) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    pthread_mutex_lock(&cuda->lock);
    cudaSetDevice(cuda->device);
    int rc = sample(cuda, logits, n, vocab, stride, rows, tokens, logprobs);
    pthread_mutex_unlock(&cuda->lock);
    return rc;
}
