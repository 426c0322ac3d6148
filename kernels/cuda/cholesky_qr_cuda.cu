// CholeskyQR2 for thin matrices (the contract and the reasons are in cholesky_qr_cuda.cuh).
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cholesky_qr_cuda.cuh"

extern "C" {
#include "kernels/cuda_cholqr.h"
}

#define CHOLQR_THREADS 256 // threads of the small kernels (one thread block each)
// The tiled Cholesky kernel's block: CHOLQR_TILE warps of CHOLQR_TILE lanes (a warp per
// column, a lane per row), and the rows a lane keeps in registers in the inversion.
#define CHOLQR_TILE 32
#define CHOLQR_ROWS_PER_LANE ((LQ_CHOLQR_MAX_COLUMNS + CHOLQR_TILE - 1) / CHOLQR_TILE)
#define CHOLQR_ALIGN 256
#define CHOLQR_FULL_MASK 0xffffffffu
// The fallback keeps a column whose part orthogonal to the columns before it is at least this
// fraction of its norm (far above float rounding); below, the column counts as dependent.
#define CHOLQR_KEEP 1e-4

static size_t cholqr_shared_bytes(int columns) {
    return (size_t)columns * (size_t)columns * sizeof(double);
}

// ---------- kernels ----------

// Whether the pivot of column j may be divided by: above LQ_CHOLQR_PIVOT_FLOOR of the column's
// squared norm in G (its original diagonal entry) and finite.
__device__ __forceinline__ static bool cholqr_pivot_ok(double pivot, double diagonal) {
    return pivot > LQ_CHOLQR_PIVOT_FLOOR * diagonal && pivot <= DBL_MAX;
}

// The right-looking Cholesky steps both kernels share, on the unscaled copy a (column-major n x
// n) whose original diagonal is `diagonal`: for each column j, the pivot test, then
// update(j, 1 / a[j][j]) of the trailing lower triangle and a barrier. Returns whether it failed
// (bad: already failed, or a pivot fails the test). Every thread reads the same pivot (written
// before the last barrier), so the decision is uniform over the block; every thread calls it.
template <typename Update>
__device__ __forceinline__ static bool cholqr_steps(const double *a, const double *diagonal, int n,
                                                    bool bad, Update update) {
    for (int j = 0; j < n && !bad; j++) {
        const double pivot = a[j + j * n];
        if (!cholqr_pivot_ok(pivot, diagonal[j])) {
            bad = true;
            break;
        }
        update(j, 1.0 / pivot);
        __syncthreads();
    }
    return bad;
}

// G = L·Lᵀ for g (column-major n x n; only the lower triangle is read), then g = L (lower
// triangle; invert 0) or g = L⁻¹ (lower, zeros above; invert 1).
//   Cholesky: right-looking, on an unscaled copy in shared memory: step j subtracts
//   a[i][j]·a[k][j] / a[j][j] from the trailing lower triangle, so a step reads only column
//   j and writes only columns after it, and one barrier per step suffices; then
//   L[i][k] = a[i][k] / √a[k][k].
//   Inverse: X = L⁻¹ in place by rows. Step j divides row j of X (final: every earlier row
//   has been subtracted from it) by L[j][j], and subtracts L[i][j] times it from each row
//   i > j. Row i's slot (i, j) still holds L[i][j] until step j, which copies column j out
//   first and then assigns X[i][j] there; L's diagonal is kept aside, and X's starts as 1.
// A pivot a[j][j] below LQ_CHOLQR_PIVOT_FLOOR times the original G[j][j] (the squared sine
// of the angle between column j and the columns before it), or not finite, fails:
// *failed = 1 and g = I, so what follows changes nothing. first: the first pass, which
// (re)sets *failed; the second pass after a failed first only writes g = I. Launch one block
// of CHOLQR_THREADS with n·n doubles of shared memory.
__global__ static void cholqr_cholesky_kernel(double *g, int n, int first, int invert,
                                              int *failed) {
    extern __shared__ double a[];
    __shared__ double diagonal[LQ_CHOLQR_MAX_COLUMNS];
    __shared__ double column[LQ_CHOLQR_MAX_COLUMNS];
    __shared__ int skip;
    if (threadIdx.x == 0) skip = first ? 0 : *failed;
    const int count = n * n;
    for (int idx = threadIdx.x; idx < count; idx += blockDim.x) {
        const int i = idx % n, k = idx / n;
        if (i >= k) a[idx] = g[idx];
        if (i == k) diagonal[i] = g[idx];
    }
    __syncthreads();
    const bool bad = cholqr_steps(a, diagonal, n, skip != 0, [&](int j, double inverse) {
        const int rest = n - 1 - j;
        for (int idx = threadIdx.x; idx < rest * rest; idx += blockDim.x) {
            const int i = j + 1 + idx % rest, k = j + 1 + idx / rest;
            if (i >= k) a[i + k * n] -= a[i + j * n] * a[k + j * n] * inverse;
        }
    });
    if (bad) {
        for (int idx = threadIdx.x; idx < count; idx += blockDim.x)
            g[idx] = idx % n == idx / n ? 1.0 : 0.0;
        if (threadIdx.x == 0) *failed = 1;
        return;
    }
    // L = a[i][k] / √a[k][k]; diagonal[] (G's diagonal, no longer needed) takes the roots.
    for (int k = threadIdx.x; k < n; k += blockDim.x) diagonal[k] = sqrt(a[k + k * n]);
    __syncthreads();
    for (int idx = threadIdx.x; idx < count; idx += blockDim.x) {
        const int i = idx % n, k = idx / n;
        if (i > k) a[idx] /= diagonal[k];
        if (i == k) a[idx] = invert ? 1.0 : diagonal[k];
    }
    __syncthreads();
    for (int j = 0; invert && j < n; j++) {
        for (int k = threadIdx.x; k <= j; k += blockDim.x) a[j + k * n] /= diagonal[j];
        for (int i = j + 1 + threadIdx.x; i < n; i += blockDim.x) column[i] = a[i + j * n];
        __syncthreads();
        const int below = n - 1 - j, width = j + 1;
        for (int idx = threadIdx.x; idx < below * width; idx += blockDim.x) {
            const int i = j + 1 + idx % below, k = idx / below;
            const double update = column[i] * a[j + k * n];
            a[i + k * n] = k == j ? -update : a[i + k * n] - update;
        }
        __syncthreads();
    }
    for (int idx = threadIdx.x; idx < count; idx += blockDim.x) {
        const int i = idx % n, k = idx / n;
        if (i >= k)
            g[idx] = a[idx];
        else if (invert)
            g[idx] = 0.0; // the Dgemm reads the whole matrix
    }
    if (threadIdx.x == 0 && first) *failed = 0;
}

// Columns c and c + 1 of X = L⁻¹ (c + 1 when below n) by forward substitution of L·x = e_c
// and L·z = e_{c+1}, by one warp and without a barrier: lane l keeps rows c + l + 32·r of
// both in registers x[r], z[r], so each element of L read serves two columns. With a the
// unscaled factor of cholqr_tiled_kernel (a[i][j] = L[i][j]·√d_j, d_j = a[j][j] = L[j][j]²),
// step j takes the residual of row j from its lane, y = residual / d_j, so x_j = y·√d_j and
// each row i > j loses L[i][j]·x_j = a[i][j]·y. Column c + 1 starts with row c at 0, so its
// step c changes nothing and leaves X[c][c + 1] = 0. The steps go by blocks b of 32 rows
// (j = c + 32·b + owner), the block loop unrolled, so that row j's registers are x[b], z[b]
// and the blocks before b (rows all below j, final) are skipped without a test. Writes
// columns c and c + 1 of g (zeros above the diagonal).
__device__ static void cholqr_invert_columns(const double *a, int n, int c, const double *root,
                                             const double *reciprocal, double *g) {
    const int lane = (int)threadIdx.x;
    double x[CHOLQR_ROWS_PER_LANE], z[CHOLQR_ROWS_PER_LANE];
#pragma unroll
    for (int r = 0; r < CHOLQR_ROWS_PER_LANE; r++) {
        x[r] = r == 0 && lane == 0 ? 1.0 : 0.0;
        z[r] = r == 0 && lane == 1 ? 1.0 : 0.0;
    }
#pragma unroll
    for (int b = 0; b < CHOLQR_ROWS_PER_LANE; b++) {
        const int base = c + CHOLQR_TILE * b; // uniform over the warp
        if (base >= n) break;
        const int steps = min(CHOLQR_TILE, n - base);
        for (int owner = 0; owner < steps; owner++) {
            const int j = base + owner;
            const int at = j * n + c + lane; // row c + lane of column j
            const double inverse = reciprocal[j], scale = root[j];
            const double y = __shfl_sync(CHOLQR_FULL_MASK, x[b], owner) * inverse;
            const double v = __shfl_sync(CHOLQR_FULL_MASK, z[b], owner) * inverse;
            if (lane > owner && base + lane < n) {
                const double l = a[at + CHOLQR_TILE * b];
                x[b] = fma(-l, y, x[b]);
                z[b] = fma(-l, v, z[b]);
            } else if (lane == owner) {
                x[b] = y * scale;
                z[b] = v * scale;
            }
#pragma unroll
            for (int r = b + 1; r < CHOLQR_ROWS_PER_LANE; r++)
                if (c + CHOLQR_TILE * r + lane < n) {
                    const double l = a[at + CHOLQR_TILE * r];
                    x[r] = fma(-l, y, x[r]);
                    z[r] = fma(-l, v, z[r]);
                }
        }
    }
    const bool second = c + 1 < n;
#pragma unroll
    for (int r = 0; r < CHOLQR_ROWS_PER_LANE; r++) {
        const int i = c + CHOLQR_TILE * r + lane;
        if (i < n) {
            g[i + c * n] = x[r];
            if (second) g[i + (c + 1) * n] = z[r];
        }
    }
    for (int i = lane; i < c; i += CHOLQR_TILE) {
        g[i + c * n] = 0.0;
        if (second) g[i + (c + 1) * n] = 0.0;
    }
}

// The same contract as cholqr_cholesky_kernel (inputs, outputs, pivot test, first/skip), with
// a block of CHOLQR_TILE x CHOLQR_TILE threads (threadIdx.x the lane, .y the warp) and
// neither division nor remainder in a loop.
//   Cholesky: the same right-looking unscaled steps, one barrier each; warp w updates the
//   columns k = j + 1 + w, j + 33 + w, ... of the trailing lower triangle, a lane per row.
//   Inverse: no barrier at all. Each column of L⁻¹ is an independent forward substitution
//   on the unscaled factor (cholqr_invert_columns), one warp per pair of columns (2p, 2p + 1);
//   pair p costs n − 2p steps, so warp w takes pairs w, 63 − w, 64 + w, ... (alternating
//   direction by rounds of 32) to even the work out.
__global__ static void __launch_bounds__(CHOLQR_TILE *CHOLQR_TILE)
    cholqr_tiled_kernel(double *g, int n, int first, int invert, int *failed) {
    extern __shared__ double a[];
    __shared__ double diagonal[LQ_CHOLQR_MAX_COLUMNS];   // G's diagonal
    __shared__ double root[LQ_CHOLQR_MAX_COLUMNS];       // √d_k = L[k][k]
    __shared__ double reciprocal[LQ_CHOLQR_MAX_COLUMNS]; // 1 / d_k
    __shared__ int skip;
    const int lane = (int)threadIdx.x, warp = (int)threadIdx.y;
    const int thread = lane + CHOLQR_TILE * warp, threads = CHOLQR_TILE * CHOLQR_TILE;
    if (thread == 0) skip = first ? 0 : *failed;
    for (int k = warp; k < n; k += CHOLQR_TILE) {
        for (int i = k + lane; i < n; i += CHOLQR_TILE) a[i + k * n] = g[i + k * n];
        if (lane == 0) diagonal[k] = g[k + k * n];
    }
    __syncthreads();
    const bool bad = cholqr_steps(a, diagonal, n, skip != 0, [&](int j, double inverse) {
        // Reads column j only, writes columns after it: no race within the step. A lane's rows
        // of column k are loaded before any is written, so the loads overlap; the chunks of
        // 32 rows past the column's end are skipped by a test uniform over the warp.
        for (int k = j + 1 + warp; k < n; k += CHOLQR_TILE) {
            const double scaled = a[k + j * n] * inverse;
            const int rows = n - k; // k .. n − 1
            double left[CHOLQR_ROWS_PER_LANE], right[CHOLQR_ROWS_PER_LANE];
#pragma unroll
            for (int p = 0; p < CHOLQR_ROWS_PER_LANE; p++) {
                const int i = k + lane + CHOLQR_TILE * p;
                left[p] = right[p] = 0.0;
                if (CHOLQR_TILE * p < rows && i < n)
                    left[p] = a[i + j * n], right[p] = a[i + k * n];
            }
#pragma unroll
            for (int p = 0; p < CHOLQR_ROWS_PER_LANE; p++) {
                const int i = k + lane + CHOLQR_TILE * p;
                if (CHOLQR_TILE * p < rows && i < n) a[i + k * n] = right[p] - left[p] * scaled;
            }
        }
    });
    if (bad) {
        for (int k = warp; k < n; k += CHOLQR_TILE)
            for (int i = lane; i < n; i += CHOLQR_TILE) g[i + k * n] = i == k ? 1.0 : 0.0;
        if (thread == 0) *failed = 1;
        return;
    }
    for (int k = thread; k < n; k += threads) {
        root[k] = sqrt(a[k + k * n]);
        reciprocal[k] = 1.0 / a[k + k * n];
    }
    __syncthreads();
    if (invert) {
        const int pairs = (n + 1) / 2;
        for (int round = 0; round * CHOLQR_TILE < pairs; round++) {
            const int pair = round * CHOLQR_TILE + (round & 1 ? CHOLQR_TILE - 1 - warp : warp);
            if (pair < pairs) cholqr_invert_columns(a, n, 2 * pair, root, reciprocal, g);
        }
    } else {
        for (int k = warp; k < n; k += CHOLQR_TILE)
            for (int i = k + lane; i < n; i += CHOLQR_TILE)
                g[i + k * n] = i == k ? root[k] : a[i + k * n] / root[k];
    }
    if (thread == 0 && first) *failed = 0;
}

__global__ static void cholqr_widen_kernel(const float *x, size_t count, double *wide) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        wide[i] = (double)x[i];
}

// x = wide rounded to float, unless the Cholesky failed (x stays the input).
__global__ static void cholqr_narrow_kernel(const double *wide, size_t count, const int *failed,
                                            float *x) {
    if (*failed) return;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = (float)wide[i];
}

// The sum of value over the thread block, in a fixed order, returned to every thread. Every
// thread of the block must call it.
__device__ static double cholqr_block_sum(double value) {
    __shared__ double partial[CHOLQR_THREADS / 32];
    __shared__ double total;
    for (int s = 16; s > 0; s >>= 1) value += __shfl_xor_sync(CHOLQR_FULL_MASK, value, s);
    if ((threadIdx.x & 31u) == 0) partial[threadIdx.x >> 5] = value;
    __syncthreads();
    if (threadIdx.x == 0) {
        double sum = 0.0;
        for (unsigned w = 0; w < blockDim.x / 32; w++) sum += partial[w];
        total = sum;
    }
    __syncthreads();
    const double result = total;
    __syncthreads(); // partial and total are written again by the next call
    return result;
}

// ||v||, in double.
__device__ static double cholqr_norm(const float *v, int rows) {
    double sum = 0.0;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) sum += (double)v[i] * (double)v[i];
    return sqrt(cholqr_block_sum(sum));
}

// One classical Gram-Schmidt pass: v −= Σ_{k<j} (x_kᵀ v)·x_k, dot products and the sum in
// double. Warp w computes the coefficients k = w, w + warps, ...
__device__ static void cholqr_project(const float *x, int rows, int j, float *v, double *coef) {
    const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u, warps = blockDim.x >> 5;
    for (int k = (int)warp; k < j; k += (int)warps) { // uniform over the warp
        const float *column = x + (size_t)k * rows;
        double dot = 0.0;
        for (int i = (int)lane; i < rows; i += 32) dot += (double)column[i] * (double)v[i];
        for (int s = 16; s > 0; s >>= 1) dot += __shfl_xor_sync(CHOLQR_FULL_MASK, dot, s);
        if (lane == 0) coef[k] = dot;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows; i += blockDim.x) {
        double sum = 0.0;
        for (int k = 0; k < j; k++) sum += coef[k] * (double)x[i + (size_t)k * rows];
        v[i] = (float)((double)v[i] - sum);
    }
    __syncthreads();
}

// The fallback when a Cholesky failed: x (rows x n, column-major) orthonormalized in place,
// column by column, by Gram-Schmidt twice ("twice is enough": Giraud, Langou, Rozložník
// 2005). A dependent column (what is left of it is below CHOLQR_KEEP of its norm) is
// replaced by the next unit vector e_c that keeps at least 1/(2√n) after projection: among
// any j + 1 unit vectors the parts outside a j-dimensional span have squared norms summing
// to at least 1, so one of them keeps 1/√(j + 1), and the search ends within j + 1 tries.
// Non-finite columns are left as they are (the quantizer's finiteness check reports them).
// One block of CHOLQR_THREADS; does nothing unless *failed.
__global__ static void cholqr_fallback_kernel(float *x, int rows, int n, const int *failed,
                                              unsigned *fallback_count) {
    if (*failed == 0) return; // uniform
    __shared__ double coef[LQ_CHOLQR_MAX_COLUMNS];
    if (threadIdx.x == 0) *fallback_count += 1u;
    int candidate = 0; // the next unit vector to try
    for (int j = 0; j < n; j++) {
        float *v = x + (size_t)j * rows;
        double before = cholqr_norm(v, rows), after = 0.0;
        bool unit = false;
        for (;;) {
            cholqr_project(x, rows, j, v, coef);
            cholqr_project(x, rows, j, v, coef);
            after = cholqr_norm(v, rows);
            if (!(before <= DBL_MAX) || !(after <= DBL_MAX)) break; // not finite: leave it
            const double keep = unit ? 0.5 / sqrt((double)n) : CHOLQR_KEEP * before;
            if (after > keep || candidate >= rows) break;
            for (int i = threadIdx.x; i < rows; i += blockDim.x)
                v[i] = i == candidate ? 1.0f : 0.0f;
            candidate++;
            unit = true;
            before = 1.0;
            __syncthreads();
        }
        if (after > 0.0 && after <= DBL_MAX)
            for (int i = threadIdx.x; i < rows; i += blockDim.x)
                v[i] = (float)((double)v[i] / after);
        __syncthreads();
    }
}

// ---------- host ----------

#define CHOLQR_CUDA(call, what)                                                                    \
    do {                                                                                           \
        cudaError_t cholqr_status_ = (call);                                                       \
        if (cholqr_status_ != cudaSuccess) return lq_cuda_fail(cholqr_status_, (what), err);       \
    } while (0)
#define CHOLQR_BLAS(call, what)                                                                    \
    do {                                                                                           \
        cublasStatus_t cholqr_status_ = (call);                                                    \
        if (cholqr_status_ != CUBLAS_STATUS_SUCCESS)                                               \
            return lq_cublas_fail(cholqr_status_, (what), err);                                    \
    } while (0)

int lq_cholqr_supported(const struct lq_cuda *cuda, int columns) {
    if (columns < 1 || columns > LQ_CHOLQR_MAX_COLUMNS) return 0;
    int optin = 0;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cuda->device) !=
        cudaSuccess)
        return 0;
    // the tile plus the static arrays of either kernel (the tiled one has three)
    return cholqr_shared_bytes(columns) + (3 * LQ_CHOLQR_MAX_COLUMNS + 8) * sizeof(double) <=
           (size_t)optin;
}

// LQ_CUDA_CHOLQR_KERNEL: new (the default: cholqr_tiled_kernel) or old
// (cholqr_cholesky_kernel, kept to compare against).
static int cholqr_kernel_named(const char *text, enum lq_cholqr_kernel *kernel,
                               struct lq_error *err) {
    *kernel = LQ_CHOLQR_KERNEL_TILED;
    if (!text || !*text || strcmp(text, "new") == 0) return LQ_OK;
    if (strcmp(text, "old") == 0) {
        *kernel = LQ_CHOLQR_KERNEL_OLD;
        return LQ_OK;
    }
    return lq_error_set(err, LQ_EINVAL, "LQ_CUDA_CHOLQR_KERNEL=%s: expected new or old", text);
}

// Beyond 48 KiB of static plus dynamic shared memory a launch needs the opt-in. The attribute
// belongs to the kernel, not to one caller: set it to all the device allows (every n that
// lq_cholqr_supported accepts fits), so that opening for fewer columns never lowers it under
// a launch of another worker.
static int cholqr_kernel_prepare(const void *kernel, int optin, const char *what,
                                 struct lq_error *err) {
    cudaFuncAttributes attributes;
    CHOLQR_CUDA(cudaFuncGetAttributes(&attributes, kernel), what);
    CHOLQR_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     optin - (int)attributes.sharedSizeBytes),
                what);
    return LQ_OK;
}

static int cholqr_kernels_prepare(const struct lq_cuda *cuda, struct lq_error *err) {
    int optin = 0;
    CHOLQR_CUDA(
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cuda->device),
        "cudaDeviceGetAttribute (CholeskyQR)");
    int rc = cholqr_kernel_prepare((const void *)cholqr_cholesky_kernel, optin,
                                   "cudaFuncSetAttribute (CholeskyQR)", err);
    if (!rc)
        rc = cholqr_kernel_prepare((const void *)cholqr_tiled_kernel, optin,
                                   "cudaFuncSetAttribute (CholeskyQR, tiled)", err);
    return rc;
}

// Queues the Cholesky kernel `kernel` on gram (n x n, device) and checks the launch.
static int cholqr_factor(enum lq_cholqr_kernel kernel, cudaStream_t stream, double *gram, int n,
                         int first, int invert, int *failed, struct lq_error *err) {
    if (kernel == LQ_CHOLQR_KERNEL_OLD)
        cholqr_cholesky_kernel<<<1, CHOLQR_THREADS, cholqr_shared_bytes(n), stream>>>(
            gram, n, first, invert, failed);
    else
        cholqr_tiled_kernel<<<1, dim3(CHOLQR_TILE, CHOLQR_TILE), cholqr_shared_bytes(n), stream>>>(
            gram, n, first, invert, failed);
    CHOLQR_CUDA(cudaGetLastError(), "CholeskyQR kernel");
    return LQ_OK;
}

static size_t cholqr_carve(size_t *offset, size_t bytes) {
    const size_t at = (*offset + CHOLQR_ALIGN - 1) / CHOLQR_ALIGN * CHOLQR_ALIGN;
    *offset = at + bytes;
    return at;
}

int lq_cholqr_open(struct lq_cholqr *qr, struct lq_cuda *cuda, int max_rows, int columns,
                   int triangular_solve, struct lq_error *err) {
    memset(qr, 0, sizeof *qr);
    if (!lq_cholqr_supported(cuda, columns) || max_rows < columns)
        return lq_error_set(err, LQ_EINVAL, "CholeskyQR: %d x %d is not supported on this device",
                            max_rows, columns);
    int rc = cholqr_kernel_named(getenv("LQ_CUDA_CHOLQR_KERNEL"), &qr->kernel, err);
    if (rc) return rc;
    qr->cuda = cuda;
    qr->max_rows = max_rows, qr->columns = columns;
    qr->triangular_solve = triangular_solve;
    size_t offset = 0;
    const size_t wide_bytes = (size_t)max_rows * columns * sizeof(double);
    const size_t wide_at = cholqr_carve(&offset, wide_bytes);
    const size_t other_at = triangular_solve ? 0 : cholqr_carve(&offset, wide_bytes);
    const size_t gram_at = cholqr_carve(&offset, (size_t)columns * columns * sizeof(double));
    const size_t failed_at = cholqr_carve(&offset, sizeof(int));
    qr->bytes = offset;
    rc = lq_cuda_malloc(cuda, qr->bytes, LQ_CUDA_JOBS, &qr->slab, err);
    if (rc) return rc;
    char *base = (char *)qr->slab;
    qr->wide = (double *)(base + wide_at);
    qr->other = triangular_solve ? NULL : (double *)(base + other_at);
    qr->gram = (double *)(base + gram_at);
    qr->failed = (int *)(base + failed_at);
    return cholqr_kernels_prepare(cuda, err);
}

void lq_cholqr_close(struct lq_cholqr *qr) {
    if (qr->slab) lq_cuda_free(qr->cuda, qr->slab);
    memset(qr, 0, sizeof *qr);
}

static unsigned cholqr_grid(size_t count) {
    size_t blocks = (count + CHOLQR_THREADS - 1) / CHOLQR_THREADS;
    return (unsigned)(blocks < 4096 ? (blocks ? blocks : 1) : 4096);
}

// One CholeskyQR pass: G = WᵀW, G = L·Lᵀ, out = W·L⁻ᵀ, W being `in` (rows x n). With
// triangular_solve a Dtrsm in place (out must be in), else L⁻¹ from the kernel and a Dgemm.
static int cholqr_pass(struct lq_cholqr *qr, cublasHandle_t blas, cudaStream_t stream, int rows,
                       int first, const double *in, double *out, struct lq_error *err) {
    const int n = qr->columns;
    const double one = 1.0, zero = 0.0;
    // Dgemm rather than Dsyrk: cuBLAS splits the long inner dimension of a gemm across the GPU;
    // only the lower triangle is read.
    CHOLQR_BLAS(cublasDgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, n, rows, &one, in, rows, in, rows,
                            &zero, qr->gram, n),
                "cublasDgemm (CholeskyQR Gram matrix)");
    const int invert = !qr->triangular_solve;
    int rc = cholqr_factor(qr->kernel, stream, qr->gram, n, first, invert, qr->failed, err);
    if (rc) return rc;
    if (invert) {
        // out = W·(L⁻¹)ᵀ
        CHOLQR_BLAS(cublasDgemm(blas, CUBLAS_OP_N, CUBLAS_OP_T, rows, n, n, &one, in, rows,
                                qr->gram, n, &zero, out, rows),
                    "cublasDgemm (CholeskyQR)");
        return LQ_OK;
    }
    if (out != in)
        return lq_error_set(err, LQ_EINVAL, "CholeskyQR: the triangular solve works in place");
    // W·R⁻¹ with R = Lᵀ: B·op(A)⁻¹, A = L lower, op = transpose
    CHOLQR_BLAS(cublasDtrsm(blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_T,
                            CUBLAS_DIAG_NON_UNIT, rows, n, &one, qr->gram, n, out, rows),
                "cublasDtrsm (CholeskyQR)");
    return LQ_OK;
}

int lq_cholqr_orthonormalize(struct lq_cholqr *qr, cublasHandle_t blas, cudaStream_t stream,
                             float *x, int rows, unsigned *fallback_count, struct lq_error *err) {
    const int n = qr->columns;
    if (rows > qr->max_rows || rows < n)
        return lq_error_set(err, LQ_EINVAL, "CholeskyQR: %d x %d does not fit %d x %d", rows, n,
                            qr->max_rows, n);
    const size_t count = (size_t)rows * n;
    cholqr_widen_kernel<<<cholqr_grid(count), CHOLQR_THREADS, 0, stream>>>(x, count, qr->wide);
    CHOLQR_CUDA(cudaGetLastError(), "CholeskyQR widen kernel");
    // with the Dgemm: wide -> other -> wide; with the Dtrsm: wide in place twice
    double *middle = qr->triangular_solve ? qr->wide : qr->other;
    int rc = cholqr_pass(qr, blas, stream, rows, 1, qr->wide, middle, err);
    if (!rc) rc = cholqr_pass(qr, blas, stream, rows, 0, middle, qr->wide, err);
    if (rc) return rc;
    cholqr_narrow_kernel<<<cholqr_grid(count), CHOLQR_THREADS, 0, stream>>>(qr->wide, count,
                                                                            qr->failed, x);
    CHOLQR_CUDA(cudaGetLastError(), "CholeskyQR narrow kernel");
    cholqr_fallback_kernel<<<1, CHOLQR_THREADS, 0, stream>>>(x, rows, n, qr->failed,
                                                             fallback_count);
    CHOLQR_CUDA(cudaGetLastError(), "CholeskyQR fallback kernel");
    return LQ_OK;
}

// ---------- the kernel alone, for tests (kernels/cuda_cholqr.h) ----------

static int compare_floats(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

// The lock is held; input (the matrix as given), work (what the kernel runs on) and flag
// (the flag the kernel sees, then its value as given) are device buffers of the caller's.
static int cholqr_factor_locked(struct lq_cuda *cuda, enum lq_cholqr_kernel kernel, int n,
                                int first, int invert, double *matrix, int *failed,
                                double *median_us, double *input, double *work, int *flag,
                                struct lq_error *err) {
    const size_t bytes = (size_t)n * n * sizeof(double);
    cudaStream_t stream = cuda->stream;
    int rc = cholqr_kernels_prepare(cuda, err);
    if (rc) return rc;
    CHOLQR_CUDA(cudaMemcpyAsync(input, matrix, bytes, cudaMemcpyHostToDevice, stream),
                "CholeskyQR test: copy in");
    CHOLQR_CUDA(cudaMemcpyAsync(work, input, bytes, cudaMemcpyDeviceToDevice, stream),
                "CholeskyQR test: copy");
    CHOLQR_CUDA(cudaMemcpyAsync(flag, failed, sizeof *flag, cudaMemcpyHostToDevice, stream),
                "CholeskyQR test: copy the flag in");
    CHOLQR_CUDA(cudaMemcpyAsync(flag + 1, flag, sizeof *flag, cudaMemcpyDeviceToDevice, stream),
                "CholeskyQR test: copy the flag");
    rc = cholqr_factor(kernel, stream, work, n, first, invert, flag, err);
    if (rc) return rc;
    CHOLQR_CUDA(cudaMemcpyAsync(matrix, work, bytes, cudaMemcpyDeviceToHost, stream),
                "CholeskyQR test: copy out");
    CHOLQR_CUDA(cudaMemcpyAsync(failed, flag, sizeof *flag, cudaMemcpyDeviceToHost, stream),
                "CholeskyQR test: copy the flag out");
    CHOLQR_CUDA(cudaStreamSynchronize(stream), "CholeskyQR test: synchronize");
    if (!median_us) return LQ_OK;
    enum { RUNS = 25 };
    cudaEvent_t start = NULL, stop = NULL;
    float times[RUNS];
    cudaError_t status = cudaEventCreate(&start);
    if (status == cudaSuccess) status = cudaEventCreate(&stop);
    // every run on the same matrix and flag, restored before the timed span
    for (int run = 0; run < RUNS && status == cudaSuccess && !rc; run++) {
        status = cudaMemcpyAsync(work, input, bytes, cudaMemcpyDeviceToDevice, stream);
        if (status == cudaSuccess)
            status =
                cudaMemcpyAsync(flag, flag + 1, sizeof *flag, cudaMemcpyDeviceToDevice, stream);
        if (status == cudaSuccess) status = cudaEventRecord(start, stream);
        if (status != cudaSuccess) break;
        rc = cholqr_factor(kernel, stream, work, n, first, invert, flag, err);
        if (!rc) status = cudaEventRecord(stop, stream);
        if (!rc && status == cudaSuccess) status = cudaEventSynchronize(stop);
        if (!rc && status == cudaSuccess) status = cudaEventElapsedTime(&times[run], start, stop);
    }
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
    if (rc) return rc;
    CHOLQR_CUDA(status, "CholeskyQR test: timing");
    qsort(times, RUNS, sizeof times[0], compare_floats);
    *median_us = 1e3 * (double)times[RUNS / 2];
    return LQ_OK;
}

extern "C" int lq_cuda_cholqr_factor(struct lq_backend *gpu, const char *kernel_name, int n,
                                     int first, int invert, double *matrix, int *failed,
                                     double *median_us, struct lq_error *err) {
    enum lq_cholqr_kernel kernel;
    int rc = cholqr_kernel_named(kernel_name, &kernel, err);
    if (rc) return rc;
    struct lq_cuda *cuda = lq_cuda_of(gpu);
    if (!lq_cholqr_supported(cuda, n))
        return lq_error_set(err, LQ_EINVAL, "CholeskyQR: %d columns are not supported", n);
    const size_t bytes = (size_t)n * n * sizeof(double);
    void *buffer = NULL;
    rc = lq_cuda_malloc(cuda, 2 * bytes + 2 * sizeof(int), LQ_CUDA_SCRATCH, &buffer, err);
    if (rc) return rc;
    double *input = (double *)buffer, *work = input + (size_t)n * n;
    int *flag = (int *)(work + (size_t)n * n);
    pthread_mutex_lock(&cuda->lock);
    rc = cholqr_factor_locked(cuda, kernel, n, first, invert, matrix, failed, median_us, input,
                              work, flag, err);
    pthread_mutex_unlock(&cuda->lock);
    lq_cuda_free(cuda, buffer);
    return rc;
}
