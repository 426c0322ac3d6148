/* CholeskyQR's factorization kernel on its own, for the GPU tests: the one-block Cholesky
 * (and inverse) of kernels/cuda/cholesky_qr_cuda.cu on a matrix the caller gives, so that
 * each kernel variant can be checked against a host factorization and against the other. */
#ifndef LQ_CUDA_CHOLQR_H
#define LQ_CUDA_CHOLQR_H

#include "core/error.h"
#include "kernels/backend.h"

/* Runs CholeskyQR's Cholesky kernel once on gpu's stream and waits for it. matrix (host,
 * column-major n x n) holds G on entry (only its lower triangle is read) and what the kernel
 * leaves on return: L in the lower triangle, the upper one unchanged (invert 0), or L⁻¹ with
 * zeros above (invert 1), or the identity when the pivot test failed. *failed (host) is the
 * device flag before the call and after it; first as in the first CholeskyQR pass. kernel:
 * "new" or "old" (LQ_CUDA_CHOLQR_KERNEL's values). median_us, when not NULL, gets the median
 * time of 25 further launches on the same input (device events around each launch).
 * LQ_EINVAL for a bad kernel name or n outside 1..LQ_CHOLQR_MAX_COLUMNS (160);
 * LQ_EUNSUPPORTED in a build without CUDA. */
int lq_cuda_cholqr_factor(struct lq_backend *gpu, const char *kernel, int n, int first, int invert,
                          double *matrix, int *failed, double *median_us, struct lq_error *err);

#endif
