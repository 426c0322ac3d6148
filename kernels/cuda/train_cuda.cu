// The training ops of the CUDA backend (kernels/backend.h, "training ops"), all but
// attention_backward (its own file). The CPU's versions (kernels/cpu/train_cpu.c) are the
// reference; these keep fp32 (and double where the CPU sums in double) throughout, so a
// training step agrees with the CPU's within fp32 rounding (tests/kernels/test_cuda_train_ops.c),
// except where the products with a frozen weight take TF32 or bf16 (below).
//
//   - Matrix products are cuBLAS GEMMs on cuda->stream. Row-major arrays are their
//     column-major transposes, so C = op(A)·op(B) is computed as Cᵀ = op(B)ᵀ·op(A)ᵀ
//     (lq_train_gemm). The products with a layer's frozen weight (y = x·Wᵀ, dx = dy·W: almost
//     all of a LoRA step's flops) run on TF32 tensor cores by default, in bf16 or as SGEMMs
//     by LQ_CUDA_TRAIN_MATH (frozen_products_math); the trained pair's products and the
//     weights' gradients are SGEMMs.
//   - LQ layers (linear_lora, and dx of linear_backward): Q is dequantized into tiles of at
//     most LQ_TRAIN_TILE_BYTES in the LQ_CUDA_LINEAR_TILE workspace by the prefill's tile
//     kernel (lq_cuda_dequant_rows_f32 / _bf16, linear_cuda.cu: 8 values a thread, 32-bit
//     index arithmetic), fp32 values core/nf.c's bit for bit (bf16: those rounded), then one
//     GEMM per tile. Never a whole dense Q.
//   - Row reductions (rmsnorm_backward, cross_entropy): one block per row, double sums.
//   - sum_squares: per 65536-value chunk a double partial (one block, a fixed reduction tree),
//     the partials summed on the host in chunk order: the same bits on every run.
//   - Host arguments (positions, targets, mask) are staged through lq_cuda_stage; results
//     for the host (loss, sum of squares) are copied back and the stream synchronized.
// Workspaces: LQ_CUDA_LINEAR_TILE (Q tiles), LQ_CUDA_LOWRANK (t = x·L2ᵀ), LQ_CUDA_LINEAR_INPUT
// (u = dy·L1), LQ_CUDA_TRAIN_INPUT (bf16 x or dy), LQ_CUDA_STAGE_0..2 (staged arguments, per-row
// losses, partial sums). Each op takes every workspace it needs before it queues anything, so none
// is regrown under a queued kernel.
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_internal.h"

// An fp32 tile of Q rows is at most this large.
#define LQ_TRAIN_TILE_BYTES ((size_t)16 << 20)
// sum_squares: values per partial sum (as train_cpu.c's chunks).
#define LQ_TRAIN_SUM_CHUNK ((size_t)1 << 16)
#define LQ_TRAIN_THREADS 256

namespace {

unsigned grid_for(const struct lq_cuda *cuda, size_t items) {
    size_t blocks = (items + LQ_TRAIN_THREADS - 1) / LQ_TRAIN_THREADS;
    size_t cap = (size_t)(cuda->sm_count > 0 ? cuda->sm_count : 1) * 16;
    return (unsigned)(blocks < 1 ? 1 : blocks < cap ? blocks : cap);
}

// C[m, n] = alpha · op(A)[m, k] · op(B)[k, n] + beta · C for row-major arrays (ld in elements),
// as train_cpu.c's sgemm; nothing happens for an empty product (as there). tf32: on TF32
// tensor cores (inputs rounded to 10-bit mantissas, fp32 sums), else an SGEMM.
int lq_train_gemm(struct lq_cuda *cuda, bool tf32, bool trans_a, bool trans_b, int m, int n, int k,
                  float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                  float *c, int ldc) {
    if (m <= 0 || n <= 0 || k <= 0) return LQ_OK;
    const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                            op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (tf32) {
        LQ_CUBLAS_TRY(cublasGemmEx(cuda->cublas, op_b, op_a, n, m, k, &alpha, b, CUDA_R_32F, ldb, a,
                                   CUDA_R_32F, lda, &beta, c, CUDA_R_32F, ldc,
                                   CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT),
                      "cublasGemmEx (training, TF32)");
        return LQ_OK;
    }
    LQ_CUBLAS_TRY(
        cublasSgemm(cuda->cublas, op_b, op_a, n, m, k, &alpha, b, ldb, a, lda, &beta, c, ldc),
        "cublasSgemm (training)");
    return LQ_OK;
}

// C[m, n] = alpha · op(A) · op(B) + beta · C as lq_train_gemm, with A and B in bf16 and C in
// fp32 (bf16 tensor cores, fp32 sums).
int lq_train_gemm_bf16(struct lq_cuda *cuda, bool trans_a, bool trans_b, int m, int n, int k,
                       float alpha, const __nv_bfloat16 *a, int lda, const __nv_bfloat16 *b,
                       int ldb, float beta, float *c, int ldc) {
    if (m <= 0 || n <= 0 || k <= 0) return LQ_OK;
    LQ_CUBLAS_TRY(cublasGemmEx(cuda->cublas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                               trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b, CUDA_R_16BF,
                               ldb, a, CUDA_R_16BF, lda, &beta, c, CUDA_R_32F, ldc,
                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                  "cublasGemmEx (training, bf16)");
    return LQ_OK;
}

// How the products with a layer's frozen weight (Q tiles or a dense W: y = x·Wᵀ and
// dx = dy·W, almost all of a LoRA step's flops) run: LQ_CUDA_TRAIN_MATH, read on every call.
//   fp32: SGEMMs on fp32 tiles of Q (the CPU's results to fp32 rounding);
//   tf32: TF32 tensor cores on the same tiles;
//   bf16 (the default; another value is reported once and taken as bf16): Q's tiles and
//         the activations (x, dy) rounded to bf16, bf16 tensor cores with fp32 sums, as QLoRA
//         and the LQ-LoRA paper train; dense weights (and the head) take TF32 there, which
//         needs no copy of them.
//         On the H100 a 7B-shaped step took 0.53 s against TF32's 0.85 and fp32's 1.78
//         (bench_cuda --train-only), and stories260K's finetune losses stayed within 6·10⁻⁴
//         of the CPU's (tests/kernels/test_gpu_e2e.py).
// The trained pair's products and every gradient of a weight stay SGEMMs: they are a rank's
// width and take the updates' precision.
enum train_math { TRAIN_FP32, TRAIN_TF32, TRAIN_BF16 };

train_math frozen_products_math(void) {
    const char *value = getenv("LQ_CUDA_TRAIN_MATH");
    if (value && strcmp(value, "fp32") == 0) return TRAIN_FP32;
    if (value && strcmp(value, "tf32") == 0) return TRAIN_TF32;
    if (value && *value && strcmp(value, "bf16") != 0) {
        static int reported;
        if (!__atomic_exchange_n(&reported, 1, __ATOMIC_RELAXED))
            fprintf(stderr, "lqd: LQ_CUDA_TRAIN_MATH=%s: expected bf16, tf32 or fp32; using bf16\n",
                    value);
    }
    return TRAIN_BF16;
}

// Rows of Q per tile of values of `bytes` each.
size_t tile_rows(const struct lq_linear *w, size_t bytes) {
    size_t step = LQ_TRAIN_TILE_BYTES / ((size_t)w->cols * bytes);
    if (step < 1) step = 1;
    return step < (size_t)w->rows ? step : (size_t)w->rows;
}

__global__ void __launch_bounds__(LQ_TRAIN_THREADS)
    lq_train_to_bf16_kernel(const float *x, size_t count, __nv_bfloat16 *out) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(x[i]);
}

// A bf16 copy of count fp32 values in workspace LQ_CUDA_TRAIN_INPUT (taken by the caller with
// its other workspaces, at least count values).
int to_bf16(struct lq_cuda *cuda, const float *x, size_t count, __nv_bfloat16 *out) {
    lq_train_to_bf16_kernel<<<grid_for(cuda, count), LQ_TRAIN_THREADS, 0, cuda->stream>>>(x, count,
                                                                                          out);
    LQ_CUDA_LAUNCHED("lq_train_to_bf16_kernel");
    return LQ_OK;
}

const struct lq_cuda_linear_data *prepared(const struct lq_linear *w) {
    const struct lq_cuda_linear_data *data = (const struct lq_cuda_linear_data *)w->backend_data;
    if (!data || w->rows <= 0 || w->cols <= 0) return NULL;
    if (!w->is_lq && !data->dense) return NULL;
    if (w->is_lq && (!data->codes || (w->rank > 0 && (!data->lora_A || !data->lora_B))))
        return NULL;
    return data;
}

// ---------------------------------------------------------------------------------------------
// Linear layers.

int linear_lora(struct lq_backend *backend, const struct lq_linear *w, const float *L1,
                const float *L2, int rank, const float *x, int n, float *y) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    const struct lq_cuda_linear_data *data = prepared(w);
    if (!data || n < 0 || rank < 0 || (rank > 0 && (!L1 || !L2))) return LQ_EINVAL;
    if (n == 0) return LQ_OK;
    const int rows = w->rows, cols = w->cols;
    const train_math math = frozen_products_math();
    const bool tf32 = math != TRAIN_FP32, bf16 = math == TRAIN_BF16;
    int rc;
    if (!w->is_lq) {
        if ((rc = lq_train_gemm(cuda, tf32, false, true, n, rows, cols, 1.0f, x, cols, data->dense,
                                cols, 0.0f, y, rows)))
            return rc;
    } else {
        // y[:, tile] = x · tileᵀ, tile by tile in fp32 or bf16 (not linear()'s fp16 tiles)
        const size_t value_bytes = bf16 ? sizeof(__nv_bfloat16) : sizeof(float);
        const size_t step = tile_rows(w, value_bytes);
        void *tile = NULL, *x16 = NULL;
        if ((rc = lq_cuda_slot(cuda, LQ_CUDA_LINEAR_TILE, step * (size_t)cols * value_bytes,
                               &tile)) ||
            (bf16 && (rc = lq_cuda_slot(cuda, LQ_CUDA_TRAIN_INPUT,
                                        (size_t)n * cols * sizeof(__nv_bfloat16), &x16))) ||
            (bf16 && (rc = to_bf16(cuda, x, (size_t)n * cols, (__nv_bfloat16 *)x16))))
            return rc;
        for (size_t r0 = 0; r0 < (size_t)rows; r0 += step) {
            const size_t count = (size_t)rows - r0 < step ? (size_t)rows - r0 : step;
            if (bf16)
                rc = lq_cuda_dequant_rows_bf16(cuda, w, data, r0, count, (__nv_bfloat16 *)tile);
            else
                rc = lq_cuda_dequant_rows_f32(cuda, w, data, r0, count, (float *)tile);
            if (!rc && bf16)
                rc = lq_train_gemm_bf16(cuda, false, true, n, (int)count, cols, 1.0f,
                                        (const __nv_bfloat16 *)x16, cols,
                                        (const __nv_bfloat16 *)tile, cols, 0.0f, y + r0, rows);
            else if (!rc)
                rc = lq_train_gemm(cuda, tf32, false, true, n, (int)count, cols, 1.0f, x, cols,
                                   (const float *)tile, cols, 0.0f, y + r0, rows);
            if (rc) return rc;
        }
        if (w->rank > 0 && (rc = lq_cuda_lowrank_add(backend, data->lora_B, data->lora_A, rows,
                                                     cols, w->rank, x, n, y)))
            return rc;
    }
    if (rank == 0) return LQ_OK;
    return lq_cuda_lowrank_add(backend, L1, L2, rows, cols, rank, x, n, y);
}

int linear_backward(struct lq_backend *backend, const struct lq_linear *w, const float *L1,
                    const float *L2, int rank, const float *x, const float *dy, int n, float *dx,
                    int accumulate_dx, float *dL1, float *dL2, float *dW) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    const struct lq_cuda_linear_data *data = prepared(w);
    if (!data || n < 0 || rank < 0 || (rank > 0 && (!L1 || !L2))) return LQ_EINVAL;
    if (dW && w->is_lq) return LQ_EINVAL; // a quantized weight has no gradient here
    if (n == 0) return LQ_OK;
    const int rows = w->rows, cols = w->cols, own = w->is_lq ? w->rank : 0;
    const train_math math = frozen_products_math();
    const bool tf32 = math != TRAIN_FP32, bf16 = math == TRAIN_BF16 && w->is_lq && dx;
    const size_t value_bytes = bf16 ? sizeof(__nv_bfloat16) : sizeof(float);
    const size_t step = w->is_lq ? tile_rows(w, value_bytes) : 0;

    // Workspaces first, at their largest: nothing regrows under a queued kernel.
    void *tile = NULL, *t = NULL, *u = NULL, *dy16 = NULL;
    const int thin = own > rank ? own : rank;
    int rc;
    if ((dx && w->is_lq &&
         (rc =
              lq_cuda_slot(cuda, LQ_CUDA_LINEAR_TILE, step * (size_t)cols * value_bytes, &tile))) ||
        (bf16 && (rc = lq_cuda_slot(cuda, LQ_CUDA_TRAIN_INPUT,
                                    (size_t)n * rows * sizeof(__nv_bfloat16), &dy16))) ||
        (rank > 0 &&
         (rc = lq_cuda_slot(cuda, LQ_CUDA_LOWRANK, (size_t)n * rank * sizeof(float), &t))) ||
        (thin > 0 &&
         (rc = lq_cuda_slot(cuda, LQ_CUDA_LINEAR_INPUT, (size_t)n * thin * sizeof(float), &u))))
        return rc;

    if (dx && !w->is_lq) {
        if ((rc = lq_train_gemm(cuda, tf32, false, false, n, cols, rows, 1.0f, dy, rows,
                                data->dense, cols, accumulate_dx ? 1.0f : 0.0f, dx, cols)))
            return rc;
    } else if (dx) {
        if (!accumulate_dx)
            LQ_CUDA_TRY(cudaMemsetAsync(dx, 0, (size_t)n * cols * sizeof(float), cuda->stream),
                        "cudaMemsetAsync (dx)");
        if (bf16 && (rc = to_bf16(cuda, dy, (size_t)n * rows, (__nv_bfloat16 *)dy16))) return rc;
        for (size_t r0 = 0; r0 < (size_t)rows; r0 += step) { // dx += dy[:, tile] · Q[tile]
            const size_t count = (size_t)rows - r0 < step ? (size_t)rows - r0 : step;
            if (bf16)
                rc = lq_cuda_dequant_rows_bf16(cuda, w, data, r0, count, (__nv_bfloat16 *)tile);
            else
                rc = lq_cuda_dequant_rows_f32(cuda, w, data, r0, count, (float *)tile);
            if (!rc && bf16)
                rc = lq_train_gemm_bf16(cuda, false, false, n, cols, (int)count, 1.0f,
                                        (const __nv_bfloat16 *)dy16 + r0, rows,
                                        (const __nv_bfloat16 *)tile, cols, 1.0f, dx, cols);
            else if (!rc)
                rc = lq_train_gemm(cuda, tf32, false, false, n, cols, (int)count, 1.0f, dy + r0,
                                   rows, (const float *)tile, cols, 1.0f, dx, cols);
            if (rc) return rc;
        }
        if (own > 0) { // the frozen pair: dx += (dy · lora_B) · lora_A
            if ((rc = lq_train_gemm(cuda, false, false, false, n, own, rows, 1.0f, dy, rows,
                                    data->lora_B, own, 0.0f, (float *)u, own)) ||
                (rc = lq_train_gemm(cuda, false, false, false, n, cols, own, 1.0f, (const float *)u,
                                    own, data->lora_A, cols, 1.0f, dx, cols)))
                return rc;
        }
    }
    if (dW && (rc = lq_train_gemm(cuda, false, true, false, rows, cols, n, 1.0f, dy, rows, x, cols,
                                  1.0f, dW, cols)))
        return rc;
    if (rank <= 0) return LQ_OK;
    // t = x · L2ᵀ and u = dy · L1, both [n, rank]
    float *tf = (float *)t, *uf = (float *)u;
    if ((rc = lq_train_gemm(cuda, false, false, true, n, rank, cols, 1.0f, x, cols, L2, cols, 0.0f,
                            tf, rank)) ||
        (rc = lq_train_gemm(cuda, false, false, false, n, rank, rows, 1.0f, dy, rows, L1, rank,
                            0.0f, uf, rank)))
        return rc;
    if (dL1 && (rc = lq_train_gemm(cuda, false, true, false, rows, rank, n, 1.0f, dy, rows, tf,
                                   rank, 1.0f, dL1, rank)))
        return rc;
    if (dL2 && (rc = lq_train_gemm(cuda, false, true, false, rank, cols, n, 1.0f, uf, rank, x, cols,
                                   1.0f, dL2, cols)))
        return rc;
    if (dx && (rc = lq_train_gemm(cuda, false, false, false, n, cols, rank, 1.0f, uf, rank, L2,
                                  cols, 1.0f, dx, cols)))
        return rc;
    return LQ_OK;
}

int matmul_backward(struct lq_backend *backend, const float *w, int rows, int cols, const float *dy,
                    int n, float *dx, int accumulate) {
    if (n < 0 || rows < 0 || cols < 0) return LQ_EINVAL;
    return lq_train_gemm(lq_cuda_of(backend), frozen_products_math() != TRAIN_FP32, false, false, n,
                         cols, rows, 1.0f, dy, rows, w, cols, accumulate ? 1.0f : 0.0f, dx, cols);
}

// ---------------------------------------------------------------------------------------------
// Reductions over a block (LQ_TRAIN_THREADS threads): every thread gets the result.

__device__ double block_sum(double v, double *shared /* [LQ_TRAIN_THREADS / 32] */) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads(); // shared may still be read by a previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int i = 0; i < LQ_TRAIN_THREADS / 32; i++) total += shared[i]; // fixed order
    return total;
}

__device__ float block_max(float v, float *shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float m = shared[0];
    for (int i = 1; i < LQ_TRAIN_THREADS / 32; i++) m = fmaxf(m, shared[i]);
    return m;
}

// ---------------------------------------------------------------------------------------------
// rmsnorm, rope, swiglu.

// Row blockIdx.x: dx_k += r·w_k·dy_k − r³·x_k/dim · Σ_j dy_j·w_j·x_j, r = (mean x² + eps)^-½.
__global__ void __launch_bounds__(LQ_TRAIN_THREADS)
    lq_rmsnorm_backward_kernel(const float *x, const float *weight, const float *dy, int dim,
                               float eps, float *dx) {
    __shared__ double shared[LQ_TRAIN_THREADS / 32];
    const size_t base = (size_t)blockIdx.x * dim;
    double sum = 0.0, dot = 0.0;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const double xj = x[base + j];
        sum += xj * xj;
        dot += (double)dy[base + j] * weight[j] * xj;
    }
    sum = block_sum(sum, shared);
    dot = block_sum(dot, shared);
    const double r = 1.0 / sqrt(sum / dim + eps), coefficient = r * r * r * dot / dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x)
        dx[base + j] += (float)(r * weight[j] * dy[base + j] - coefficient * x[base + j]);
}

int rmsnorm_backward(struct lq_backend *backend, const float *x, const float *weight,
                     const float *dy, int n, int dim, float eps, float *dx) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (n < 0 || dim < 0) return LQ_EINVAL;
    if (n == 0 || dim == 0) return LQ_OK;
    lq_rmsnorm_backward_kernel<<<(unsigned)n, LQ_TRAIN_THREADS, 0, cuda->stream>>>(x, weight, dy,
                                                                                   dim, eps, dx);
    LQ_CUDA_LAUNCHED("lq_rmsnorm_backward_kernel");
    return LQ_OK;
}

// Token blockIdx.x: each pair (k, k + half) of every head rotated by −angle, the angle in
// double exactly as the CPU computes it.
__global__ void __launch_bounds__(LQ_TRAIN_THREADS)
    lq_rope_backward_kernel(float *dx, int heads, int head_dim, const int *positions, float theta) {
    const int half = head_dim / 2, i = blockIdx.x;
    const int position = positions[i];
    for (int item = threadIdx.x; item < half * heads; item += blockDim.x) {
        const int k = item % half, h = item / half;
        const double angle = position * pow((double)theta, -2.0 * k / head_dim);
        const float c = (float)cos(angle), s = (float)sin(angle);
        float *v = dx + ((size_t)i * heads + h) * head_dim;
        const float g0 = v[k], g1 = v[k + half];
        v[k] = __fadd_rn(__fmul_rn(g0, c), __fmul_rn(g1, s));
        v[k + half] = __fsub_rn(__fmul_rn(g1, c), __fmul_rn(g0, s));
    }
}

int rope_backward(struct lq_backend *backend, float *dx, int n, int heads, int head_dim,
                  const int *positions, float theta) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (n < 0 || heads < 0 || head_dim < 0) return LQ_EINVAL;
    if (n == 0 || heads == 0 || head_dim < 2) return LQ_OK;
    if (!positions) return LQ_EINVAL;
    void *device_positions = NULL;
    int rc =
        lq_cuda_stage(cuda, LQ_CUDA_STAGE_0, positions, (size_t)n * sizeof(int), &device_positions);
    if (rc) return rc;
    lq_rope_backward_kernel<<<(unsigned)n, LQ_TRAIN_THREADS, 0, cuda->stream>>>(
        dx, heads, head_dim, (const int *)device_positions, theta);
    LQ_CUDA_LAUNCHED("lq_rope_backward_kernel");
    return LQ_OK;
}

__global__ void __launch_bounds__(LQ_TRAIN_THREADS)
    lq_swiglu_backward_kernel(const float *gate, const float *up, const float *dout, size_t count,
                              float *dgate, float *dup) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i], d = dout[i], u = up[i];
        const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
        const float silu_prime = __fmul_rn(s, __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s))));
        dup[i] = __fmul_rn(d, __fmul_rn(g, s));
        dgate[i] = __fmul_rn(__fmul_rn(d, u), silu_prime);
    }
}

int swiglu_backward(struct lq_backend *backend, const float *gate, const float *up,
                    const float *dout, size_t count, float *dgate, float *dup) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (count == 0) return LQ_OK;
    lq_swiglu_backward_kernel<<<grid_for(cuda, count), LQ_TRAIN_THREADS, 0, cuda->stream>>>(
        gate, up, dout, count, dgate, dup);
    LQ_CUDA_LAUNCHED("lq_swiglu_backward_kernel");
    return LQ_OK;
}

// ---------------------------------------------------------------------------------------------
// Loss.

// Row blockIdx.x: losses[i] = logsumexp − logit[target] (0 when masked out) and, when dlogits,
// grad_scale · (softmax − onehot) (0 when masked out). dlogits may be logits: every read of
// the row comes before the barrier that precedes the writes, and each write replaces only the
// value the same thread has just read.
__global__ void __launch_bounds__(LQ_TRAIN_THREADS)
    lq_cross_entropy_kernel(const float *logits, const int *targets, const unsigned char *mask,
                            int vocab, float grad_scale, double *losses, float *dlogits) {
    __shared__ double shared[LQ_TRAIN_THREADS / 32];
    __shared__ float shared_max[LQ_TRAIN_THREADS / 32];
    const int i = blockIdx.x;
    const size_t base = (size_t)i * vocab;
    const float *row = logits + base;
    float *d = dlogits ? dlogits + base : NULL;
    if (mask && !mask[i]) {
        if (threadIdx.x == 0) losses[i] = 0.0;
        if (d)
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) d[j] = 0.0f;
        return;
    }
    float max = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) max = fmaxf(max, row[j]);
    max = block_max(max, shared_max);
    double sum = 0.0;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += exp((double)row[j] - max);
    sum = block_sum(sum, shared);
    const int target = targets[i];
    const float target_logit = row[target];
    if (threadIdx.x == 0) losses[i] = log(sum) + max - target_logit;
    if (!d) return;
    __syncthreads(); // every thread has read row[target] before anyone overwrites the row
    const double inverse = 1.0 / sum;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const double probability = exp((double)row[j] - max) * inverse;
        d[j] = (float)(grad_scale * (probability - (j == target)));
    }
}

int cross_entropy(struct lq_backend *backend, const float *logits, const int *targets,
                  const unsigned char *mask, int n, int vocab, float grad_scale, double *loss_sum,
                  float *dlogits) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (n < 0 || vocab <= 0 || (n > 0 && !targets) || !loss_sum) return LQ_EINVAL;
    for (int i = 0; i < n; i++)
        if ((!mask || mask[i]) && (targets[i] < 0 || targets[i] >= vocab)) return LQ_EINVAL;
    if (n == 0) return LQ_OK;
    void *device_targets = NULL, *device_mask = NULL, *losses = NULL;
    int rc;
    // the losses' workspace first: staging copies are queued as they are taken
    if ((rc = lq_cuda_slot(cuda, LQ_CUDA_STAGE_2, (size_t)n * sizeof(double), &losses)) ||
        (rc = lq_cuda_stage(cuda, LQ_CUDA_STAGE_0, targets, (size_t)n * sizeof(int),
                            &device_targets)) ||
        (mask && (rc = lq_cuda_stage(cuda, LQ_CUDA_STAGE_1, mask, (size_t)n, &device_mask))))
        return rc;
    double *host = (double *)malloc((size_t)n * sizeof(double));
    if (!host) return LQ_ENOMEM;
    lq_cross_entropy_kernel<<<(unsigned)n, LQ_TRAIN_THREADS, 0, cuda->stream>>>(
        logits, (const int *)device_targets, (const unsigned char *)device_mask, vocab, grad_scale,
        (double *)losses, dlogits);
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess)
        status = cudaMemcpyAsync(host, losses, (size_t)n * sizeof(double), cudaMemcpyDeviceToHost,
                                 cuda->stream);
    if (status == cudaSuccess) status = cudaStreamSynchronize(cuda->stream);
    if (status != cudaSuccess) {
        free(host);
        return lq_cuda_fail(status, "cross_entropy", NULL);
    }
    double total = 0.0;
    for (int i = 0; i < n; i++) total += host[i]; // in token order, as the CPU sums
    free(host);
    *loss_sum += total;
    return LQ_OK;
}

// ---------------------------------------------------------------------------------------------
// Squares and the optimizer.

// partial[blockIdx.x] = Σ x² over chunk blockIdx.x, in double, a fixed order for fixed input.
__global__ void __launch_bounds__(LQ_TRAIN_THREADS)
    lq_sum_squares_kernel(const float *x, size_t count, double *partial) {
    __shared__ double shared[LQ_TRAIN_THREADS / 32];
    const size_t first = (size_t)blockIdx.x * LQ_TRAIN_SUM_CHUNK;
    const size_t last = first + LQ_TRAIN_SUM_CHUNK < count ? first + LQ_TRAIN_SUM_CHUNK : count;
    double sum = 0.0;
    for (size_t i = first + threadIdx.x; i < last; i += blockDim.x) sum += (double)x[i] * x[i];
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

int sum_squares(struct lq_backend *backend, const float *x, size_t count, double *out) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (!out) return LQ_EINVAL;
    if (count == 0) {
        *out = 0.0;
        return LQ_OK;
    }
    const size_t chunks = (count + LQ_TRAIN_SUM_CHUNK - 1) / LQ_TRAIN_SUM_CHUNK;
    if (chunks > 0x7fffffffu) return LQ_EINVAL;
    void *partial = NULL;
    int rc = lq_cuda_slot(cuda, LQ_CUDA_STAGE_2, chunks * sizeof(double), &partial);
    if (rc) return rc;
    double *host = (double *)malloc(chunks * sizeof(double));
    if (!host) return LQ_ENOMEM;
    lq_sum_squares_kernel<<<(unsigned)chunks, LQ_TRAIN_THREADS, 0, cuda->stream>>>(
        x, count, (double *)partial);
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess)
        status = cudaMemcpyAsync(host, partial, chunks * sizeof(double), cudaMemcpyDeviceToHost,
                                 cuda->stream);
    if (status == cudaSuccess) status = cudaStreamSynchronize(cuda->stream);
    if (status != cudaSuccess) {
        free(host);
        return lq_cuda_fail(status, "sum_squares", NULL);
    }
    double total = 0.0;
    for (size_t i = 0; i < chunks; i++) total += host[i];
    free(host);
    *out = total;
    return LQ_OK;
}

__global__ void __launch_bounds__(LQ_TRAIN_THREADS)
    lq_accumulate_squares_kernel(float *acc, const float *x, size_t count, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = x[i];
        acc[i] = __fadd_rn(acc[i], __fmul_rn(scale, __fmul_rn(v, v)));
    }
}

int accumulate_squares(struct lq_backend *backend, float *acc, const float *x, size_t count,
                       float scale) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (count == 0) return LQ_OK;
    lq_accumulate_squares_kernel<<<grid_for(cuda, count), LQ_TRAIN_THREADS, 0, cuda->stream>>>(
        acc, x, count, scale);
    LQ_CUDA_LAUNCHED("lq_accumulate_squares_kernel");
    return LQ_OK;
}

struct lq_adamw_step {
    float decay, beta1, beta2, step_size, correction2_sqrt, eps, grad_scale;
};

// The CPU's operations in its order, each rounded to fp32 (no contraction into FMAs).
__global__ void __launch_bounds__(LQ_TRAIN_THREADS)
    lq_adamw_kernel(float *params, const float *grads, float *m, float *v, size_t count,
                    const lq_adamw_step h) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        const float g = __fmul_rn(grads[i], h.grad_scale);
        const float mi = __fadd_rn(__fmul_rn(h.beta1, m[i]), __fmul_rn(1.0f - h.beta1, g));
        const float vi =
            __fadd_rn(__fmul_rn(h.beta2, v[i]), __fmul_rn(1.0f - h.beta2, __fmul_rn(g, g)));
        const float p = __fmul_rn(params[i], h.decay);
        m[i] = mi, v[i] = vi;
        const float denominator = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), h.correction2_sqrt), h.eps);
        params[i] = __fsub_rn(p, __fmul_rn(h.step_size, __fdiv_rn(mi, denominator)));
    }
}

int adamw(struct lq_backend *backend, float *params, const float *grads, float *m, float *v,
          size_t count, const struct lq_adamw_params *hyper) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (!hyper || hyper->step < 1) return LQ_EINVAL;
    if (count == 0) return LQ_OK;
    const double correction1 = 1.0 - pow(hyper->beta1, (double)hyper->step);
    const double correction2 = 1.0 - pow(hyper->beta2, (double)hyper->step);
    lq_adamw_step h;
    h.decay = (float)(1.0 - (double)hyper->learning_rate * hyper->weight_decay);
    h.beta1 = hyper->beta1, h.beta2 = hyper->beta2;
    h.step_size = (float)(hyper->learning_rate / correction1);
    h.correction2_sqrt = (float)sqrt(correction2);
    h.eps = hyper->eps, h.grad_scale = hyper->grad_scale;
    lq_adamw_kernel<<<grid_for(cuda, count), LQ_TRAIN_THREADS, 0, cuda->stream>>>(params, grads, m,
                                                                                  v, count, h);
    LQ_CUDA_LAUNCHED("lq_adamw_kernel");
    return LQ_OK;
}

int zero(struct lq_backend *backend, float *x, size_t count) {
    if (count == 0) return LQ_OK;
    LQ_CUDA_TRY(cudaMemsetAsync(x, 0, count * sizeof(float), lq_cuda_of(backend)->stream),
                "cudaMemsetAsync (zero)");
    return LQ_OK;
}

int copy(struct lq_backend *backend, void *to, const void *from, size_t bytes) {
    if (bytes == 0 || to == from) return LQ_OK;
    LQ_CUDA_TRY(
        cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, lq_cuda_of(backend)->stream),
        "cudaMemcpyAsync (copy)");
    return LQ_OK;
}

} // namespace

// ---------------------------------------------------------------------------------------------
// The ops-table entries: under the op lock, on the backend's device, like every other op.

#define LQ_TRAIN_LOCKED(call)                                                                      \
    do {                                                                                           \
        struct lq_cuda *lq_cuda_ = lq_cuda_of(backend);                                            \
        pthread_mutex_lock(&lq_cuda_->lock);                                                       \
        cudaSetDevice(lq_cuda_->device);                                                           \
        int lq_rc_ = (call);                                                                       \
        pthread_mutex_unlock(&lq_cuda_->lock);                                                     \
        return lq_rc_;                                                                             \
    } while (0)

int lq_cuda_op_zero(struct lq_backend *backend, float *x, size_t count) {
    LQ_TRAIN_LOCKED(zero(backend, x, count));
}

int lq_cuda_op_copy(struct lq_backend *backend, void *to, const void *from, size_t bytes) {
    LQ_TRAIN_LOCKED(copy(backend, to, from, bytes));
}

int lq_cuda_op_linear_lora(struct lq_backend *backend, const struct lq_linear *w, const float *L1,
                           const float *L2, int rank, const float *x, int n, float *y) {
    LQ_TRAIN_LOCKED(linear_lora(backend, w, L1, L2, rank, x, n, y));
}

int lq_cuda_op_linear_backward(struct lq_backend *backend, const struct lq_linear *w,
                               const float *L1, const float *L2, int rank, const float *x,
                               const float *dy, int n, float *dx, int accumulate_dx, float *dL1,
                               float *dL2, float *dW) {
    LQ_TRAIN_LOCKED(
        linear_backward(backend, w, L1, L2, rank, x, dy, n, dx, accumulate_dx, dL1, dL2, dW));
}

int lq_cuda_op_matmul_backward(struct lq_backend *backend, const float *w, int rows, int cols,
                               const float *dy, int n, float *dx, int accumulate) {
    LQ_TRAIN_LOCKED(matmul_backward(backend, w, rows, cols, dy, n, dx, accumulate));
}

int lq_cuda_op_rmsnorm_backward(struct lq_backend *backend, const float *x, const float *weight,
                                const float *dy, int n, int dim, float eps, float *dx) {
    LQ_TRAIN_LOCKED(rmsnorm_backward(backend, x, weight, dy, n, dim, eps, dx));
}

int lq_cuda_op_rope_backward(struct lq_backend *backend, float *dx, int n, int heads, int head_dim,
                             const int *positions, float theta) {
    LQ_TRAIN_LOCKED(rope_backward(backend, dx, n, heads, head_dim, positions, theta));
}

int lq_cuda_op_swiglu_backward(struct lq_backend *backend, const float *gate, const float *up,
                               const float *dout, size_t count, float *dgate, float *dup) {
    LQ_TRAIN_LOCKED(swiglu_backward(backend, gate, up, dout, count, dgate, dup));
}

int lq_cuda_op_cross_entropy(struct lq_backend *backend, const float *logits, const int *targets,
                             const unsigned char *mask, int n, int vocab, float grad_scale,
                             double *loss_sum, float *dlogits) {
    LQ_TRAIN_LOCKED(
        cross_entropy(backend, logits, targets, mask, n, vocab, grad_scale, loss_sum, dlogits));
}

int lq_cuda_op_sum_squares(struct lq_backend *backend, const float *x, size_t count, double *out) {
    LQ_TRAIN_LOCKED(sum_squares(backend, x, count, out));
}

int lq_cuda_op_accumulate_squares(struct lq_backend *backend, float *acc, const float *x,
                                  size_t count, float scale) {
    LQ_TRAIN_LOCKED(accumulate_squares(backend, acc, x, count, scale));
}

int lq_cuda_op_adamw(struct lq_backend *backend, float *params, const float *grads, float *m,
                     float *v, size_t count, const struct lq_adamw_params *hyper) {
    LQ_TRAIN_LOCKED(adamw(backend, params, grads, m, v, count, hyper));
}
