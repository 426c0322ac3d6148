// token_nll on the device (kernels/backend.h, "evaluation"): lqd eval scores every position of
// a window here, so n doubles come back instead of the [n, vocab] logits (2048 x 49152 floats,
// 400 MB, per SmolLM2 window).
//
// One CTA per row. Each thread takes the columns v ≡ threadIdx.x (mod LQ_NLL_THREADS): first
// the row's max in float (exact in any order), then Σ exp(logit − max) in double, reduced by a
// fixed tree (warp shuffles, then the warps' sums in warp order). The order depends only on
// vocab, so a row gets the same bits on every run; it differs from the CPU's sequential sum by
// rounding only (~1e-15 relative).
#include <math.h>
#include <stdlib.h>

#include "kernels/cuda/cuda_internal.h"

#define LQ_NLL_THREADS 512
#define LQ_NLL_WARPS (LQ_NLL_THREADS / 32)

namespace {

__device__ float nll_block_max(float v, float *shared /* [LQ_NLL_WARPS] */) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
    __syncthreads();
    float m = shared[0];
    for (int i = 1; i < LQ_NLL_WARPS; i++) m = fmaxf(m, shared[i]);
    return m;
}

__device__ double nll_block_sum(double v, double *shared /* [LQ_NLL_WARPS] */) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
    __syncthreads();
    double total = 0.0;
    for (int i = 0; i < LQ_NLL_WARPS; i++) total += shared[i]; // fixed order
    return total;
}

// nll[blockIdx.x] = log Σ exp(row − max) + max − row[target], as nll_cpu.c's row_nll.
__global__ void __launch_bounds__(LQ_NLL_THREADS)
    lq_token_nll_kernel(const float *logits, const int *targets, int vocab, double *nll) {
    __shared__ float shared_max[LQ_NLL_WARPS];
    __shared__ double shared_sum[LQ_NLL_WARPS];
    const float *row = logits + (size_t)blockIdx.x * (size_t)vocab;
    float max = -INFINITY;
    for (int v = threadIdx.x; v < vocab; v += LQ_NLL_THREADS) max = fmaxf(max, row[v]);
    max = nll_block_max(max, shared_max);
    double sum = 0.0;
    for (int v = threadIdx.x; v < vocab; v += LQ_NLL_THREADS) sum += exp((double)row[v] - max);
    sum = nll_block_sum(sum, shared_sum); // its own shared array: no wait for the max's readers
    if (threadIdx.x == 0) nll[blockIdx.x] = log(sum) + max - row[targets[blockIdx.x]];
}

} // namespace

int lq_cuda_token_nll(struct lq_backend *backend, const float *logits, const int *targets, int n,
                      int vocab, double *nll) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (n < 0 || vocab < 1 || (n > 0 && (!logits || !targets || !nll))) return LQ_EINVAL;
    for (int i = 0; i < n; i++)
        if (targets[i] < 0 || targets[i] >= vocab) return LQ_EINVAL;
    if (n == 0) return LQ_OK;
    void *device_nll = NULL, *device_targets = NULL;
    int rc;
    // every workspace before anything is queued (a regrowth frees the old one)
    if ((rc = lq_cuda_slot(cuda, LQ_CUDA_STAGE_1, (size_t)n * sizeof(double), &device_nll)) ||
        (rc = lq_cuda_stage(cuda, LQ_CUDA_STAGE_0, targets, (size_t)n * sizeof(int),
                            &device_targets)))
        return rc;
    lq_token_nll_kernel<<<(unsigned)n, LQ_NLL_THREADS, 0, cuda->stream>>>(
        logits, (const int *)device_targets, vocab, (double *)device_nll);
    LQ_CUDA_LAUNCHED("lq_token_nll_kernel");
    LQ_CUDA_TRY(cudaMemcpyAsync(nll, device_nll, (size_t)n * sizeof(double), cudaMemcpyDeviceToHost,
                                cuda->stream),
                "token_nll: copying the results");
    LQ_CUDA_TRY(cudaStreamSynchronize(cuda->stream), "token_nll");
    return LQ_OK;
}
