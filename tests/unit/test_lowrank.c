/* The low-rank add y += (x · L2ᵀ) · L1ᵀ (kernels/cpu/lowrank_kernels.h) on random L1, L2, x of
 * the shapes a SmolLM2 LQ model and its adapters use, and odd ones (ranks and lengths that are
 * not multiples of 16, rows that end mid-block), for 1..16, 33 and 64 tokens, and 80 (the
 * OpenBLAS path). The AVX-512 kernel and the portable one must give the same bits; both must
 * follow the documented recipe, restated here independently; each token's result must not depend
 * on the other tokens of the call; y must accumulate; and the result must be the right one,
 * against a float64 reference. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/lowrank_kernels.h"
#include "lq_test.h"

#define MAX_N 80

struct shape {
    int rows, cols, rank;
};

static const struct shape shapes[] = {{576, 576, 16}, {192, 576, 16}, {1536, 576, 64},
                                      {37, 96, 16},   {5, 40, 3},     {576, 1536, 8}};
static const char *const names[] = {"portable", "AVX2", "AVX-512"};
static const int token_counts[] = {1,  2,  3,  4,  5,  6,  7,  8,  9, 10,
                                   11, 12, 13, 14, 15, 16, 33, 64, 80};

struct data {
    struct shape s;
    float *L1, *L2, *x, *y0; /* y0: y before the add, not zero */
};

static int make_data(struct data *d, struct shape s, uint64_t seed) {
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    d->s = s;
    d->L1 = malloc((size_t)s.rows * s.rank * sizeof *d->L1);
    d->L2 = malloc((size_t)s.rank * s.cols * sizeof *d->L2);
    d->x = malloc((size_t)MAX_N * s.cols * sizeof *d->x);
    d->y0 = malloc((size_t)MAX_N * s.rows * sizeof *d->y0);
    if (!d->L1 || !d->L2 || !d->x || !d->y0) return -1;
    lq_rng_fill_normal(&rng, d->L1, (size_t)s.rows * s.rank);
    lq_rng_fill_normal(&rng, d->L2, (size_t)s.rank * s.cols);
    lq_rng_fill_normal(&rng, d->x, (size_t)MAX_N * s.cols);
    lq_rng_fill_normal(&rng, d->y0, (size_t)MAX_N * s.rows);
    for (size_t i = 0; i < (size_t)s.rows * s.rank; i++) d->L1[i] *= 0.05f;
    for (size_t i = 0; i < (size_t)s.rank * s.cols; i++) d->L2[i] *= 0.05f;
    return 0;
}

static void free_data(struct data *d) {
    free(d->L1);
    free(d->L2);
    free(d->x);
    free(d->y0);
}

static float *copy_y(const struct data *d, int n) {
    float *y = malloc((size_t)n * d->s.rows * sizeof *y);
    if (y) memcpy(y, d->y0, (size_t)n * d->s.rows * sizeof *y);
    return y;
}

/* The recipe as lowrank_kernels.h words it, written out independently of lowrank_cpu.c. */
static float spec_dot(const float *w, const float *x, int len) {
    float l[16];
    for (int j = 0; j < 16; j++) l[j] = 0.0f;
    for (int c0 = 0; c0 < len; c0 += 16)
        for (int j = 0; j < 16; j++)
            l[j] = c0 + j < len ? fmaf(w[c0 + j], x[c0 + j], l[j]) : fmaf(0.0f, 0.0f, l[j]);
    float a = (l[0] + l[2]) + (l[1] + l[3]), b = (l[4] + l[6]) + (l[5] + l[7]);
    float c = (l[8] + l[10]) + (l[9] + l[11]), e = (l[12] + l[14]) + (l[13] + l[15]);
    return (a + b) + (c + e);
}

static void spec_add(const struct data *d, int n, float *y) {
    const struct shape s = d->s;
    float *t = malloc((size_t)n * s.rank * sizeof *t);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < s.rank; k++)
            t[i * s.rank + k] =
                spec_dot(d->L2 + (size_t)k * s.cols, d->x + (size_t)i * s.cols, s.cols);
    for (int i = 0; i < n; i++)
        for (int r = 0; r < s.rows; r++)
            y[(size_t)i * s.rows + r] +=
                spec_dot(d->L1 + (size_t)r * s.rank, t + i * s.rank, s.rank);
    free(t);
}

/* Elements whose bits differ. */
static size_t differing(const float *a, const float *b, size_t count) {
    size_t diff = 0;
    for (size_t i = 0; i < count; i++) diff += memcmp(a + i, b + i, sizeof *a) != 0;
    return diff;
}

/* |y - ref| against 1e-5 of the sum of magnitudes, |y0| + Σ_k |L1[r,k]| · Σ_c |x[c] L2[k,c]|
 * (a cancellation-proof scale for a relative error), in float64. Returns the worst ratio. */
static double worst_relative(const struct data *d, int n, const float *y) {
    const struct shape s = d->s;
    double worst = 0;
    double *t = malloc((size_t)s.rank * sizeof *t), *ta = malloc((size_t)s.rank * sizeof *ta);
    for (int i = 0; i < n; i++) {
        const float *xi = d->x + (size_t)i * s.cols;
        for (int k = 0; k < s.rank; k++) {
            double sum = 0, mag = 0;
            for (int c = 0; c < s.cols; c++) {
                double p = (double)d->L2[(size_t)k * s.cols + c] * xi[c];
                sum += p;
                mag += fabs(p);
            }
            t[k] = sum;
            ta[k] = mag;
        }
        for (int r = 0; r < s.rows; r++) {
            double ref = d->y0[(size_t)i * s.rows + r], mag = fabs(ref);
            for (int k = 0; k < s.rank; k++) {
                ref += (double)d->L1[(size_t)r * s.rank + k] * t[k];
                mag += fabs((double)d->L1[(size_t)r * s.rank + k]) * ta[k];
            }
            double ratio = fabs((double)y[(size_t)i * s.rows + r] - ref) / (mag > 0 ? mag : 1);
            if (ratio > worst) worst = ratio;
        }
    }
    free(t);
    free(ta);
    return worst;
}

static void test_kernels_agree(void) {
    for (int k = LQ_LOWRANK_AVX2; k <= LQ_LOWRANK_AVX512; k++)
        if (!lq_lowrank_kernel_supported(k))
            printf("  (no %s on this CPU: that kernel is not checked)\n", names[k]);
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        struct data d;
        CHECK(make_data(&d, shapes[si], 1000 + si) == 0);
        const struct shape s = d.s;
        for (size_t ni = 0; ni < sizeof token_counts / sizeof token_counts[0]; ni++) {
            const int n = token_counts[ni];
            const size_t count = (size_t)n * s.rows;
            float *api = copy_y(&d, n);
            CHECK_OK(lq_cpu_lowrank_add(NULL, d.L1, d.L2, s.rows, s.cols, s.rank, d.x, n, api));
            double rel = worst_relative(&d, n, api);
            CHECK_MSG(rel <= 1e-5, "%dx%d rank %d, %d tokens: relative error %g", s.rows, s.cols,
                      s.rank, n, rel);
            if (n <= LQ_LOWRANK_MAX_TOKENS) {
                float *portable = copy_y(&d, n), *spec = copy_y(&d, n);
                CHECK_OK(lq_lowrank_add_kernel(LQ_LOWRANK_PORTABLE, d.L1, d.L2, s.rows, s.cols,
                                               s.rank, d.x, n, portable));
                spec_add(&d, n, spec);
                CHECK_MSG(differing(portable, spec, count) == 0,
                          "%dx%d rank %d, %d tokens: portable kernel off the recipe in %zu", s.rows,
                          s.cols, s.rank, n, differing(portable, spec, count));
                CHECK_MSG(differing(api, portable, count) == 0,
                          "%dx%d rank %d, %d tokens: lq_cpu_lowrank_add != portable in %zu", s.rows,
                          s.cols, s.rank, n, differing(api, portable, count));
                CHECK(differing(api, d.y0, count) > 0); /* the add did something */
                for (int k = LQ_LOWRANK_AVX2; k <= LQ_LOWRANK_AVX512; k++) {
                    if (!lq_lowrank_kernel_supported(k)) continue;
                    float *fast = copy_y(&d, n);
                    CHECK_OK(
                        lq_lowrank_add_kernel(k, d.L1, d.L2, s.rows, s.cols, s.rank, d.x, n, fast));
                    CHECK_MSG(differing(fast, portable, count) == 0,
                              "%dx%d rank %d, %d tokens: %s != portable in %zu", s.rows, s.cols,
                              s.rank, n, names[k], differing(fast, portable, count));
                    free(fast);
                }
                free(portable);
                free(spec);
            }
            free(api);
        }
        free_data(&d);
    }
}

/* Each token alone (n = 1, its own y row) gives the bits it gets inside any batch. */
static void test_batch_invariance(void) {
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        struct data d;
        CHECK(make_data(&d, shapes[si], 2000 + si) == 0);
        const struct shape s = d.s;
        for (int kernel = LQ_LOWRANK_PORTABLE; kernel <= LQ_LOWRANK_AVX512; kernel++) {
            if (!lq_lowrank_kernel_supported(kernel)) continue;
            for (size_t ni = 0; ni < sizeof token_counts / sizeof token_counts[0]; ni++) {
                const int n = token_counts[ni];
                if (n > LQ_LOWRANK_MAX_TOKENS) continue;
                float *batch = copy_y(&d, n);
                CHECK_OK(lq_lowrank_add_kernel(kernel, d.L1, d.L2, s.rows, s.cols, s.rank, d.x, n,
                                               batch));
                size_t diff = 0;
                for (int i = 0; i < n; i++) {
                    float *alone = copy_y(&d, i + 1) + (size_t)i * s.rows; /* row i of y0 */
                    CHECK_OK(lq_lowrank_add_kernel(kernel, d.L1, d.L2, s.rows, s.cols, s.rank,
                                                   d.x + (size_t)i * s.cols, 1, alone));
                    diff += differing(alone, batch + (size_t)i * s.rows, s.rows);
                    free(alone - (size_t)i * s.rows);
                }
                CHECK_MSG(diff == 0, "%dx%d rank %d, %d tokens, %s: %zu differ alone", s.rows,
                          s.cols, s.rank, n, names[kernel], diff);
                free(batch);
            }
        }
        free_data(&d);
    }
}

/* The checks above can fail: another summation order (the row-wise kernel of the old path) is
 * told apart bit for bit, and a one-ulp change is seen. */
static void test_checks_can_fail(void) {
    struct data d;
    CHECK(make_data(&d, shapes[0], 3000) == 0);
    const struct shape s = d.s;
    const int n = 4;
    float *recipe = copy_y(&d, n), *rowwise = copy_y(&d, n);
    CHECK_OK(lq_lowrank_add_kernel(LQ_LOWRANK_PORTABLE, d.L1, d.L2, s.rows, s.cols, s.rank, d.x, n,
                                   recipe));
    float *t = malloc((size_t)n * s.rank * sizeof *t);
    lq_cpu_gemm_nt(n, s.rank, s.cols, d.x, d.L2, t, s.rank, 0.0f);
    lq_cpu_gemm_nt(n, s.rows, s.rank, t, d.L1, rowwise, s.rows, 1.0f);
    CHECK(differing(recipe, rowwise, (size_t)n * s.rows) > 0);
    CHECK(worst_relative(&d, n, rowwise) <= 1e-5); /* a right answer, by another order */
    recipe[7] = nextafterf(recipe[7], INFINITY);
    float *again = copy_y(&d, n);
    CHECK_OK(lq_lowrank_add_kernel(lq_lowrank_default_kernel(), d.L1, d.L2, s.rows, s.cols, s.rank,
                                   d.x, n, again));
    CHECK(differing(recipe, again, (size_t)n * s.rows) == 1);
    /* a wrong result is caught by the float64 reference */
    again[3] += 1e-2f;
    CHECK(worst_relative(&d, n, again) > 1e-5);
    CHECK(lq_lowrank_add_kernel(LQ_LOWRANK_PORTABLE, d.L1, d.L2, s.rows, s.cols, s.rank, d.x, 65,
                                again) == LQ_EINVAL);
    free(t);
    free(recipe);
    free(rowwise);
    free(again);
    free_data(&d);
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* Timing, only with LQ_LOWRANK_BENCH=1: ns per call, the old path (two lq_cpu_gemm_nt, the
 * row-wise kernel) against each kernel of the recipe. */
static void bench(void) {
    if (!getenv("LQ_LOWRANK_BENCH")) return;
    const struct shape bench_shapes[] = {
        {576, 576, 16}, {1536, 576, 16}, {576, 1536, 16}, {1536, 576, 64}};
    const int bench_n[] = {1, 4, 16};
    for (size_t si = 0; si < sizeof bench_shapes / sizeof bench_shapes[0]; si++) {
        struct data d;
        CHECK(make_data(&d, bench_shapes[si], 4000) == 0);
        const struct shape s = d.s;
        for (size_t ni = 0; ni < sizeof bench_n / sizeof bench_n[0]; ni++) {
            const int n = bench_n[ni];
            float *y = copy_y(&d, n), *t = malloc((size_t)n * s.rank * sizeof *t);
            const int reps = (int)(2e8 / ((double)n * s.rank * (s.rows + s.cols))) + 20;
            double best[4] = {1e30, 1e30, 1e30, 1e30};
            for (int round = 0; round < 5; round++)
                for (int which = 0; which < 4; which++) {
                    if (which > 0 && !lq_lowrank_kernel_supported(which - 1)) continue;
                    double start = now_ns();
                    for (int r = 0; r < reps; r++) {
                        if (which == 0) {
                            lq_cpu_gemm_nt(n, s.rank, s.cols, d.x, d.L2, t, s.rank, 0.0f);
                            lq_cpu_gemm_nt(n, s.rows, s.rank, t, d.L1, y, s.rows, 1.0f);
                        } else {
                            lq_lowrank_add_kernel(which - 1, d.L1, d.L2, s.rows, s.cols, s.rank,
                                                  d.x, n, y);
                        }
                    }
                    double ns = (now_ns() - start) / reps;
                    if (ns < best[which]) best[which] = ns;
                }
            printf("  rows %4d cols %4d rank %2d n %2d: old %7.0f  portable %7.0f  AVX2 %7.0f  "
                   "AVX-512 %7.0f ns\n",
                   s.rows, s.cols, s.rank, n, best[0], best[1], best[2], best[3]);
            free(y);
            free(t);
        }
        free_data(&d);
    }
}

LQ_TEST_MAIN(LQ_TEST(test_kernels_agree), LQ_TEST(test_batch_invariance),
             LQ_TEST(test_checks_can_fail), LQ_TEST(bench))
