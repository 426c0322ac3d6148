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
// That bisection is kept here as the reference, picked with LQ_CUDA_SAMPLE=bisect; the default
// is sample_radix_cuda.cu, which finds the same cuts by radix select in about 15 passes and
// gives the same tokens and logprobs to the bit (test_cuda_sample checks both).
//
// Against the CPU: the weights exp((x - max) / T) come from CUDA's expf (2 ulp) rather than
// glibc's, and the sums add the same terms in another order, so where u lands within rounding
// (~1e-7 relative) of a boundary of the cumulative distribution the two may pick neighbouring
// tokens. Greedy (temperature 0) and everything decided by comparisons of logits (top-k,
// min-p's threshold, ties) are exact.
#include "kernels/cuda/cuda_internal.h"
#include "kernels/cuda/sample_cuda.cuh"

extern "C" {
#include "core/sampler.h"
}

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace {

using namespace lq_sample_device;

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
    return last_weighted_token(
        row, vocab, kept, count_at(row, vocab, kept.key, s), max, t, argmax, s,
        [&](unsigned long long key, long long j) { return select_tie(row, vocab, key, j, s); });
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
    if (logprobs) store_logprob(row, vocab, max, token, s, logprobs);
    if (threadIdx.x == 0) tokens[blockIdx.x] = token;
}

// LQ_CUDA_SAMPLE=bisect picks sample_kernel, radix (or unset) sample_radix_kernel; another
// value is reported once and taken as radix. Read on every call, so a test can run both.
bool bisect_requested(void) {
    const char *value = getenv("LQ_CUDA_SAMPLE");
    if (!value || !*value || strcmp(value, "radix") == 0) return false;
    if (strcmp(value, "bisect") == 0) return true;
    static int reported;
    if (!__atomic_exchange_n(&reported, 1, __ATOMIC_RELAXED))
        fprintf(stderr, "lqd: LQ_CUDA_SAMPLE=%s: expected radix or bisect; using radix\n", value);
    return false;
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
    cudaError_t status;
    if (bisect_requested()) {
        sample_kernel<<<n, kThreads, 0, cuda->stream>>>(
            logits, vocab, stride, (const device_row *)device_rows, device_tokens, device_logprobs);
        status = cudaGetLastError();
    } else {
        status = lq_cuda_sample_radix_launch(cuda, logits, n, vocab, stride,
                                             (const device_row *)device_rows, device_tokens,
                                             device_logprobs);
    }
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
