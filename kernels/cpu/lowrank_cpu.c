/* The adapter ops of the CPU backend: a linear layer's shared part alone, and a low-rank term
 * added on top. lq_cpu_linear itself adds its own low-rank part with lq_cpu_lowrank_add, so
 * linear_base followed by lowrank_add of the layer's own pair is, row for row, the very
 * sequence of rounded operations linear performs: with the row-wise kernel (up to 64 rows) a
 * request's logits are the same bits whichever adapters its batch-mates use. */
#include <stdlib.h>

#include "kernels/cpu/cpu_ops.h"

int lq_cpu_linear_base(struct lq_backend *backend, const struct lq_linear *w, const float *x, int n,
                       float *y) {
    struct lq_linear base = *w; /* a shallow copy that only forgets the low-rank part */
    base.rank = 0;
    base.lora_A = base.lora_B = NULL;
    return lq_cpu_linear(backend, &base, x, n, y);
}

int lq_cpu_lowrank_add(struct lq_backend *backend, const float *L1, const float *L2, int rows,
                       int cols, int rank, const float *x, int n, float *y) {
    (void)backend;
    if (n < 0 || rows < 0 || cols < 0 || rank < 0) return LQ_EINVAL;
    if (n == 0 || rank == 0 || rows == 0) return LQ_OK;
    /* y += (x · L2ᵀ) · L1ᵀ: two thin products instead of a dense L1·L2 */
    float *t = malloc((size_t)n * (size_t)rank * sizeof *t);
    if (!t) return LQ_ENOMEM;
    lq_cpu_gemm_nt(n, rank, cols, x, L2, t, rank, 0.0f);
    lq_cpu_gemm_nt(n, rows, rank, t, L1, y, rows, 1.0f);
    free(t);
    return LQ_OK;
}
