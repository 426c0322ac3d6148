/* Truncated SVD of a row-major float matrix: randomized (Halko, Martinsson & Tropp 2011:
 * Gaussian sketch with oversampling, power iterations with re-orthonormalization, exact SVD
 * of the small projected matrix) or exact (LAPACK gesdd), on OpenBLAS/LAPACKE. */
#ifndef LQ_SVD_H
#define LQ_SVD_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

enum lq_svd_method {
    LQ_SVD_AUTO, /* exact for small matrices, randomized otherwise */
    LQ_SVD_EXACT,
    LQ_SVD_RANDOMIZED,
};

struct lq_svd_options {
    enum lq_svd_method method;
    int oversample;  /* extra sketch columns beyond the rank (reference: 10) */
    int power_iters; /* subspace iterations (reference: 2) */
    uint64_t seed;   /* the Gaussian sketch; same seed, same factors */
};

void lq_svd_options_default(struct lq_svd_options *options);
const char *lq_svd_method_name(enum lq_svd_method method);
int lq_svd_method_parse(const char *text, enum lq_svd_method *out, struct lq_error *err);

/* Rank-`rank` truncated SVD of the m x n row-major matrix a: u (m x rank, row-major),
 * s (rank, descending), vt (rank x n, row-major), all caller-allocated. rank must be
 * 1..min(m, n). Deterministic for a given seed and OpenBLAS thread count. */
int lq_svd_truncated(const float *a, size_t m, size_t n, int rank,
                     const struct lq_svd_options *options, float *u, float *s, float *vt,
                     struct lq_error *err);

/* Which method AUTO picks for this shape and rank. */
enum lq_svd_method lq_svd_resolve(size_t m, size_t n, int rank,
                                  const struct lq_svd_options *options);

#endif
