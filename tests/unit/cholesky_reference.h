/* What the CholeskyQR kernel tests share (tests/unit/test_cholqr_emulation.c on the CPU,
 * tests/kernels/test_cuda_ops.c on the GPU): Gram matrices like CholeskyQR's, the textbook
 * Cholesky factorization and triangular inverse in double that the kernels are checked
 * against, and the error measure. Matrices are column-major n x n. */
#ifndef LQ_CHOLESKY_REFERENCE_H
#define LQ_CHOLESKY_REFERENCE_H

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"

/* G = XᵀX for a random (2n + 3) x n X whose columns have norms spread over 10^±2 (as a
 * sketch's do): symmetric positive definite, κ(G / diagonal scaling) small. Both triangles are
 * filled. */
static inline void cholesky_reference_gram(struct lq_rng *rng, int n, double *g) {
    const int rows = 2 * n + 3;
    double *x = malloc((size_t)rows * n * sizeof *x);
    for (int k = 0; k < n; k++) {
        const double scale = pow(10.0, 4.0 * lq_rng_uniform(rng) - 2.0);
        for (int i = 0; i < rows; i++) x[i + (size_t)k * rows] = scale * lq_rng_normal(rng);
    }
    for (int k = 0; k < n; k++)
        for (int i = k; i < n; i++) {
            double sum = 0.0;
            for (int r = 0; r < rows; r++) sum += x[r + (size_t)i * rows] * x[r + (size_t)k * rows];
            g[i + (size_t)k * n] = g[k + (size_t)i * n] = sum;
        }
    free(x);
}

/* G = XᵀX for a random 2n x n X whose column n − 1 is column 0 plus 1e-7 of noise: its
 * Cholesky pivot is ~1e-14 of its diagonal, below LQ_CHOLQR_PIVOT_FLOOR (1e-10). n >= 2. */
static inline void cholesky_reference_dependent_gram(struct lq_rng *rng, int n, double *g) {
    const int rows = 2 * n;
    double *x = malloc((size_t)rows * n * sizeof *x);
    for (size_t i = 0; i < (size_t)rows * n; i++) x[i] = lq_rng_normal(rng);
    for (int i = 0; i < rows; i++) x[i + (size_t)(n - 1) * rows] = x[i] + 1e-7 * lq_rng_normal(rng);
    for (int k = 0; k < n; k++)
        for (int i = 0; i < n; i++) {
            double sum = 0.0;
            for (int r = 0; r < rows; r++) sum += x[r + (size_t)i * rows] * x[r + (size_t)k * rows];
            g[i + (size_t)k * n] = sum;
        }
    free(x);
}

/* G = L·Lᵀ by the inner-product (Cholesky–Banachiewicz) form, l's upper triangle zero.
 * Returns 0, or -1 when a pivot is not positive. */
static inline int cholesky_reference_factor(const double *g, int n, double *l) {
    memset(l, 0, (size_t)n * n * sizeof *l);
    for (int i = 0; i < n; i++)
        for (int k = 0; k <= i; k++) {
            double sum = g[i + (size_t)k * n];
            for (int p = 0; p < k; p++) sum -= l[i + (size_t)p * n] * l[k + (size_t)p * n];
            if (i == k) {
                if (!(sum > 0.0)) return -1;
                l[i + (size_t)i * n] = sqrt(sum);
            } else {
                l[i + (size_t)k * n] = sum / l[k + (size_t)k * n];
            }
        }
    return 0;
}

/* X = L⁻¹ (lower, zeros above) by solving L·X = I a row at a time. */
static inline void cholesky_reference_inverse(const double *l, int n, double *x) {
    memset(x, 0, (size_t)n * n * sizeof *x);
    for (int c = 0; c < n; c++)
        for (int i = c; i < n; i++) {
            double sum = i == c ? 1.0 : 0.0;
            for (int p = c; p < i; p++) sum -= l[i + (size_t)p * n] * x[p + (size_t)c * n];
            x[i + (size_t)c * n] = sum / l[i + (size_t)i * n];
        }
}

/* The weight of element (i, k) of L (inverse 0) or of L⁻¹ (inverse 1) for G = D·Ĝ·D,
 * D = diag(√G_ii): L = D·L̂ and L⁻¹ = L̂⁻¹·D⁻¹, so weighting rows of L by D⁻¹ and columns of
 * L⁻¹ by D measures the error of the scale-free factor L̂ (Cholesky is exact under diagonal
 * scaling, so a column of norm 10⁻² is held to the same relative accuracy as one of 10²). */
static inline double cholesky_reference_weight(const double *g, int n, int i, int k, int inverse) {
    return inverse ? sqrt(g[k + (size_t)k * n]) : 1.0 / sqrt(g[i + (size_t)i * n]);
}

/* ‖W∘(a − b)‖_F / ‖W∘b‖_F over the lower triangle (with the diagonal), W the weights above
 * for the Gram matrix g; NaN or infinity anywhere gives +inf. */
static inline double cholesky_reference_error(const double *a, const double *b, const double *g,
                                              int n, int inverse) {
    double diff = 0.0, norm = 0.0;
    for (int k = 0; k < n; k++)
        for (int i = k; i < n; i++) {
            const double w = cholesky_reference_weight(g, n, i, k, inverse);
            const double x = w * a[i + (size_t)k * n], y = w * b[i + (size_t)k * n];
            if (!isfinite(x) || !isfinite(y)) return INFINITY;
            diff += (x - y) * (x - y), norm += y * y;
        }
    return norm > 0.0 ? sqrt(diff / norm) : sqrt(diff);
}

/* The error a backward-stable Cholesky and substitution may make, in the measure above:
 * ε·n·κ_F(L̂) with a margin of 8, κ_F(L̂) = ‖L̂‖_F·‖L̂⁻¹‖_F (an upper bound on κ₂(L̂), and the
 * forward errors of L̂ and L̂⁻¹ grow with κ(L̂) at most that fast). For the well-conditioned
 * Ĝ of cholesky_reference_gram this is ~1e-11 at n = 160; index errors are of order 1. */
static inline double cholesky_reference_tolerance(const double *g, const double *l,
                                                  const double *inverse, int n) {
    double a = 0.0, b = 0.0;
    for (int k = 0; k < n; k++)
        for (int i = k; i < n; i++) {
            const double x = cholesky_reference_weight(g, n, i, k, 0) * l[i + (size_t)k * n];
            const double y = cholesky_reference_weight(g, n, i, k, 1) * inverse[i + (size_t)k * n];
            a += x * x, b += y * y;
        }
    return 8.0 * 2.220446049250313e-16 * n * sqrt(a) * sqrt(b);
}

/* A test case: a random Gram matrix like CholeskyQR's (cholesky_reference_gram), its reference
 * factor L and L⁻¹, n x n column-major each; free with cholesky_reference_case_free. Returns
 * cholesky_reference_factor's result (0: positive definite). */
struct cholesky_reference_case {
    double *gram, *l, *inverse;
};

static inline int cholesky_reference_case_make(struct lq_rng *rng, int n,
                                               struct cholesky_reference_case *c) {
    const size_t count = (size_t)n * n;
    c->gram = malloc(count * sizeof(double));
    c->l = malloc(count * sizeof(double));
    c->inverse = malloc(count * sizeof(double));
    if (!c->gram || !c->l || !c->inverse) abort();
    cholesky_reference_gram(rng, n, c->gram);
    const int rc = cholesky_reference_factor(c->gram, n, c->l);
    cholesky_reference_inverse(c->l, n, c->inverse);
    return rc;
}

static inline void cholesky_reference_case_free(struct cholesky_reference_case *c) {
    free(c->gram), free(c->l), free(c->inverse);
}

#endif
