// All eigenpairs of a small symmetric matrix in double in ONE kernel launch: cyclic two-sided
// Jacobi in one thread block, the matrix (packed lower triangle) and the eigenvector
// accumulator in shared memory.
//
// Why: the randomized SVD's small eigenproblem (a q x q Gram matrix, q = rank + 10, 74 for
// rank 64) through cuSOLVER's Dsyevd is ~170 launches (tridiagonalization, divide and
// conquer, 2·(q − 1) back-transformation kernels), ~1.1 ms on an H100, and with several
// decompositions on concurrent streams the error table is bound by that launch traffic. This
// is one launch on one SM, so the other streams keep the rest of the GPU.
//
// Algorithm (Golub and Van Loan, 8.5; the schedule and the rotation are in
// eig_jacobi_math.h, shared with the host transcription in tests/unit/test_jacobi_order.c;
// the kernel's code is in eig_jacobi_kernel.h, which tests/unit/test_jacobi_kernel.c runs on
// the CPU with a thread per CUDA thread):
// per round of the round-robin ordering n/2 disjoint pairs (p, q) (an odd n gets a dummy
// index that sits out), one thread per pair computes its rotation and its own 2 x 2 diagonal
// block while the other warps apply the previous round's V·J to the eigenvector columns
// (double-buffered rotations: the two need no barrier between them); then the block applies
// Jᵀ·A·J to every off-diagonal 2 x 2 block of two pairs (each written by one thread). Two
// barriers a round; n − 1 rounds (n even) are a sweep, which meets every pair once. Sweeps stop
// when the off-diagonal norm is at most LQ_EIG_JACOBI_TOLERANCE of the whole, or when a sweep
// skipped every rotation; after LQ_EIG_JACOBI_MAX_SWEEPS *info says it did not converge. The matrix
// is first scaled by a power of two (exact) so that its largest entry is in [1, 2), which keeps the
// squared norms away from overflow and underflow; the eigenvalues are scaled back.
#ifndef LQ_EIG_JACOBI_CUDA_CUH
#define LQ_EIG_JACOBI_CUDA_CUH

#include <stddef.h>

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "core/error.h"

// *info after a solve: 0, or one of these (the outputs are then not eigenpairs; the values
// are also defined in eig_jacobi_kernel.h, which the kernel sees).
#ifndef LQ_EIG_JACOBI_UNCONVERGED
#define LQ_EIG_JACOBI_UNCONVERGED 1 // LQ_EIG_JACOBI_MAX_SWEEPS sweeps left it off-diagonal
#define LQ_EIG_JACOBI_NOT_FINITE 2  // the input holds Inf or NaN (every output is NaN)
#endif

// Bytes of shared memory the solver needs for an n x n matrix.
size_t lq_eig_jacobi_shared_bytes(int n);

// Whether the solver runs an n x n matrix on this device (its shared memory fits a thread
// block: n <= 138 on an H100's 227 KiB).
int lq_eig_jacobi_supported(int device, int n);

// Queued on stream for the current device: a (device, n x n, column-major, leading dimension
// n) holds the lower triangle of a symmetric matrix, as cuSOLVER's syevd reads it (the upper
// triangle is not read); on return lambda (device, n) holds the eigenvalues ascending and a
// the eigenvectors, column j for lambda[j]; *info (device) is 0 or LQ_EIG_JACOBI_*. Returns
// LQ_EINVAL when the device cannot run n (lq_eig_jacobi_supported), or the launch's error.
int lq_eig_jacobi(cudaStream_t stream, double *a, int n, double *lambda, int *info,
                  struct lq_error *err);

// What a nonzero *info means, in words.
const char *lq_eig_jacobi_info_text(int info);

#ifdef __cplusplus
}
#endif

#endif
