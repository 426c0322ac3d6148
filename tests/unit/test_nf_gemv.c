/* The fused decode kernels (kernels/cpu/nf_gemv.h) against the tile path they replace and
 * against each other, on random NF matrices of every b0 and of block layouts that do and do not
 * line up with rows and with eight columns, odd shapes and 1..16 tokens, and up to the 64 tokens
 * a call may carry. The recipe is fixed
 * (no fused multiply-add, no reassociation), so the tolerance is zero: bit for bit. A float64
 * dot product checks that the shared recipe computes the right thing at all; a row's result for
 * a token must not depend on the other tokens of the call (batch invariance). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/nf.h"
#include "core/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/nf_gemv.h"
#include "lq_test.h"

#define MAX_TOKENS LQ_NF_GEMV_MAX_TOKENS

struct case_data {
    struct lq_nf_matrix m;
    float *dense; /* dequantized Q */
    float *x;     /* MAX_TOKENS tokens */
};

static int make_case(struct case_data *d, struct lq_nf_config config, size_t rows, size_t cols,
                     uint64_t seed) {
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    float *a = malloc(rows * cols * sizeof *a);
    d->dense = malloc(rows * cols * sizeof *d->dense);
    d->x = malloc(MAX_TOKENS * cols * sizeof *d->x);
    if (!a || !d->dense || !d->x) return -1;
    lq_rng_fill_normal(&rng, a, rows * cols);
    /* rows of very different magnitudes, so that block scales vary widely */
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < cols; c++) a[r * cols + c] *= (float)(1 + r % 5) * 0.01f;
    lq_rng_fill_normal(&rng, d->x, MAX_TOKENS * cols);
    struct lq_error err = {0};
    int rc = lq_nf_quantize(a, rows, cols, &config, &d->m, &err);
    free(a);
    if (rc) {
        fprintf(stderr, "quantize: %s\n", err.message);
        return rc;
    }
    lq_nf_dequantize(&d->m, d->dense);
    return 0;
}

static void free_case(struct case_data *d) {
    lq_nf_matrix_free(&d->m);
    free(d->dense), free(d->x);
}

static int same_bits(const float *a, const float *b, size_t count) {
    return memcmp(a, b, count * sizeof *a) == 0;
}

/* Every kernel, every n in `counts`: equal to the tile path, to each token run alone, to a
 * call on a sub-range of rows, and near the float64 product. */
static void check_case(struct lq_nf_config config, size_t rows, size_t cols, const int *counts,
                       int count_count, uint64_t seed) {
    char name[64];
    lq_nf_config_format(&config, name, sizeof name);
    struct case_data d;
    memset(&d, 0, sizeof d);
    if (make_case(&d, config, rows, cols, seed)) {
        CHECK_MSG(0, "could not build %s %zux%zu", name, rows, cols);
        free_case(&d);
        return;
    }
    float *tile = malloc(MAX_TOKENS * rows * sizeof *tile);
    float *got = malloc(MAX_TOKENS * rows * sizeof *got);
    float *alone = malloc(rows * sizeof *alone);
    const enum lq_nf_gemv_kernel kernels[] = {LQ_NF_GEMV_PORTABLE, LQ_NF_GEMV_AVX2};
    for (int ci = 0; ci < count_count; ci++) {
        const int n = counts[ci];
        CHECK_OK(lq_cpu_quantized_gemv(&d.m, d.x, n, tile, LQ_NF_GEMV_TILE));
        /* the recipe computes the dot product: within float32 rounding of float64 */
        for (int t = 0; t < n; t++)
            for (size_t r = 0; r < rows; r++) {
                double exact = 0.0, magnitude = 0.0;
                for (size_t c = 0; c < cols; c++) {
                    double p = (double)d.dense[r * cols + c] * (double)d.x[(size_t)t * cols + c];
                    exact += p;
                    magnitude += fabs(p);
                }
                CHECK_NEAR(tile[(size_t)t * rows + r], exact, 1e-6 * magnitude + 1e-30);
            }
        for (size_t k = 0; k < sizeof kernels / sizeof kernels[0]; k++) {
            memset(got, 0xff, MAX_TOKENS * rows * sizeof *got);
            CHECK_OK(lq_cpu_quantized_gemv(&d.m, d.x, n, got, kernels[k]));
            CHECK_MSG(same_bits(got, tile, (size_t)n * rows), "%s vs tile: %s %zux%zu n=%d",
                      lq_nf_gemv_kernel_name(kernels[k]), name, rows, cols, n);
            /* batch invariance: token t alone gives the bits it got among n */
            for (int t = 0; t < n; t++) {
                CHECK_OK(lq_cpu_quantized_gemv(&d.m, d.x + (size_t)t * cols, 1, alone, kernels[k]));
                CHECK_MSG(same_bits(alone, got + (size_t)t * rows, rows),
                          "%s token %d alone vs in %d: %s %zux%zu",
                          lq_nf_gemv_kernel_name(kernels[k]), t, n, name, rows, cols);
            }
            /* a thread's rows start anywhere: rows [rows/2, rows) on their own */
            size_t half = rows / 2;
            memset(got, 0xff, MAX_TOKENS * rows * sizeof *got);
            if (kernels[k] == LQ_NF_GEMV_AVX2)
                lq_nf_gemv_avx2(&d.m, half, rows, d.x, n, got, rows);
            else
                lq_nf_gemv_portable(&d.m, half, rows, d.x, n, got, rows);
            for (int t = 0; t < n; t++)
                CHECK_MSG(same_bits(got + (size_t)t * rows + half, tile + (size_t)t * rows + half,
                                    rows - half),
                          "%s rows from %zu: %s %zux%zu n=%d", lq_nf_gemv_kernel_name(kernels[k]),
                          half, name, rows, cols, n);
        }
    }
    free(tile), free(got), free(alone);
    free_case(&d);
}

static const int all_counts[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
static const int some_counts[] = {1, 3, 4, 8, 13, 16};
#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

static void test_every_b0_and_token_count(void) {
    const int bits[] = {2, 3, 4, 8};
    for (int i = 0; i < 4; i++) {
        struct lq_nf_config c = {bits[i], 8, LQ_SCALE_FP32, 64, 256};
        check_case(c, 17, 256, all_counts, COUNT(all_counts), 100 + (uint64_t)i);
        check_case(c, 3, 200, all_counts, COUNT(all_counts), 200 + (uint64_t)i);
    }
}

static void test_odd_shapes(void) {
    const int bits[] = {2, 3, 4, 8};
    const size_t shapes[][2] = {{1, 1}, {1, 7}, {3, 13}, {17, 67}, {1, 129}, {3, 8}, {17, 333}};
    for (int i = 0; i < 4; i++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            struct lq_nf_config c = {bits[i], 4, LQ_SCALE_FP16, 16, 4};
            check_case(c, shapes[s][0], shapes[s][1], some_counts, COUNT(some_counts),
                       300 + 17 * (uint64_t)i + s);
        }
}

/* Blocks that end inside eight columns (B0 not a multiple of 8, B0 below 8, B0 = 1) or span
 * several rows, every scale type, 1-bit to 8-bit scale codes, one-block groups. */
static void test_block_layouts(void) {
    const int bits[] = {2, 3, 4, 8};
    const struct lq_nf_config layouts[] = {
        {0, 8, LQ_SCALE_FP32, 64, 256}, {0, 3, LQ_SCALE_BF16, 32, 16},
        {0, 2, LQ_SCALE_FP16, 16, 64},  {0, 8, LQ_SCALE_FP32, 24, 3},
        {0, 5, LQ_SCALE_BF16, 5, 7},    {0, 1, LQ_SCALE_FP16, 1, 1},
        {0, 4, LQ_SCALE_FP32, 12, 1},   {0, 8, LQ_SCALE_BF16, 512, 2},
        {0, 6, LQ_SCALE_FP32, 100, 5},
    };
    for (int i = 0; i < 4; i++)
        for (size_t l = 0; l < sizeof layouts / sizeof layouts[0]; l++) {
            struct lq_nf_config c = layouts[l];
            c.b0 = bits[i];
            check_case(c, 17, 100, some_counts, COUNT(some_counts), 500 + 31 * (uint64_t)i + l);
            check_case(c, 3, 64, some_counts, COUNT(some_counts), 700 + 31 * (uint64_t)i + l);
        }
}

/* Enough rows that the thread pool splits them: the split must not change a bit. */
static void test_threaded_rows(void) {
    struct lq_nf_config c = LQ_NF_CONFIG_NF3;
    const int counts[] = {1, 8};
    check_case(c, 300, 576, counts, COUNT(counts), 900);
}

/* More than eight tokens: the AVX2 kernel decodes a span of a row once for every group of eight
 * tokens, with a span length that depends on the token count; a block of rows shares each span. */
static void test_many_tokens(void) {
    const int bits[] = {2, 3, 4, 8};
    const int counts[] = {9, 17, 24, 33, 63, 64};
    for (int i = 0; i < 4; i++) {
        struct lq_nf_config c = {bits[i], 8, LQ_SCALE_FP32, 64, 256};
        check_case(c, 19, 1000, counts, COUNT(counts), 1100 + (uint64_t)i);
        struct lq_nf_config odd = {bits[i], 5, LQ_SCALE_BF16, 24, 3};
        check_case(odd, 11, 200, counts, COUNT(counts), 1200 + (uint64_t)i);
    }
}

static void test_kernel_choice(void) {
    printf("avx2 %s on this CPU; default decode kernel: %s\n",
           lq_nf_gemv_avx2_supported() ? "runs" : "does not run",
           lq_nf_gemv_kernel_name(lq_nf_gemv_default_kernel()));
    CHECK(lq_nf_gemv_default_kernel() == lq_nf_gemv_default_kernel());
}

LQ_TEST_MAIN(LQ_TEST(test_kernel_choice), LQ_TEST(test_every_b0_and_token_count),
             LQ_TEST(test_odd_shapes), LQ_TEST(test_block_layouts), LQ_TEST(test_threaded_rows),
             LQ_TEST(test_many_tokens))
