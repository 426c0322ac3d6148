#include "core/rng.h"
#include "core/svd.h"
#include "tests/unit/lq_test.h"

#include <cblas.h>
#include <stdlib.h>

/* m x n matrix with singular values 0.9^k on random orthonormal-ish directions plus noise. */
static float *decaying_matrix(size_t m, size_t n, uint64_t seed) {
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    size_t k = 40;
    float *left = malloc(m * k * sizeof(float)), *right = malloc(k * n * sizeof(float));
    float *a = malloc(m * n * sizeof(float));
    lq_rng_fill_normal(&rng, left, m * k);
    lq_rng_fill_normal(&rng, right, k * n);
    for (size_t j = 0; j < k; j++) {
        float scale = powf(0.8f, (float)j);
        for (size_t i = 0; i < m; i++) left[i * k + j] *= scale;
    }
    lq_rng_fill_normal(&rng, a, m * n);
    for (size_t i = 0; i < m * n; i++) a[i] *= 0.01f;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)k, 1.0f, left,
                (int)k, right, (int)n, 1.0f, a, (int)n);
    free(left), free(right);
    return a;
}

static double residual_norm(const float *a, size_t m, size_t n, int r, const float *u,
                            const float *s, const float *vt) {
    double sum = 0;
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j++) {
            double x = a[i * n + j];
            for (int k = 0; k < r; k++) x -= (double)u[i * r + k] * s[k] * vt[k * n + j];
            sum += x * x;
        }
    return sqrt(sum);
}

static void test_randomized_matches_exact(void) {
    size_t m = 600, n = 400;
    int r = 12;
    float *a = decaying_matrix(m, n, 1);
    float *u1 = malloc(m * r * sizeof(float)), *s1 = malloc(r * sizeof(float)),
          *v1 = malloc(r * n * sizeof(float));
    float *u2 = malloc(m * r * sizeof(float)), *s2 = malloc(r * sizeof(float)),
          *v2 = malloc(r * n * sizeof(float));
    struct lq_svd_options exact, randomized;
    lq_svd_options_default(&exact);
    exact.method = LQ_SVD_EXACT;
    lq_svd_options_default(&randomized);
    randomized.method = LQ_SVD_RANDOMIZED;
    CHECK(lq_svd_truncated(a, m, n, r, &exact, u1, s1, v1, NULL) == 0);
    CHECK(lq_svd_truncated(a, m, n, r, &randomized, u2, s2, v2, NULL) == 0);
    for (int k = 0; k < r; k++) {
        CHECK_MSG(fabsf(s1[k] - s2[k]) <= 1e-3f * s1[0], "sigma %d: %g vs %g", k, s1[k], s2[k]);
        if (k) CHECK(s1[k] <= s1[k - 1] && s2[k] <= s2[k - 1]);
    }
    /* Eckart-Young: the exact truncation is optimal, the randomized one within 1% of it */
    double best = residual_norm(a, m, n, r, u1, s1, v1);
    double sketch = residual_norm(a, m, n, r, u2, s2, v2);
    CHECK_MSG(sketch <= best * 1.01 && sketch >= best * (1 - 1e-4), "%g vs %g", sketch, best);
    /* orthonormal columns of U */
    for (int p = 0; p < r; p++)
        for (int q = 0; q < r; q++) {
            double dot = 0;
            for (size_t i = 0; i < m; i++) dot += (double)u2[i * r + p] * u2[i * r + q];
            CHECK_NEAR(dot, p == q ? 1.0 : 0.0, 1e-4);
        }
    /* same seed, same factors; another seed, other rounding */
    float *u3 = malloc(m * r * sizeof(float));
    CHECK(lq_svd_truncated(a, m, n, r, &randomized, u3, s2, v2, NULL) == 0);
    CHECK(memcmp(u2, u3, m * r * sizeof(float)) == 0);
    free(a), free(u1), free(s1), free(v1), free(u2), free(s2), free(v2), free(u3);
}

static void test_auto_and_bounds(void) {
    struct lq_svd_options o;
    lq_svd_options_default(&o);
    CHECK(lq_svd_resolve(64, 172, 8, &o) == LQ_SVD_EXACT);
    CHECK(lq_svd_resolve(4096, 4096, 64, &o) == LQ_SVD_RANDOMIZED);
    CHECK(lq_svd_resolve(4096, 100, 64, &o) == LQ_SVD_EXACT);
    float a[6] = {1, 2, 3, 4, 5, 6}, u[6], s[3], vt[9];
    struct lq_error err = {0};
    CHECK(lq_svd_truncated(a, 2, 3, 3, &o, u, s, vt, &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "rank 3") != NULL);
    CHECK(lq_svd_truncated(a, 2, 3, 0, &o, u, s, vt, &err) == LQ_EINVAL);
    CHECK(lq_svd_truncated(a, 2, 3, 2, &o, u, s, vt, &err) == 0);
    CHECK_NEAR(s[0], 9.508032, 1e-4); /* singular values of [[1,2,3],[4,5,6]] */
    CHECK_NEAR(s[1], 0.7728696, 1e-4);
    enum lq_svd_method method;
    CHECK(lq_svd_method_parse("randomized", &method, NULL) == 0 && method == LQ_SVD_RANDOMIZED);
    CHECK(lq_svd_method_parse("fast", &method, &err) == LQ_EINVAL);
}

LQ_TEST_MAIN(LQ_TEST(test_randomized_matches_exact), LQ_TEST(test_auto_and_bounds))
