/* Every CUDA training op (kernels/cuda/train_cuda.cu) against the CPU op (the reference,
 * kernels/cpu/train_cpu.c) on fresh random inputs at several shapes, odd ones included,
 * through the one backend interface both implement. Device outputs are poisoned with NaN
 * before each run, so an element a kernel never writes fails the check; "+=" outputs start
 * from the same random values on both backends. Tolerances are relative L2 errors
 * ‖gpu − cpu‖ / ‖cpu‖, stated below (token_nll: per row). attention_backward has its own
 * test.
 * Without a usable GPU (or in a build without CUDA) the test exits 77: meson's "skipped".
 * Usage: test_cuda_train_ops [CASE] (CASE: a substring of a case name). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/lq.h"
#include "core/nf.h"
#include "core/rng.h"
#include "kernels/backend.h"
#include "tests/unit/lq_test.h"

/* The CPU ops these are checked against are the exact fp32 kernels: on a CPU with AVX-512 an
 * LQ layer's default is the integer kernel (kernels/cpu/int_gemv.h, ~1e-4 from exact), whose
 * error would hide the GPU's. Set before the first linear call reads it. */
__attribute__((constructor)) static void exact_cpu_kernels(void) {
    setenv("LQ_CPU_KERNEL", "avx2", 0);
}
#include "tests/kernels/kernel_check.h"

/* fp32 products and sums in another order (cuBLAS, block reductions): far under 1e-5. The
 * LQ tiles are dequantized bit for bit as the CPU does, so LQ layers get the same bound. */
#define TOL_FP32 2e-5
/* Products with a frozen weight on TF32 tensor cores (LQ_CUDA_TRAIN_MATH=tf32):
 * each input rounded to a 10-bit mantissa (relative error at most 2^-11 each), fp32 sums.
 * On these random inputs the errors are independent, ~5e-4 of ‖y‖; the bound leaves 4x. */
#define TOL_TF32 2e-3
/* bf16 (the default, LQ_CUDA_TRAIN_MATH unset): Q's values and x (dy) rounded to 8-bit mantissas
 * (at most 2^-9 each), fp32 sums: ~2e-3 of ‖y‖; dense layers take TF32 there. */
#define TOL_BF16 1e-2
/* Element-wise ops computed with the CPU's operations in its order (expf, sin/cos of the
 * same double angle may differ by an ulp). */
#define TOL_ELEMENTWISE 1e-6
/* Double sums in another order. */
#define TOL_DOUBLE 1e-12

/* The tolerance of outputs that take a product with the frozen weight (y, dx): TOL_FP32 while
 * the cases run with LQ_CUDA_TRAIN_MATH=fp32, TOL_TF32 and TOL_BF16 in the *_tf32 and *_bf16
 * cases. */
static double tol_frozen = TOL_FP32;

static void frozen_products_fp32(void) {
    setenv("LQ_CUDA_TRAIN_MATH", "fp32", 1);
    tol_frozen = TOL_FP32;
}

static void frozen_products_bf16(void) {
    unsetenv("LQ_CUDA_TRAIN_MATH"); /* the default */
    tol_frozen = TOL_BF16;
}

static void frozen_products_tf32(void) {
    setenv("LQ_CUDA_TRAIN_MATH", "tf32", 1);
    tol_frozen = TOL_TF32;
}

static float *copy_floats(const float *x, size_t count) {
    float *y = malloc((count ? count : 1) * sizeof *y);
    memcpy(y, x, count * sizeof *y);
    return y;
}

static void release(float *device) {
    if (device) gpu->ops->buffer_free(gpu, device);
}

/* The device array against the host reference. */
#define CHECK_DEVICE(device, reference, count, tolerance, ...)                                     \
    do {                                                                                           \
        float *lq_h_ = to_host((device), (count));                                                 \
        CHECK_CLOSE(lq_h_, (reference), (count), (tolerance), __VA_ARGS__);                        \
        free(lq_h_);                                                                               \
    } while (0)

#define CHECK_DOUBLE(gpu_value, cpu_value, tolerance, ...)                                         \
    do {                                                                                           \
        double lq_g_ = (gpu_value), lq_c_ = (cpu_value);                                           \
        double lq_rel_ = fabs(lq_g_ - lq_c_) / (fabs(lq_c_) > 0 ? fabs(lq_c_) : 1.0);              \
        if (!(lq_rel_ <= (tolerance))) {                                                           \
            fprintf(stderr, "%s:%d: %.17g vs %.17g (relative %.3g > %.1g): ", __FILE__, __LINE__,  \
                    lq_g_, lq_c_, lq_rel_, (double)(tolerance));                                   \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            lq_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

static const int token_counts[] = {1, 7, 64, 300};
#define TOKEN_COUNTS (sizeof token_counts / sizeof token_counts[0])

/* ---------- zero, copy ---------- */

static void test_zero_copy(void) {
    const size_t counts[] = {1, 37, 4096, 100003};
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
        size_t count = counts[c];
        float *x = random_floats(count, 1.0f), *zeros = calloc(count, sizeof *zeros);
        float *dx = device_floats(x, count), *dy = device_floats(NULL, count);
        CHECK_OK(gpu->ops->copy(gpu, dy, dx, count * sizeof(float)));
        CHECK_DEVICE(dy, x, count, 0.0, "copy %zu", count);
        CHECK_OK(gpu->ops->zero(gpu, dx, count));
        float *h = to_host(dx, count);
        CHECK_MSG(memcmp(h, zeros, count * sizeof *h) == 0, "zero %zu", count);
        CHECK_OK(gpu->ops->zero(gpu, dx, 0));
        CHECK_OK(gpu->ops->copy(gpu, dy, dx, 0));
        release(dx), release(dy);
        free(x), free(zeros), free(h);
    }
}

/* ---------- linear layers ---------- */

/* An LQ layer: Q = Quantize(random) under c, and random own factors of rank `rank`. */
static int make_lq(int rows, int cols, struct lq_nf_config c, int rank, struct lq_linear *w) {
    memset(w, 0, sizeof *w);
    w->rows = rows, w->cols = cols, w->is_lq = 1, w->rank = rank;
    float *dense = random_floats((size_t)rows * cols, 0.05f);
    struct lq_error err = {0};
    int rc = lq_nf_quantize(dense, (size_t)rows, (size_t)cols, &c, &w->q, &err);
    free(dense);
    if (rc) {
        fprintf(stderr, "lq_nf_quantize: %s\n", err.message);
        return rc;
    }
    if (rank > 0) {
        w->lora_A = random_floats((size_t)rank * cols, 0.05f);
        w->lora_B = random_floats((size_t)rows * rank, 0.05f);
    }
    return 0;
}

static void make_dense(int rows, int cols, struct lq_linear *w) {
    memset(w, 0, sizeof *w);
    w->rows = rows, w->cols = cols;
    w->dense = random_floats((size_t)rows * cols, 0.05f);
}

/* linear_lora and linear_backward of w with a trainable pair of rank `rank` at n tokens,
 * every output compared; variant picks which gradients are asked for. */
static void compare_layer(const struct lq_linear *w, int rank, int n, int variant,
                          const char *label) {
    const int rows = w->rows, cols = w->cols;
    const size_t nx = (size_t)n * cols, ny = (size_t)n * rows;
    struct lq_error err = {0};
    struct lq_linear on_gpu = *w;
    if (gpu->ops->linear_prepare(gpu, &on_gpu, &err)) {
        CHECK_MSG(0, "linear_prepare %s: %s", label, err.message);
        return;
    }
    float *L1 = rank ? random_floats((size_t)rows * rank, 0.1f) : NULL;
    float *L2 = rank ? random_floats((size_t)rank * cols, 0.1f) : NULL;
    float *x = random_floats(nx, 1.0f), *dy = random_floats(ny, 1.0f);
    float *d_L1 = rank ? device_floats(L1, (size_t)rows * rank) : NULL;
    float *d_L2 = rank ? device_floats(L2, (size_t)rank * cols) : NULL;
    float *d_x = device_floats(x, nx), *d_dy = device_floats(dy, ny);

    /* forward */
    float *y = malloc(ny * sizeof *y), *d_y = device_floats(NULL, ny);
    CHECK_OK(cpu->ops->linear_lora(cpu, w, L1, L2, rank, x, n, y));
    CHECK_OK(gpu->ops->linear_lora(gpu, &on_gpu, d_L1, d_L2, rank, d_x, n, d_y));
    CHECK_DEVICE(d_y, y, ny, tol_frozen, "linear_lora %s, rank %d, n %d", label, rank, n);

    /* backward: variant 0 overwrites dx and asks for everything; 1 accumulates into dx;
     * 2 has no dx and only dL1 */
    const int accumulate = variant == 1, want_dx = variant != 2, want_dL2 = variant != 2;
    const int want_dW = !w->is_lq && variant != 2;
    const size_t nL1 = (size_t)rows * rank, nL2 = (size_t)rank * cols, nW = (size_t)rows * cols;
    float *dx0 = random_floats(nx, 1.0f), *dL10 = random_floats(nL1, 1.0f);
    float *dL20 = random_floats(nL2, 1.0f), *dW0 = random_floats(nW, 1.0f);
    float *dx = copy_floats(dx0, nx), *dL1 = copy_floats(dL10, nL1);
    float *dL2 = copy_floats(dL20, nL2), *dW = copy_floats(dW0, nW);
    float *d_dx = want_dx ? device_floats(accumulate ? dx0 : NULL, nx) : NULL;
    float *d_dL1 = rank ? device_floats(dL10, nL1) : NULL;
    float *d_dL2 = rank && want_dL2 ? device_floats(dL20, nL2) : NULL;
    float *d_dW = want_dW ? device_floats(dW0, nW) : NULL;
    CHECK_OK(cpu->ops->linear_backward(cpu, w, L1, L2, rank, x, dy, n, want_dx ? dx : NULL,
                                       accumulate, rank ? dL1 : NULL, rank && want_dL2 ? dL2 : NULL,
                                       want_dW ? dW : NULL));
    CHECK_OK(gpu->ops->linear_backward(gpu, &on_gpu, d_L1, d_L2, rank, d_x, d_dy, n, d_dx,
                                       accumulate, d_dL1, d_dL2, d_dW));
    if (want_dx)
        CHECK_DEVICE(d_dx, dx, nx, tol_frozen,
                     "linear_backward dx (accumulate %d) %s, rank %d, n %d", accumulate, label,
                     rank, n);
    if (rank)
        CHECK_DEVICE(d_dL1, dL1, nL1, TOL_FP32, "linear_backward dL1 %s, rank %d, n %d", label,
                     rank, n);
    if (rank && want_dL2)
        CHECK_DEVICE(d_dL2, dL2, nL2, TOL_FP32, "linear_backward dL2 %s, rank %d, n %d", label,
                     rank, n);
    if (want_dW)
        CHECK_DEVICE(d_dW, dW, nW, TOL_FP32, "linear_backward dW %s, rank %d, n %d", label, rank,
                     n);
    if (w->is_lq) { /* a quantized weight has no gradient: refused on both */
        float *d_any = device_floats(NULL, nW);
        CHECK(gpu->ops->linear_backward(gpu, &on_gpu, d_L1, d_L2, rank, d_x, d_dy, n, NULL, 0, NULL,
                                        NULL, d_any) == LQ_EINVAL);
        release(d_any);
    }

    gpu->ops->linear_release(gpu, &on_gpu);
    release(d_L1), release(d_L2), release(d_x), release(d_dy), release(d_y);
    release(d_dx), release(d_dL1), release(d_dL2), release(d_dW);
    free(L1), free(L2), free(x), free(dy), free(y);
    free(dx0), free(dL10), free(dL20), free(dW0), free(dx), free(dL1), free(dL2), free(dW);
}

static void linear_dense_cases(void) {
    const int shapes[][2] = {{37, 53}, {64, 64}, {300, 129}};
    const int ranks[] = {0, 4, 8};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        struct lq_linear w;
        make_dense(shapes[s][0], shapes[s][1], &w);
        char label[64];
        snprintf(label, sizeof label, "dense %d x %d", w.rows, w.cols);
        for (size_t r = 0; r < 3; r++)
            for (size_t b = 0; b < TOKEN_COUNTS; b++)
                compare_layer(&w, ranks[r], token_counts[b], (int)((r + b) % 3), label);
        free(w.dense);
    }
}

/* b0 2, 3, 4, 8; every scale type; blocks that divide 32, are multiples of it and neither;
 * partial last blocks and groups */
static const struct lq_nf_config train_configs[] = {
    {4, 8, LQ_SCALE_FP32, 64, 256},
    {2, 2, LQ_SCALE_BF16, 16, 16},
    {3, 4, LQ_SCALE_FP16, 48, 3},
    {8, 8, LQ_SCALE_FP32, 64, 256},
};
#define TRAIN_CONFIGS (sizeof train_configs / sizeof train_configs[0])
/* odd shapes take the one-value-per-thread tile kernel, 256 x 512 the 8-values one */
static const int train_shapes[][2] = {{37, 53}, {256, 512}, {300, 129}};

static void linear_lq_cases(void) {
    const struct lq_nf_config *configs = train_configs;
    const int(*shapes)[2] = train_shapes;
    const int own_ranks[] = {0, 4, 8}, ranks[] = {0, 4, 8};
    for (size_t c = 0; c < TRAIN_CONFIGS; c++)
        for (size_t s = 0; s < sizeof train_shapes / sizeof train_shapes[0]; s++)
            for (size_t o = 0; o < 3; o++) {
                struct lq_linear w;
                if (make_lq(shapes[s][0], shapes[s][1], configs[c], own_ranks[o], &w)) {
                    CHECK(0);
                    continue;
                }
                char label[128], text[64];
                snprintf(label, sizeof label, "LQ %s %d x %d own rank %d",
                         lq_nf_config_format(&configs[c], text, sizeof text), w.rows, w.cols,
                         w.rank);
                for (size_t b = 0; b < TOKEN_COUNTS; b++)
                    compare_layer(&w, ranks[(o + b) % 3], token_counts[b], (int)((c + s + b) % 3),
                                  label);
                lq_linear_free(&w);
            }
    /* more than one 16 MB fp32 tile of Q rows (and than one CPU tile) */
    struct lq_linear w;
    if (make_lq(1100, 4096, configs[0], 4, &w)) {
        CHECK(0);
        return;
    }
    compare_layer(&w, 8, 7, 0, "LQ nf4 1100 x 4096 own rank 4");
    compare_layer(&w, 4, 64, 1, "LQ nf4 1100 x 4096 own rank 4");
    lq_linear_free(&w);
}

static void test_linear_dense(void) {
    frozen_products_fp32();
    linear_dense_cases();
}

static void test_linear_dense_tf32(void) {
    frozen_products_tf32();
    linear_dense_cases();
    frozen_products_fp32();
}

static void test_linear_lq(void) {
    frozen_products_fp32();
    linear_lq_cases();
}

static void test_linear_lq_tf32(void) {
    frozen_products_tf32();
    linear_lq_cases();
    frozen_products_fp32();
}

static void test_linear_lq_bf16(void) {
    frozen_products_bf16();
    linear_lq_cases();
    frozen_products_fp32();
}

static void test_linear_dense_bf16(void) { /* dense weights take TF32 there */
    frozen_products_bf16();
    linear_dense_cases();
    frozen_products_fp32();
}

/* The fp32 tiles of Q are core/nf.c's values bit for bit: with x = I (one token per column)
 * and SGEMMs, y = x·Qᵀ is Qᵀ itself (each sum one value times 1 plus zeros, exact), which must
 * equal lq_nf_dequantize's values. */
static void test_linear_lq_tile_exact(void) {
    frozen_products_fp32();
    for (size_t c = 0; c < TRAIN_CONFIGS; c++)
        for (size_t s = 0; s < sizeof train_shapes / sizeof train_shapes[0]; s++) {
            struct lq_linear w;
            if (make_lq(train_shapes[s][0], train_shapes[s][1], train_configs[c], 0, &w)) {
                CHECK(0);
                continue;
            }
            const int rows = w.rows, cols = w.cols, n = cols;
            const size_t nx = (size_t)n * cols, ny = (size_t)n * rows;
            float *x = calloc(nx, sizeof *x), *y = malloc(ny * sizeof *y);
            float *q = malloc((size_t)rows * cols * sizeof *q);
            for (int i = 0; i < n; i++) x[(size_t)i * cols + i] = 1.0f;
            lq_nf_dequantize(&w.q, q);
            for (int i = 0; i < n; i++) /* y[i][r] = Q[r][i] */
                for (int r = 0; r < rows; r++) y[(size_t)i * rows + r] = q[(size_t)r * cols + i];
            struct lq_error err = {0};
            struct lq_linear on_gpu = w;
            CHECK_OK(gpu->ops->linear_prepare(gpu, &on_gpu, &err));
            float *d_x = device_floats(x, nx), *d_y = device_floats(NULL, ny);
            CHECK_OK(gpu->ops->linear_lora(gpu, &on_gpu, NULL, NULL, 0, d_x, n, d_y));
            float *h = to_host(d_y, ny);
            size_t differ = 0, first = ny;
            for (size_t i = 0; i < ny; i++)
                if (!(h[i] == y[i])) differ++, first = first < ny ? first : i;
            char text[64];
            CHECK_MSG(differ == 0,
                      "Q tile of %s %d x %d: %zu of %zu values differ (first at %zu: "
                      "%.9g vs %.9g)",
                      lq_nf_config_format(&train_configs[c], text, sizeof text), rows, cols, differ,
                      ny, first, first < ny ? h[first] : 0.0, first < ny ? y[first] : 0.0);
            gpu->ops->linear_release(gpu, &on_gpu);
            release(d_x), release(d_y);
            free(x), free(y), free(q), free(h);
            lq_linear_free(&w);
        }
}

static void matmul_backward_cases(void) {
    const int shapes[][2] = {{37, 53}, {512, 64}, {1000, 288}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t b = 0; b < TOKEN_COUNTS; b++)
            for (int accumulate = 0; accumulate < 2; accumulate++) {
                int rows = shapes[s][0], cols = shapes[s][1], n = token_counts[b];
                size_t nw = (size_t)rows * cols, ny = (size_t)n * rows, nx = (size_t)n * cols;
                float *w = random_floats(nw, 0.1f), *dy = random_floats(ny, 1.0f);
                float *dx = random_floats(nx, 1.0f);
                float *d_w = device_floats(w, nw), *d_dy = device_floats(dy, ny);
                float *d_dx = device_floats(accumulate ? dx : NULL, nx);
                CHECK_OK(cpu->ops->matmul_backward(cpu, w, rows, cols, dy, n, dx, accumulate));
                CHECK_OK(
                    gpu->ops->matmul_backward(gpu, d_w, rows, cols, d_dy, n, d_dx, accumulate));
                CHECK_DEVICE(d_dx, dx, nx, tol_frozen,
                             "matmul_backward %d x %d, n %d, accumulate %d", rows, cols, n,
                             accumulate);
                release(d_w), release(d_dy), release(d_dx);
                free(w), free(dy), free(dx);
            }
}

static void test_matmul_backward(void) {
    frozen_products_fp32();
    matmul_backward_cases();
}

static void test_matmul_backward_tf32(void) {
    frozen_products_tf32();
    matmul_backward_cases();
    frozen_products_fp32();
}

/* ---------- row-wise and element-wise ops ---------- */

static void test_rmsnorm_backward(void) {
    const int dims[] = {64, 37, 288, 4096};
    for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++)
        for (size_t b = 0; b < TOKEN_COUNTS; b++) {
            int n = token_counts[b], dim = dims[d];
            size_t count = (size_t)n * dim;
            float *x = random_floats(count, 3.0f), *w = random_floats((size_t)dim, 1.0f);
            float *dy = random_floats(count, 1.0f), *dx = random_floats(count, 1.0f);
            float *d_x = device_floats(x, count), *d_w = device_floats(w, (size_t)dim);
            float *d_dy = device_floats(dy, count), *d_dx = device_floats(dx, count);
            CHECK_OK(cpu->ops->rmsnorm_backward(cpu, x, w, dy, n, dim, 1e-5f, dx));
            CHECK_OK(gpu->ops->rmsnorm_backward(gpu, d_x, d_w, d_dy, n, dim, 1e-5f, d_dx));
            CHECK_DEVICE(d_dx, dx, count, TOL_FP32, "rmsnorm_backward %d x %d", n, dim);
            release(d_x), release(d_w), release(d_dy), release(d_dx);
            free(x), free(w), free(dy), free(dx);
        }
}

static void test_rope_backward(void) {
    const int shapes[][2] = {{4, 64}, {3, 6}, {8, 128}, {1, 2}}; /* heads, head_dim */
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t b = 0; b < TOKEN_COUNTS; b++) {
            int heads = shapes[s][0], hd = shapes[s][1], n = token_counts[b];
            size_t count = (size_t)n * heads * hd;
            int *positions = malloc((size_t)n * sizeof *positions);
            for (int i = 0; i < n; i++) positions[i] = (int)(lq_rng_next(&rng) % 4096);
            positions[0] = 0;
            float *dx = random_floats(count, 1.0f), *d_dx = device_floats(dx, count);
            CHECK_OK(cpu->ops->rope_backward(cpu, dx, n, heads, hd, positions, 10000.0f));
            CHECK_OK(gpu->ops->rope_backward(gpu, d_dx, n, heads, hd, positions, 10000.0f));
            CHECK_DEVICE(d_dx, dx, count, TOL_ELEMENTWISE, "rope_backward n %d, %d heads of %d", n,
                         heads, hd);
            release(d_dx);
            free(positions), free(dx);
        }
}

static void test_swiglu_backward(void) {
    const size_t counts[] = {1, 37, 4096, 300 * 688 + 5};
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++)
        for (int alias = 0; alias < 2; alias++) {
            size_t count = counts[c];
            float *gate = random_floats(count, 3.0f), *up = random_floats(count, 1.0f);
            float *dout = random_floats(count, 1.0f);
            float *dgate = malloc(count * sizeof *dgate), *dup = malloc(count * sizeof *dup);
            float *d_gate = device_floats(gate, count), *d_up = device_floats(up, count);
            float *d_dout = device_floats(dout, count), *d_dup = device_floats(NULL, count);
            float *d_dgate = alias ? d_dout : device_floats(NULL, count);
            CHECK_OK(cpu->ops->swiglu_backward(cpu, gate, up, dout, count, dgate, dup));
            CHECK_OK(gpu->ops->swiglu_backward(gpu, d_gate, d_up, d_dout, count, d_dgate, d_dup));
            CHECK_DEVICE(d_dgate, dgate, count, TOL_ELEMENTWISE, "swiglu_backward dgate %zu%s",
                         count, alias ? " (in place)" : "");
            CHECK_DEVICE(d_dup, dup, count, TOL_ELEMENTWISE, "swiglu_backward dup %zu", count);
            release(d_gate), release(d_up), release(d_dout), release(d_dup);
            if (!alias) release(d_dgate);
            free(gate), free(up), free(dout), free(dgate), free(dup);
        }
}

/* ---------- loss ---------- */

static void test_cross_entropy(void) {
    const int vocabs[] = {1, 37, 512, 32000};
    for (size_t v = 0; v < sizeof vocabs / sizeof vocabs[0]; v++)
        for (size_t b = 0; b < TOKEN_COUNTS; b++)
            for (int variant = 0; variant < 4; variant++) {
                /* 0: every token, dlogits apart; 1: a mask; 2: dlogits = logits (in place),
                 * with a mask; 3: no dlogits */
                int vocab = vocabs[v], n = token_counts[b];
                if (vocab == 32000 && n == 300 && variant != 2) continue; /* keep it short */
                size_t count = (size_t)n * vocab;
                float *logits = random_floats(count, 4.0f);
                int *targets = malloc((size_t)n * sizeof *targets);
                unsigned char *mask = malloc((size_t)n);
                for (int i = 0; i < n; i++) {
                    targets[i] = (int)(lq_rng_next(&rng) % (uint64_t)vocab);
                    mask[i] = (unsigned char)(lq_rng_next(&rng) % 3 != 0);
                }
                mask[0] = 1;
                if (n > 1) targets[n - 1] = -5, mask[n - 1] = 0; /* masked out: not checked */
                const unsigned char *m = variant == 0 || variant == 3 ? NULL : mask;
                if (!m && n > 1) targets[n - 1] = vocab - 1;
                const float scale = 0.37f;
                float *dlogits = variant == 3 ? NULL : malloc(count * sizeof *dlogits);
                double cpu_loss = 1.5, gpu_loss = 1.5; /* "+=" */
                CHECK_OK(cpu->ops->cross_entropy(cpu, logits, targets, m, n, vocab, scale,
                                                 &cpu_loss, dlogits));
                float *d_logits = device_floats(logits, count);
                float *d_dlogits = variant == 3   ? NULL
                                   : variant == 2 ? d_logits
                                                  : device_floats(NULL, count);
                CHECK_OK(gpu->ops->cross_entropy(gpu, d_logits, targets, m, n, vocab, scale,
                                                 &gpu_loss, d_dlogits));
                CHECK_DOUBLE(gpu_loss, cpu_loss, TOL_DOUBLE,
                             "cross_entropy loss n %d, vocab %d, variant %d", n, vocab, variant);
                if (d_dlogits)
                    CHECK_DEVICE(d_dlogits, dlogits, count, TOL_ELEMENTWISE,
                                 "cross_entropy dlogits n %d, vocab %d, variant %d", n, vocab,
                                 variant);
                /* a target out of range on a masked-in row is refused */
                int saved = targets[0];
                targets[0] = vocab;
                CHECK(gpu->ops->cross_entropy(gpu, d_logits, targets, m, n, vocab, scale, &gpu_loss,
                                              NULL) == LQ_EINVAL);
                targets[0] = saved;
                release(d_logits);
                if (variant < 2) release(d_dlogits);
                free(logits), free(targets), free(mask), free(dlogits);
            }
}

/* ---------- evaluation ---------- */

/* Logits whose rows stress the op: plain (scale 4), huge (scale 1000: most exp underflow),
 * shifted far from 0 (+-20000: max subtraction matters), all equal, and rows whose target is
 * the max (an NLL near 0). */
static float *nll_logits(int n, int vocab, int *targets) {
    float *logits = random_floats((size_t)n * vocab, 4.0f);
    for (int i = 0; i < n; i++) {
        float *row = logits + (size_t)i * vocab;
        targets[i] = (int)(lq_rng_next(&rng) % (uint64_t)vocab);
        switch (i % 5) {
        case 1:
            for (int v = 0; v < vocab; v++) row[v] *= 250.0f;
            break;
        case 2:
            for (int v = 0; v < vocab; v++) row[v] += i % 2 ? 20000.0f : -20000.0f;
            break;
        case 3:
            if (i % 4 == 3)
                for (int v = 0; v < vocab; v++) row[v] = 1.25f;
            break;
        case 4: {
            int best = 0;
            for (int v = 1; v < vocab; v++) best = row[v] > row[best] ? v : best;
            targets[i] = best;
            break;
        }
        }
    }
    return logits;
}

/* Each row's NLL within 1e-9 of the CPU's: both sum in double, in another order. Relative to
 * max(1, |nll|): a row whose target holds almost all the mass has an NLL of log(1 + tiny),
 * where rounding the sum near 1 is an absolute error of ~1e-16. The device op also gives the
 * same bits on a second run (a fixed reduction order). */
static void test_token_nll(void) {
    const int vocabs[] = {7, 1000, 49152};
    for (size_t v = 0; v < sizeof vocabs / sizeof vocabs[0]; v++)
        for (size_t b = 0; b < TOKEN_COUNTS; b++) {
            int vocab = vocabs[v], n = token_counts[b];
            size_t count = (size_t)n * vocab;
            int *targets = malloc((size_t)n * sizeof *targets);
            float *logits = nll_logits(n, vocab, targets);
            double *cpu_nll = malloc((size_t)n * sizeof *cpu_nll);
            double *gpu_nll = malloc((size_t)n * sizeof *gpu_nll);
            double *again = malloc((size_t)n * sizeof *again);
            CHECK_OK(cpu->ops->token_nll(cpu, logits, targets, n, vocab, cpu_nll));
            float *d_logits = device_floats(logits, count);
            for (int i = 0; i < n; i++) gpu_nll[i] = again[i] = NAN;
            CHECK_OK(gpu->ops->token_nll(gpu, d_logits, targets, n, vocab, gpu_nll));
            CHECK_OK(gpu->ops->token_nll(gpu, d_logits, targets, n, vocab, again));
            for (int i = 0; i < n; i++) {
                double error = fabs(gpu_nll[i] - cpu_nll[i]) / fmax(1.0, fabs(cpu_nll[i]));
                CHECK_MSG(error <= 1e-9, "token_nll n %d, vocab %d, row %d: %.17g vs %.17g", n,
                          vocab, i, gpu_nll[i], cpu_nll[i]);
            }
            CHECK_MSG(memcmp(gpu_nll, again, (size_t)n * sizeof *again) == 0,
                      "token_nll n %d, vocab %d: a second run gave other bits", n, vocab);
            /* a target outside the vocabulary is refused, on both backends */
            int saved = targets[n - 1];
            targets[n - 1] = vocab;
            CHECK(gpu->ops->token_nll(gpu, d_logits, targets, n, vocab, again) == LQ_EINVAL);
            CHECK(cpu->ops->token_nll(cpu, logits, targets, n, vocab, again) == LQ_EINVAL);
            targets[n - 1] = -1;
            CHECK(gpu->ops->token_nll(gpu, d_logits, targets, n, vocab, again) == LQ_EINVAL);
            targets[n - 1] = saved;
            CHECK_OK(gpu->ops->token_nll(gpu, d_logits, targets, 0, vocab, again));
            release(d_logits);
            free(logits), free(targets), free(cpu_nll), free(gpu_nll), free(again);
        }
}

/* ---------- squares, optimizer ---------- */

static void test_sum_squares(void) {
    const size_t counts[] = {0, 1, 1000, ((size_t)1 << 16) * 3 + 17, 5000011};
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
        size_t count = counts[c];
        float *x = random_floats(count, 2.0f), *d_x = device_floats(x, count);
        double cpu_sum = -1.0, gpu_sum = -1.0, again = -2.0;
        CHECK_OK(cpu->ops->sum_squares(cpu, x, count, &cpu_sum));
        CHECK_OK(gpu->ops->sum_squares(gpu, d_x, count, &gpu_sum));
        CHECK_OK(gpu->ops->sum_squares(gpu, d_x, count, &again));
        CHECK_DOUBLE(gpu_sum, cpu_sum, TOL_DOUBLE, "sum_squares %zu", count);
        CHECK_MSG(memcmp(&gpu_sum, &again, sizeof again) == 0, "sum_squares %zu: %.17g then %.17g",
                  count, gpu_sum, again);
        release(d_x);
        free(x);
    }
}

static void test_accumulate_squares(void) {
    const size_t counts[] = {1, 37, 100003};
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
        size_t count = counts[c];
        float *acc = random_floats(count, 1.0f), *x = random_floats(count, 2.0f);
        float *d_acc = device_floats(acc, count), *d_x = device_floats(x, count);
        CHECK_OK(cpu->ops->accumulate_squares(cpu, acc, x, count, 0.25f));
        CHECK_OK(gpu->ops->accumulate_squares(gpu, d_acc, d_x, count, 0.25f));
        CHECK_DEVICE(d_acc, acc, count, TOL_ELEMENTWISE, "accumulate_squares %zu", count);
        release(d_acc), release(d_x);
        free(acc), free(x);
    }
}

static void test_adamw(void) {
    const size_t counts[] = {1, 37, 100003};
    const long steps[] = {1, 7, 1000};
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++)
        for (size_t s = 0; s < sizeof steps / sizeof steps[0]; s++) {
            size_t count = counts[c];
            struct lq_adamw_params hyper = {
                2e-4f, 0.9f, 0.999f, 1e-8f, 0.01f, s == 1 ? 0.8f : 1.0f, steps[s]};
            float *p = random_floats(count, 0.1f), *g = random_floats(count, 0.01f);
            float *m = random_floats(count, 0.001f), *v = random_floats(count, 1e-5f);
            for (size_t i = 0; i < count; i++) v[i] = fabsf(v[i]);
            float *d_p = device_floats(p, count), *d_g = device_floats(g, count);
            float *d_m = device_floats(m, count), *d_v = device_floats(v, count);
            CHECK_OK(cpu->ops->adamw(cpu, p, g, m, v, count, &hyper));
            CHECK_OK(gpu->ops->adamw(gpu, d_p, d_g, d_m, d_v, count, &hyper));
            CHECK_DEVICE(d_p, p, count, TOL_ELEMENTWISE, "adamw params %zu, step %ld", count,
                         steps[s]);
            CHECK_DEVICE(d_m, m, count, TOL_ELEMENTWISE, "adamw m %zu, step %ld", count, steps[s]);
            CHECK_DEVICE(d_v, v, count, TOL_ELEMENTWISE, "adamw v %zu, step %ld", count, steps[s]);
            hyper.step = 0;
            CHECK(gpu->ops->adamw(gpu, d_p, d_g, d_m, d_v, count, &hyper) == LQ_EINVAL);
            release(d_p), release(d_g), release(d_m), release(d_v);
            free(p), free(g), free(m), free(v);
        }
}

int main(int argc, char **argv) {
    struct lq_error err = {0};
    if (lq_backend_cuda_create(0, 0, &gpu, &err)) {
        printf("SKIP: %s\n", err.message);
        return 77;
    }
    CHECK_OK(lq_backend_cpu_create(&cpu, &err));
    lq_rng_seed(&rng, 20261203);
    static const struct lq_test_case cases[] = {
        LQ_TEST(test_zero_copy),          LQ_TEST(test_linear_dense),
        LQ_TEST(test_linear_lq),          LQ_TEST(test_linear_lq_tile_exact),
        LQ_TEST(test_matmul_backward),    LQ_TEST(test_linear_dense_tf32),
        LQ_TEST(test_linear_lq_tf32),     LQ_TEST(test_matmul_backward_tf32),
        LQ_TEST(test_linear_lq_bf16),     LQ_TEST(test_linear_dense_bf16),
        LQ_TEST(test_rmsnorm_backward),   LQ_TEST(test_rope_backward),
        LQ_TEST(test_swiglu_backward),    LQ_TEST(test_cross_entropy),
        LQ_TEST(test_token_nll),          LQ_TEST(test_sum_squares),
        LQ_TEST(test_accumulate_squares), LQ_TEST(test_adamw),
    };
    int failed = 0;
    const char *filter = argc > 1 ? argv[1] : NULL;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (filter && !strstr(cases[i].name, filter)) continue;
        int before = lq_test_failures;
        cases[i].run();
        printf("%s %s\n", lq_test_failures == before ? "ok  " : "FAIL", cases[i].name);
        failed |= lq_test_failures != before;
    }
    gpu->ops->destroy(gpu);
    cpu->ops->destroy(cpu);
    return failed ? 1 : 0;
}
