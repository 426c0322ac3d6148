// The LQ decomposition W ≈ Q + L1·L2 (LQ-LoRA Algorithm 2, core/lq.c) on the GPU.
//
// Design
//   * One call = one context (struct dec): its own non-blocking stream, cuBLAS handle (with
//     a counted workspace) and cuSOLVER handle, and device buffers counted under
//     LQ_CUDA_JOBS. Nothing is shared with the backend's ops, so no lock is taken.
//   * Matrices stay row-major on the device. cuBLAS is column-major, so a row-major m x n
//     matrix is used as the column-major n x m matrix (its transpose); the thin sketch
//     matrices (Y, Z, ...) are kept column-major because cuSOLVER's QR wants them so.
//   * One step is queued without a host wait: R = W − Q (weighted), the randomized SVD of R,
//     L1, L2, L1·L2, then one pass that gives the half-step error ||W − Q_old − L1L2|| and
//     the next quantizer input W − L1L2, then the NF pipeline (nf_cuda.cuh) whose last
//     kernel also sums the full-step error. Errors and ||W|| are sums of double terms per
//     thread, reduced per thread block and then in one block in a fixed order, so a step is
//     deterministic (the CPU also sums in double; only the order differs). The step ends
//     with one copy of a small status (the sums, solver infos, the first bad value, the
//     first overflowing group) and one stream synchronization: the stopping rule needs the
//     error, and the candidate bookkeeping runs on the host as in lq.c.
//   * While the device runs a step, the host draws the next step's Gaussian sketch with
//     core's rng: the xoshiro stream is walked once to find chunk starts, then chunks are
//     filled with lq_rng_fill_normal in parallel, giving exactly the values svd.c draws.
//     They go up from pinned memory (two buffers, alternating).
//   * Randomized SVD (Halko et al., as svd.c): Y = A·Ω, Householder QR (geqrf + orgqr), power
//     iterations Z = Aᵀ·Y, QR, Y = A·Z, QR; Bᵀ = Aᵀ·Y. The small SVD of B (q x n) comes from
//     the eigendecomposition of the q x q Gram matrix B·Bᵀ, formed and solved in double
//     (Dsyrk + Dsyevd): squaring the condition number in double costs σ_i a relative error
//     of about 1e-16·(σ_1/σ_i)², below float rounding for every σ_i > 1e-4·σ_1, and it is one
//     small solver call where cuSOLVER's gesvd on a 4096 x 74 matrix is slow. Then
//     L1 = Y·Ub·Σ^½ (float: Y and Ub are orthonormal, nothing cancels) and
//     L2 = Σ^-½·Ubᵀ·B (double, then float: rows for small σ cancel heavily). Eigenvalues
//     below 4·q·ε_double·λ_max are rounding noise: their σ is 0 and their factor columns and
//     rows are 0.
//   * The exact SVD (AUTO on small matrices, or asked for) runs core's lq_svd_truncated on a
//     downloaded copy of R, as the CPU does: those steps wait for the host.
//   * The best candidate's factors are kept on the device by stream-ordered copies; at the
//     end lq_cuda_decompose downloads L1, L2 and the kept step's W − L1·L2 and packs Q with
//     core's lq_nf_quantize: the same input gives the same packed Q, equal bit for bit to
//     the dense Q the device used.
//   * lq_cuda_decompose_errors uploads W (and Fisher weights) once and reuses every buffer
//     for all configurations; nothing but the status comes back (the exact SVD path aside).
//
// Differences from core's lq_decompose (same seed):
//   * L1·L2 agrees to float rounding (cuBLAS vs OpenBLAS summation order, Gram
//     eigendecomposition vs gesdd), so W − L1L2 does too; the quantizer is bit-exact, but a
//     value that rounding moves across a code midpoint gets the neighbouring code. Errors
//     then agree to float rounding (L1·L2 agreed to 6e-7 relative in a host transcription
//     of these calls), and a stop decided by a near tie (error >= previous) can fall one
//     step apart.
//   * Each randomized component's sign (a column of L1 with the matching row of L2) is
//     syevd's choice, not gesdd's: it can be flipped relative to the CPU's.
//   * Components below the noise threshold above are 0 where the CPU keeps tiny values.
//   * The exact path gives the CPU's factors bit for bit from the same residual.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_internal.h"
#include "kernels/cuda/nf_cuda.cuh"

extern "C" {
#include "core/parallel.h"
#include "core/rng.h"
}

// Error checks that fill err (the ops' macros pass NULL: decompositions report reasons).
#define DEC_CUDA(call, what)                                                                       \
    do {                                                                                           \
        cudaError_t dec_status_ = (call);                                                          \
        if (dec_status_ != cudaSuccess) return lq_cuda_fail(dec_status_, (what), err);             \
    } while (0)
#define DEC_LAUNCHED(what) DEC_CUDA(cudaGetLastError(), (what))
#define DEC_BLAS(call, what)                                                                       \
    do {                                                                                           \
        cublasStatus_t dec_status_ = (call);                                                       \
        if (dec_status_ != CUBLAS_STATUS_SUCCESS) return lq_cublas_fail(dec_status_, (what), err); \
    } while (0)
#define DEC_SOLVER(call, what)                                                                     \
    do {                                                                                           \
        cusolverStatus_t dec_status_ = (call);                                                     \
        if (dec_status_ != CUSOLVER_STATUS_SUCCESS)                                                \
            return lq_cusolver_fail(dec_status_, (what), err);                                     \
    } while (0)
#define DEC_TRY(call)                                                                              \
    do {                                                                                           \
        int dec_rc_ = (call);                                                                      \
        if (dec_rc_) return dec_rc_;                                                               \
    } while (0)

#define DEC_THREADS 256
#define DEC_MAX_ALLOCATIONS 48
#define DEC_SKETCH_CHUNK 16384                  // sketch values per parallel chunk (even)
#define DEC_BLAS_WORKSPACE ((size_t)32 << 20)   // cuBLAS's recommended size on Hopper
#define DEC_NO_INDEX 0xffffffffffffffffull      // status: nothing recorded
#define DEC_STEP_SEED_MIX 0x9e3779b97f4a7c15ull // lq.c mixes the step into the seed

// What one step reports to the host: one copy, one synchronization.
enum { DEC_SUM_HALF, DEC_SUM_FULL, DEC_SUM_NORM, DEC_SUM_COUNT };
struct dec_status {
    double sums[DEC_SUM_COUNT];   // Σ F·d²: half step, full step (or init), and Σ F·W²
    unsigned long long first_bad; // first non-finite quantizer input, or DEC_NO_INDEX
    unsigned long long bad_group; // first group whose range overflows b2, or DEC_NO_INDEX
    unsigned offset_bits;         // the quantizer's offset (min block absmax) as bits
    int qr_info, eig_info;        // cuSOLVER's devInfo
};

// The fixed sizes of one call.
struct dec_shape {
    size_t rows, cols, numel;
    int rank;
    int sketch;     // q: columns of the randomized sketch (0 unless randomized)
    int randomized; // rank > 0 and the SVD resolves to the randomized method
    int exact;      // rank > 0 and the SVD resolves to the exact method (on the host)
    int keep;       // factors and Q come back (decompose), else only errors
    int weighted;   // Fisher weights given
    size_t max_blocks, max_groups; // NF plan sizes, the largest over the configurations
};

struct dec {
    struct lq_cuda *cuda;
    struct dec_shape shape;
    cudaStream_t stream;
    cublasHandle_t blas;
    cusolverDnHandle_t solver;

    // device: matrices, rows x cols row-major
    float *w, *q, *r, *lowrank, *fisher;
    float *row_weight, *col_weight, *inverse_row, *inverse_col;
    // device: the NF plan and the reductions
    float *absmax, *block_scale, *group_scale;
    double *partials;
    struct dec_status *status;
    // device: the randomized SVD (column-major thin matrices)
    float *omega; // q x n (Ω row-major n x q, as drawn)
    float *y;     // m x q range basis
    float *z;     // n x q co-range basis, then Bᵀ
    float *tau, *solver_work, *ub;
    double *bt, *gram, *lambda, *ubs, *l2t, *eig_work;
    int solver_lwork, eig_lwork;
    // device: factors (L1 rows x rank, L2 rank x cols, row-major)
    float *L1, *L2, *prev_L1, *prev_L2, *best_q_L1, *best_q_L2, *out_L1, *out_L2;

    // host
    const float *host_w;
    float *host_row_weight, *host_col_weight; // owned (malloc)
    float *host_inverse;                      // 1/row weights, then 1/column weights
    float *omega_host[2];                     // pinned
    struct dec_status *status_host;           // pinned
    struct lq_rng *chunk_starts;
    size_t chunk_count;
    float *host_residual, *host_u, *host_s, *host_vt, *host_L1, *host_L2; // exact SVD, final Q
    const float *last_input; // device: what the quantizer read last (for error messages)
    struct lq_nf_device_config nf;

    void *allocations[DEC_MAX_ALLOCATIONS];
    int allocation_count;
};

// What one decomposition found.
struct dec_result {
    double best;
    int iters, best_iter, best_is_half_step, best_q_from_w;
};

// ---------- kernels ----------

// r = (W − Q), times row_weight[i]·col_weight[j] when weighted (lq.c: factorize). One
// thread block per row, so the weights need no division.
__global__ static void dec_residual_kernel(const float *w, const float *q, size_t rows, size_t cols,
                                           const float *row_weight, const float *col_weight,
                                           float *r) {
    for (size_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t base = row * cols;
        const float rw = row_weight ? row_weight[row] : 1.0f;
        for (size_t col = threadIdx.x; col < cols; col += blockDim.x) {
            float v = lq_nf_sub(w[base + col], q[base + col]);
            if (row_weight) v = lq_nf_mul(v, lq_nf_mul(rw, col_weight[col]));
            r[base + col] = v;
        }
    }
}

// r = W − lowrank; with SUM also Σ F·(W − Q − lowrank)² of the block into partials
// (lq.c: error_pass with residual_out).
template <bool SUM>
__global__ static void dec_half_kernel(const float *w, const float *q, const float *lowrank,
                                       const float *fisher, size_t count, float *r,
                                       double *partials) {
    double sum = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        const float wi = w[i], li = lowrank[i];
        r[i] = lq_nf_sub(wi, li);
        if (SUM) {
            double d = (double)wi - (double)q[i] - (double)li;
            sum += (fisher ? (double)fisher[i] : 1.0) * d * d;
        }
    }
    if (SUM) {
        double total = lq_nf_block_sum(sum);
        if (threadIdx.x == 0) partials[blockIdx.x] = total;
    }
}

// Σ F·W² of the block into partials (lq_weighted_distance(W, NULL, F), squared).
__global__ static void dec_norm_kernel(const float *w, const float *fisher, size_t count,
                                       double *partials) {
    double sum = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        double d = (double)w[i];
        sum += fisher ? (double)fisher[i] * d * d : d * d;
    }
    double total = lq_nf_block_sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// *out = Σ partials[0..count), in an order fixed by count.
__global__ static void dec_sum_kernel(const double *partials, unsigned count, double *out) {
    double sum = 0.0;
    for (unsigned i = threadIdx.x; i < count; i += blockDim.x) sum += partials[i];
    double total = lq_nf_block_sum(sum);
    if (threadIdx.x == 0) *out = total;
}

__global__ static void dec_widen_kernel(const float *x, size_t count, double *y) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = (double)x[i];
}

// Component k of the rank-r truncation from syevd's ascending eigenpairs of B·Bᵀ (q x q):
// σ_k = √λ, ub[:, k] = e·σ^½ (float, for L1 = Y·ub) and ubs[:, k] = e·σ^-½ (double, for
// L2 = ubsᵀ·B). One thread block per component.
__global__ static void dec_pick_kernel(const double *lambda, const double *vectors, int q,
                                       float *ub, double *ubs) {
    const int k = blockIdx.x, source = q - 1 - k;
    const double top = lambda[q - 1], value = lambda[source];
    double sigma = 0.0;
    if (!isfinite(top))
        sigma = nan(""); // let the quantizer's finiteness check report it
    else if (value > top * (4.0 * q * 2.220446049250313e-16))
        sigma = sqrt(value);
    const double root = sqrt(sigma);
    for (int c = threadIdx.x; c < q; c += blockDim.x) {
        const double e = vectors[c + (size_t)source * q];
        ub[c + (size_t)k * q] = (float)(e * root);
        ubs[c + (size_t)k * q] = sigma != 0.0 ? e / root : 0.0;
    }
}

// L2 (rank x cols, row-major) from L2ᵀ in double (cols x rank, column-major: the same
// index), times 1/col_weight when weighted.
__global__ static void dec_l2_kernel(const double *l2t, size_t cols, size_t count,
                                     const float *inverse_col, float *L2) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = (float)l2t[i];
        L2[i] = inverse_col ? lq_nf_mul(v, inverse_col[i % cols]) : v;
    }
}

// L1[i, :] *= 1/row_weight[i].
__global__ static void dec_scale_rows_kernel(float *L1, size_t count, int rank,
                                             const float *inverse_row) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        L1[i] = lq_nf_mul(L1[i], inverse_row[i / (size_t)rank]);
}

// ---------- context ----------

static int dec_alloc(struct dec *d, size_t bytes, void **out, struct lq_error *err) {
    *out = NULL;
    if (d->allocation_count == DEC_MAX_ALLOCATIONS)
        return lq_error_set(err, LQ_EINVAL, "decomposition: too many device buffers");
    int rc = lq_cuda_malloc(d->cuda, bytes ? bytes : 1, LQ_CUDA_JOBS, out, err);
    if (rc) return rc;
    d->allocations[d->allocation_count++] = *out;
    return LQ_OK;
}

template <typename T>
static int dec_array(struct dec *d, size_t count, T **out, struct lq_error *err) {
    void *p = NULL;
    int rc = dec_alloc(d, count * sizeof(T), &p, err);
    *out = (T *)p;
    return rc;
}

static void dec_close(struct dec *d) {
    if (d->stream) cudaStreamSynchronize(d->stream); // nothing may still use the buffers
    // The handles go first: the cuBLAS workspace is ours and must outlive its handle.
    if (d->solver) cusolverDnDestroy(d->solver);
    if (d->blas) cublasDestroy(d->blas);
    for (int i = 0; i < d->allocation_count; i++) lq_cuda_free(d->cuda, d->allocations[i]);
    for (int i = 0; i < 2; i++)
        if (d->omega_host[i]) cudaFreeHost(d->omega_host[i]);
    if (d->status_host) cudaFreeHost(d->status_host);
    if (d->stream) cudaStreamDestroy(d->stream);
    free(d->chunk_starts);
    free(d->host_residual), free(d->host_u), free(d->host_s), free(d->host_vt);
    free(d->host_L1), free(d->host_L2);
    free(d->host_row_weight), free(d->host_col_weight), free(d->host_inverse);
    memset(d, 0, sizeof *d);
}

static int dec_handles(struct dec *d, struct lq_error *err) {
    DEC_CUDA(cudaSetDevice(d->cuda->device), "cudaSetDevice");
    DEC_CUDA(cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking), "cudaStreamCreate");
    DEC_BLAS(cublasCreate(&d->blas), "cublasCreate");
    DEC_BLAS(cublasSetStream(d->blas, d->stream), "cublasSetStream");
    // A workspace of our own: counted, and the same for every GEMM of the call, which keeps
    // cuBLAS's results reproducible.
    void *workspace = NULL;
    DEC_TRY(dec_alloc(d, DEC_BLAS_WORKSPACE, &workspace, err));
    DEC_BLAS(cublasSetWorkspace(d->blas, workspace, DEC_BLAS_WORKSPACE), "cublasSetWorkspace");
    DEC_SOLVER(cusolverDnCreate(&d->solver), "cusolverDnCreate");
    DEC_SOLVER(cusolverDnSetStream(d->solver, d->stream), "cusolverDnSetStream");
    return LQ_OK;
}

// The randomized SVD's buffers and cuSOLVER workspaces.
static int dec_sketch_buffers(struct dec *d, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const size_t m = s->rows, n = s->cols, q = (size_t)s->sketch, r = (size_t)s->rank;
    DEC_TRY(dec_array(d, n * q, &d->omega, err));
    DEC_TRY(dec_array(d, m * q, &d->y, err));
    DEC_TRY(dec_array(d, n * q, &d->z, err));
    DEC_TRY(dec_array(d, q, &d->tau, err));
    DEC_TRY(dec_array(d, q * r, &d->ub, err));
    DEC_TRY(dec_array(d, n * q, &d->bt, err));
    DEC_TRY(dec_array(d, q * q, &d->gram, err));
    DEC_TRY(dec_array(d, q, &d->lambda, err));
    DEC_TRY(dec_array(d, q * r, &d->ubs, err));
    DEC_TRY(dec_array(d, n * r, &d->l2t, err));
    const int M = (int)m, N = (int)n, Q = (int)q;
    int sizes[4] = {0, 0, 0, 0};
    DEC_SOLVER(cusolverDnSgeqrf_bufferSize(d->solver, M, Q, d->y, M, &sizes[0]),
               "cusolverDnSgeqrf_bufferSize");
    DEC_SOLVER(cusolverDnSgeqrf_bufferSize(d->solver, N, Q, d->z, N, &sizes[1]),
               "cusolverDnSgeqrf_bufferSize");
    DEC_SOLVER(cusolverDnSorgqr_bufferSize(d->solver, M, Q, Q, d->y, M, d->tau, &sizes[2]),
               "cusolverDnSorgqr_bufferSize");
    DEC_SOLVER(cusolverDnSorgqr_bufferSize(d->solver, N, Q, Q, d->z, N, d->tau, &sizes[3]),
               "cusolverDnSorgqr_bufferSize");
    d->solver_lwork = 1;
    for (int i = 0; i < 4; i++)
        d->solver_lwork = sizes[i] > d->solver_lwork ? sizes[i] : d->solver_lwork;
    DEC_TRY(dec_array(d, (size_t)d->solver_lwork, &d->solver_work, err));
    DEC_SOLVER(cusolverDnDsyevd_bufferSize(d->solver, CUSOLVER_EIG_MODE_VECTOR,
                                           CUBLAS_FILL_MODE_LOWER, Q, d->gram, Q, d->lambda,
                                           &d->eig_lwork),
               "cusolverDnDsyevd_bufferSize");
    if (d->eig_lwork < 1) d->eig_lwork = 1;
    DEC_TRY(dec_array(d, (size_t)d->eig_lwork, &d->eig_work, err));

    for (int i = 0; i < 2; i++)
        DEC_CUDA(
            cudaHostAlloc((void **)&d->omega_host[i], n * q * sizeof(float), cudaHostAllocDefault),
            "cudaHostAlloc (sketch)");
    d->chunk_count = (n * q + DEC_SKETCH_CHUNK - 1) / DEC_SKETCH_CHUNK;
    d->chunk_starts = (struct lq_rng *)malloc(d->chunk_count * sizeof *d->chunk_starts);
    if (!d->chunk_starts) return lq_error_set(err, LQ_ENOMEM, "out of memory for the sketch");
    return LQ_OK;
}

// Host buffers of the exact SVD path.
static int dec_exact_buffers(struct dec *d, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const size_t r = (size_t)s->rank;
    d->host_residual = (float *)malloc(s->numel * sizeof(float));
    d->host_u = (float *)malloc(s->rows * r * sizeof(float));
    d->host_s = (float *)malloc(r * sizeof(float));
    d->host_vt = (float *)malloc(r * s->cols * sizeof(float));
    d->host_L1 = (float *)malloc(s->rows * r * sizeof(float));
    d->host_L2 = (float *)malloc(r * s->cols * sizeof(float));
    if (!d->host_residual || !d->host_u || !d->host_s || !d->host_vt || !d->host_L1 || !d->host_L2)
        return lq_error_set(err, LQ_ENOMEM, "out of memory for the SVD of %zu x %zu", s->rows,
                            s->cols);
    return LQ_OK;
}

// The Fisher information (for the errors), the row and column weights (for the SVD input)
// and their inverses (for the factors: lq.c multiplies by 1.0f / weight, the same values).
static int upload_weights(struct dec *d, const float *fisher, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    DEC_TRY(dec_array(d, s->numel, &d->fisher, err));
    DEC_TRY(dec_array(d, s->rows, &d->row_weight, err));
    DEC_TRY(dec_array(d, s->cols, &d->col_weight, err));
    DEC_TRY(dec_array(d, s->rows, &d->inverse_row, err));
    DEC_TRY(dec_array(d, s->cols, &d->inverse_col, err));
    d->host_inverse = (float *)malloc((s->rows + s->cols) * sizeof(float));
    if (!d->host_inverse) return lq_error_set(err, LQ_ENOMEM, "out of memory for Fisher weights");
    for (size_t i = 0; i < s->rows; i++) d->host_inverse[i] = 1.0f / d->host_row_weight[i];
    for (size_t j = 0; j < s->cols; j++)
        d->host_inverse[s->rows + j] = 1.0f / d->host_col_weight[j];
    const struct {
        float *device;
        const float *host;
        size_t count;
    } uploads[5] = {
        {d->fisher, fisher, s->numel},
        {d->row_weight, d->host_row_weight, s->rows},
        {d->col_weight, d->host_col_weight, s->cols},
        {d->inverse_row, d->host_inverse, s->rows},
        {d->inverse_col, d->host_inverse + s->rows, s->cols},
    };
    for (int i = 0; i < 5; i++)
        DEC_CUDA(cudaMemcpyAsync(uploads[i].device, uploads[i].host,
                                 uploads[i].count * sizeof(float), cudaMemcpyHostToDevice,
                                 d->stream),
                 "upload the Fisher weights");
    return LQ_OK;
}

// Opens the context: handles, every buffer, W (and the Fisher data) uploaded. The host
// weights (malloc'ed) become the context's.
static int dec_open(struct dec *d, struct lq_cuda *cuda, const struct dec_shape *shape,
                    const float *w, const float *fisher, float *row_weight, float *col_weight,
                    struct lq_error *err) {
    memset(d, 0, sizeof *d);
    d->cuda = cuda;
    d->shape = *shape;
    d->host_w = w;
    d->host_row_weight = row_weight, d->host_col_weight = col_weight;
    const struct dec_shape *s = &d->shape;
    const size_t n = s->numel, r = (size_t)s->rank;
    DEC_TRY(dec_handles(d, err));

    DEC_TRY(dec_array(d, n, &d->w, err));
    DEC_TRY(dec_array(d, n, &d->q, err));
    DEC_TRY(dec_array(d, n, &d->r, err));
    DEC_TRY(dec_array(d, s->max_blocks, &d->absmax, err));
    DEC_TRY(dec_array(d, s->max_blocks, &d->block_scale, err));
    DEC_TRY(dec_array(d, s->max_groups, &d->group_scale, err));
    DEC_TRY(dec_array(d, LQ_NF_MAX_GRID, &d->partials, err));
    DEC_TRY(dec_array(d, 1, &d->status, err));
    if (r > 0) {
        DEC_TRY(dec_array(d, n, &d->lowrank, err));
        DEC_TRY(dec_array(d, s->rows * r, &d->L1, err));
        DEC_TRY(dec_array(d, r * s->cols, &d->L2, err));
    }
    if (r > 0 && s->keep) {
        DEC_TRY(dec_array(d, s->rows * r, &d->prev_L1, err));
        DEC_TRY(dec_array(d, r * s->cols, &d->prev_L2, err));
        DEC_TRY(dec_array(d, s->rows * r, &d->best_q_L1, err));
        DEC_TRY(dec_array(d, r * s->cols, &d->best_q_L2, err));
        DEC_TRY(dec_array(d, s->rows * r, &d->out_L1, err));
        DEC_TRY(dec_array(d, r * s->cols, &d->out_L2, err));
    }
    if (s->randomized) DEC_TRY(dec_sketch_buffers(d, err));
    if (s->exact) DEC_TRY(dec_exact_buffers(d, err));
    DEC_CUDA(cudaHostAlloc((void **)&d->status_host, sizeof *d->status_host, cudaHostAllocDefault),
             "cudaHostAlloc (status)");

    DEC_CUDA(cudaMemcpyAsync(d->w, w, n * sizeof(float), cudaMemcpyHostToDevice, d->stream),
             "upload W");
    if (s->weighted) DEC_TRY(upload_weights(d, fisher, err));
    // Clean status: no bad value, no bad group, solver infos 0.
    DEC_CUDA(cudaMemsetAsync(d->status, 0, sizeof *d->status, d->stream), "cudaMemset");
    DEC_CUDA(cudaMemsetAsync(&d->status->first_bad, 0xff, sizeof(unsigned long long), d->stream),
             "cudaMemset");
    DEC_CUDA(cudaMemsetAsync(&d->status->bad_group, 0xff, sizeof(unsigned long long), d->stream),
             "cudaMemset");
    return LQ_OK;
}

// ---------- the Gaussian sketch, drawn on the host ----------

struct sketch_job {
    const struct lq_rng *starts;
    float *out;
    size_t count;
};

static void sketch_body(void *context, size_t begin, size_t end) {
    const struct sketch_job *job = (const struct sketch_job *)context;
    for (size_t chunk = begin; chunk < end; chunk++) {
        struct lq_rng rng = job->starts[chunk];
        size_t first = chunk * DEC_SKETCH_CHUNK;
        size_t count =
            job->count - first < DEC_SKETCH_CHUNK ? job->count - first : DEC_SKETCH_CHUNK;
        lq_rng_fill_normal(&rng, job->out + first, count);
    }
}

// out[0..n·q) = what lq_rng_fill_normal(seeded with seed) writes, as svd.c draws Ω. Each
// normal pair costs two 64-bit draws, so a chunk of an even number c of values starts c
// draws further along the stream, with no spare value pending: walking the cheap integer
// stream once gives every chunk's start, and the costly Box-Muller runs in parallel.
static void sketch_fill(struct dec *d, uint64_t seed, float *out) {
    const size_t count = d->shape.cols * (size_t)d->shape.sketch;
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    for (size_t chunk = 0; chunk < d->chunk_count; chunk++) {
        d->chunk_starts[chunk] = rng;
        if (chunk + 1 < d->chunk_count)
            for (size_t k = 0; k < DEC_SKETCH_CHUNK; k++) lq_rng_next(&rng);
    }
    struct sketch_job job = {d->chunk_starts, out, count};
    lq_parallel_for(d->chunk_count, 1, sketch_body, &job);
}

static uint64_t step_seed(uint64_t seed, int step) {
    return seed ^ (DEC_STEP_SEED_MIX * (uint64_t)step);
}

// ---------- device steps ----------

static int sgemm(struct dec *d, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                 const float *a, int lda, const float *b, int ldb, float *c, int ldc,
                 struct lq_error *err) {
    const float one = 1.0f, zero = 0.0f;
    DEC_BLAS(cublasSgemm(d->blas, ta, tb, m, n, k, &one, a, lda, b, ldb, &zero, c, ldc),
             "cublasSgemm");
    return LQ_OK;
}

// Sums partials[0..blocks) into status->sums[slot].
static int reduce_into(struct dec *d, unsigned blocks, int slot, struct lq_error *err) {
    dec_sum_kernel<<<1, DEC_THREADS, 0, d->stream>>>(d->partials, blocks, &d->status->sums[slot]);
    DEC_LAUNCHED("sum kernel");
    return LQ_OK;
}

// Q = dequantize(quantize(input)) and status->sums[DEC_SUM_FULL] = Σ F·(W − Q − lowrank)²
// (lowrank NULL: zero).
static int quantize(struct dec *d, const float *input, const float *lowrank, struct lq_error *err) {
    const struct lq_nf_device_config *nf = &d->nf;
    const unsigned per_block = LQ_NF_THREADS / (unsigned)nf->team; // teams per thread block
    const unsigned blocks = lq_nf_grid(nf->n_blocks, per_block);
    const unsigned group_blocks = lq_nf_grid(nf->n_groups, LQ_NF_THREADS / 32);
    DEC_CUDA(cudaMemsetAsync(&d->status->offset_bits, 0xff, sizeof(unsigned), d->stream),
             "cudaMemset");
    lq_nf_absmax_kernel<<<blocks, LQ_NF_THREADS, 0, d->stream>>>(
        input, nf->numel, nf->B0, nf->team, nf->n_blocks, d->absmax, &d->status->offset_bits,
        &d->status->first_bad);
    DEC_LAUNCHED("NF absmax kernel");
    lq_nf_group_kernel<<<group_blocks, LQ_NF_THREADS, 0, d->stream>>>(
        d->absmax, nf->n_blocks, nf->n_groups, nf->B1, nf->b1, nf->b2, &d->status->offset_bits,
        d->group_scale, d->block_scale, &d->status->bad_group);
    DEC_LAUNCHED("NF group kernel");
    lq_nf_values_kernel<true><<<blocks, LQ_NF_THREADS, 0, d->stream>>>(
        input, *nf, d->block_scale, d->q, d->w, lowrank, d->fisher, d->partials);
    DEC_LAUNCHED("NF values kernel");
    d->last_input = input;
    return reduce_into(d, blocks, DEC_SUM_FULL, err);
}

// Replaces the columns of the column-major rows x q matrix x by an orthonormal basis of
// their span (Householder QR, as svd.c's orthonormalize).
static int orthonormalize(struct dec *d, float *x, int rows, struct lq_error *err) {
    const int q = d->shape.sketch;
    DEC_SOLVER(cusolverDnSgeqrf(d->solver, rows, q, x, rows, d->tau, d->solver_work,
                                d->solver_lwork, &d->status->qr_info),
               "cusolverDnSgeqrf");
    DEC_SOLVER(cusolverDnSorgqr(d->solver, rows, q, q, x, rows, d->tau, d->solver_work,
                                d->solver_lwork, &d->status->qr_info),
               "cusolverDnSorgqr");
    return LQ_OK;
}

// L1, L2 from the randomized SVD of a = d->r (m x n row-major, i.e. the column-major n x m
// matrix Aᶜ = Aᵀ), with Ω already uploaded. Every product in svd.c's terms:
//   Y = A·Ω       gemm(T, T): Aᶜᵀ (m x n) times Ωᶜᵀ (Ω uploaded row-major is Ωᶜ, q x n)
//   Z = Aᵀ·Y      gemm(N, N): Aᶜ (n x m) times Y (m x q)
//   Y = A·Z       gemm(T, N)
//   Bᵀ = Aᵀ·Y     n x q, as Z
//   L1ᵀ = ubᵀ·Yᵀ  r x m column-major = L1 row-major
//   L2ᵀ = Bᵀ·ubs  n x r column-major = L2 row-major
static int randomized_factors(struct dec *d, int power_iters, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const int m = (int)s->rows, n = (int)s->cols, q = s->sketch, r = s->rank;
    const float *a = d->r;
    const cublasOperation_t N = CUBLAS_OP_N, T = CUBLAS_OP_T;
    DEC_TRY(sgemm(d, T, T, m, q, n, a, n, d->omega, q, d->y, m, err));
    DEC_TRY(orthonormalize(d, d->y, m, err));
    for (int it = 0; it < power_iters; it++) {
        // Re-orthonormalizing between products keeps the small singular directions from
        // drowning in rounding error (Halko et al., Algorithm 4.4).
        DEC_TRY(sgemm(d, N, N, n, q, m, a, n, d->y, m, d->z, n, err));
        DEC_TRY(orthonormalize(d, d->z, n, err));
        DEC_TRY(sgemm(d, T, N, m, q, n, a, n, d->z, n, d->y, m, err));
        DEC_TRY(orthonormalize(d, d->y, m, err));
    }
    DEC_TRY(sgemm(d, N, N, n, q, m, a, n, d->y, m, d->z, n, err)); // Bᵀ
    const size_t nq = (size_t)n * q;
    dec_widen_kernel<<<lq_nf_grid(nq, DEC_THREADS), DEC_THREADS, 0, d->stream>>>(d->z, nq, d->bt);
    DEC_LAUNCHED("widen kernel");
    const double one = 1.0, zero = 0.0;
    DEC_BLAS(
        cublasDsyrk(d->blas, CUBLAS_FILL_MODE_LOWER, T, q, n, &one, d->bt, n, &zero, d->gram, q),
        "cublasDsyrk");
    DEC_SOLVER(cusolverDnDsyevd(d->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, q,
                                d->gram, q, d->lambda, d->eig_work, d->eig_lwork,
                                &d->status->eig_info),
               "cusolverDnDsyevd");
    dec_pick_kernel<<<r, 128, 0, d->stream>>>(d->lambda, d->gram, q, d->ub, d->ubs);
    DEC_LAUNCHED("pick kernel");
    DEC_TRY(sgemm(d, T, T, r, m, q, d->ub, q, d->y, m, d->L1, r, err));
    DEC_BLAS(cublasDgemm(d->blas, N, N, n, r, q, &one, d->bt, n, d->ubs, q, &zero, d->l2t, n),
             "cublasDgemm");
    const size_t rn = (size_t)r * n, mr = (size_t)m * r;
    dec_l2_kernel<<<lq_nf_grid(rn, DEC_THREADS), DEC_THREADS, 0, d->stream>>>(
        d->l2t, (size_t)n, rn, d->inverse_col, d->L2);
    DEC_LAUNCHED("L2 kernel");
    if (d->inverse_row) {
        dec_scale_rows_kernel<<<lq_nf_grid(mr, DEC_THREADS), DEC_THREADS, 0, d->stream>>>(
            d->L1, mr, r, d->inverse_row);
        DEC_LAUNCHED("row weight kernel");
    }
    return LQ_OK;
}

// L1, L2 from core's exact SVD of the downloaded residual, with lq.c's factor arithmetic.
static int exact_factors(struct dec *d, const struct lq_svd_options *svd, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const size_t rows = s->rows, cols = s->cols;
    const int rank = s->rank;
    DEC_CUDA(cudaMemcpyAsync(d->host_residual, d->r, s->numel * sizeof(float),
                             cudaMemcpyDeviceToHost, d->stream),
             "download the residual");
    DEC_CUDA(cudaStreamSynchronize(d->stream), "cudaStreamSynchronize");
    DEC_TRY(lq_svd_truncated(d->host_residual, rows, cols, rank, svd, d->host_u, d->host_s,
                             d->host_vt, err));
    float *sv = d->host_s;
    for (int k = 0; k < rank; k++) sv[k] = sqrtf(fmaxf(sv[k], 0.0f));
    for (size_t i = 0; i < rows; i++) {
        float inverse_row = d->host_row_weight ? 1.0f / d->host_row_weight[i] : 1.0f;
        for (int k = 0; k < rank; k++)
            d->host_L1[i * (size_t)rank + k] =
                d->host_u[i * (size_t)rank + k] * sv[k] * inverse_row;
    }
    for (int k = 0; k < rank; k++)
        for (size_t j = 0; j < cols; j++) {
            float inverse_col = d->host_col_weight ? 1.0f / d->host_col_weight[j] : 1.0f;
            d->host_L2[(size_t)k * cols + j] =
                sv[k] * d->host_vt[(size_t)k * cols + j] * inverse_col;
        }
    DEC_CUDA(cudaMemcpyAsync(d->L1, d->host_L1, rows * (size_t)rank * sizeof(float),
                             cudaMemcpyHostToDevice, d->stream),
             "upload L1");
    DEC_CUDA(cudaMemcpyAsync(d->L2, d->host_L2, (size_t)rank * cols * sizeof(float),
                             cudaMemcpyHostToDevice, d->stream),
             "upload L2");
    return LQ_OK;
}

// lowrank = L1·L2: the row-major m x n product is the column-major (L1·L2)ᵀ = L2ᵀ·L1ᵀ, and
// the row-major factors are exactly the column-major L2ᵀ (n x r) and L1ᵀ (r x m).
static int lowrank_product(struct dec *d, const float *L1, const float *L2, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const int m = (int)s->rows, n = (int)s->cols, r = s->rank;
    return sgemm(d, CUBLAS_OP_N, CUBLAS_OP_N, n, m, r, L2, n, L1, r, d->lowrank, n, err);
}

// One factorization step (lq.c: factorize): L1, L2 <- SVD_r of (W − Q) weighted, then
// lowrank = L1·L2. omega_host holds this step's sketch when randomized.
static int factorize(struct dec *d, const struct lq_svd_options *svd, const float *omega_host,
                     struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    unsigned row_blocks = (unsigned)(s->rows < LQ_NF_MAX_GRID ? s->rows : LQ_NF_MAX_GRID);
    dec_residual_kernel<<<row_blocks, DEC_THREADS, 0, d->stream>>>(
        d->w, d->q, s->rows, s->cols, d->row_weight, d->col_weight, d->r);
    DEC_LAUNCHED("residual kernel");
    if (s->randomized) {
        DEC_CUDA(cudaMemcpyAsync(d->omega, omega_host, s->cols * (size_t)s->sketch * sizeof(float),
                                 cudaMemcpyHostToDevice, d->stream),
                 "upload the sketch");
        DEC_TRY(randomized_factors(d, svd->power_iters, err));
    } else {
        DEC_TRY(exact_factors(d, svd, err));
    }
    return lowrank_product(d, d->L1, d->L2, err);
}

// The half step: status->sums[DEC_SUM_HALF] = Σ F·(W − Q − L1L2)² and r = W − L1L2.
static int half_step(struct dec *d, struct lq_error *err) {
    const size_t n = d->shape.numel;
    const unsigned blocks = lq_nf_grid(n, DEC_THREADS);
    dec_half_kernel<true><<<blocks, DEC_THREADS, 0, d->stream>>>(d->w, d->q, d->lowrank, d->fisher,
                                                                 n, d->r, d->partials);
    DEC_LAUNCHED("half-step kernel");
    return reduce_into(d, blocks, DEC_SUM_HALF, err);
}

// status->sums[DEC_SUM_NORM] = ||W||² (weighted).
static int norm_squared(struct dec *d, struct lq_error *err) {
    const size_t n = d->shape.numel;
    const unsigned blocks = lq_nf_grid(n, DEC_THREADS);
    dec_norm_kernel<<<blocks, DEC_THREADS, 0, d->stream>>>(d->w, d->fisher, n, d->partials);
    DEC_LAUNCHED("norm kernel");
    return reduce_into(d, blocks, DEC_SUM_NORM, err);
}

static float download_float(struct dec *d, const float *device) {
    float value = NAN;
    if (cudaMemcpyAsync(&value, device, sizeof value, cudaMemcpyDeviceToHost, d->stream) !=
            cudaSuccess ||
        cudaStreamSynchronize(d->stream) != cudaSuccess)
        return NAN;
    return value;
}

// Queues the status's way back; check_step waits for it.
static int queue_status(struct dec *d, struct lq_error *err) {
    DEC_CUDA(cudaMemcpyAsync(d->status_host, d->status, sizeof *d->status_host,
                             cudaMemcpyDeviceToHost, d->stream),
             "download the status");
    return LQ_OK;
}

// Waits for the queued step and turns what its status says into core's errors.
static int check_step(struct dec *d, struct lq_error *err) {
    DEC_CUDA(cudaStreamSynchronize(d->stream), "decomposition step");
    const struct dec_status *st = d->status_host;
    const struct dec_shape *s = &d->shape;
    if (st->qr_info != 0)
        return lq_error_set(err, LQ_ESOLVER,
                            "cuSOLVER QR of the sketch of %zu x %zu failed (info %d)", s->rows,
                            s->cols, st->qr_info);
    if (st->eig_info != 0)
        return lq_error_set(err, LQ_ESOLVER,
                            "cuSOLVER syevd failed on the %d x %d sketch Gram matrix (info %d)",
                            s->sketch, s->sketch, st->eig_info);
    if (st->first_bad != DEC_NO_INDEX) {
        size_t index = (size_t)st->first_bad;
        return lq_error_set(err, LQ_ENUMERIC, "value %zu is %g: cannot quantize", index,
                            (double)download_float(d, d->last_input + index));
    }
    if (st->bad_group != DEC_NO_INDEX) {
        size_t group = (size_t)st->bad_group;
        return lq_error_set(err, LQ_ENUMERIC, "group %zu: scale %g overflows %s; choose a wider b2",
                            group, (double)download_float(d, d->group_scale + group),
                            lq_scale_dtype_name((enum lq_scale_dtype)d->nf.b2));
    }
    return LQ_OK;
}

static int copy_factors(struct dec *d, float *L1, float *L2, const float *from_L1,
                        const float *from_L2, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const size_t r = (size_t)s->rank;
    DEC_CUDA(cudaMemcpyAsync(L1, from_L1, s->rows * r * sizeof(float), cudaMemcpyDeviceToDevice,
                             d->stream),
             "copy L1");
    DEC_CUDA(cudaMemcpyAsync(L2, from_L2, r * s->cols * sizeof(float), cudaMemcpyDeviceToDevice,
                             d->stream),
             "copy L2");
    return LQ_OK;
}

// One decomposition under configuration c, lq_decompose's loop step for step. history
// (max_iters values) and norm (||W||, weighted like the errors) are optional.
static int run(struct dec *d, const struct lq_nf_config *c, const struct lq_decompose_options *o,
               double *history, double *norm, struct dec_result *res, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const int rank = s->rank, keep = s->keep && rank > 0;
    lq_nf_device_config_init(&d->nf, c, s->numel);
    memset(res, 0, sizeof *res);
    res->best = INFINITY;
    res->best_q_from_w = 1;
    double previous = INFINITY;
    int q_from_w = 1;
    if (keep) {
        // An initial Q that no step beats keeps L = 0 (lq.c zeroes them).
        DEC_CUDA(cudaMemsetAsync(d->out_L1, 0, s->rows * (size_t)rank * sizeof(float), d->stream),
                 "cudaMemset");
        DEC_CUDA(cudaMemsetAsync(d->out_L2, 0, (size_t)rank * s->cols * sizeof(float), d->stream),
                 "cudaMemset");
    }
    if (norm) DEC_TRY(norm_squared(d, err)); // comes back with the first status
    if (o->init == LQ_INIT_QUANTIZED) {
        DEC_TRY(quantize(d, d->w, NULL, err));
        DEC_TRY(queue_status(d, err));
        DEC_TRY(check_step(d, err));
        res->best = sqrt(d->status_host->sums[DEC_SUM_FULL]);
    } else {
        DEC_CUDA(cudaMemsetAsync(d->q, 0, s->numel * sizeof(float), d->stream), "cudaMemset");
    }
    if (s->randomized) sketch_fill(d, step_seed(o->svd.seed, 1), d->omega_host[1]);

    for (int step = 1; step <= o->max_iters; step++) {
        const float *input = d->w, *lowrank = NULL;
        if (rank > 0) {
            struct lq_svd_options svd = o->svd;
            svd.seed = step_seed(o->svd.seed, step);
            DEC_TRY(factorize(d, &svd, d->omega_host[step & 1], err));
            DEC_TRY(half_step(d, err));
            input = d->r, lowrank = d->lowrank;
        }
        DEC_TRY(quantize(d, input, lowrank, err));
        DEC_TRY(queue_status(d, err));
        // Host work while the device runs the step.
        if (s->randomized && step < o->max_iters)
            sketch_fill(d, step_seed(o->svd.seed, step + 1), d->omega_host[(step + 1) & 1]);
        DEC_TRY(check_step(d, err));
        if (norm) *norm = sqrt(d->status_host->sums[DEC_SUM_NORM]);

        const double half = sqrt(d->status_host->sums[DEC_SUM_HALF]);
        const double error = sqrt(d->status_host->sums[DEC_SUM_FULL]);
        // Half step: the previous Q with the new L (Q = 0 of a zero start is no candidate).
        if (rank > 0 && (step > 1 || o->init == LQ_INIT_QUANTIZED) && half < res->best) {
            res->best = half;
            res->best_iter = step, res->best_is_half_step = 1;
            res->best_q_from_w = q_from_w;
            if (keep) {
                DEC_TRY(copy_factors(d, d->best_q_L1, d->best_q_L2, d->prev_L1, d->prev_L2, err));
                DEC_TRY(copy_factors(d, d->out_L1, d->out_L2, d->L1, d->L2, err));
            }
        }
        q_from_w = rank == 0;
        if (history) history[step - 1] = error;
        res->iters = step;
        if (error < res->best) {
            res->best = error;
            res->best_iter = step, res->best_is_half_step = 0;
            res->best_q_from_w = q_from_w;
            if (keep) {
                DEC_TRY(copy_factors(d, d->best_q_L1, d->best_q_L2, d->L1, d->L2, err));
                DEC_TRY(copy_factors(d, d->out_L1, d->out_L2, d->L1, d->L2, err));
            }
        }
        if (keep) DEC_TRY(copy_factors(d, d->prev_L1, d->prev_L2, d->L1, d->L2, err));
        // Without a low-rank part Q is final after one step; otherwise stop as soon as the
        // error stops falling, or falls by less than the requested fraction.
        if (rank == 0 || error >= previous) break;
        if (o->min_improvement > 0 && previous - error < o->min_improvement * previous) break;
        previous = error;
    }
    return LQ_OK;
}

// The kept factors and the packed Q of the kept step into out.
static int collect(struct dec *d, const struct lq_nf_config *c, const struct dec_result *res,
                   struct lq_decomposition *out, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const size_t r = (size_t)s->rank;
    if (r > 0) {
        DEC_CUDA(cudaMemcpyAsync(out->L1, d->out_L1, s->rows * r * sizeof(float),
                                 cudaMemcpyDeviceToHost, d->stream),
                 "download L1");
        DEC_CUDA(cudaMemcpyAsync(out->L2, d->out_L2, r * s->cols * sizeof(float),
                                 cudaMemcpyDeviceToHost, d->stream),
                 "download L2");
    }
    // Re-quantize the kept Q's input: the same input gives the same Q bit for bit.
    const float *input = d->host_w;
    if (!res->best_q_from_w) {
        if (!d->host_residual) {
            d->host_residual = (float *)malloc(s->numel * sizeof(float));
            if (!d->host_residual)
                return lq_error_set(err, LQ_ENOMEM, "out of memory decomposing %zu x %zu", s->rows,
                                    s->cols);
        }
        DEC_TRY(lowrank_product(d, d->best_q_L1, d->best_q_L2, err));
        const unsigned blocks = lq_nf_grid(s->numel, DEC_THREADS);
        dec_half_kernel<false><<<blocks, DEC_THREADS, 0, d->stream>>>(d->w, NULL, d->lowrank, NULL,
                                                                      s->numel, d->r, NULL);
        DEC_LAUNCHED("residual kernel");
        DEC_CUDA(cudaMemcpyAsync(d->host_residual, d->r, s->numel * sizeof(float),
                                 cudaMemcpyDeviceToHost, d->stream),
                 "download the residual");
        input = d->host_residual;
    }
    DEC_CUDA(cudaStreamSynchronize(d->stream), "decomposition results");
    return lq_nf_quantize(input, s->rows, s->cols, c, &out->Q, err);
}

// ---------- validation (lq.c's rules and messages) ----------

static int validate_matrix(const float *w, size_t rows, size_t cols,
                           const struct lq_decompose_options *o, struct lq_error *err) {
    size_t k = rows < cols ? rows : cols;
    if (rows == 0 || cols == 0 || rows > (size_t)INT32_MAX || cols > (size_t)INT32_MAX)
        return lq_error_set(err, LQ_EINVAL, "cannot decompose a %zu x %zu matrix", rows, cols);
    if (o->rank < 0 || (size_t)o->rank > k)
        return lq_error_set(err, LQ_EINVAL, "rank %d: must be 0..%zu for a %zu x %zu matrix",
                            o->rank, k, rows, cols);
    if (o->max_iters < 1)
        return lq_error_set(err, LQ_EINVAL, "iterations %d: must be >= 1", o->max_iters);
    if (!(o->min_improvement >= 0.0 && o->min_improvement < 1.0))
        return lq_error_set(err, LQ_EINVAL, "minimum improvement %g: must be in [0, 1)",
                            o->min_improvement);
    for (size_t i = 0; i < rows * cols; i++)
        if (!isfinite(w[i]))
            return lq_error_set(err, LQ_ENUMERIC, "W[%zu, %zu] is %g", i / cols, i % cols,
                                (double)w[i]);
    if (o->rank > 0 && (o->svd.oversample < 0 || o->svd.power_iters < 0))
        return lq_error_set(err, LQ_EINVAL, "oversample and power iterations must be >= 0");
    return LQ_OK;
}

// Row and column weights from the Fisher information, as lq.c's fisher_weights: means of
// sqrt(F), floored at 1e-6 of the largest. *row_out, *col_out are malloc'ed.
static int fisher_weights(const float *fisher, size_t rows, size_t cols, float **row_out,
                          float **col_out, struct lq_error *err) {
    *row_out = *col_out = NULL;
    float *row_weight = (float *)malloc(rows * sizeof(float));
    float *col_weight = (float *)malloc(cols * sizeof(float));
    double *col_sum = (double *)calloc(cols, sizeof(double));
    int rc = LQ_OK;
    double largest = 0.0;
    float row_floor = 0.0f, col_floor = 0.0f;
    if (!row_weight || !col_weight || !col_sum) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory for Fisher weights");
        goto done;
    }
    for (size_t i = 0; i < rows; i++) {
        double row_sum = 0.0;
        for (size_t j = 0; j < cols; j++) {
            float f = fisher[i * cols + j];
            if (!(f >= 0.0f) || isinf(f)) {
                rc = lq_error_set(err, LQ_EINVAL,
                                  "Fisher information at (%zu, %zu) is %g: must be finite and >= 0",
                                  i, j, (double)f);
                goto done;
            }
            double root = sqrt((double)f);
            row_sum += root;
            col_sum[j] += root;
        }
        row_weight[i] = (float)(row_sum / (double)cols);
        largest = fmax(largest, row_weight[i]);
    }
    for (size_t j = 0; j < cols; j++) col_weight[j] = (float)(col_sum[j] / (double)rows);
    if (largest == 0.0) {
        rc = lq_error_set(err, LQ_EINVAL, "Fisher information is all zero");
        goto done;
    }
    for (size_t i = 0; i < rows; i++) row_floor = fmaxf(row_floor, row_weight[i]);
    for (size_t j = 0; j < cols; j++) col_floor = fmaxf(col_floor, col_weight[j]);
    row_floor *= 1e-6f, col_floor *= 1e-6f;
    for (size_t i = 0; i < rows; i++) row_weight[i] = fmaxf(row_weight[i], row_floor);
    for (size_t j = 0; j < cols; j++) col_weight[j] = fmaxf(col_weight[j], col_floor);
done:
    free(col_sum);
    if (rc) {
        free(row_weight), free(col_weight);
        return rc;
    }
    *row_out = row_weight, *col_out = col_weight;
    return LQ_OK;
}

// The call's sizes for options o over configurations configs[0..n).
static void shape_of(size_t rows, size_t cols, const struct lq_nf_config *configs, size_t n,
                     const struct lq_decompose_options *o, int keep, struct dec_shape *s) {
    memset(s, 0, sizeof *s);
    s->rows = rows, s->cols = cols, s->numel = rows * cols;
    s->rank = o->rank;
    s->keep = keep;
    s->weighted = o->fisher != NULL;
    if (o->rank > 0) {
        // As lq_svd_truncated: anything but an exact resolution is randomized.
        s->exact = lq_svd_resolve(rows, cols, o->rank, &o->svd) == LQ_SVD_EXACT;
        s->randomized = !s->exact;
    }
    if (s->randomized) {
        size_t k = rows < cols ? rows : cols;
        size_t q = (size_t)o->rank + (size_t)(o->svd.oversample > 0 ? o->svd.oversample : 0);
        s->sketch = (int)(q > k ? k : q);
    }
    for (size_t i = 0; i < n; i++) {
        size_t blocks = lq_nf_block_count(s->numel, &configs[i]);
        size_t groups = lq_nf_group_count(s->numel, &configs[i]);
        s->max_blocks = blocks > s->max_blocks ? blocks : s->max_blocks;
        s->max_groups = groups > s->max_groups ? groups : s->max_groups;
    }
}

// ---------- entry points ----------

int lq_cuda_decompose(struct lq_backend *backend, const float *w, size_t rows, size_t cols,
                      const struct lq_nf_config *config, const struct lq_decompose_options *options,
                      struct lq_decomposition *out, struct lq_error *err) {
    memset(out, 0, sizeof *out);
    int rc = lq_nf_config_validate(config, err);
    if (rc) return rc;
    if ((rc = validate_matrix(w, rows, cols, options, err))) return rc;
    float *row_weight = NULL, *col_weight = NULL;
    if (options->fisher &&
        (rc = fisher_weights(options->fisher, rows, cols, &row_weight, &col_weight, err)))
        return rc;
    const size_t r = (size_t)options->rank;
    out->rows = rows, out->cols = cols, out->rank = options->rank;
    out->L1 = (float *)malloc((r ? rows * r : 1) * sizeof(float));
    out->L2 = (float *)malloc((r ? r * cols : 1) * sizeof(float));
    out->history = (double *)malloc((size_t)options->max_iters * sizeof(double));
    if (!out->L1 || !out->L2 || !out->history) {
        free(row_weight), free(col_weight);
        lq_decomposition_free(out);
        return lq_error_set(err, LQ_ENOMEM, "out of memory decomposing %zu x %zu", rows, cols);
    }

    struct dec_shape shape;
    shape_of(rows, cols, config, 1, options, 1, &shape);
    struct dec *d = (struct dec *)calloc(1, sizeof *d);
    if (!d) {
        free(row_weight), free(col_weight);
        lq_decomposition_free(out);
        return lq_error_set(err, LQ_ENOMEM, "out of memory decomposing %zu x %zu", rows, cols);
    }
    struct dec_result res;
    double norm = 0.0;
    rc = dec_open(d, lq_cuda_of(backend), &shape, w, options->fisher, row_weight, col_weight, err);
    if (!rc) rc = run(d, config, options, out->history, &norm, &res, err);
    if (!rc) rc = collect(d, config, &res, out, err);
    dec_close(d);
    free(d);
    if (rc) {
        lq_decomposition_free(out);
        return rc;
    }
    out->error = res.best;
    out->norm = norm;
    out->iters = res.iters;
    out->best_iter = res.best_iter;
    out->best_is_half_step = res.best_is_half_step;
    return LQ_OK;
}

int lq_cuda_decompose_errors(struct lq_backend *backend, const float *w, size_t rows, size_t cols,
                             const struct lq_nf_config *configs, const uint64_t *seeds,
                             size_t n_configs, const struct lq_decompose_options *options,
                             double *errors, struct lq_error *err) {
    if (n_configs == 0) return LQ_OK;
    int rc = LQ_OK;
    for (size_t i = 0; i < n_configs; i++)
        if ((rc = lq_nf_config_validate(&configs[i], err))) return rc;
    if ((rc = validate_matrix(w, rows, cols, options, err))) return rc;
    float *row_weight = NULL, *col_weight = NULL;
    if (options->fisher &&
        (rc = fisher_weights(options->fisher, rows, cols, &row_weight, &col_weight, err)))
        return rc;

    struct dec_shape shape;
    shape_of(rows, cols, configs, n_configs, options, 0, &shape);
    struct dec *d = (struct dec *)calloc(1, sizeof *d);
    if (!d) {
        free(row_weight), free(col_weight);
        return lq_error_set(err, LQ_ENOMEM, "out of memory decomposing %zu x %zu", rows, cols);
    }
    rc = dec_open(d, lq_cuda_of(backend), &shape, w, options->fisher, row_weight, col_weight, err);
    for (size_t i = 0; i < n_configs && !rc; i++) {
        struct lq_decompose_options o = *options;
        o.svd.seed = seeds[i];
        struct dec_result res;
        rc = run(d, &configs[i], &o, NULL, NULL, &res, err);
        if (rc) {
            char text[64];
            lq_error_prefix(err, "configuration %s",
                            lq_nf_config_format(&configs[i], text, sizeof text));
            break;
        }
        errors[i] = res.best * res.best; // the paper's cost, as compress.c squares the error
    }
    dec_close(d);
    free(d);
    return rc;
}
