#include "svd.h"

#include <cblas.h>
#include <lapacke.h>
#include <stdlib.h>
#include <string.h>

#include "rng.h"

void lq_svd_options_default(struct lq_svd_options *options) {
    options->method = LQ_SVD_AUTO;
    options->oversample = 10;
    options->power_iters = 2;
    options->seed = 0;
}

const char *lq_svd_method_name(enum lq_svd_method method) {
    switch (method) {
    case LQ_SVD_AUTO:
        return "auto";
    case LQ_SVD_EXACT:
        return "exact";
    case LQ_SVD_RANDOMIZED:
        return "randomized";
    }
    return "?";
}

int lq_svd_method_parse(const char *text, enum lq_svd_method *out, struct lq_error *err) {
    for (int m = LQ_SVD_AUTO; m <= LQ_SVD_RANDOMIZED; m++)
        if (strcmp(text, lq_svd_method_name((enum lq_svd_method)m)) == 0) {
            *out = (enum lq_svd_method)m;
            return LQ_OK;
        }
    return lq_error_set(err, LQ_EINVAL, "SVD method '%s': expected auto, exact or randomized",
                        text);
}

enum lq_svd_method lq_svd_resolve(size_t m, size_t n, int rank,
                                  const struct lq_svd_options *options) {
    if (options->method != LQ_SVD_AUTO) return options->method;
    size_t k = m < n ? m : n;
    size_t sketch = (size_t)rank + (size_t)(options->oversample > 0 ? options->oversample : 0);
    /* A sketch that is not much narrower than the matrix saves nothing, and below ~256 the
     * exact SVD costs microseconds: both cases take the exact, and more accurate, route. */
    if (k <= 256 || 2 * sketch >= k) return LQ_SVD_EXACT;
    return LQ_SVD_RANDOMIZED;
}

static int exact_svd(const float *a, size_t m, size_t n, int rank, float *u, float *s, float *vt,
                     struct lq_error *err) {
    size_t k = m < n ? m : n;
    float *copy = malloc(m * n * sizeof *copy);
    float *uk = malloc(m * k * sizeof *uk);
    float *sk = malloc(k * sizeof *sk);
    float *vk = malloc(k * n * sizeof *vk);
    int rc = LQ_OK;
    if (!copy || !uk || !sk || !vk) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory for the SVD of %zu x %zu", m, n);
        goto done;
    }
    memcpy(copy, a, m * n * sizeof *copy);
    lapack_int info = LAPACKE_sgesdd(LAPACK_ROW_MAJOR, 'S', (lapack_int)m, (lapack_int)n, copy,
                                     (lapack_int)n, sk, uk, (lapack_int)k, vk, (lapack_int)n);
    if (info != 0) {
        rc = lq_error_set(err, LQ_ESOLVER, "LAPACK sgesdd failed on %zu x %zu (info %d)", m, n,
                          (int)info);
        goto done;
    }
    for (size_t i = 0; i < m; i++) memcpy(u + i * rank, uk + i * k, (size_t)rank * sizeof *u);
    memcpy(s, sk, (size_t)rank * sizeof *s);
    memcpy(vt, vk, (size_t)rank * n * sizeof *vt);
done:
    free(copy), free(uk), free(sk), free(vk);
    return rc;
}

/* Replaces the columns of the rows x cols row-major matrix x by an orthonormal basis of
 * their span (Householder QR). */
static int orthonormalize(float *x, size_t rows, size_t cols, float *tau, struct lq_error *err) {
    lapack_int info = LAPACKE_sgeqrf(LAPACK_ROW_MAJOR, (lapack_int)rows, (lapack_int)cols, x,
                                     (lapack_int)cols, tau);
    if (info == 0)
        info = LAPACKE_sorgqr(LAPACK_ROW_MAJOR, (lapack_int)rows, (lapack_int)cols,
                              (lapack_int)cols, x, (lapack_int)cols, tau);
    if (info != 0)
        return lq_error_set(err, LQ_ESOLVER, "LAPACK QR of %zu x %zu failed (info %d)", rows, cols,
                            (int)info);
    return LQ_OK;
}

static int randomized_svd(const float *a, size_t m, size_t n, int rank,
                          const struct lq_svd_options *options, float *u, float *s, float *vt,
                          struct lq_error *err) {
    size_t k = m < n ? m : n;
    size_t q = (size_t)rank + (size_t)(options->oversample > 0 ? options->oversample : 0);
    if (q > k) q = k;
    float *omega = malloc(n * q * sizeof(float));
    float *y = malloc(m * q * sizeof(float)); /* range basis, m x q */
    float *z = malloc(n * q * sizeof(float)); /* co-range basis, n x q */
    float *b = malloc(q * n * sizeof(float)); /* projected matrix, q x n */
    float *ub = malloc(q * q * sizeof(float));
    float *sb = malloc(q * sizeof(float));
    float *vb = malloc(q * n * sizeof(float));
    float *tau = malloc(q * sizeof(float));
    int rc = LQ_OK;
    if (!omega || !y || !z || !b || !ub || !sb || !vb || !tau) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory for the SVD of %zu x %zu", m, n);
        goto done;
    }
    struct lq_rng rng;
    lq_rng_seed(&rng, options->seed);
    lq_rng_fill_normal(&rng, omega, n * q);

    const int M = (int)m, N = (int)n, Q = (int)q;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, Q, N, 1.0f, a, N, omega, Q, 0.0f, y,
                Q);
    if ((rc = orthonormalize(y, m, q, tau, err))) goto done;
    for (int it = 0; it < options->power_iters; it++) {
        /* Re-orthonormalizing between products keeps the small singular directions from
         * drowning in rounding error (Halko et al., Algorithm 4.4). */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, N, Q, M, 1.0f, a, N, y, Q, 0.0f, z, Q);
        if ((rc = orthonormalize(z, n, q, tau, err))) goto done;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, Q, N, 1.0f, a, N, z, Q, 0.0f, y,
                    Q);
        if ((rc = orthonormalize(y, m, q, tau, err))) goto done;
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Q, N, M, 1.0f, y, Q, a, N, 0.0f, b, N);
    lapack_int info = LAPACKE_sgesdd(LAPACK_ROW_MAJOR, 'S', Q, N, b, N, sb, ub, Q, vb, N);
    if (info != 0) {
        rc = lq_error_set(err, LQ_ESOLVER, "LAPACK sgesdd failed on the %zu x %zu sketch (info %d)",
                          q, n, (int)info);
        goto done;
    }
    /* u = y · ub[:, :rank] */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, rank, Q, 1.0f, y, Q, ub, Q, 0.0f, u,
                rank);
    memcpy(s, sb, (size_t)rank * sizeof *s);
    memcpy(vt, vb, (size_t)rank * n * sizeof *vt);
done:
    free(omega), free(y), free(z), free(b), free(ub), free(sb), free(vb), free(tau);
    return rc;
}

int lq_svd_truncated(const float *a, size_t m, size_t n, int rank,
                     const struct lq_svd_options *options, float *u, float *s, float *vt,
                     struct lq_error *err) {
    size_t k = m < n ? m : n;
    if (m == 0 || n == 0 || m > (size_t)INT32_MAX || n > (size_t)INT32_MAX)
        return lq_error_set(err, LQ_EINVAL, "SVD of a %zu x %zu matrix", m, n);
    if (rank < 1 || (size_t)rank > k)
        return lq_error_set(err, LQ_EINVAL, "rank %d: must be 1..%zu for a %zu x %zu matrix", rank,
                            k, m, n);
    if (options->oversample < 0 || options->power_iters < 0)
        return lq_error_set(err, LQ_EINVAL, "oversample and power iterations must be >= 0");
    if (lq_svd_resolve(m, n, rank, options) == LQ_SVD_EXACT)
        return exact_svd(a, m, n, rank, u, s, vt, err);
    return randomized_svd(a, m, n, rank, options, u, s, vt, err);
}
