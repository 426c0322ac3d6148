/* The bf16 output-head kernels (kernels/cpu/bf16_gemv.h) and the CPU backend's head ops
 * (LQ_CPU_HEAD=bf16): the portable and AVX2 kernels give the same bits (one fixed recipe, no
 * fused multiply-add) on odd shapes, 1..64 tokens and row sub-ranges; a token's result does
 * not depend on the other tokens of the call; a float64 dot product of the bf16-rounded
 * weights checks the recipe computes the right thing; the backend's head_matmul (gemv and,
 * past 64 tokens, widened tiles through OpenBLAS) matches it too, and the fp32 default keeps
 * no copy. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/half.h"
#include "core/rng.h"
#include "kernels/backend.h"
#include "kernels/cpu/bf16_gemv.h"
#include "kernels/cpu/cpu_ops.h"
#include "lq_test.h"

struct head_case {
    size_t rows, cols;
    int n;
    float *w;    /* fp32 head */
    uint16_t *b; /* its bf16 rounding */
    float *x;    /* n tokens */
};

static int make_case(struct head_case *d, size_t rows, size_t cols, int n, uint64_t seed) {
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    d->rows = rows, d->cols = cols, d->n = n;
    d->w = malloc(rows * cols * sizeof *d->w);
    d->b = malloc(rows * cols * sizeof *d->b);
    d->x = malloc((size_t)n * cols * sizeof *d->x);
    if (!d->w || !d->b || !d->x) return -1;
    lq_rng_fill_normal(&rng, d->w, rows * cols);
    lq_rng_fill_normal(&rng, d->x, (size_t)n * cols);
    for (size_t i = 0; i < rows * cols; i++) {
        d->w[i] *= (float)(1 + i % 7) * 0.02f; /* rows of different magnitudes */
        d->b[i] = lq_float_to_bf16(d->w[i]);
    }
    return 0;
}

static void free_case(struct head_case *d) {
    free(d->w), free(d->b), free(d->x);
}

/* float64 dot of the bf16 weights, and the sum of |products| for a rounding bound. */
static double reference_dot(const struct head_case *d, size_t r, int t, double *magnitude) {
    double sum = 0, abs_sum = 0;
    for (size_t c = 0; c < d->cols; c++) {
        double p = (double)lq_bf16_to_float(d->b[r * d->cols + c]) * d->x[(size_t)t * d->cols + c];
        sum += p, abs_sum += fabs(p);
    }
    *magnitude = abs_sum;
    return sum;
}

static const size_t shapes[][2] = {{1, 1},   {3, 7},  {5, 8},    {9, 9},   {17, 15},
                                   {33, 64}, {7, 65}, {31, 579}, {64, 576}};
static const int token_counts[] = {1, 2, 3, 5, 7, 64};

static void test_kernels_agree_bit_for_bit(void) {
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t k = 0; k < sizeof token_counts / sizeof token_counts[0]; k++) {
            struct head_case d;
            int n = token_counts[k];
            CHECK(make_case(&d, shapes[s][0], shapes[s][1], n, 100 + s * 10 + k) == 0);
            size_t out = (size_t)n * d.rows;
            float *portable = malloc(out * sizeof *portable), *avx2 = malloc(out * sizeof *avx2);
            float *single = malloc(d.rows * sizeof *single);
            lq_bf16_gemv_portable(d.b, d.cols, 0, d.rows, d.x, n, portable, d.rows);
            lq_bf16_gemv_avx2(d.b, d.cols, 0, d.rows, d.x, n, avx2, d.rows);
            CHECK_MSG(memcmp(portable, avx2, out * sizeof *avx2) == 0, "%zu x %zu, %d tokens",
                      d.rows, d.cols, n);
            double worst = 0;
            for (int t = 0; t < n; t++) {
                /* batch invariance: token t alone gives the same bits */
                lq_bf16_gemv_avx2(d.b, d.cols, 0, d.rows, d.x + (size_t)t * d.cols, 1, single,
                                  d.rows);
                CHECK(memcmp(single, avx2 + (size_t)t * d.rows, d.rows * sizeof *single) == 0);
                for (size_t r = 0; r < d.rows; r++) {
                    double magnitude, ref = reference_dot(&d, r, t, &magnitude);
                    double error = fabs(avx2[(size_t)t * d.rows + r] - ref);
                    /* float accumulation: at most ~cols ulps of the magnitude */
                    double bound = (double)(d.cols + 2) * 6e-8 * magnitude + 1e-30;
                    if (error / bound > worst) worst = error / bound;
                }
            }
            CHECK_MSG(worst <= 1.0, "%zu x %zu, %d tokens: error %.3g of the bound", d.rows, d.cols,
                      n, worst);
            free(portable), free(avx2), free(single), free_case(&d);
        }
}

static void test_row_ranges(void) {
    struct head_case d;
    CHECK(make_case(&d, 41, 23, 3, 7) == 0);
    float *whole = malloc(3 * d.rows * sizeof *whole), *parts = malloc(3 * d.rows * sizeof *parts);
    lq_bf16_gemv_avx2(d.b, d.cols, 0, d.rows, d.x, 3, whole, d.rows);
    for (size_t i = 0; i < 3 * d.rows; i++) parts[i] = NAN;
    size_t cuts[] = {0, 1, 2, 13, 40, 41};
    for (int i = 0; i + 1 < 6; i++)
        (i % 2 ? lq_bf16_gemv_portable : lq_bf16_gemv_avx2)(d.b, d.cols, cuts[i], cuts[i + 1], d.x,
                                                            3, parts, d.rows);
    CHECK(memcmp(whole, parts, 3 * d.rows * sizeof *whole) == 0);
    free(whole), free(parts), free_case(&d);
}

/* The backend's head ops with LQ_CPU_HEAD=bf16: head_matmul equals the kernel up to 64 tokens
 * and the float64 reference beyond (OpenBLAS on widened tiles); memory() counts the copy. */
static void test_backend_head(void) {
    struct lq_backend *plain, *bf16;
    struct lq_error err = {0};
    unsetenv("LQ_CPU_HEAD");
    CHECK_OK(lq_backend_cpu_create(&plain, &err));
    setenv("LQ_CPU_HEAD", "bf16", 1);
    CHECK_OK(lq_backend_cpu_create(&bf16, &err));
    unsetenv("LQ_CPU_HEAD");

    struct head_case d;
    const int n = 70;
    CHECK(make_case(&d, 301, 77, n, 11) == 0);
    void *head = (void *)1;
    CHECK_OK(plain->ops->head_prepare(plain, d.w, (int)d.rows, (int)d.cols, 0, &head, &err));
    CHECK(head == NULL); /* the default (auto) keeps a dense model's fp32 head: matmul */
    CHECK_OK(plain->ops->head_prepare(plain, d.w, (int)d.rows, (int)d.cols, 1, &head, &err));
    CHECK(head == NULL); /* and an LQ model's too when rows are not runs of 32 (77 columns) */
    CHECK_OK(bf16->ops->head_prepare(bf16, d.w, (int)d.rows, (int)d.cols, 0, &head, &err));
    CHECK(head != NULL);
    struct lq_backend_memory memory;
    bf16->ops->memory(bf16, &memory);
    CHECK(memory.weights == d.rows * d.cols * sizeof(uint16_t));

    float *y = malloc((size_t)n * d.rows * sizeof *y), *kernel = malloc(8 * d.rows * sizeof *y);
    static const int calls[] = {1, 9, 64, 65, n};
    for (size_t call = 0; call < sizeof calls / sizeof calls[0]; call++) {
        int tokens = calls[call];
        CHECK_OK(bf16->ops->head_matmul(bf16, head, d.x, tokens, y));
        if (tokens <= LQ_BF16_GEMV_MAX_TOKENS) {
            int first = tokens < 8 ? tokens : 8;
            lq_bf16_gemv_portable(d.b, d.cols, 0, d.rows, d.x, first, kernel, d.rows);
            CHECK(memcmp(kernel, y, (size_t)first * d.rows * sizeof *y) == 0);
        }
        double worst = 0;
        for (int t = 0; t < tokens; t++)
            for (size_t r = 0; r < d.rows; r++) {
                double magnitude, ref = reference_dot(&d, r, t, &magnitude);
                double bound = (double)(d.cols + 2) * 6e-8 * magnitude + 1e-30;
                double e = fabs(y[(size_t)t * d.rows + r] - ref) / bound;
                if (e > worst) worst = e;
            }
        CHECK_MSG(worst <= 1.0, "%d tokens: error %.3g of the bound", tokens, worst);
    }
    bf16->ops->head_release(bf16, head);
    bf16->ops->memory(bf16, &memory);
    CHECK(memory.weights == 0);
    free(y), free(kernel), free_case(&d);
    plain->ops->destroy(plain);
    bf16->ops->destroy(bf16);
}

LQ_TEST_MAIN(LQ_TEST(test_kernels_agree_bit_for_bit), LQ_TEST(test_row_ranges),
             LQ_TEST(test_backend_head))
