/* Test matrices for symmetric eigensolvers and the check of a solution, shared by the host
 * transcription of the Jacobi kernel (tests/unit/test_jacobi_order.c) and the kernel on the
 * GPU (tests/kernels/test_cuda_eig.c). Matrices are full n x n, column-major. Include after
 * tests/unit/lq_test.h. */
#ifndef LQ_EIG_CHECK_H
#define LQ_EIG_CHECK_H

#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"

/* The sizes both tests solve: tiny, the decomposition's sketch (74), odd, and the largest the
 * kernel's shared memory holds on an H100 (138). */
static const int eig_check_sizes[] = {1, 2, 3, 17, 74, 75, 128, 138};
#define EIG_CHECK_SIZE_COUNT (int)(sizeof eig_check_sizes / sizeof eig_check_sizes[0])

static double *eig_check_random(struct lq_rng *rng, int n) {
    double *a = malloc((size_t)n * n * sizeof(double));
    if (!a) abort();
    for (int c = 0; c < n; c++)
        for (int r = c; r < n; r++)
            a[r + (size_t)c * n] = a[c + (size_t)r * n] = lq_rng_normal(rng);
    return a;
}

/* Q·diag(values)·Qᵀ with Q orthonormal (QR of a Gaussian matrix), exactly symmetric. */
static double *eig_check_with_eigenvalues(struct lq_rng *rng, int n, const double *values) {
    double *q = malloc((size_t)n * n * sizeof(double)), *tau = malloc((size_t)n * sizeof(double));
    double *a = calloc((size_t)n * n, sizeof(double));
    if (!q || !tau || !a) abort();
    for (size_t k = 0; k < (size_t)n * n; k++) q[k] = lq_rng_normal(rng);
    CHECK(LAPACKE_dgeqrf(LAPACK_COL_MAJOR, n, n, q, n, tau) == 0);
    CHECK(LAPACKE_dorgqr(LAPACK_COL_MAJOR, n, n, n, q, n, tau) == 0);
    for (int r = 0; r < n; r++)
        for (int c = 0; c <= r; c++) {
            double sum = 0.0;
            for (int k = 0; k < n; k++)
                sum += q[r + (size_t)k * n] * values[k] * q[c + (size_t)k * n];
            a[r + (size_t)c * n] = a[c + (size_t)r * n] = sum;
        }
    free(q), free(tau);
    return a;
}

/* Three clusters of exactly repeated eigenvalues (−1, 0, 1). */
static double *eig_check_repeated(struct lq_rng *rng, int n) {
    double *values = malloc((size_t)n * sizeof(double));
    if (!values) abort();
    for (int k = 0; k < n; k++) values[k] = (double)(k % 3) - 1.0;
    double *a = eig_check_with_eigenvalues(rng, n, values);
    free(values);
    return a;
}

/* A Gram matrix B·Bᵀ as the randomized SVD forms, singular values of B from 1 down to 1e-6:
 * condition 1e12. */
static double *eig_check_gram(struct lq_rng *rng, int n) {
    double *values = malloc((size_t)n * sizeof(double));
    if (!values) abort();
    for (int k = 0; k < n; k++) {
        const double sigma = pow(1e-6, n > 1 ? (double)k / (n - 1) : 0.0);
        values[k] = sigma * sigma;
    }
    double *a = eig_check_with_eigenvalues(rng, n, values);
    free(values);
    return a;
}

/* Row and column `index` set to 0. */
static void eig_check_zero_row(double *a, int n, int index) {
    for (int k = 0; k < n; k++) a[index + (size_t)k * n] = a[k + (size_t)index * n] = 0.0;
}

/* A diagonal matrix with unsorted entries. */
static double *eig_check_diagonal(struct lq_rng *rng, int n) {
    double *a = calloc((size_t)n * n, sizeof(double));
    if (!a) abort();
    for (int k = 0; k < n; k++) a[k + (size_t)k * n] = lq_rng_normal(rng);
    return a;
}

/* Checks a solution of a: lambda ascending and within 1e-12·‖A‖ of ref_lambda, ‖A·V − V·Λ‖ <=
 * 1e-12·‖A‖·n and ‖VᵀV − I‖ <= 1e-12·n (Frobenius norms; v column k for lambda[k]). The norms
 * are taken in units of the largest entry, so that 1e±200 matrices neither under- nor
 * overflow. Prints the figures when LQ_TEST_VERBOSE is set; returns whether it passed. */
static int eig_check_solution(const char *what, const double *a, int n, const double *lambda,
                              const double *v, const double *ref_lambda, const char *note) {
    double unit = 0.0;
    for (size_t k = 0; k < (size_t)n * n; k++) unit = fmax(unit, fabs(a[k]));
    if (unit == 0.0) unit = 1.0;
    double norm = 0.0, worst_value = 0.0, residual = 0.0, orthogonality = 0.0;
    for (size_t k = 0; k < (size_t)n * n; k++) norm += (a[k] / unit) * (a[k] / unit);
    norm = sqrt(norm);
    int ascending = 1;
    for (int k = 0; k < n; k++) {
        worst_value = fmax(worst_value, fabs(lambda[k] / unit - ref_lambda[k] / unit));
        if (k > 0 && !(lambda[k - 1] <= lambda[k])) ascending = 0;
        if (isnan(lambda[k])) worst_value = NAN;
    }
    for (int k = 0; k < n; k++)
        for (int r = 0; r < n; r++) {
            double av = 0.0;
            for (int c = 0; c < n; c++) av += a[r + (size_t)c * n] / unit * v[c + (size_t)k * n];
            const double d = av - lambda[k] / unit * v[r + (size_t)k * n];
            residual += d * d;
        }
    for (int k = 0; k < n; k++)
        for (int l = 0; l < n; l++) {
            double dot = 0.0;
            for (int r = 0; r < n; r++) dot += v[r + (size_t)k * n] * v[r + (size_t)l * n];
            const double d = dot - (k == l);
            orthogonality += d * d;
        }
    residual = sqrt(residual), orthogonality = sqrt(orthogonality);
    const int before = lq_test_failures;
    CHECK_MSG(ascending, "%s n = %d: eigenvalues not ascending", what, n);
    CHECK_MSG(worst_value <= 1e-12 * norm, "%s n = %d: eigenvalue off by %g (||A|| %g)", what, n,
              worst_value, norm);
    CHECK_MSG(residual <= 1e-12 * norm * n, "%s n = %d: ||AV - VL|| = %g (||A|| %g)", what, n,
              residual, norm);
    CHECK_MSG(orthogonality <= 1e-12 * n, "%s n = %d: ||VtV - I|| = %g", what, n, orthogonality);
    if (getenv("LQ_TEST_VERBOSE"))
        printf("  %-10s n = %3d: %s, eigenvalues %.2e, residual %.2e, orthogonality %.2e "
               "(relative to ||A|| %.3g)\n",
               what, n, note, worst_value / (norm > 0 ? norm : 1), residual / (norm > 0 ? norm : 1),
               orthogonality, norm);
    return lq_test_failures == before;
}

/* The awkward matrices, each size of eig_check_sizes through `check` (solve and check one
 * matrix): repeated eigenvalues, a zero row, a diagonal matrix, a Gram matrix of condition
 * 1e12, and a random one scaled by 1e-200 and by 1e+200 (the solver's power-of-two scaling
 * must keep the squared norms finite and nonzero). */
static inline void eig_check_awkward(struct lq_rng *rng,
                                     void (*check)(const char *what, const double *a, int n)) {
    for (int i = 0; i < EIG_CHECK_SIZE_COUNT; i++) {
        const int n = eig_check_sizes[i];
        double *a = eig_check_repeated(rng, n);
        check("repeated", a, n);
        eig_check_zero_row(a, n, n / 2);
        check("zero row", a, n);
        free(a);
        a = eig_check_diagonal(rng, n);
        check("diagonal", a, n);
        free(a);
        a = eig_check_gram(rng, n);
        check("gram 1e12", a, n);
        free(a);
        a = eig_check_random(rng, n);
        for (size_t k = 0; k < (size_t)n * n; k++) a[k] *= 1e-200;
        check("tiny", a, n);
        for (size_t k = 0; k < (size_t)n * n; k++) a[k] = a[k] * 1e200 * 1e200;
        check("huge", a, n);
        free(a);
    }
}

/* A NaN, an infinity and a negative infinity in the lower triangle of a 5 x 5 matrix: `solve`
 * (a, n, lambda, v; returns the solver's info) must answer `not_finite` and leave every output
 * NaN. */
static inline void eig_check_not_finite(int (*solve)(const double *a, int n, double *lambda,
                                                     double *v),
                                        int not_finite) {
    const int n = 5;
    const double bad[3] = {NAN, INFINITY, -INFINITY};
    double a[25], lambda[5], v[25];
    for (int b = 0; b < 3; b++) {
        for (int k = 0; k < 25; k++) a[k] = 1.0;
        a[3 + 1 * n] = bad[b];
        CHECK_MSG(solve(a, n, lambda, v) == not_finite, "entry %g: not reported", bad[b]);
        for (int k = 0; k < n; k++) CHECK(isnan(lambda[k]));
        for (int k = 0; k < 25; k++) CHECK(isnan(v[k]));
    }
}

#endif
