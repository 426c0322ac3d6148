/* The integer kernels (kernels/cpu/int_gemv.h): the AVX-512 kernel against the
 * portable one bit for bit (same recipe, every b0, block layouts shorter and longer than a run,
 * odd row counts, 1..64 tokens, row sub-ranges, the threaded entry point), batch invariance, and
 * both against the float64 product of the dequantized matrix within the error bound the recipe
 * implies (table rounding of each code plus rounding of each activation). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/nf.h"
#include "core/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/int_gemv.h"
#include "lq_test.h"

#define MAX_TOKENS 100

struct case_data {
    struct lq_nf_matrix m;
    float *dense; /* dequantized Q */
    float *x;     /* MAX_TOKENS tokens */
    void *buffer; /* the quantized activations */
    struct lq_int_activations a;
};

static int make_case(struct case_data *d, struct lq_nf_config config, size_t rows, size_t cols,
                     int n, uint64_t seed) {
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    float *a = malloc(rows * cols * sizeof *a);
    d->dense = malloc(rows * cols * sizeof *d->dense);
    d->x = malloc(MAX_TOKENS * cols * sizeof *d->x);
    d->buffer = aligned_alloc(64, (lq_int_activations_bytes(n, cols) + 63) / 64 * 64);
    if (!a || !d->dense || !d->x || !d->buffer) return -1;
    lq_rng_fill_normal(&rng, a, rows * cols);
    for (size_t r = 0; r < rows; r++) /* rows of very different magnitudes */
        for (size_t c = 0; c < cols; c++) a[r * cols + c] *= (float)(1 + r % 5) * 0.01f;
    lq_rng_fill_normal(&rng, d->x, MAX_TOKENS * cols);
    /* an outlier column and an all-zero run, as real activations have */
    for (int t = 0; t < MAX_TOKENS; t++) {
        d->x[(size_t)t * cols + cols / 2] *= 30.0f;
        if (cols >= 64) memset(d->x + (size_t)t * cols + 32, 0, 32 * sizeof(float));
    }
    struct lq_error err = {0};
    int rc = lq_nf_quantize(a, rows, cols, &config, &d->m, &err);
    free(a);
    if (rc) {
        fprintf(stderr, "quantize: %s\n", err.message);
        return rc;
    }
    lq_nf_dequantize(&d->m, d->dense);
    lq_int_activations_quantize(d->x, n, cols, lq_int_run_length(config.B0), LQ_INT_NF_UNIT,
                                d->buffer, &d->a);
    return 0;
}

static void free_case(struct case_data *d) {
    lq_nf_matrix_free(&d->m);
    free(d->dense), free(d->x), free(d->buffer);
}

/* |y - exact| may not exceed the sum over columns of the two roundings the recipe makes: the
 * code's table value to 1/8191 (half a step of its block's scale) and x to 1/16383 of its run's
 * largest value; plus the float roundings of the per-run scaling (1e-6 of the products' sum). */
static int within_bound(const struct case_data *d, size_t rows, size_t cols, int n, const float *y,
                        double *worst) {
    int ok = 1;
    const size_t run = (size_t)d->a.run, runs = cols / run;
    for (int t = 0; t < n; t++) {
        const float *x = d->x + (size_t)t * cols;
        for (size_t r = 0; r < rows; r++) {
            const float *w = d->dense + r * cols;
            double exact = 0, bound = 0, size = 0;
            for (size_t c = 0; c < cols; c++) {
                size_t flat = r * cols + c;
                double step_x = d->a.scale[(size_t)t * runs + c / run] * LQ_INT_NF_UNIT;
                double scale_w = lq_nf_block_scale(&d->m, flat / (size_t)d->m.config.B0);
                exact += (double)w[c] * x[c];
                size += fabs((double)w[c] * x[c]);
                bound += 0.5 / LQ_INT_NF_UNIT * scale_w * (fabs(x[c]) + 0.5 * step_x) +
                         fabs(w[c]) * 0.5 * step_x;
            }
            double error = fabs(y[(size_t)t * rows + r] - exact);
            if (bound > 0 && error / bound > *worst) *worst = error / bound;
            if (!(error <= bound + 1e-6 * size + 1e-30)) ok = 0;
        }
    }
    return ok;
}

static void check_case(struct lq_nf_config config, size_t rows, size_t cols, int n, uint64_t seed) {
    char name[64];
    lq_nf_config_format(&config, name, sizeof name);
    struct case_data d;
    memset(&d, 0, sizeof d);
    if (make_case(&d, config, rows, cols, n, seed)) {
        CHECK_MSG(0, "could not build %s %zux%zu", name, rows, cols);
        free_case(&d);
        return;
    }
    CHECK_MSG(lq_int_gemv_supports(&d.m), "%s %zux%zu should be supported", name, rows, cols);
    float *portable = malloc((size_t)n * rows * sizeof *portable);
    float *simd = malloc((size_t)n * rows * sizeof *simd);
    float *threaded = malloc((size_t)n * rows * sizeof *threaded);
    float *alone = malloc(rows * sizeof *alone);
    /* poison, so that a row a kernel forgets shows */
    for (size_t i = 0; i < (size_t)n * rows; i++) simd[i] = threaded[i] = NAN;
    lq_int_gemv_portable(&d.m, 0, rows, &d.a, portable, rows);
    lq_int_gemv_avx512(&d.m, 0, rows, &d.a, simd, rows);
    CHECK_MSG(!memcmp(portable, simd, (size_t)n * rows * sizeof *simd),
              "avx512 != portable: %s %zux%zu n=%d", name, rows, cols, n);
    /* the threaded entry points: the decode one up to 64 tokens, the linear layer (prefill)
     * beyond, where it runs the integer kernel when that is the default */
    int threaded_ran = 1;
    if (n <= LQ_NF_GEMV_MAX_TOKENS) {
        CHECK_OK(lq_cpu_quantized_gemv(&d.m, d.x, n, threaded, LQ_NF_GEMV_INT));
    } else if (lq_nf_gemv_default_kernel() == LQ_NF_GEMV_INT && lq_int_gemv_supports(&d.m)) {
        struct lq_linear layer = {.rows = (int)rows, .cols = (int)cols, .is_lq = 1, .q = d.m};
        CHECK_OK(lq_cpu_linear(NULL, &layer, d.x, n, threaded));
    } else {
        threaded_ran = 0;
    }
    CHECK_MSG(!threaded_ran || !memcmp(portable, threaded, (size_t)n * rows * sizeof *simd),
              "threaded int != portable: %s %zux%zu n=%d", name, rows, cols, n);
    /* a sub-range of rows gives the same rows */
    if (rows > 3) {
        size_t begin = 1, end = rows - 1;
        for (size_t i = 0; i < (size_t)n * rows; i++) simd[i] = NAN;
        lq_int_gemv_avx512(&d.m, begin, end, &d.a, simd, rows);
        int same = 1;
        for (int t = 0; t < n; t++)
            for (size_t r = begin; r < end; r++)
                same &= !memcmp(&simd[(size_t)t * rows + r], &portable[(size_t)t * rows + r], 4);
        CHECK_MSG(same, "row range differs: %s %zux%zu n=%d", name, rows, cols, n);
    }
    /* batch invariance: the last token quantized and multiplied alone */
    {
        struct case_data single = d;
        void *buffer = aligned_alloc(64, (lq_int_activations_bytes(1, cols) + 63) / 64 * 64);
        lq_int_activations_quantize(d.x + (size_t)(n - 1) * cols, 1, cols, d.a.run, LQ_INT_NF_UNIT,
                                    buffer, &single.a);
        lq_int_gemv_avx512(&d.m, 0, rows, &single.a, alone, rows);
        CHECK_MSG(!memcmp(alone, portable + (size_t)(n - 1) * rows, rows * sizeof *alone),
                  "token alone differs from the batch: %s n=%d", name, n);
        free(buffer);
    }
    double worst = 0;
    CHECK_MSG(within_bound(&d, rows, cols, n, portable, &worst),
              "beyond the rounding bound: %s %zux%zu n=%d (worst %.3g of the bound)", name, rows,
              cols, n, worst);
    free(portable), free(simd), free(threaded), free(alone);
    free_case(&d);
}

static void test_every_b0_and_token_count(void) {
    const int bits[] = {2, 3, 4};
    const int counts[] = {1, 2, 3, 4, 5, 7, 8, 13, 16, 33, 64, 100};
    for (int i = 0; i < 3; i++)
        for (size_t k = 0; k < sizeof counts / sizeof *counts; k++) {
            struct lq_nf_config c = {bits[i], 8, LQ_SCALE_FP32, 64, 256};
            check_case(c, 37, 576, counts[k], 100 + (uint64_t)(i * 100) + k);
        }
}

static void test_block_layouts(void) {
    const int bits[] = {2, 3, 4};
    const struct lq_nf_config layouts[] = {
        {0, 8, LQ_SCALE_FP32, 64, 256}, {0, 3, LQ_SCALE_BF16, 32, 16},
        {0, 2, LQ_SCALE_FP16, 16, 64},  {0, 4, LQ_SCALE_FP32, 8, 3},
        {0, 8, LQ_SCALE_FP16, 4, 7},    {0, 6, LQ_SCALE_BF16, 128, 5},
        {0, 5, LQ_SCALE_FP32, 2, 9},    {0, 7, LQ_SCALE_FP16, 96, 2},
    };
    const size_t widths[] = {32, 96, 128, 192, 1536};
    for (int i = 0; i < 3; i++)
        for (size_t l = 0; l < sizeof layouts / sizeof *layouts; l++)
            for (size_t w = 0; w < sizeof widths / sizeof *widths; w++) {
                struct lq_nf_config c = layouts[l];
                c.b0 = bits[i];
                if (widths[w] % (size_t)c.B0 && c.B0 >= LQ_INT_RUN) continue;
                check_case(c, 19, widths[w], 1 + (int)((l + w) % 6), 7000 + l * 10 + w);
            }
}

static void test_supports(void) {
    struct lq_nf_matrix m;
    memset(&m, 0, sizeof m);
    m.rows = 4;
    m.cols = 576;
    m.config = (struct lq_nf_config){3, 8, LQ_SCALE_FP32, 64, 256};
    CHECK(lq_int_gemv_supports(&m));
    m.config.B0 = 48; /* neither whole runs nor whole lanes */
    CHECK(!lq_int_gemv_supports(&m));
    m.config.B0 = 128; /* 576 is not a multiple: blocks would straddle rows */
    CHECK(!lq_int_gemv_supports(&m));
    m.config.B0 = 64;
    m.cols = 100; /* not whole runs */
    CHECK(!lq_int_gemv_supports(&m));
    m.cols = 576;
    m.config.b0 = 5;
    CHECK(!lq_int_gemv_supports(&m));
    m.config.b0 = 8; /* a 256-entry table: the exact kernels */
    CHECK(!lq_int_gemv_supports(&m));
}

/* x to half a step of 1/16383 of its run's largest value; the AVX-512 quantizer gives the
 * portable one's values (runs of 32 and 64, ties, zeros, outliers). */
static void test_activation_rounding(void) {
    enum { cols = 192, n = 3 };
    float x[n * cols];
    struct lq_rng rng;
    lq_rng_seed(&rng, 5);
    lq_rng_fill_normal(&rng, x, n * cols);
    memset(x + 64, 0, 64 * sizeof *x);                              /* zero runs */
    for (int k = 0; k < 32; k++) x[cols + k] = (float)(k - 16) / 2; /* ties once scaled */
    x[2 * cols + 5] = 1e4f;                                         /* an outlier */
    const size_t bytes = (lq_int_activations_bytes(n, cols) + 63) / 64 * 64;
    void *portable_buffer = aligned_alloc(64, bytes), *simd_buffer = aligned_alloc(64, bytes);
    for (int run = 32; run <= 64; run += 32) {
        struct lq_int_activations a, b;
        memset(portable_buffer, 0xa5, bytes);
        memset(simd_buffer, 0x5a, bytes);
        lq_int_activations_quantize(x, n, cols, run, LQ_INT_NF_UNIT, simd_buffer, &b);
        a = b; /* the same layout over the other buffer */
        a.q = (int16_t *)((uint8_t *)portable_buffer + ((uint8_t *)b.q - (uint8_t *)simd_buffer));
        a.scale =
            (float *)((uint8_t *)portable_buffer + ((uint8_t *)b.scale - (uint8_t *)simd_buffer));
        const size_t runs = (size_t)n * cols / (size_t)run;
        lq_int_activations_runs_portable(x, 0, runs, LQ_INT_NF_UNIT, &a);
        CHECK_MSG(!memcmp(a.q, b.q, (size_t)n * cols * sizeof *a.q) &&
                      !memcmp(a.scale, b.scale, runs * sizeof *a.scale),
                  "avx512 activations differ from the portable ones, run %d", run);
        int close = 1;
        for (size_t k = 0; k < runs; k++) {
            const float *in = x + k * (size_t)run;
            float absmax = 0;
            for (int i = 0; i < run; i++) absmax = fmaxf(absmax, fabsf(in[i]));
            close &= a.scale[k] == absmax / (16383.0f * 8191.0f);
            for (int i = 0; i < run; i++) {
                double back = (double)a.q[k * (size_t)run + (size_t)i] * absmax / 16383.0;
                close &= fabs(back - in[i]) <= 0.5 * absmax / 16383.0 * 1.001 + 1e-30;
            }
        }
        CHECK_MSG(close, "x is not carried to half a step, run %d", run);
    }
    free(portable_buffer), free(simd_buffer);
    /* the int16 tables: ends at -8191 and 8191, zero code at 0 */
    for (int b0 = 2; b0 <= 4; b0++) {
        const int16_t *t = lq_int_code_table(b0);
        CHECK(t[0] == -8191 && t[(1 << b0) - 1] == 8191 && t[(1 << (b0 - 1)) - 1] == 0);
    }
}

/* The int8 matrix (the int8 output head): AVX-512 = portable bit for bit, any token count; near
 * the float64 product within the recipe's rounding bound; the CPU head op gives the same bits
 * through its threaded path, and its many-token path (dequantized tiles) stays within the bound. */
static void test_int8_matrix(void) {
    const size_t rows = 45, cols = 320;
    struct lq_rng rng;
    lq_rng_seed(&rng, 77);
    float *w = malloc(rows * cols * sizeof *w), *x = malloc(80 * cols * sizeof *x);
    float *back = malloc(rows * cols * sizeof *back);
    float *portable = malloc(80 * rows * sizeof *portable),
          *simd = malloc(80 * rows * sizeof *simd);
    lq_rng_fill_normal(&rng, w, rows * cols);
    lq_rng_fill_normal(&rng, x, 80 * cols);
    for (size_t c = 0; c < cols; c++) w[7 * cols + c] = 0.0f; /* an all-zero row */
    struct lq_int8_matrix m;
    struct lq_error err = {0};
    CHECK_OK(lq_int8_matrix_quantize(w, rows, cols, 64, &m, &err));
    lq_int8_matrix_dequantize_rows(&m, 0, rows, back);
    int close = 1;
    for (size_t i = 0; i < rows * cols; i++)
        close &= fabsf(back[i] - w[i]) <= 0.5f * m.scales[i / (size_t)m.run] * 1.0001f;
    CHECK_MSG(close, "int8 matrix dequantizes beyond half a step");
    const int counts[] = {1, 2, 5, 64};
    for (int k = 0; k < 4; k++) {
        const int n = counts[k];
        void *buffer = aligned_alloc(64, (lq_int_activations_bytes(n, cols) + 63) / 64 * 64);
        struct lq_int_activations a;
        lq_int_activations_quantize(x, n, cols, m.run, LQ_INT_INT8_UNIT, buffer, &a);
        for (size_t i = 0; i < (size_t)n * rows; i++) simd[i] = NAN;
        lq_int8_matrix_gemv_portable(&m, 0, rows, &a, portable, rows);
        lq_int8_matrix_gemv_avx512(&m, 0, rows, &a, simd, rows);
        CHECK_MSG(!memcmp(portable, simd, (size_t)n * rows * sizeof *simd),
                  "int8 matrix: avx512 != portable, n=%d", n);
        int ok = 1;
        for (int t = 0; t < n; t++)
            for (size_t r = 0; r < rows; r++) {
                double exact = 0, bound = 0;
                for (size_t c = 0; c < cols; c++) {
                    double step_x = a.scale[(size_t)t * (cols / (size_t)m.run) + c / (size_t)m.run];
                    const float xc = x[(size_t)t * cols + c];
                    exact += (double)back[r * cols + c] * xc;
                    bound += fabs(back[r * cols + c]) * 0.5 * step_x;
                }
                ok &= fabs(portable[(size_t)t * rows + r] - exact) <= bound * 1.0001 + 1e-6;
            }
        CHECK_MSG(ok, "int8 matrix beyond the activation rounding bound, n=%d", n);
        free(buffer);
    }
    lq_int8_matrix_free(&m);
    /* the head op (runs of 32): up to 64 tokens the int kernel's bits, portable = AVX-512; beyond,
     * the product of the dequantized head (fp32 tiles) */
    CHECK_OK(lq_int8_matrix_quantize(w, rows, cols, 32, &m, &err));
    CHECK(m.run == 32);
    lq_int8_matrix_dequantize_rows(&m, 0, rows, back);
    struct lq_cpu_head *head = NULL;
    CHECK_OK(lq_cpu_head_create(w, (int)rows, (int)cols, LQ_CPU_HEAD_INT8, &head, &err));
    CHECK(lq_cpu_head_bytes(head) == rows * cols + rows * cols / 32 * sizeof(float));
    {
        void *buffer = aligned_alloc(64, (lq_int_activations_bytes(64, cols) + 63) / 64 * 64);
        struct lq_int_activations a;
        lq_int_activations_quantize(x, 64, cols, 32, LQ_INT_INT8_UNIT, buffer, &a);
        lq_int8_matrix_gemv_portable(&m, 0, rows, &a, portable, rows);
        free(buffer);
    }
    CHECK_OK(lq_cpu_head_matmul(head, x, 64, simd));
    CHECK_MSG(!memcmp(portable, simd, 64 * rows * sizeof *simd), "head op != int kernel");
    CHECK_OK(lq_cpu_head_matmul(head, x, 80, simd));
    int near = 1;
    for (int t = 0; t < 80; t++)
        for (size_t r = 0; r < rows; r++) {
            double exact = 0, size = 0;
            for (size_t c = 0; c < cols; c++) {
                exact += (double)back[r * cols + c] * x[(size_t)t * cols + c];
                size += fabs((double)back[r * cols + c] * x[(size_t)t * cols + c]);
            }
            near &= fabs(simd[(size_t)t * rows + r] - exact) <= 1e-5 * size + 1e-6;
        }
    CHECK_MSG(near, "head op with 80 tokens is not the product of the dequantized head");
    lq_cpu_head_free(head);
    lq_int8_matrix_free(&m);
    /* a small matrix in runs of 32 */
    CHECK_OK(lq_int8_matrix_quantize(w, 9, 96, 32, &m, &err));
    {
        void *buffer = aligned_alloc(64, (lq_int_activations_bytes(3, 96) + 63) / 64 * 64);
        struct lq_int_activations a;
        lq_int_activations_quantize(x, 3, 96, m.run, LQ_INT_INT8_UNIT, buffer, &a);
        lq_int8_matrix_gemv_portable(&m, 0, 9, &a, portable, 9);
        lq_int8_matrix_gemv_avx512(&m, 0, 9, &a, simd, 9);
        CHECK_MSG(!memcmp(portable, simd, 27 * sizeof *simd), "int8 matrix, runs of 32");
        free(buffer);
    }
    lq_int8_matrix_free(&m);
    CHECK(lq_int8_matrix_quantize(w, rows, 100, 32, &m, &err) == LQ_EINVAL);
    CHECK(lq_int8_matrix_quantize(w, rows, 96, 64, &m, &err) == LQ_EINVAL);
    w[3] = INFINITY;
    CHECK(lq_int8_matrix_quantize(w, rows, cols, 32, &m, &err) == LQ_ENUMERIC);
    free(w), free(x), free(back), free(portable), free(simd);
}

static void test_kernel_choice(void) {
    printf("avx512 integer kernel %s on this CPU; default decode kernel: %s\n",
           lq_int_gemv_avx512_supported() ? "runs" : "does not run (portable compared to itself)",
           lq_nf_gemv_kernel_name(lq_nf_gemv_default_kernel()));
    CHECK(lq_nf_gemv_default_kernel() == lq_nf_gemv_default_kernel());
}

LQ_TEST_MAIN(LQ_TEST(test_kernel_choice), LQ_TEST(test_supports), LQ_TEST(test_activation_rounding),
             LQ_TEST(test_every_b0_and_token_count), LQ_TEST(test_block_layouts),
             LQ_TEST(test_int8_matrix))
