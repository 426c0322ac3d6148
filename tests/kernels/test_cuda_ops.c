/* Every CUDA op against the CPU op (the reference) on fresh random inputs at several shapes,
 * odd ones included, through the one backend interface both implement. Device outputs are
 * poisoned with NaN before each run, so an element a kernel never writes fails the check.
 * Tolerances are relative L2 errors ‖gpu − cpu‖ / ‖cpu‖, stated per path below.
 * Without a usable GPU (or in a build without CUDA) the test exits 77: meson's "skipped".
 * Usage: test_cuda_ops [CASE]... [--time] (CASE: a substring of a case name, or with a '$' at
 * its end, the end of one: linear_lq$ is test_linear_lq alone; the cases any CASE names run). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/lq.h"
#include "core/nf.h"
#include "core/rng.h"
#include "kernels/backend.h"
#include "kernels/cuda_cholqr.h"
#include "tests/unit/cholesky_reference.h"
#include "tests/unit/lq_test.h"

/* The CPU ops these are checked against are the exact fp32 kernels: on a CPU with AVX-512 an
 * LQ layer's default is the integer kernel (kernels/cpu/int_gemv.h, ~1e-4 from exact), whose
 * error would hide the GPU's. Set before the first linear call reads it. */
__attribute__((constructor)) static void exact_cpu_kernels(void) {
    setenv("LQ_CPU_KERNEL", "avx2", 0);
}
#include "tests/kernels/kernel_check.h"

/* fp32 arithmetic in another order (cuBLAS, warp reductions): far under 1e-5. */
#define TOL_FP32 2e-5
/* The large-batch LQ path multiplies fp16 tiles on tensor cores (fp32 accumulate). */
#define TOL_FP16 4e-3

/* The kernel development harness (in the spirit of llm.c's dev/cuda): `test_cuda_ops CASE
 * --time` runs one case alone, each GPU op checked against the CPU op as always, then timed:
 * the median of 25 calls, each between two synchronizations. */
static int timing;

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#define TIME_GPU(call, ...)                                                                        \
    do {                                                                                           \
        if (!timing) break;                                                                        \
        double lq_t_[25];                                                                          \
        struct lq_error lq_e_ = {0};                                                               \
        for (int lq_i_ = 0; lq_i_ < 28; lq_i_++) {                                                 \
            gpu->ops->synchronize(gpu, &lq_e_);                                                    \
            double lq_s_ = seconds_now();                                                          \
            (void)(call);                                                                          \
            gpu->ops->synchronize(gpu, &lq_e_);                                                    \
            if (lq_i_ >= 3) lq_t_[lq_i_ - 3] = seconds_now() - lq_s_;                              \
        }                                                                                          \
        qsort(lq_t_, 25, sizeof lq_t_[0], compare_doubles);                                        \
        printf("  %9.1f us  ", lq_t_[12] * 1e6);                                                   \
        printf(__VA_ARGS__);                                                                       \
        putchar('\n');                                                                             \
    } while (0)

/* ---------- element-wise and row-wise ops ---------- */

static void test_rmsnorm(void) {
    const int shapes[][2] = {{1, 64}, {7, 4096}, {3, 37}, {33, 288}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int n = shapes[s][0], dim = shapes[s][1];
        float *x = random_floats((size_t)n * dim, 3.0f), *w = random_floats((size_t)dim, 1.0f);
        float *ref = malloc((size_t)n * dim * sizeof *ref);
        cpu->ops->rmsnorm(cpu, x, w, n, dim, 1e-5f, ref);
        float *dx = device_floats(x, (size_t)n * dim), *dw = device_floats(w, (size_t)dim);
        float *dout = device_floats(NULL, (size_t)n * dim);
        CHECK_OK(gpu->ops->rmsnorm(gpu, dx, dw, n, dim, 1e-5f, dout));
        float *out = to_host(dout, (size_t)n * dim);
        CHECK_CLOSE(out, ref, (size_t)n * dim, TOL_FP32, "rmsnorm %d x %d", n, dim);
        TIME_GPU(gpu->ops->rmsnorm(gpu, dx, dw, n, dim, 1e-5f, dout), "rmsnorm %d x %d", n, dim);
        gpu->ops->buffer_free(gpu, dx), gpu->ops->buffer_free(gpu, dw);
        gpu->ops->buffer_free(gpu, dout);
        free(x), free(w), free(ref), free(out);
    }
}

static void test_embed(void) {
    const int vocab = 1000, dim = 72, n = 9;
    float *table = random_floats((size_t)vocab * dim, 1.0f);
    int ids[9];
    for (int i = 0; i < n; i++) ids[i] = (int)(lq_rng_next(&rng) % vocab);
    ids[3] = vocab - 1, ids[4] = 0;
    float *ref = malloc((size_t)n * dim * sizeof *ref);
    cpu->ops->embed(cpu, table, dim, ids, n, ref);
    float *dt = device_floats(table, (size_t)vocab * dim),
          *dout = device_floats(NULL, (size_t)n * dim);
    CHECK_OK(gpu->ops->embed(gpu, dt, dim, ids, n, dout));
    float *out = to_host(dout, (size_t)n * dim);
    CHECK(memcmp(out, ref, (size_t)n * dim * sizeof *out) == 0);
    /* the same with the ids in device memory (decode-step graphs) */
    void *device_ids = device_bytes(ids, sizeof ids);
    float *dout2 = device_floats(NULL, (size_t)n * dim);
    CHECK_OK(gpu->ops->embed_device(gpu, dt, dim, device_ids, n, dout2));
    float *out2 = to_host(dout2, (size_t)n * dim);
    CHECK(memcmp(out2, ref, (size_t)n * dim * sizeof *out2) == 0);
    gpu->ops->buffer_free(gpu, dt), gpu->ops->buffer_free(gpu, dout);
    gpu->ops->buffer_free(gpu, dout2), gpu->ops->buffer_free(gpu, device_ids);
    free(table), free(ref), free(out), free(out2);
}

static void test_rope(void) {
    const int shapes[][3] = {{5, 8, 8}, {3, 32, 128}, {2, 4, 48}, {1, 1, 2}};
    const float thetas[] = {10000.0f, 500000.0f};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t t = 0; t < 2; t++) {
            int n = shapes[s][0], heads = shapes[s][1], hd = shapes[s][2];
            size_t count = (size_t)n * heads * hd;
            float *x = random_floats(count, 1.0f), *ref = malloc(count * sizeof *ref);
            int positions[5];
            for (int i = 0; i < n; i++) positions[i] = (int)(lq_rng_next(&rng) % 32768);
            positions[0] = 0;
            memcpy(ref, x, count * sizeof *ref);
            cpu->ops->rope(cpu, ref, n, heads, hd, positions, thetas[t]);
            float *dx = device_floats(x, count), *dx2 = device_floats(x, count);
            CHECK_OK(gpu->ops->rope(gpu, dx, n, heads, hd, positions, thetas[t]));
            float *out = to_host(dx, count);
            CHECK_CLOSE(out, ref, count, TOL_FP32, "rope n %d heads %d hd %d theta %g", n, heads,
                        hd, (double)thetas[t]);
            /* positions in device memory: the same bits as the staged call */
            void *device_positions = device_bytes(positions, (size_t)n * sizeof(int));
            CHECK_OK(gpu->ops->rope_device(gpu, dx2, n, heads, hd, device_positions, thetas[t]));
            float *out2 = to_host(dx2, count);
            CHECK(memcmp(out2, out, count * sizeof *out) == 0);
            gpu->ops->buffer_free(gpu, dx2), gpu->ops->buffer_free(gpu, device_positions);
            free(out2);
            TIME_GPU(gpu->ops->rope(gpu, dx, n, heads, hd, positions, thetas[t]),
                     "rope n %d heads %d hd %d", n, heads, hd);
            gpu->ops->buffer_free(gpu, dx);
            free(x), free(ref), free(out);
        }
}

/* add_rmsnorm against the CPU's add then rmsnorm; rope_qk_device against two ropes. */
static void test_fused_ops(void) {
    const int shapes[][2] = {{1, 4096}, {5, 576}, {3, 130}, {2, 7}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int n = shapes[s][0], dim = shapes[s][1];
        const size_t count = (size_t)n * dim;
        float *x = random_floats(count, 1.0f), *y = random_floats(count, 1.0f);
        float *w = random_floats(dim, 1.0f), *xr = malloc(count * sizeof *xr);
        float *ref = malloc(count * sizeof *ref);
        memcpy(xr, x, count * sizeof *xr);
        CHECK_OK(cpu->ops->add(cpu, xr, y, count));
        CHECK_OK(cpu->ops->rmsnorm(cpu, xr, w, n, dim, 1e-5f, ref));
        float *dx = device_floats(x, count), *dy = device_floats(y, count);
        float *dw = device_floats(w, dim), *dout = device_floats(NULL, count);
        CHECK_OK(gpu->ops->add_rmsnorm(gpu, dx, dy, dw, n, dim, 1e-5f, dout));
        float *out = to_host(dout, count), *xs = to_host(dx, count);
        CHECK(memcmp(xs, xr, count * sizeof *xs) == 0); /* the residual: exact float adds */
        CHECK_CLOSE(out, ref, count, TOL_FP32, "add_rmsnorm n %d dim %d", n, dim);
        gpu->ops->buffer_free(gpu, dx), gpu->ops->buffer_free(gpu, dy);
        gpu->ops->buffer_free(gpu, dw), gpu->ops->buffer_free(gpu, dout);
        free(x), free(y), free(w), free(xr), free(ref), free(out), free(xs);
    }
    const int heads = 8, kv_heads = 2, hd = 64, n = 3;
    int positions[3] = {0, 17, 4000};
    const size_t q_count = (size_t)n * heads * hd, k_count = (size_t)n * kv_heads * hd;
    float *q = random_floats(q_count, 1.0f), *k = random_floats(k_count, 1.0f);
    float *dq = device_floats(q, q_count), *dk = device_floats(k, k_count);
    float *dq2 = device_floats(q, q_count), *dk2 = device_floats(k, k_count);
    void *device_positions = device_bytes(positions, sizeof positions);
    CHECK_OK(gpu->ops->rope_device(gpu, dq, n, heads, hd, device_positions, 10000.0f));
    CHECK_OK(gpu->ops->rope_device(gpu, dk, n, kv_heads, hd, device_positions, 10000.0f));
    CHECK_OK(gpu->ops->rope_qk_device(gpu, dq2, heads, dk2, kv_heads, n, hd, device_positions,
                                      10000.0f));
    float *q1 = to_host(dq, q_count), *q2 = to_host(dq2, q_count);
    float *k1 = to_host(dk, k_count), *k2 = to_host(dk2, k_count);
    CHECK(memcmp(q1, q2, q_count * sizeof *q1) == 0 && memcmp(k1, k2, k_count * sizeof *k1) == 0);
    gpu->ops->buffer_free(gpu, dq), gpu->ops->buffer_free(gpu, dk);
    gpu->ops->buffer_free(gpu, dq2), gpu->ops->buffer_free(gpu, dk2);
    gpu->ops->buffer_free(gpu, device_positions);
    free(q), free(k), free(q1), free(q2), free(k1), free(k2);
}

static void test_swiglu_add(void) {
    const size_t counts[] = {1, 1023, 4096 * 7 + 3};
    for (size_t s = 0; s < 3; s++) {
        size_t count = counts[s];
        float *gate = random_floats(count, 4.0f), *up = random_floats(count, 1.0f);
        float *ref = malloc(count * sizeof *ref);
        memcpy(ref, gate, count * sizeof *ref);
        cpu->ops->swiglu(cpu, ref, up, count);
        float *dg = device_floats(gate, count), *du = device_floats(up, count);
        CHECK_OK(gpu->ops->swiglu(gpu, dg, du, count));
        float *out = to_host(dg, count);
        CHECK_CLOSE(out, ref, count, TOL_FP32, "swiglu %zu", count);
        cpu->ops->add(cpu, ref, up, count);
        CHECK_OK(gpu->ops->add(gpu, dg, du, count));
        free(out);
        out = to_host(dg, count);
        CHECK_CLOSE(out, ref, count, TOL_FP32, "add %zu", count);
        TIME_GPU(gpu->ops->swiglu(gpu, dg, du, count), "swiglu %zu", count);
        gpu->ops->buffer_free(gpu, dg), gpu->ops->buffer_free(gpu, du);
        free(gate), free(up), free(ref), free(out);
    }
}

/* ---------- linear layers ---------- */

/* Runs w on both backends for n random tokens and compares. */
/* x_offset: x starts that many floats into its device buffer (1: not 16-byte aligned). */
static void compare_linear_at(struct lq_linear *w, int n, double tolerance, const char *label,
                              int x_offset) {
    struct lq_error err = {0};
    struct lq_linear on_gpu = *w;
    if (gpu->ops->linear_prepare(gpu, &on_gpu, &err)) {
        CHECK_MSG(0, "linear_prepare %s: %s", label, err.message);
        return;
    }
    float *x = random_floats((size_t)n * w->cols + (size_t)x_offset, 1.0f);
    float *ref = malloc((size_t)n * w->rows * sizeof *ref);
    CHECK_OK(cpu->ops->linear(cpu, w, x + x_offset, n, ref));
    float *dx = device_floats(x, (size_t)n * w->cols + (size_t)x_offset);
    float *dy = device_floats(NULL, (size_t)n * w->rows);
    CHECK_OK(gpu->ops->linear(gpu, &on_gpu, dx + x_offset, n, dy));
    float *out = to_host(dy, (size_t)n * w->rows);
    CHECK_CLOSE(out, ref, (size_t)n * w->rows, tolerance, "%s, n %d%s", label, n,
                x_offset ? ", x not 16-byte aligned" : "");
    TIME_GPU(gpu->ops->linear(gpu, &on_gpu, dx + x_offset, n, dy), "%s, n %d", label, n);
    gpu->ops->linear_release(gpu, &on_gpu);
    gpu->ops->buffer_free(gpu, dx), gpu->ops->buffer_free(gpu, dy);
    free(x), free(ref), free(out);
}

static void compare_linear(struct lq_linear *w, int n, double tolerance, const char *label) {
    compare_linear_at(w, n, tolerance, label, 0);
}

static void test_linear_dense(void) {
    const int shapes[][3] = {{37, 53, 1}, {64, 64, 5}, {512, 256, 65}, {300, 129, 3}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        struct lq_linear w = {0};
        w.rows = shapes[s][0], w.cols = shapes[s][1];
        w.dense = random_floats((size_t)w.rows * w.cols, 0.1f);
        char label[64];
        snprintf(label, sizeof label, "dense %d x %d", w.rows, w.cols);
        compare_linear(&w, shapes[s][2], TOL_FP32, label);
        free(w.dense);
    }
}

/* An LQ layer: Q = Quantize(random) under c, and random rank-r factors. */
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

static void test_linear_lq(void) {
    /* Every b0, block sizes that divide 32, are multiples of it and neither (generic path),
     * every scale type, partial last blocks and groups, odd shapes. */
    const struct lq_nf_config configs[] = {
        {2, 2, LQ_SCALE_BF16, 16, 16},
        {3, 3, LQ_SCALE_FP16, 32, 64},
        {4, 4, LQ_SCALE_FP32, 64, 256},
        {8, 8, LQ_SCALE_FP32, 64, 256},
        {3, 8, LQ_SCALE_FP32, 64, 256},
        {2, 4, LQ_SCALE_FP16, 48, 3},
        {4, 2, LQ_SCALE_BF16, 8, 5},
        {3, 1, LQ_SCALE_FP32, 128, 7},
        /* the small-batch tensor-core path: 4 blocks per 32 codes at b0 = 3, b0 = 2 with 1 */
        {3, 4, LQ_SCALE_BF16, 8, 4},
        {2, 8, LQ_SCALE_FP32, 32, 16},
    };
    /* 300 x 1056: a partial band of 256 rows and a partial k-tile of 128 columns there */
    const int shapes[][2] = {{256, 512}, {37, 53}, {96, 4096}, {300, 1056}};
    /* 9..64 take the tensor-core path in 16, 32, 48 or 64 token slots */
    const int batches[] = {1, 3, 8, 9, 17, 33, 64, 100};
    const int ranks[] = {0, 8};
    for (size_t c = 0; c < sizeof configs / sizeof configs[0]; c++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            for (size_t r = 0; r < 2; r++) {
                struct lq_linear w;
                if (make_lq(shapes[s][0], shapes[s][1], configs[c], ranks[r], &w)) {
                    CHECK(0);
                    continue;
                }
                for (size_t b = 0; b < sizeof batches / sizeof batches[0]; b++) {
                    char label[128], text[64];
                    snprintf(label, sizeof label, "LQ %s %d x %d rank %d",
                             lq_nf_config_format(&configs[c], text, sizeof text), w.rows, w.cols,
                             w.rank);
                    /* the decode path (up to 4 tokens) is fp32; from 5 tokens on, fp16 tensor
                     * cores may take over (kernels/cuda/linear_cuda.cu) */
                    compare_linear(&w, batches[b], batches[b] <= 4 ? TOL_FP32 : TOL_FP16, label);
                }
                lq_linear_free(&w);
            }
}

/* The one-token decode kernels (LQ_CUDA_DECODE v1 to v6, kernels/cuda/linear_cuda.cu) on
 * shapes whose grids walk several row groups per CTA on a GPU of ~132 SMs (2 and 3 groups, a
 * partial last band, slices of 1024 columns and a part of one, 9 slices: too many for v3's
 * clusters), ranks whose share per slice is 0, under 32 and over 32 values: each against the
 * CPU, and v2, v3, v4 bit for bit against v1 (the same arithmetic in the same order; v5 and
 * its forced 2 and 4 rows per warp sum in another order: against the CPU only; v6 rounds the
 * values and x to fp16: against the CPU at fp16's tolerance; with its codes in registers and,
 * where the shape allows, staged in shared memory (LQ_CUDA_MMA1_STAGE=1), with x staged by
 * clusters of 2 and 4 CTAs (LQ_CUDA_MMA1_CLUSTER), and with t = x·L2ᵀ computed by its CTAs
 * where the grid allows (LQ_CUDA_MMA1_INLINE_T=1; else by the projection kernel), also with
 * every warp taking the sums it reads itself, as a warp whose poll runs out does
 * (LQ_CUDA_MMA1_SPIN=0): the same bits). The
 * environment variable is restored afterwards. */
static void test_linear_lq_gemv(void) {
    const struct lq_nf_config configs[] = {{3, 8, LQ_SCALE_FP32, 64, 256},
                                           {4, 4, LQ_SCALE_FP32, 64, 256},
                                           {3, 4, LQ_SCALE_BF16, 16, 8},
                                           {2, 8, LQ_SCALE_FP16, 8, 64}};
    /* the last: x too wide for v5's shared memory (it falls back to v1) */
    /* (4100 x 2048: rows whose tiles start 16-byte aligned at every b0, which v6 stages; a
     * partial last row group) */
    const int shapes[][2] = {{3000, 2080}, {9000, 64},  {20000, 64},
                             {100, 8224},  {40, 32800}, {4100, 2048}};
    const int ranks[] = {0, 8, 80};
    const char *before = getenv("LQ_CUDA_DECODE");
    char *saved = before ? strdup(before) : NULL;
    for (size_t c = 0; c < sizeof configs / sizeof configs[0]; c++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            for (size_t r = 0; r < sizeof ranks / sizeof ranks[0]; r++) {
                struct lq_linear w;
                if (make_lq(shapes[s][0], shapes[s][1], configs[c], ranks[r], &w)) {
                    CHECK(0);
                    continue;
                }
                char label[128], text[64];
                snprintf(label, sizeof label, "LQ %s %d x %d rank %d",
                         lq_nf_config_format(&configs[c], text, sizeof text), w.rows, w.cols,
                         w.rank);
                struct lq_error err = {0};
                struct lq_linear on_gpu = w;
                if (gpu->ops->linear_prepare(gpu, &on_gpu, &err)) {
                    CHECK_MSG(0, "linear_prepare %s: %s", label, err.message);
                    lq_linear_free(&w);
                    continue;
                }
                const size_t out_count = (size_t)w.rows;
                float *x = random_floats((size_t)w.cols, 1.0f);
                float *ref = malloc(out_count * sizeof *ref);
                CHECK_OK(cpu->ops->linear(cpu, &w, x, 1, ref));
                float *dx = device_floats(x, (size_t)w.cols);
                enum { VARIANTS = 18 };
                float *out[VARIANTS] = {NULL};
                /* v6 at lq_mma1_pick's choice, at 2, 3 and 4 CTAs per SM (the kernel's register
                 * cap), with its codes staged, with x staged by clusters of 2 (codes staged)
                 * and of 4 CTAs, and with t projected in the kernel (codes in registers, and
                 * staged), then with every warp taking t itself (the same two). Each v6
                 * variant's settings: LQ_CUDA_MMA1_ + mma1_names[i] = settings[i] (NULL: unset). */
                static const char *const variants[VARIANTS] = {
                    "v1", "v2", "v3", "v4", "v5", "v5r2", "v5r4", "v6", "v6",
                    "v6", "v6", "v6", "v6", "v6", "v6",   "v6",   "v6", "v6"};
                static const char *const mma1_names[5] = {
                    "LQ_CUDA_MMA1_CTAS", "LQ_CUDA_MMA1_STAGE", "LQ_CUDA_MMA1_CLUSTER",
                    "LQ_CUDA_MMA1_INLINE_T", "LQ_CUDA_MMA1_SPIN"};
                static const struct {
                    const char *settings[5], *how;
                } mma1[VARIANTS] = {
                    [8] = {{"2"}, " (2 CTAs per SM)"},
                    [9] = {{"3"}, " (3 CTAs per SM)"},
                    [10] = {{"4"}, " (4 CTAs per SM)"},
                    [11] = {{NULL, "1"}, " (codes staged)"},
                    [12] = {{NULL, "1", "2"}, " (clusters of 2, staged)"},
                    [13] = {{NULL, NULL, "4"}, " (clusters of 4)"},
                    [14] = {{NULL, NULL, NULL, "1"}, " (t projected here)"},
                    [15] = {{NULL, "1", NULL, "1"}, " (t projected here, staged)"},
                    [16] = {{NULL, NULL, NULL, "1", "0"}, " (t projected here, each warp's own)"},
                    [17] = {{NULL, "1", NULL, "1", "0"},
                            " (t projected here, staged, each warp's own)"},
                };
                for (int v = 0; v < VARIANTS; v++) {
                    setenv("LQ_CUDA_DECODE", variants[v], 1);
                    for (int i = 0; i < 5; i++)
                        if (mma1[v].settings[i]) setenv(mma1_names[i], mma1[v].settings[i], 1);
                    float *dy = device_floats(NULL, out_count); /* NaN poison */
                    CHECK_OK(gpu->ops->linear(gpu, &on_gpu, dx, 1, dy));
                    out[v] = to_host(dy, out_count);
                    /* v6: fp16 values and x on the tensor cores (B0 = 8: v1) */
                    const char *how = mma1[v].how ? mma1[v].how : "";
                    CHECK_CLOSE(out[v], ref, out_count, v >= 7 ? TOL_FP16 : TOL_FP32, "%s, %s%s",
                                label, variants[v], how);
                    TIME_GPU(gpu->ops->linear(gpu, &on_gpu, dx, 1, dy), "%s, n 1, %s%s", label,
                             variants[v], how);
                    for (int i = 0; i < 5; i++)
                        if (mma1[v].settings[i]) unsetenv(mma1_names[i]);
                    gpu->ops->buffer_free(gpu, dy);
                }
                for (int v = 1; v < 4; v++)
                    CHECK_MSG(out[0] && out[v] &&
                                  memcmp(out[0], out[v], out_count * sizeof(float)) == 0,
                              "%s: %s differs from v1 in its bits", label, variants[v]);
                gpu->ops->linear_release(gpu, &on_gpu);
                gpu->ops->buffer_free(gpu, dx);
                /* the same sums unless the row groups per CTA differ (the CTAs a SM take set
                 * the grid): fp32 rounding apart */
                for (int v = 8; v < 11; v++)
                    if (out[7] && out[v])
                        CHECK_CLOSE(out[v], out[7], out_count, TOL_FP32,
                                    "%s: v6%s against its own choice", label, mma1[v].how);
                /* staged or not, in clusters or not, t projected here or by its kernel: the
                 * same rows per CTA and the same arithmetic (x is a plain input: no norm's sum to
                 * split; the kernel's pieces are the projection kernel's slice sums, in its
                 * order) */
                for (int v = 11; v < VARIANTS; v++)
                    CHECK_MSG(out[7] && out[v] &&
                                  memcmp(out[7], out[v], out_count * sizeof(float)) == 0,
                              "%s: v6%s differs in its bits from v6 alone", label, mma1[v].how);
                for (int v = 0; v < VARIANTS; v++) free(out[v]);
                free(x), free(ref);
                lq_linear_free(&w);
            }
    if (saved)
        setenv("LQ_CUDA_DECODE", saved, 1);
    else
        unsetenv("LQ_CUDA_DECODE");
    free(saved);
}

/* count LQ layers, layer i of shape {rows, cols, rank} shapes[i] under configs[i], on the host
 * and prepared on the GPU: how many were made (those are the caller's to release and free). */
static int make_layers(int count, const struct lq_nf_config *configs, const int (*shapes)[3],
                       struct lq_linear *host, struct lq_linear *dev) {
    int made = 0;
    for (int i = 0; i < count; i++) {
        if (make_lq(shapes[i][0], shapes[i][1], configs[i], shapes[i][2], &host[i])) break;
        struct lq_error err = {0};
        dev[i] = host[i];
        if (gpu->ops->linear_prepare(gpu, &dev[i], &err)) {
            CHECK_MSG(0, "linear_prepare: %s", err.message);
            lq_linear_free(&host[i]);
            break;
        }
        made++;
    }
    return made;
}

/* linear_group (three layers of one input, as a step's Q, K and V): bit for bit what linear
 * gives layer by layer, for each one-token kernel (each layer's projection and decode kernel
 * then run apart from the others', in another order), for 1 to 4 tokens (decoded together) and
 * 5 and 9 (layer by layer), ranks 0, 8 and 80 mixed, two configurations in one group. */
static void test_linear_group(void) {
    const struct lq_nf_config configs[] = {{3, 8, LQ_SCALE_FP32, 64, 256},
                                           {2, 8, LQ_SCALE_FP16, 32, 16},
                                           {3, 4, LQ_SCALE_BF16, 16, 8}};
    const int shapes[][3] = {{1001, 2080, 80}, {9000, 2080, 0}, {3000, 2080, 8}};
    struct lq_linear host[3], dev[3];
    const int made = make_layers(3, configs, shapes, host, dev);
    CHECK(made == 3);
    const char *before = getenv("LQ_CUDA_DECODE");
    char *saved = before ? strdup(before) : NULL;
    static const char *const variants[] = {"auto", "v1", "v5", "v6"};
    /* 5 to 64: the tensor-core GEMM's group (one projection launch, the GEMMs chained; the
     * rank-0 layer in the middle; the first layer's 1001 rows at an odd count: partial sums
     * of a size that is no multiple of 4 before the next layer's, which its reduction reads as
     * float4s) */
    const int tokens[] = {1, 2, 4, 5, 9, 16, 33, 64};
    for (size_t v = 0; v < sizeof variants / sizeof variants[0] && made == 3; v++)
        for (size_t t = 0; t < sizeof tokens / sizeof tokens[0]; t++) {
            if (v > 0 && tokens[t] > 4) continue; /* the one-token kernel does not matter there */
            setenv("LQ_CUDA_DECODE", variants[v], 1);
            const int n = tokens[t], cols = shapes[0][1];
            float *x = random_floats((size_t)n * cols, 1.0f);
            float *dx = device_floats(x, (size_t)n * cols);
            float *apart[3], *together[3];
            const struct lq_linear *w[3] = {&dev[0], &dev[1], &dev[2]};
            for (int i = 0; i < 3; i++) {
                apart[i] = device_floats(NULL, (size_t)n * shapes[i][0]);
                together[i] = device_floats(NULL, (size_t)n * shapes[i][0]);
                CHECK_OK(gpu->ops->linear(gpu, &dev[i], dx, n, apart[i]));
            }
            CHECK_OK(gpu->ops->linear_group(gpu, w, 3, dx, n, together));
            for (int i = 0; i < 3; i++) {
                const size_t count = (size_t)n * shapes[i][0];
                float *a = to_host(apart[i], count), *b = to_host(together[i], count);
                float *ref = malloc(count * sizeof *ref);
                CHECK_OK(cpu->ops->linear(cpu, &host[i], x, n, ref));
                CHECK_CLOSE(b, ref, count,
                            strcmp(variants[v], "v6") == 0 || n > 4 ? TOL_FP16 : TOL_FP32,
                            "group layer %d, %s, n %d", i, variants[v], n);
                CHECK_MSG(a && b && memcmp(a, b, count * sizeof(float)) == 0,
                          "group layer %d, %s, n %d: not linear's bits", i, variants[v], n);
                free(a), free(b), free(ref);
            }
            TIME_GPU((gpu->ops->linear(gpu, &dev[0], dx, n, apart[0]),
                      gpu->ops->linear(gpu, &dev[1], dx, n, apart[1]),
                      gpu->ops->linear(gpu, &dev[2], dx, n, apart[2])),
                     "three layers apart, %s, n %d", variants[v], n);
            TIME_GPU(gpu->ops->linear_group(gpu, w, 3, dx, n, together),
                     "three layers together, %s, n %d", variants[v], n);
            for (int i = 0; i < 3; i++)
                gpu->ops->buffer_free(gpu, apart[i]), gpu->ops->buffer_free(gpu, together[i]);
            gpu->ops->buffer_free(gpu, dx);
            free(x);
        }
    if (saved)
        setenv("LQ_CUDA_DECODE", saved, 1);
    else
        unsetenv("LQ_CUDA_DECODE");
    free(saved);
    for (int i = 0; i < made; i++) gpu->ops->linear_release(gpu, &dev[i]), lq_linear_free(&host[i]);
}

/* Grid edges of the small-batch tensor-core path (linear_mma_cuda.cu) that small shapes never
 * reach on a 132-SM GPU: enough row bands that each CTA streams several k-tiles (the prefetch),
 * the last one partial (also for the 16-token kernel, two CTAs per SM); more bands than SMs,
 * so that one split writes y without a reduction. */
static void test_linear_lq_mma(void) {
    const struct lq_nf_config configs[] = {{3, 8, LQ_SCALE_FP32, 64, 256},
                                           {4, 3, LQ_SCALE_FP16, 8, 16}};
    /* the last: 16 tokens, whose kernel an SM holds twice, with 33 bands still left several
     * k-tiles per CTA (8 splits of 32) */
    const int cases[][4] = {
        {4352, 1056, 16, 40}, {4352, 1024, 8, 64}, {33792, 128, 0, 17}, {8448, 4096, 8, 16}};
    for (size_t c = 0; c < sizeof configs / sizeof configs[0]; c++)
        for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
            struct lq_linear w;
            if (make_lq(cases[k][0], cases[k][1], configs[c], cases[k][2], &w)) {
                CHECK(0);
                continue;
            }
            char label[128], text[64];
            snprintf(label, sizeof label, "LQ %s %d x %d rank %d",
                     lq_nf_config_format(&configs[c], text, sizeof text), w.rows, w.cols, w.rank);
            compare_linear(&w, cases[k][3], TOL_FP16, label);
            /* x not 16-byte aligned: the staging's scalar loads (and the projection's) */
            if (k < 2) compare_linear_at(&w, cases[k][3], TOL_FP16, label, 1);
            lq_linear_free(&w);
        }
}

/* The low-rank products of the prefill path run on TF32 tensor cores by default
 * (test_linear_lq checks that); with LQ_CUDA_LOWRANK_TF32=0 as SGEMMs: the same cases there
 * (100 tokens, and every count on 37 x 53, which the tensor-core GEMM does not take; 17 and 64
 * on 300 x 1056 take it), a rank large enough that a wrong product shows far above the
 * tolerance. */
static void test_linear_lq_lowrank_sgemm(void) {
    const struct lq_nf_config configs[] = {{3, 8, LQ_SCALE_FP32, 64, 256},
                                           {4, 2, LQ_SCALE_BF16, 8, 5}};
    const int shapes[][2] = {{300, 1056}, {37, 53}};
    const int batches[] = {17, 64, 100};
    setenv("LQ_CUDA_LOWRANK_TF32", "0", 1);
    for (size_t c = 0; c < sizeof configs / sizeof configs[0]; c++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            struct lq_linear w;
            if (make_lq(shapes[s][0], shapes[s][1], configs[c], 24, &w)) {
                CHECK(0);
                continue;
            }
            for (size_t b = 0; b < sizeof batches / sizeof batches[0]; b++) {
                char label[128], text[64];
                snprintf(label, sizeof label, "LQ %s %d x %d rank %d, low rank as SGEMMs",
                         lq_nf_config_format(&configs[c], text, sizeof text), w.rows, w.cols,
                         w.rank);
                compare_linear(&w, batches[b], TOL_FP16, label);
            }
            lq_linear_free(&w);
        }
    unsetenv("LQ_CUDA_LOWRANK_TF32");
}

/* The adapter ops (lowrank_cuda.cu): linear_base (the layer without its own pair) and
 * lowrank_add (y += (x · L2ᵀ) · L1ᵀ with uploaded factors, on a slice of rows as the batched
 * forward pass adds each adapter group's pair), each against the CPU op; and linear_base +
 * lowrank_add of the layer's own pair against the CPU's linear. */
static void test_linear_adapter(void) {
    const struct lq_nf_config configs[] = {{4, 8, LQ_SCALE_FP32, 64, 256},
                                           {3, 3, LQ_SCALE_FP16, 32, 64},
                                           {2, 4, LQ_SCALE_FP16, 48, 3}};
    const int shapes[][2] = {{256, 512}, {37, 53}, {96, 4096}};
    const int batches[] = {1, 3, 8, 9, 64, 100};
    const int adapter_ranks[] = {1, 8, 64};
    for (size_t c = 0; c < sizeof configs / sizeof configs[0]; c++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            struct lq_linear w;
            if (make_lq(shapes[s][0], shapes[s][1], configs[c], 8, &w)) {
                CHECK(0);
                continue;
            }
            struct lq_linear on_gpu = w;
            struct lq_error err = {0};
            if (gpu->ops->linear_prepare(gpu, &on_gpu, &err)) {
                CHECK_MSG(0, "linear_prepare: %s", err.message);
                lq_linear_free(&w);
                continue;
            }
            const float *own_L1 = NULL, *own_L2 = NULL;
            CHECK_OK(gpu->ops->weights_upload(gpu, w.lora_B, (size_t)w.rows * 8, &own_L1, &err));
            CHECK_OK(gpu->ops->weights_upload(gpu, w.lora_A, (size_t)8 * w.cols, &own_L2, &err));
            for (size_t b = 0; b < sizeof batches / sizeof batches[0]; b++) {
                const int n = batches[b];
                const size_t in = (size_t)n * w.cols, out = (size_t)n * w.rows;
                const double tolerance = n <= 4 ? TOL_FP32 : TOL_FP16;
                char label[128], text[64];
                snprintf(label, sizeof label, "%s %d x %d, n %d",
                         lq_nf_config_format(&configs[c], text, sizeof text), w.rows, w.cols, n);
                float *x = random_floats(in, 1.0f), *ref = malloc(out * sizeof *ref);
                float *dx = device_floats(x, in), *dy = device_floats(NULL, out);
                /* linear_base */
                CHECK_OK(cpu->ops->linear_base(cpu, &w, x, n, ref));
                CHECK_OK(gpu->ops->linear_base(gpu, &on_gpu, dx, n, dy));
                float *got = to_host(dy, out);
                CHECK_CLOSE(got, ref, out, tolerance, "linear_base %s", label);
                free(got);
                TIME_GPU(gpu->ops->linear_base(gpu, &on_gpu, dx, n, dy), "linear_base %s", label);
                /* + the own pair: the CPU's linear */
                CHECK_OK(gpu->ops->lowrank_add(gpu, own_L1, own_L2, w.rows, w.cols, 8, dx, n, dy));
                CHECK_OK(cpu->ops->linear(cpu, &w, x, n, ref));
                got = to_host(dy, out);
                CHECK_CLOSE(got, ref, out, tolerance, "linear_base + lowrank_add (own) %s", label);
                free(got);
                /* an adapter's pair of another rank on rows [n / 3, n): fp32 on both sides */
                for (size_t r = 0; r < sizeof adapter_ranks / sizeof adapter_ranks[0]; r++) {
                    const int rank = adapter_ranks[r], first = n / 3, rows = n - first;
                    float *L1 = random_floats((size_t)w.rows * rank, 0.05f);
                    float *L2 = random_floats((size_t)rank * w.cols, 0.05f);
                    float *y = random_floats(out, 1.0f);
                    const float *dL1 = NULL, *dL2 = NULL;
                    CHECK_OK(gpu->ops->weights_upload(gpu, L1, (size_t)w.rows * rank, &dL1, &err));
                    CHECK_OK(gpu->ops->weights_upload(gpu, L2, (size_t)rank * w.cols, &dL2, &err));
                    float *dz = device_floats(y, out);
                    CHECK_OK(cpu->ops->lowrank_add(cpu, L1, L2, w.rows, w.cols, rank,
                                                   x + (size_t)first * w.cols, rows,
                                                   y + (size_t)first * w.rows));
                    CHECK_OK(gpu->ops->lowrank_add(gpu, dL1, dL2, w.rows, w.cols, rank,
                                                   dx + (size_t)first * w.cols, rows,
                                                   dz + (size_t)first * w.rows));
                    got = to_host(dz, out);
                    CHECK_CLOSE(got, y, out, TOL_FP32, "lowrank_add rank %d, rows %d..%d of %s",
                                rank, first, n, label);
                    TIME_GPU(gpu->ops->lowrank_add(gpu, dL1, dL2, w.rows, w.cols, rank, dx, n, dz),
                             "lowrank_add rank %d %s", rank, label);
                    gpu->ops->weights_release(gpu, dL1), gpu->ops->weights_release(gpu, dL2);
                    gpu->ops->buffer_free(gpu, dz);
                    free(L1), free(L2), free(y), free(got);
                }
                gpu->ops->buffer_free(gpu, dx), gpu->ops->buffer_free(gpu, dy);
                free(x), free(ref);
            }
            gpu->ops->weights_release(gpu, own_L1), gpu->ops->weights_release(gpu, own_L2);
            gpu->ops->linear_release(gpu, &on_gpu);
            lq_linear_free(&w);
        }
}

static void test_matmul(void) {
    const int shapes[][3] = {{1000, 64, 1}, {512, 288, 17}, {33, 7, 2}};
    for (size_t s = 0; s < 3; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], n = shapes[s][2];
        float *w = random_floats((size_t)rows * cols, 0.1f),
              *x = random_floats((size_t)n * cols, 1.0f);
        float *ref = malloc((size_t)n * rows * sizeof *ref);
        cpu->ops->matmul(cpu, w, rows, cols, x, n, ref);
        struct lq_error err = {0};
        const float *dw = NULL;
        CHECK_OK(gpu->ops->weights_upload(gpu, w, (size_t)rows * cols, &dw, &err));
        float *dx = device_floats(x, (size_t)n * cols), *dy = device_floats(NULL, (size_t)n * rows);
        CHECK_OK(gpu->ops->matmul(gpu, dw, rows, cols, dx, n, dy));
        float *out = to_host(dy, (size_t)n * rows);
        CHECK_CLOSE(out, ref, (size_t)n * rows, TOL_FP32, "matmul %d x %d, n %d", rows, cols, n);
        TIME_GPU(gpu->ops->matmul(gpu, dw, rows, cols, dx, n, dy), "matmul %d x %d, n %d", rows,
                 cols, n);
        gpu->ops->weights_release(gpu, dw);
        gpu->ops->buffer_free(gpu, dx), gpu->ops->buffer_free(gpu, dy);
        free(w), free(x), free(ref), free(out);
    }
}

/* ---------- attention ---------- */

/* LQ_CUDA_ATTENTION_DECODE: 0 puts one-token attention on the tile kernel (read per call). */
static void attention_kernel(int tile) {
    if (tile)
        setenv("LQ_CUDA_ATTENTION_DECODE", "0", 1);
    else
        unsetenv("LQ_CUDA_ATTENTION_DECODE");
}

static void test_attention(void) {
    /* {n, start, heads, kv_heads, head_dim} */
    const int cases[][5] = {{13, 0, 8, 4, 8},       {1, 500, 8, 4, 8}, {5, 100, 32, 8, 128},
                            {1, 4095, 32, 32, 128}, {7, 0, 4, 4, 48},  {3, 61, 2, 1, 256},
                            {64, 0, 32, 8, 64},     {1, 0, 8, 8, 64}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int n = cases[k][0], start = cases[k][1], heads = cases[k][2], kv = cases[k][3];
        int hd = cases[k][4], positions = start + n;
        size_t q_count = (size_t)n * heads * hd, kv_count = (size_t)positions * kv * hd;
        float *q = random_floats(q_count, 1.0f), *kc = random_floats(kv_count, 1.0f);
        float *vc = random_floats(kv_count, 1.0f), *ref = malloc(q_count * sizeof *ref);
        CHECK_OK(cpu->ops->attention(cpu, q, kc, vc, n, start, heads, kv, hd, ref));
        float *dq = device_floats(q, q_count), *dk = device_floats(kc, kv_count);
        float *dv = device_floats(vc, kv_count);
        for (int tile = 0; tile < 2; tile++) { /* one token: the decode kernel, then the tile one */
            attention_kernel(tile);
            const char *kernel = tile ? "tile kernel" : "default kernel";
            float *dout = device_floats(NULL, q_count);
            CHECK_OK(gpu->ops->attention(gpu, dq, dk, dv, n, start, heads, kv, hd, dout));
            float *out = to_host(dout, q_count);
            CHECK_CLOSE(out, ref, q_count, TOL_FP32,
                        "attention n %d start %d heads %d/%d hd %d, %s", n, start, heads, kv, hd,
                        kernel);
            TIME_GPU(gpu->ops->attention(gpu, dq, dk, dv, n, start, heads, kv, hd, dout),
                     "attention n %d start %d heads %d/%d hd %d, %s", n, start, heads, kv, hd,
                     kernel);
            gpu->ops->buffer_free(gpu, dout);
            free(out);
        }
        attention_kernel(0);
        gpu->ops->buffer_free(gpu, dq), gpu->ops->buffer_free(gpu, dk);
        gpu->ops->buffer_free(gpu, dv);
        free(q), free(kc), free(vc), free(ref);
    }
}

static void test_attention_batch(void) {
    enum { N = 6 };
    const int heads = 8, kv = 2, hd = 64, context = 3000;
    const int positions[N] = {0, 1, 17, 2999, 640, 5};
    size_t kv_dim = (size_t)kv * hd, q_dim = (size_t)heads * hd;
    float *kc[N], *vc[N], *dkc[N], *dvc[N];
    for (int i = 0; i < N; i++) {
        kc[i] = random_floats((size_t)context * kv_dim, 1.0f);
        vc[i] = random_floats((size_t)context * kv_dim, 1.0f);
        dkc[i] = device_floats(kc[i], (size_t)context * kv_dim);
        dvc[i] = device_floats(vc[i], (size_t)context * kv_dim);
    }
    float *q = random_floats(N * q_dim, 1.0f), *kn = random_floats(N * kv_dim, 1.0f);
    float *vn = random_floats(N * kv_dim, 1.0f), *ref = malloc(N * q_dim * sizeof *ref);
    CHECK_OK(cpu->ops->attention_batch(cpu, q, kn, vn, kc, vc, positions, N, heads, kv, hd, ref));
    float *dq = device_floats(q, N * q_dim), *dkn = device_floats(kn, N * kv_dim);
    float *dvn = device_floats(vn, N * kv_dim), *dout = device_floats(NULL, N * q_dim);
    CHECK_OK(
        gpu->ops->attention_batch(gpu, dq, dkn, dvn, dkc, dvc, positions, N, heads, kv, hd, dout));
    float *out = to_host(dout, N * q_dim);
    CHECK_CLOSE(out, ref, N * q_dim, TOL_FP32, "attention_batch of %d sequences", N);
    /* cache pointers and positions in device memory, launch shapes from a bound on the keys
     * (decode-step graphs): bounds just above the longest sequence and far above it */
    void *device_k = device_bytes(dkc, sizeof dkc), *device_v = device_bytes(dvc, sizeof dvc);
    void *device_positions = device_bytes(positions, sizeof positions);
    const int bounds[] = {3000, 4096, 32768};
    for (int b = 0; b < 6; b++) { /* the decode kernel, then the tile kernel */
        attention_kernel(b >= 3);
        float *dout2 = device_floats(NULL, N * q_dim);
        CHECK_OK(gpu->ops->attention_batch_device(gpu, dq, dkn, dvn, device_k, device_v,
                                                  device_positions, N, heads, kv, hd, bounds[b % 3],
                                                  dout2));
        float *out2 = to_host(dout2, N * q_dim);
        CHECK_CLOSE(out2, ref, N * q_dim, TOL_FP32,
                    "attention_batch_device of %d sequences, keys bound %d, %s", N, bounds[b % 3],
                    b >= 3 ? "tile kernel" : "default kernel");
        gpu->ops->buffer_free(gpu, dout2);
        free(out2);
    }
    attention_kernel(0);
    gpu->ops->buffer_free(gpu, device_k), gpu->ops->buffer_free(gpu, device_v);
    gpu->ops->buffer_free(gpu, device_positions);
    for (int i = 0; i < N; i++) { /* the new rows landed in each cache at its position */
        float *cache = to_host(dkc[i], (size_t)context * kv_dim);
        CHECK(memcmp(cache, kc[i], (size_t)context * kv_dim * sizeof(float)) == 0);
        free(cache);
        gpu->ops->buffer_free(gpu, dkc[i]), gpu->ops->buffer_free(gpu, dvc[i]);
        free(kc[i]), free(vc[i]);
    }
    gpu->ops->buffer_free(gpu, dq), gpu->ops->buffer_free(gpu, dkn);
    gpu->ops->buffer_free(gpu, dvn), gpu->ops->buffer_free(gpu, dout);
    free(q), free(kn), free(vn), free(ref), free(out);
}

/* ---------- decomposition ---------- */

/* An environment variable's value before a case changes it, so that a run started with it
 * set (cuda_ops_decompose_jacobi) keeps it after the case. */
struct saved_env {
    const char *name;
    int set;
    char value[64];
};

static struct saved_env save_env(const char *name) {
    struct saved_env saved = {name, 0, ""};
    const char *value = getenv(name);
    if (value) saved.set = 1, snprintf(saved.value, sizeof saved.value, "%s", value);
    return saved;
}

static void restore_env(const struct saved_env *saved) {
    if (saved->set)
        setenv(saved->name, saved->value, 1);
    else
        unsetenv(saved->name);
}

/* linear_fused: the norm before, the residual add and SwiGLU taken into the one-token kernel
 * (v6), against the CPU's unfused ops (fp16's tolerance: v6) and against the GPU's unfused ops
 * (LQ_CUDA_FUSE=0: the same kernels fed a materialized input, so only the norm's scale and the
 * low-rank term's order of rounding differ; 1e-4: a scale one ulp off flips the fp16 rounding
 * of an x value now and then, ~1e-5 of y); three layers of one input written, one layer
 * added, two (gate and up, equal rows) through SwiGLU; 1 and 2 tokens (2: apart inside the
 * op), under v6 and v1 (apart), and groups with a B0 = 8 layer that v6 cannot take (apart).
 * Timed fused and apart. */
static void fused_case(const struct lq_linear *host, struct lq_linear *dev, int count, int kind,
                       enum lq_linear_output output, int n, const char *variant) {
    const int cols = host[0].cols;
    static const char *const kinds[] = {"x", "rmsnorm(x)"};
    static const char *const outputs[] = {"", ", y +=", ", swiglu"};
    float *x = random_floats((size_t)n * cols, kind == LQ_INPUT_RMSNORM ? 7.0f : 1.0f);
    float *weight = random_floats((size_t)cols, 1.0f);
    float *input = malloc((size_t)n * cols * sizeof(float));
    memcpy(input, x, (size_t)n * cols * sizeof(float));
    if (kind == LQ_INPUT_RMSNORM)
        CHECK_OK(cpu->ops->rmsnorm(cpu, x, weight, n, cols, 1e-5f, input));
    float *dx = device_floats(x, (size_t)n * cols), *dweight = device_floats(weight, (size_t)cols);
    const struct lq_linear_input in = {(enum lq_linear_input_kind)kind, dx,
                                       kind == LQ_INPUT_RMSNORM ? dweight : NULL, 1e-5f};
    const struct lq_linear *w[3] = {&dev[0], &dev[1], &dev[2]};
    /* what y holds before (the residual to add to), and the CPU's result in ref */
    float *prior[3] = {NULL, NULL, NULL}, *fused[3], *apart[3], *ref[3];
    const int checked = output == LQ_OUTPUT_SWIGLU ? 1 : count; /* SwiGLU: y[0]; y[1] scratch */
    for (int i = 0; i < count; i++) {
        const size_t rows = (size_t)n * host[i].rows;
        prior[i] = output == LQ_OUTPUT_ADD ? random_floats(rows, 1.0f) : NULL;
        ref[i] = malloc(rows * sizeof(float));
        CHECK_OK(cpu->ops->linear(cpu, &host[i], input, n, ref[i]));
        if (output == LQ_OUTPUT_ADD) CHECK_OK(cpu->ops->add(cpu, ref[i], prior[i], rows));
    }
    if (output == LQ_OUTPUT_SWIGLU)
        CHECK_OK(cpu->ops->swiglu(cpu, ref[0], ref[1], (size_t)n * host[0].rows));
    const struct saved_env fuse = save_env("LQ_CUDA_FUSE");
    for (int pass = 0; pass < 2; pass++) { /* fused, then apart */
        setenv("LQ_CUDA_FUSE", pass ? "0" : "1", 1);
        float *dy[3];
        for (int i = 0; i < count; i++)
            dy[i] = device_floats(prior[i], (size_t)n * host[i].rows); /* or NaN poison */
        CHECK_OK(gpu->ops->linear_fused(gpu, w, count, &in, n, dy, output));
        for (int i = 0; i < checked; i++) {
            (pass ? apart : fused)[i] = to_host(dy[i], (size_t)n * host[i].rows);
            CHECK_CLOSE((pass ? apart : fused)[i], ref[i], (size_t)n * host[i].rows, TOL_FP16,
                        "fused layer %d, %s%s, %s, n %d, %s", i, kinds[kind], outputs[output],
                        variant, n, pass ? "apart" : "fused");
        }
        TIME_GPU(gpu->ops->linear_fused(gpu, w, count, &in, n, dy, output),
                 "%d layer(s), %s%s, %s, n %d, %s", count, kinds[kind], outputs[output], variant, n,
                 pass ? "apart" : "fused");
        for (int i = 0; i < count; i++) gpu->ops->buffer_free(gpu, dy[i]);
    }
    restore_env(&fuse);
    for (int i = 0; i < checked; i++) {
        CHECK_CLOSE(fused[i], apart[i], (size_t)n * host[i].rows, 1e-4,
                    "fused layer %d against apart, %s%s, %s, n %d", i, kinds[kind], outputs[output],
                    variant, n);
        free(fused[i]), free(apart[i]);
    }
    for (int i = 0; i < count; i++) free(ref[i]), free(prior[i]);
    gpu->ops->buffer_free(gpu, dx), gpu->ops->buffer_free(gpu, dweight);
    free(x), free(weight), free(input);
}

static void test_linear_fused(void) {
    const struct lq_nf_config configs[] = {{3, 8, LQ_SCALE_FP32, 64, 256},
                                           {2, 8, LQ_SCALE_FP16, 32, 16},
                                           {4, 4, LQ_SCALE_BF16, 16, 8},
                                           {3, 8, LQ_SCALE_FP32, 8, 64}, /* B0 = 8: not v6 */
                                           {3, 4, LQ_SCALE_BF16, 64, 16}};
    const int shapes[][3] = {
        {3000, 2080, 8}, {1000, 2080, 80}, {520, 2080, 0}, {1000, 2080, 16}, {1000, 2080, 0}};
    struct lq_linear host[5], dev[5];
    const int made = make_layers(5, configs, shapes, host, dev);
    CHECK(made == 5);
    const struct saved_env decode = save_env("LQ_CUDA_DECODE");
    static const char *const variants[] = {"v6", "v1"};
    for (size_t v = 0; v < 2 && made == 5; v++) {
        setenv("LQ_CUDA_DECODE", variants[v], 1);
        CHECK(gpu->ops->fuses_linears(gpu, 1) == (v == 0) && !gpu->ops->fuses_linears(gpu, 2));
        for (int n = 1; n <= 2; n++)
            for (int kind = LQ_INPUT_PLAIN; kind <= LQ_INPUT_RMSNORM; kind++) {
                fused_case(host, dev, 3, kind, LQ_OUTPUT_WRITE, n, variants[v]);
                fused_case(host, dev, 1, kind, LQ_OUTPUT_ADD, n, variants[v]);
                /* gate and up: layers 1 and 4 (1000 rows each, ranks 80 and 0) */
                struct lq_linear pair_host[2] = {host[1], host[4]}, pair_dev[2] = {dev[1], dev[4]};
                fused_case(pair_host, pair_dev, 2, kind, LQ_OUTPUT_SWIGLU, n, variants[v]);
            }
        fused_case(host + 1, dev + 1, 3, LQ_INPUT_RMSNORM, LQ_OUTPUT_WRITE, 1, variants[v]);
        fused_case(host + 3, dev + 3, 1, LQ_INPUT_RMSNORM, LQ_OUTPUT_ADD, 1, variants[v]);
        struct lq_linear b8_host[2] = {host[3], host[4]}, b8_dev[2] = {dev[3], dev[4]};
        fused_case(b8_host, b8_dev, 2, LQ_INPUT_RMSNORM, LQ_OUTPUT_SWIGLU, 1, variants[v]);
    }
    restore_env(&decode);
    /* refused: several layers added, SwiGLU over one layer or unequal rows */
    float *d = device_floats(NULL, 8192);
    const struct lq_linear *w[2] = {&dev[0], &dev[1]};
    float *y[2] = {d, d + 4096};
    const struct lq_linear_input in = {LQ_INPUT_PLAIN, d + 2048, NULL, 0.0f};
    CHECK(gpu->ops->linear_fused(gpu, w, 2, &in, 1, y, LQ_OUTPUT_ADD) == LQ_EINVAL);
    CHECK(gpu->ops->linear_fused(gpu, w, 1, &in, 1, y, LQ_OUTPUT_SWIGLU) == LQ_EINVAL);
    CHECK(gpu->ops->linear_fused(gpu, w, 2, &in, 1, y, LQ_OUTPUT_SWIGLU) == LQ_EINVAL);
    gpu->ops->buffer_free(gpu, d);
    for (int i = 0; i < made; i++) gpu->ops->linear_release(gpu, &dev[i]), lq_linear_free(&host[i]);
}

/* rope_attention_batch_device: the rotary embedding done by the one-token attention kernel
 * against rope_qk_device then attention_batch_device, bit for bit (the output and every cache),
 * and both against the CPU's rope then attention_batch; head_dim 64 and 128 (in the kernel) and
 * 48 (the two ops inside the op), GQA, a position past the cached cos/sin rows (9000), one
 * split and several (keys bounds 128 and 16384). */
static void test_rope_attention(void) {
    enum { N = 6 };
    const int shapes[][3] = {{8, 2, 64}, {32, 32, 128}, {4, 4, 48}}; /* heads, kv, head_dim */
    const int positions[N] = {0, 1, 17, 9000, 640, 5}, context = 9001;
    const float theta = 10000.0f;
    void *device_positions = device_bytes(positions, sizeof positions);
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int heads = shapes[c][0], kv = shapes[c][1], hd = shapes[c][2];
        const size_t kv_dim = (size_t)kv * hd, q_dim = (size_t)heads * hd;
        const size_t cache = (size_t)context * kv_dim;
        float *kc[N], *vc[N], *dkc[2][N], *dvc[2][N];
        for (int i = 0; i < N; i++) {
            kc[i] = random_floats(cache, 1.0f), vc[i] = random_floats(cache, 1.0f);
            for (int w = 0; w < 2; w++)
                dkc[w][i] = device_floats(kc[i], cache), dvc[w][i] = device_floats(vc[i], cache);
        }
        float *q = random_floats(N * q_dim, 1.0f), *kn = random_floats(N * kv_dim, 1.0f);
        float *vn = random_floats(N * kv_dim, 1.0f), *ref = malloc(N * q_dim * sizeof *ref);
        /* the CPU: rope in place, then attention */
        float *q_cpu = malloc(N * q_dim * sizeof(float)),
              *kn_cpu = malloc(N * kv_dim * sizeof(float));
        memcpy(q_cpu, q, N * q_dim * sizeof(float));
        memcpy(kn_cpu, kn, N * kv_dim * sizeof(float));
        CHECK_OK(cpu->ops->rope(cpu, q_cpu, N, heads, hd, positions, theta));
        CHECK_OK(cpu->ops->rope(cpu, kn_cpu, N, kv, hd, positions, theta));
        CHECK_OK(cpu->ops->attention_batch(cpu, q_cpu, kn_cpu, vn, kc, vc, positions, N, heads, kv,
                                           hd, ref));
        const int bounds[] = {16384, 9088};
        for (int b = 0; b < 2; b++) {
            float *outs[2] = {NULL, NULL};
            /* 0: the two ops, 1: the one, 2 (--time): both timed on caches of their own, since
             * each run rotates q and k in place again and writes its cache rows */
            for (int w = 0; w < (timing ? 3 : 2); w++) {
                float *dq = device_floats(q, N * q_dim), *dkn = device_floats(kn, N * kv_dim);
                float *dvn = device_floats(vn, N * kv_dim), *dout = device_floats(NULL, N * q_dim);
                float *scratch_k[N], *scratch_v[N];
                for (int i = 0; i < N && w == 2; i++)
                    scratch_k[i] = device_floats(kc[i], cache),
                    scratch_v[i] = device_floats(vc[i], cache);
                void *device_k = device_bytes(w == 2 ? scratch_k : dkc[w], sizeof dkc[0]);
                void *device_v = device_bytes(w == 2 ? scratch_v : dvc[w], sizeof dvc[0]);
                if (w == 0) {
                    CHECK_OK(gpu->ops->rope_qk_device(gpu, dq, heads, dkn, kv, N, hd,
                                                      device_positions, theta));
                    CHECK_OK(gpu->ops->attention_batch_device(gpu, dq, dkn, dvn, device_k, device_v,
                                                              device_positions, N, heads, kv, hd,
                                                              bounds[b], dout));
                } else if (w == 1) {
                    CHECK_OK(gpu->ops->rope_attention_batch_device(
                        gpu, dq, dkn, dvn, device_k, device_v, device_positions, N, heads, kv, hd,
                        bounds[b], theta, dout));
                } else {
                    TIME_GPU(gpu->ops->rope_attention_batch_device(
                                 gpu, dq, dkn, dvn, device_k, device_v, device_positions, N, heads,
                                 kv, hd, bounds[b], theta, dout),
                             "rope + attention in one op, heads %d/%d, head_dim %d, bound %d",
                             heads, kv, hd, bounds[b]);
                    TIME_GPU((gpu->ops->rope_qk_device(gpu, dq, heads, dkn, kv, N, hd,
                                                       device_positions, theta),
                              gpu->ops->attention_batch_device(gpu, dq, dkn, dvn, device_k,
                                                               device_v, device_positions, N, heads,
                                                               kv, hd, bounds[b], dout)),
                             "rope, then attention, heads %d/%d, head_dim %d, bound %d", heads, kv,
                             hd, bounds[b]);
                }
                if (w < 2) outs[w] = to_host(dout, N * q_dim);
                for (int i = 0; i < N && w == 2; i++)
                    gpu->ops->buffer_free(gpu, scratch_k[i]),
                        gpu->ops->buffer_free(gpu, scratch_v[i]);
                gpu->ops->buffer_free(gpu, dq), gpu->ops->buffer_free(gpu, dkn);
                gpu->ops->buffer_free(gpu, dvn), gpu->ops->buffer_free(gpu, dout);
                gpu->ops->buffer_free(gpu, device_k), gpu->ops->buffer_free(gpu, device_v);
            }
            CHECK_CLOSE(outs[1], ref, N * q_dim, TOL_FP32,
                        "rope + attention, heads %d/%d, head_dim %d, bound %d", heads, kv, hd,
                        bounds[b]);
            CHECK_MSG(outs[0] && outs[1] &&
                          memcmp(outs[0], outs[1], N * q_dim * sizeof(float)) == 0,
                      "rope + attention, heads %d/%d, head_dim %d, bound %d: not the two ops' "
                      "bits",
                      heads, kv, hd, bounds[b]);
            free(outs[0]), free(outs[1]);
        }
        for (int i = 0; i < N; i++) { /* both wrote the same rotated row, nothing else */
            float *a = to_host(dkc[0][i], cache), *b = to_host(dkc[1][i], cache);
            CHECK_MSG(a && b && memcmp(a, b, cache * sizeof(float)) == 0,
                      "rope + attention, head_dim %d: sequence %d's key cache differs", hd, i);
            free(a), free(b);
            for (int w = 0; w < 2; w++)
                gpu->ops->buffer_free(gpu, dkc[w][i]), gpu->ops->buffer_free(gpu, dvc[w][i]);
            free(kc[i]), free(vc[i]);
        }
        free(q), free(kn), free(vn), free(ref), free(q_cpu), free(kn_cpu);
    }
    gpu->ops->buffer_free(gpu, device_positions);
}

static void test_decompose(void) {
    if (!gpu->ops->decompose || !gpu->ops->decompose_errors) {
        CHECK_MSG(0, "%s", "the CUDA backend has no decompose op");
        return;
    }
    const size_t rows = 192, cols = 320;
    float *w = random_floats(rows * cols, 0.02f);
    const struct lq_nf_config configs[] = {{3, 8, LQ_SCALE_FP32, 64, 256},
                                           {2, 2, LQ_SCALE_BF16, 16, 16},
                                           {4, 3, LQ_SCALE_FP16, 32, 64}};
    uint64_t seeds[3] = {1, 2, 3};
    double errors[3];
    struct lq_decompose_options options;
    lq_decompose_options_default(&options);
    options.rank = 16, options.max_iters = 5;
    options.svd.method = LQ_SVD_RANDOMIZED;
    struct lq_error err = {0};
    CHECK_OK(
        gpu->ops->decompose_errors(gpu, w, rows, cols, configs, seeds, 3, &options, errors, &err));
    for (int c = 0; c < 3; c++) {
        struct lq_decompose_options o = options;
        o.svd.seed = seeds[c];
        struct lq_decomposition ref, dev;
        CHECK_OK(lq_decompose(w, rows, cols, &configs[c], &o, &ref, &err));
        int rc = gpu->ops->decompose(gpu, w, rows, cols, &configs[c], &o, &dev, &err);
        CHECK_MSG(rc == 0, "decompose: %s", err.message);
        if (rc) continue;
        /* The same algorithm and sketch in another arithmetic order: the errors agree closely,
         * and a step may stop one iteration apart, so compare the errors, not the factors. */
        double ref_error = ref.error * ref.error;
        CHECK_MSG(fabs(dev.error * dev.error - ref_error) <= 0.02 * ref_error,
                  "decompose error %.6g vs CPU %.6g", dev.error * dev.error, ref_error);
        CHECK_MSG(fabs(errors[c] - ref_error) <= 0.02 * ref_error,
                  "decompose_errors %.6g vs CPU %.6g", errors[c], ref_error);
        /* what it returns reconstructs to its stated error */
        float *back = malloc(rows * cols * sizeof *back);
        lq_decomposition_reconstruct(&dev, back);
        double stated = lq_weighted_distance(w, back, NULL, rows * cols);
        CHECK_NEAR(stated, dev.error, 1e-3 * dev.error);
        free(back);
        lq_decomposition_free(&ref), lq_decomposition_free(&dev);
    }
    /* Concurrent streams and the device-drawn sketch (either kernel) must not change a single
     * bit: a row of the table equals the one-stream, host-sketch row. */
    enum { ROW = 8 };
    struct lq_nf_config grid[LQ_NF_TABLE1_SIZE], row[ROW];
    uint64_t row_seeds[ROW];
    double concurrent[ROW], serial[ROW], host_sketch[ROW], thread_sketch[ROW];
    lq_nf_grid_table1(grid);
    for (int i = 0; i < ROW; i++) row[i] = grid[i * 29], row_seeds[i] = 100 + (uint64_t)i;
    CHECK_OK(gpu->ops->decompose_errors(gpu, w, rows, cols, row, row_seeds, ROW, &options,
                                        concurrent, &err));
    setenv("LQ_CUDA_DECOMPOSE_STREAMS", "1", 1);
    CHECK_OK(gpu->ops->decompose_errors(gpu, w, rows, cols, row, row_seeds, ROW, &options, serial,
                                        &err));
    setenv("LQ_CUDA_DECOMPOSE_SKETCH_KERNEL", "thread", 1);
    CHECK_OK(gpu->ops->decompose_errors(gpu, w, rows, cols, row, row_seeds, ROW, &options,
                                        thread_sketch, &err));
    unsetenv("LQ_CUDA_DECOMPOSE_SKETCH_KERNEL");
    setenv("LQ_CUDA_DECOMPOSE_SKETCH", "host", 1);
    CHECK_OK(gpu->ops->decompose_errors(gpu, w, rows, cols, row, row_seeds, ROW, &options,
                                        host_sketch, &err));
    unsetenv("LQ_CUDA_DECOMPOSE_STREAMS");
    unsetenv("LQ_CUDA_DECOMPOSE_SKETCH");
    CHECK(memcmp(concurrent, serial, sizeof serial) == 0);
    CHECK(memcmp(host_sketch, serial, sizeof serial) == 0);
    CHECK(memcmp(thread_sketch, serial, sizeof serial) == 0);
    /* The one-value-a-lane NF values kernel writes the same Q bit for bit and sums the error
     * in another order: equal errors up to that order. */
    double team_values[ROW];
    setenv("LQ_CUDA_DECOMPOSE_NF_VALUES", "team", 1);
    CHECK_OK(gpu->ops->decompose_errors(gpu, w, rows, cols, row, row_seeds, ROW, &options,
                                        team_values, &err));
    unsetenv("LQ_CUDA_DECOMPOSE_NF_VALUES");
    for (int i = 0; i < ROW; i++)
        CHECK_MSG(fabs(team_values[i] - serial[i]) <= 1e-9 * serial[i],
                  "LQ_CUDA_DECOMPOSE_NF_VALUES=team: error %.17g vs %.17g", team_values[i],
                  serial[i]);

    /* The other ways to run a step (LQ_CUDA_DECOMPOSE_QR, _EIG, _TF32: the table's default
     * is TF32, so 0 is the other way; LQ_CUDA_CHOLQR_KERNEL: CholeskyQR's old Cholesky
     * kernel) against the default, or against the eigensolver this run names (meson's
     * cuda_ops_decompose_jacobi sets LQ_CUDA_DECOMPOSE_EIG=jacobi). */
    static const char *const variants[][2] = {
        {"LQ_CUDA_DECOMPOSE_QR", "householder"}, {"LQ_CUDA_DECOMPOSE_QR", "cholesky-trsm"},
        {"LQ_CUDA_DECOMPOSE_EIG", "batched"},    {"LQ_CUDA_DECOMPOSE_EIG", "jacobi"},
        {"LQ_CUDA_DECOMPOSE_EIG", "syevd"},      {"LQ_CUDA_DECOMPOSE_TF32", "0"},
        {"LQ_CUDA_CHOLQR_KERNEL", "old"}};
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        struct saved_env saved = save_env(variants[v][0]);
        setenv(variants[v][0], variants[v][1], 1);
        double variant[3];
        int rc = gpu->ops->decompose_errors(gpu, w, rows, cols, configs, seeds, 3, &options,
                                            variant, &err);
        restore_env(&saved);
        CHECK_MSG(rc == 0, "%s=%s: %s", variants[v][0], variants[v][1], err.message);
        for (int c = 0; c < 3 && rc == 0; c++)
            CHECK_MSG(fabs(variant[c] - errors[c]) <= 0.02 * errors[c],
                      "%s=%s: error %.6g vs %.6g by default", variants[v][0], variants[v][1],
                      variant[c], errors[c]);
    }
    setenv("LQ_CUDA_DECOMPOSE_QR", "givens", 1);
    int bad =
        gpu->ops->decompose_errors(gpu, w, rows, cols, configs, seeds, 1, &options, errors, &err);
    unsetenv("LQ_CUDA_DECOMPOSE_QR");
    CHECK(bad == LQ_EINVAL && strstr(err.message, "LQ_CUDA_DECOMPOSE_QR") != NULL);
    setenv("LQ_CUDA_DECOMPOSE_SKETCH_KERNEL", "warp", 1);
    bad = gpu->ops->decompose_errors(gpu, w, rows, cols, configs, seeds, 1, &options, errors, &err);
    unsetenv("LQ_CUDA_DECOMPOSE_SKETCH_KERNEL");
    CHECK(bad == LQ_EINVAL && strstr(err.message, "LQ_CUDA_DECOMPOSE_SKETCH_KERNEL") != NULL);
    setenv("LQ_CUDA_CHOLQR_KERNEL", "fast", 1);
    bad = gpu->ops->decompose_errors(gpu, w, rows, cols, configs, seeds, 1, &options, errors, &err);
    unsetenv("LQ_CUDA_CHOLQR_KERNEL");
    CHECK(bad == LQ_EINVAL && strstr(err.message, "LQ_CUDA_CHOLQR_KERNEL") != NULL);
    setenv("LQ_CUDA_DECOMPOSE_NF_VALUES", "float8", 1);
    bad = gpu->ops->decompose_errors(gpu, w, rows, cols, configs, seeds, 1, &options, errors, &err);
    unsetenv("LQ_CUDA_DECOMPOSE_NF_VALUES");
    CHECK(bad == LQ_EINVAL && strstr(err.message, "LQ_CUDA_DECOMPOSE_NF_VALUES") != NULL);
    struct saved_env eig = save_env("LQ_CUDA_DECOMPOSE_EIG");
    setenv("LQ_CUDA_DECOMPOSE_EIG", "qr", 1);
    bad = gpu->ops->decompose_errors(gpu, w, rows, cols, configs, seeds, 1, &options, errors, &err);
    restore_env(&eig);
    CHECK(bad == LQ_EINVAL && strstr(err.message, "LQ_CUDA_DECOMPOSE_EIG=qr") != NULL);
    free(w);

    /* A rank-20 W with a 26-column sketch (rank 16 + 10): every sketch is rank-deficient, so
     * each CholeskyQR fails its pivot test and the Gram-Schmidt fallback must return an
     * orthonormal basis. One step, so the error is that step's factors': equal to the CPU's
     * (Householder QR) and to the GPU's own Householder path. */
    enum { INNER = 20 };
    float *left = random_floats(rows * INNER, 1.0f), *right = random_floats(INNER * cols, 1.0f);
    w = malloc(rows * cols * sizeof *w);
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < cols; j++) {
            double sum = 0.0;
            for (int k = 0; k < INNER; k++)
                sum += (double)left[i * INNER + k] * (double)right[(size_t)k * cols + j];
            w[i * cols + j] = (float)(sum * 0.02 / sqrt((double)INNER));
        }
    struct lq_decompose_options one = options;
    one.max_iters = 1, one.svd.seed = 5;
    struct lq_decomposition ref, dev;
    CHECK_OK(lq_decompose(w, rows, cols, &configs[0], &one, &ref, &err));
    CHECK_OK(gpu->ops->decompose(gpu, w, rows, cols, &configs[0], &one, &dev, &err));
    setenv("LQ_CUDA_DECOMPOSE_QR", "householder", 1);
    double householder = -1.0;
    CHECK_OK(gpu->ops->decompose_errors(gpu, w, rows, cols, &configs[0], &one.svd.seed, 1, &one,
                                        &householder, &err));
    unsetenv("LQ_CUDA_DECOMPOSE_QR");
    const double cholesky = dev.error * dev.error, cpu = ref.error * ref.error;
    CHECK_MSG(fabs(cholesky - cpu) <= 0.02 * cpu, "rank-deficient: error %.6g vs CPU %.6g",
              cholesky, cpu);
    CHECK_MSG(fabs(cholesky - householder) <= 1e-3 * householder,
              "rank-deficient: error %.6g vs %.6g with Householder QR", cholesky, householder);
    lq_decomposition_free(&ref), lq_decomposition_free(&dev);
    free(left), free(right), free(w);
}

/* ---------- CholeskyQR's Cholesky kernel ---------- */

/* The kernel `kernel` on a copy of g (first pass or not, the device flag before the call as
 * given); returns the flag after the call, the result in out. */
static int run_cholqr(const char *kernel, const double *g, int n, int first, int invert,
                      int failed_before, double *out, double *median_us) {
    memcpy(out, g, (size_t)n * n * sizeof *out);
    int failed = failed_before;
    struct lq_error err = {0};
    int rc = lq_cuda_cholqr_factor(gpu, kernel, n, first, invert, out, &failed, median_us, &err);
    CHECK_MSG(rc == 0, "lq_cuda_cholqr_factor(%s, n %d): %s", kernel, n, err.message);
    return rc ? -1 : failed;
}

static int cholqr_is_identity(const double *g, int n) {
    for (int k = 0; k < n; k++)
        for (int i = 0; i < n; i++)
            if (g[i + (size_t)k * n] != (i == k ? 1.0 : 0.0)) return 0;
    return 1;
}

/* Both Cholesky kernels of CholeskyQR (LQ_CUDA_CHOLQR_KERNEL new, the default, and old)
 * against the host's textbook Cholesky and inverse in double (tests/unit/cholesky_reference.h)
 * and against each other, on Gram matrices like CholeskyQR's; their pivot test, the identity
 * and the flag on failure, the first/skip behaviour, bit-for-bit repeatability. --time prints
 * each kernel's median time at every size. */
static void test_cholqr(void) {
    static const int sizes[] = {1, 2, 3, 17, 74, 75, 128, 160};
    static const char *const kernels[2] = {"new", "old"};
    const double upper_mark = 12345.0; /* L must leave the upper triangle alone */
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        const int n = sizes[s];
        const size_t count = (size_t)n * n;
        struct cholesky_reference_case c;
        CHECK(cholesky_reference_case_make(&rng, n, &c) == 0);
        double *gram = c.gram; /* its upper triangle is marked below */
        const double *l = c.l, *inverse = c.inverse;
        double *out[2] = {malloc(count * sizeof(double)), malloc(count * sizeof(double))};
        double *again = malloc(count * sizeof *again);
        for (int k = 1; k < n; k++)
            for (int i = 0; i < k; i++) gram[i + (size_t)k * n] = upper_mark;
        const double tolerance = cholesky_reference_tolerance(gram, l, inverse, n);
        for (int invert = 0; invert <= 1; invert++) {
            const double *reference = invert ? inverse : l;
            for (int v = 0; v < 2; v++) {
                double us = 0.0;
                int failed =
                    run_cholqr(kernels[v], gram, n, 1, invert, 1, out[v], timing ? &us : NULL);
                CHECK_MSG(failed == 0, "cholqr %s n %d invert %d: flag %d", kernels[v], n, invert,
                          failed);
                double error = cholesky_reference_error(out[v], reference, gram, n, invert);
                CHECK_MSG(error <= tolerance, "cholqr %s n %d invert %d: error %.3g > %.3g",
                          kernels[v], n, invert, error, tolerance);
                for (int k = 1; k < n; k++)
                    for (int i = 0; i < k; i++) {
                        const double upper = out[v][i + (size_t)k * n];
                        CHECK_MSG(invert ? upper == 0.0 : upper == upper_mark,
                                  "cholqr %s n %d invert %d: upper (%d, %d) = %g", kernels[v], n,
                                  invert, i, k, upper);
                    }
                /* the same input gives the same bits */
                run_cholqr(kernels[v], gram, n, 1, invert, 0, again, NULL);
                CHECK_MSG(memcmp(again, out[v], count * sizeof *again) == 0,
                          "cholqr %s n %d invert %d: not repeatable", kernels[v], n, invert);
                if (timing)
                    printf("  %9.1f us  cholqr %s n %d invert %d (kernel alone)\n", us, kernels[v],
                           n, invert);
            }
            const double between = cholesky_reference_error(out[0], out[1], gram, n, invert);
            CHECK_MSG(between <= 2.0 * tolerance, "cholqr n %d invert %d: new vs old %.3g > %.3g",
                      n, invert, between, 2.0 * tolerance);
        }
        /* the second pass: after a failed first only the identity, the flag kept; after a
         * successful one a factorization, the flag left at 0 */
        for (int v = 0; v < 2; v++)
            for (int invert = 0; invert <= 1; invert++) {
                int failed = run_cholqr(kernels[v], gram, n, 0, invert, 1, out[v], NULL);
                CHECK_MSG(failed == 1 && cholqr_is_identity(out[v], n),
                          "cholqr %s n %d invert %d: skip: flag %d", kernels[v], n, invert, failed);
                failed = run_cholqr(kernels[v], gram, n, 0, invert, 0, out[v], NULL);
                CHECK_MSG(failed == 0 && cholesky_reference_error(out[v], invert ? inverse : l,
                                                                  gram, n, invert) <= tolerance,
                          "cholqr %s n %d invert %d: second pass: flag %d", kernels[v], n, invert,
                          failed);
            }
        cholesky_reference_case_free(&c);
        free(out[0]), free(out[1]), free(again);
    }
    /* the pivot test: a nearly dependent column, a NaN, an infinity */
    static const int failing[] = {2, 17, 74, 160};
    for (size_t s = 0; s < sizeof failing / sizeof failing[0]; s++) {
        const int n = failing[s];
        const size_t count = (size_t)n * n;
        double *dependent = malloc(count * sizeof *dependent);
        double *regular = malloc(count * sizeof *regular), *g = malloc(count * sizeof *g);
        double *out = malloc(count * sizeof *out);
        cholesky_reference_dependent_gram(&rng, n, dependent);
        cholesky_reference_gram(&rng, n, regular);
        for (int variant = 0; variant < 3; variant++) {
            memcpy(g, variant == 0 ? dependent : regular, count * sizeof *g);
            if (variant == 1) g[n - 1] = NAN; /* (n − 1, 0) */
            if (variant == 2) g[n - 1] = INFINITY;
            for (int v = 0; v < 2; v++)
                for (int invert = 0; invert <= 1; invert++) {
                    int failed = run_cholqr(kernels[v], g, n, 1, invert, 0, out, NULL);
                    CHECK_MSG(failed == 1 && cholqr_is_identity(out, n),
                              "cholqr %s n %d variant %d invert %d: flag %d", kernels[v], n,
                              variant, invert, failed);
                }
        }
        free(dependent), free(regular), free(g), free(out);
    }
    /* bad arguments */
    double one = 4.0;
    int flag = 0;
    struct lq_error err = {0};
    CHECK(lq_cuda_cholqr_factor(gpu, "fast", 1, 1, 1, &one, &flag, NULL, &err) == LQ_EINVAL &&
          strstr(err.message, "LQ_CUDA_CHOLQR_KERNEL") != NULL);
    CHECK(lq_cuda_cholqr_factor(gpu, "new", 0, 1, 1, &one, &flag, NULL, &err) == LQ_EINVAL);
    CHECK(lq_cuda_cholqr_factor(gpu, "new", 161, 1, 1, &one, &flag, NULL, &err) == LQ_EINVAL);
}

static void test_memory_accounting(void) {
    struct lq_backend_memory before, during, after;
    gpu->ops->memory(gpu, &before);
    void *buffer = NULL;
    struct lq_error err = {0};
    CHECK_OK(gpu->ops->buffer_alloc(gpu, 3 << 20, &buffer, &err));
    gpu->ops->memory(gpu, &during);
    CHECK(during.buffers == before.buffers + (3 << 20));
    CHECK(during.device_total > 0 && during.limit > 0);
    gpu->ops->buffer_free(gpu, buffer);
    gpu->ops->memory(gpu, &after);
    CHECK(after.buffers == before.buffers);
    /* beyond the limit: refused with a message, nothing allocated */
    void *huge = NULL;
    int rc = gpu->ops->buffer_alloc(gpu, during.limit + 1, &huge, &err);
    CHECK(rc == LQ_ENOMEM && huge == NULL && strstr(err.message, "MiB") != NULL);
}

int main(int argc, char **argv) {
    struct lq_error err = {0};
    if (lq_backend_cuda_create(0, 0, &gpu, &err)) {
        printf("SKIP: %s\n", err.message);
        return 77;
    }
    CHECK_OK(lq_backend_cpu_create(&cpu, &err));
    lq_rng_seed(&rng, 20261126);
    static const struct lq_test_case cases[] = {
        LQ_TEST(test_rmsnorm),
        LQ_TEST(test_embed),
        LQ_TEST(test_rope),
        LQ_TEST(test_swiglu_add),
        LQ_TEST(test_fused_ops),
        LQ_TEST(test_linear_dense),
        LQ_TEST(test_linear_lq),
        LQ_TEST(test_linear_lq_mma),
        LQ_TEST(test_linear_lq_lowrank_sgemm),
        LQ_TEST(test_linear_lq_gemv),
        LQ_TEST(test_linear_group),
        LQ_TEST(test_linear_fused),
        LQ_TEST(test_linear_adapter),
        LQ_TEST(test_matmul),
        LQ_TEST(test_attention),
        LQ_TEST(test_attention_batch),
        LQ_TEST(test_rope_attention),
        LQ_TEST(test_decompose),
        LQ_TEST(test_cholqr),
        LQ_TEST(test_memory_accounting),
    };
    int failed = 0, filters = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--time") == 0)
            timing = 1;
        else
            filters++;
    }
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        /* each other argument selects the cases whose names contain it; one ending in '$' the
         * case whose name ends with what comes before it (linear_lq$: test_linear_lq alone) */
        int selected = filters == 0;
        for (int a = 1; a < argc && !selected; a++) {
            const char *f = argv[a];
            const size_t length = strlen(f), name_length = strlen(cases[i].name);
            if (strcmp(f, "--time") == 0) continue;
            if (length > 0 && f[length - 1] == '$')
                selected = name_length >= length - 1 &&
                           strncmp(cases[i].name + name_length - (length - 1), f, length - 1) == 0;
            else
                selected = strstr(cases[i].name, f) != NULL;
        }
        if (!selected) continue;
        int before = lq_test_failures;
        cases[i].run();
        printf("%s %s\n", lq_test_failures == before ? "ok  " : "FAIL", cases[i].name);
        failed |= lq_test_failures != before;
    }
    gpu->ops->destroy(gpu);
    cpu->ops->destroy(cpu);
    return failed ? 1 : 0;
}
