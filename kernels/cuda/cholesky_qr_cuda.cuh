// Thin QR on the device for the randomized SVD's range bases: CholeskyQR2 with the Gram
// matrix and its Cholesky factor in double (Yamazaki, Tomov and Dongarra, "Mixed-precision
// Cholesky QR factorization and its case studies on multicore CPU with multiple GPUs", 2015).
//
// Why: cuSOLVER's geqrf + orgqr on a 4096 x 74 matrix is a long chain of small, dependent
// launches (a panel factorization per block of columns), latency-bound however many streams
// run. CholeskyQR is two cuBLAS calls and one small kernel per pass, each using the whole GPU
// or finishing in microseconds:
//   X (float, rows x n) is widened to double, G = XᵀX (Dgemm), G = L·Lᵀ and L⁻¹ (one thread
//   block, in shared memory), X = X·L⁻ᵀ (one Dgemm; or a Dtrsm with L, when opened with
//   triangular_solve); a second pass on the result restores orthogonality to rounding level,
//   then X goes back to float. In double the first pass loses about
//   ε_double·κ(X)² of orthogonality, so for every κ(X) the pivot test below lets through
//   (about 10⁵ per column) the second pass sees a matrix orthonormal to 10⁻⁶ or better.
//
// A Cholesky pivot below LQ_CHOLQR_PIVOT_FLOOR of its column's squared norm (X is close to
// rank-deficient: a matrix of rank below n, a zero matrix) or not finite sets a flag on the
// device; X then stays as it was and one kernel orthonormalizes it by classical Gram-Schmidt
// done twice, completing dependent columns with unit vectors, as Householder QR would give an
// orthonormal basis of any matrix. Nothing waits for the host: the flag is read on the device
// and every such fallback counts one in *fallback_count.
//
// The result spans the same space as Householder QR's (columns may differ in sign), which is
// all the randomized SVD uses. Every kernel and cuBLAS call is deterministic.
#ifndef LQ_CHOLESKY_QR_CUDA_CUH
#define LQ_CHOLESKY_QR_CUDA_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_internal.h"

#define LQ_CHOLQR_MAX_COLUMNS 160 // n·n doubles of shared memory: 200 KiB at 160
#define LQ_CHOLQR_PIVOT_FLOOR 1e-10

// Which Cholesky kernel factors the Gram matrix (LQ_CUDA_CHOLQR_KERNEL, read at open): the
// tiled one (new, the default: one barrier per column, L⁻¹ by a warp per column) or the old
// one (kept to compare against).
enum lq_cholqr_kernel { LQ_CHOLQR_KERNEL_TILED, LQ_CHOLQR_KERNEL_OLD };

// The device memory of one worker: borrowed handles, owned buffers.
struct lq_cholqr {
    struct lq_cuda *cuda;
    int max_rows, columns;
    int triangular_solve; // X·L⁻ᵀ by Dtrsm (else L⁻¹ and a Dgemm)
    void *slab;           // one allocation, counted under LQ_CUDA_JOBS
    size_t bytes;         // its size
    double *wide;         // max_rows x columns, column-major
    double *other;        // the same, the Dgemm's other side (NULL with triangular_solve)
    double *gram;         // columns x columns
    int *failed;          // whether the last Cholesky of the current orthonormalization failed

    enum lq_cholqr_kernel kernel; // LQ_CUDA_CHOLQR_KERNEL
};

// Whether this device can run CholeskyQR on n columns (n <= LQ_CHOLQR_MAX_COLUMNS and the
// n x n shared-memory tile fits a thread block).
int lq_cholqr_supported(const struct lq_cuda *cuda, int columns);

// Buffers for matrices of up to max_rows rows and exactly `columns` columns; triangular_solve
// picks the Dtrsm form. LQ_EINVAL for an LQ_CUDA_CHOLQR_KERNEL other than new or old.
int lq_cholqr_open(struct lq_cholqr *qr, struct lq_cuda *cuda, int max_rows, int columns,
                   int triangular_solve, struct lq_error *err);
void lq_cholqr_close(struct lq_cholqr *qr);

// Replaces the columns of the column-major rows x columns float matrix x (leading dimension
// rows) by an orthonormal basis of their span, queued on stream with blas (bound to stream).
// *fallback_count (device memory) is incremented when the Gram-Schmidt fallback ran.
int lq_cholqr_orthonormalize(struct lq_cholqr *qr, cublasHandle_t blas, cudaStream_t stream,
                             float *x, int rows, unsigned *fallback_count, struct lq_error *err);

#endif
