// The adapter ops of the CUDA backend (kernels/backend.h, "adapters in serving"):
//   - linear_base: the layer's shared part alone. linear_cuda.cu's kernels already skip the
//     low-rank term when the layer's rank is 0, so this runs lq_cuda_linear on a shallow copy
//     of the layer that forgets its pair: the same packed Q, the same decode and prefill paths.
//   - lowrank_add: y += (x · L2ᵀ) · L1ᵀ as two fp32 cuBLAS SGEMMs on cuda->stream, the first
//     into the LQ_CUDA_LOWRANK workspace (t [n, rank]), the second accumulating into y
//     (beta 1). Factors are device arrays (weights_upload), in PEFT's orientation.
// A batch of requests on several adapters then costs one pass over Q for all rows plus two
// thin GEMMs per adapter group. Unlike the CPU, cuBLAS and the fused decode kernel round in
// different orders, so on the GPU linear and linear_base + lowrank_add agree within fp32
// rounding, not bit for bit (tests/kernels/test_cuda_ops.c checks both against the CPU).
#include <stdint.h>

#include "kernels/cuda/cuda_internal.h"

int lq_cuda_linear_base(struct lq_backend *backend, const struct lq_linear *w, const float *x,
                        int n, float *y) {
    struct lq_linear base = *w; // backend_data (the packed Q) is shared; only the pair is dropped
    base.rank = 0;
    base.lora_A = base.lora_B = NULL;
    return lq_cuda_linear(backend, &base, x, n, y);
}

int lq_cuda_lowrank_add(struct lq_backend *backend, const float *L1, const float *L2, int rows,
                        int cols, int rank, const float *x, int n, float *y) {
    if (n < 0 || rows < 0 || cols < 0 || rank < 0) return LQ_EINVAL;
    if (n == 0 || rank == 0 || rows == 0) return LQ_OK;
    if (!L1 || !L2 || !x || !y) return LQ_EINVAL;
    struct lq_cuda *cuda = lq_cuda_of(backend);
    void *t = NULL;
    int rc = lq_cuda_slot(cuda, LQ_CUDA_LOWRANK, (size_t)n * (size_t)rank * sizeof(float), &t);
    if (rc) return rc;
    // cuBLAS is column-major: a row-major [n, k] array is its transpose [k × n] with ld k.
    //   tᵀ [rank × n] = L2 [rank × cols] · xᵀ   (L2 row-major = L2ᵀ column-major: OP_T)
    //   yᵀ [rows × n] += L1 [rows × rank] · tᵀ  (likewise OP_T on L1's row-major storage)
    const float one = 1.0f, zero = 0.0f;
    LQ_CUBLAS_TRY(cublasSgemm(cuda->cublas, CUBLAS_OP_T, CUBLAS_OP_N, rank, n, cols, &one, L2, cols,
                              x, cols, &zero, (float *)t, rank),
                  "cublasSgemm (low-rank projection)");
    LQ_CUBLAS_TRY(cublasSgemm(cuda->cublas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, rank, &one, L1, rank,
                              (const float *)t, rank, &one, y, rows),
                  "cublasSgemm (low-rank expansion)");
    return LQ_OK;
}

// The ops-table entries: under the op lock, on the backend's device, like every other op.
int lq_cuda_op_linear_base(struct lq_backend *backend, const struct lq_linear *w, const float *x,
                           int n, float *y) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    pthread_mutex_lock(&cuda->lock);
    cudaSetDevice(cuda->device);
    int rc = lq_cuda_linear_base(backend, w, x, n, y);
    pthread_mutex_unlock(&cuda->lock);
    return rc;
}

int lq_cuda_op_lowrank_add(struct lq_backend *backend, const float *L1, const float *L2, int rows,
                           int cols, int rank, const float *x, int n, float *y) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    pthread_mutex_lock(&cuda->lock);
    cudaSetDevice(cuda->device);
    int rc = lq_cuda_lowrank_add(backend, L1, L2, rows, cols, rank, x, n, y);
    pthread_mutex_unlock(&cuda->lock);
    return rc;
}
