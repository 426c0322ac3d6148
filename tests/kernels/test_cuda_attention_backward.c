/* The CUDA attention_backward against the CPU op (the reference) on fresh random inputs, at
 * batch 1..3 sequences of n = 1, 7, 64, 300 tokens, heads/kv_heads 8/4, 4/4, 2/1 and head_dim
 * 8, 48, 64, 128, plus head_dim 256, inputs not 16-byte aligned (the scalar-load path) and a
 * sharp softmax. dq, dk and dv are poisoned with NaN before each run, so an element the
 * kernels never write (or one they accumulate into instead of overwriting) fails the check.
 * Tolerance: relative L2 error ‖gpu − cpu‖ / ‖cpu‖ per output. The GPU op is deterministic:
 * a second run must give the same bits. Exits 77 without a usable GPU (meson's "skipped").
 * Each case runs both implementations (LQ_CUDA_ATTENTION_BACKWARD=tiled, the default, and
 * untiled) against the same reference.
 * Usage: test_cuda_attention_backward [--time] (--time: also 7B-shaped cases, both
 * implementations timed). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/rng.h"
#include "kernels/backend.h"
#include "tests/unit/lq_test.h"
#include "tests/kernels/kernel_check.h"

/* fp32 in another summation order; dq and dk sum dS terms that cancel (Σ_t dS_it = 0). */
#define TOL_FP32 2e-5

static int timing;

/* Both implementations (LQ_CUDA_ATTENTION_BACKWARD): the tiled default and the untiled one. */
static const char *const kernels[] = {"tiled", "untiled"};

struct shape {
    int batch, n, heads, kv_heads, hd;
    float q_scale; /* larger: sharper softmax */
    size_t pad;    /* floats in front of every input: pad 1 breaks 16-byte alignment */
};

static void check_shape(struct shape c, int time_it) {
    const size_t rows = (size_t)c.batch * c.n;
    const size_t q_count = rows * c.heads * c.hd, kv_count = rows * c.kv_heads * c.hd;
    float *q = random_floats(q_count, c.q_scale), *k = random_floats(kv_count, 1.0f);
    float *v = random_floats(kv_count, 1.0f), *dout = random_floats(q_count, 1.0f);
    float *ref_dq = malloc(q_count * sizeof *ref_dq), *ref_dk = malloc(kv_count * sizeof *ref_dk);
    float *ref_dv = malloc(kv_count * sizeof *ref_dv);
    CHECK_OK(cpu->ops->attention_backward(cpu, q, k, v, dout, c.batch, c.n, c.heads, c.kv_heads,
                                          c.hd, ref_dq, ref_dk, ref_dv));

    float *gq = device_floats_padded(q, q_count, c.pad),
          *gk = device_floats_padded(k, kv_count, c.pad);
    float *gv = device_floats_padded(v, kv_count, c.pad),
          *gdo = device_floats_padded(dout, q_count, c.pad);
    float *gdq = device_floats_padded(NULL, q_count, 0),
          *gdk = device_floats_padded(NULL, kv_count, 0);
    float *gdv = device_floats_padded(NULL, kv_count, 0);
    const float *iq = gq + c.pad, *ik = gk + c.pad, *iv = gv + c.pad, *ido = gdo + c.pad;
    float *poison = malloc((q_count > kv_count ? q_count : kv_count) * sizeof *poison);
    for (size_t i = 0; i < (q_count > kv_count ? q_count : kv_count); i++) poison[i] = NAN;
    for (size_t kernel = 0; kernel < sizeof kernels / sizeof kernels[0]; kernel++) {
        setenv("LQ_CUDA_ATTENTION_BACKWARD", kernels[kernel], 1);
        CHECK_OK(gpu->ops->copy_to_device(gpu, gdq, poison, q_count * sizeof(float)));
        CHECK_OK(gpu->ops->copy_to_device(gpu, gdk, poison, kv_count * sizeof(float)));
        CHECK_OK(gpu->ops->copy_to_device(gpu, gdv, poison, kv_count * sizeof(float)));
        CHECK_OK(gpu->ops->attention_backward(gpu, iq, ik, iv, ido, c.batch, c.n, c.heads,
                                              c.kv_heads, c.hd, gdq, gdk, gdv));
        float *dq = to_host(gdq, q_count), *dk = to_host(gdk, kv_count);
        float *dv = to_host(gdv, kv_count);
        const double eq = relative_error(dq, ref_dq, q_count);
        const double ek = relative_error(dk, ref_dk, kv_count);
        const double ev = relative_error(dv, ref_dv, kv_count);
        CHECK_MSG(eq <= TOL_FP32 && ek <= TOL_FP32 && ev <= TOL_FP32,
                  "%s: batch %d n %d heads %d/%d hd %d q_scale %g pad %zu: relative errors dq "
                  "%.3g dk %.3g dv %.3g",
                  kernels[kernel], c.batch, c.n, c.heads, c.kv_heads, c.hd, (double)c.q_scale,
                  c.pad, eq, ek, ev);

        /* Deterministic: the same bits again, over fresh poison. */
        CHECK_OK(gpu->ops->copy_to_device(gpu, gdq, poison, q_count * sizeof(float)));
        CHECK_OK(gpu->ops->copy_to_device(gpu, gdk, poison, kv_count * sizeof(float)));
        CHECK_OK(gpu->ops->copy_to_device(gpu, gdv, poison, kv_count * sizeof(float)));
        CHECK_OK(gpu->ops->attention_backward(gpu, iq, ik, iv, ido, c.batch, c.n, c.heads,
                                              c.kv_heads, c.hd, gdq, gdk, gdv));
        float *dq2 = to_host(gdq, q_count), *dk2 = to_host(gdk, kv_count);
        float *dv2 = to_host(gdv, kv_count);
        CHECK_MSG(memcmp(dq, dq2, q_count * sizeof *dq) == 0 &&
                      memcmp(dk, dk2, kv_count * sizeof *dk) == 0 &&
                      memcmp(dv, dv2, kv_count * sizeof *dv) == 0,
                  "%s: batch %d n %d heads %d/%d hd %d: a second run gave other bits",
                  kernels[kernel], c.batch, c.n, c.heads, c.kv_heads, c.hd);

        if (time_it) {
            struct lq_error err = {0};
            double best = INFINITY;
            for (int r = 0; r < 10; r++) {
                gpu->ops->synchronize(gpu, &err);
                double start = seconds_now();
                gpu->ops->attention_backward(gpu, iq, ik, iv, ido, c.batch, c.n, c.heads,
                                             c.kv_heads, c.hd, gdq, gdk, gdv);
                gpu->ops->synchronize(gpu, &err);
                double t = seconds_now() - start;
                best = t < best ? t : best;
            }
            printf("  %9.1f us  attention_backward (%s) batch %d n %d heads %d/%d hd %d (best of "
                   "10)\n",
                   best * 1e6, kernels[kernel], c.batch, c.n, c.heads, c.kv_heads, c.hd);
        }
        free(dq), free(dk), free(dv), free(dq2), free(dk2), free(dv2);
    }
    unsetenv("LQ_CUDA_ATTENTION_BACKWARD");

    gpu->ops->buffer_free(gpu, gq), gpu->ops->buffer_free(gpu, gk);
    gpu->ops->buffer_free(gpu, gv), gpu->ops->buffer_free(gpu, gdo);
    gpu->ops->buffer_free(gpu, gdq), gpu->ops->buffer_free(gpu, gdk);
    gpu->ops->buffer_free(gpu, gdv);
    free(q), free(k), free(v), free(dout), free(ref_dq), free(ref_dk), free(ref_dv);
    free(poison);
}

static void test_shapes(void) {
    static const int ns[] = {1, 7, 64, 300};
    static const int head_pairs[][2] = {{8, 4}, {4, 4}, {2, 1}};
    static const int hds[] = {8, 48, 64, 128};
    int index = 0;
    for (size_t a = 0; a < sizeof ns / sizeof ns[0]; a++)
        for (size_t b = 0; b < sizeof head_pairs / sizeof head_pairs[0]; b++)
            for (size_t d = 0; d < sizeof hds / sizeof hds[0]; d++, index++) {
                struct shape c = {1 + index % 3, ns[a], head_pairs[b][0], head_pairs[b][1], hds[d],
                                  1.0f,          0};
                check_shape(c, 0);
            }
}

static void test_odd_cases(void) {
    /* head_dim 256 (the largest), both load paths */
    check_shape((struct shape){2, 65, 4, 2, 256, 1.0f, 0}, 0);
    check_shape((struct shape){1, 33, 2, 1, 256, 1.0f, 1}, 0);
    /* unaligned inputs: the scalar-load path at head_dims the float4 path would take */
    check_shape((struct shape){3, 64, 8, 4, 64, 1.0f, 1}, 0);
    check_shape((struct shape){2, 300, 4, 4, 128, 1.0f, 1}, 0);
    /* head_dims that are not multiples of 4 or 8, and 32 (one float4 per lane group) */
    check_shape((struct shape){2, 17, 6, 3, 5, 1.0f, 0}, 0);
    check_shape((struct shape){1, 40, 2, 2, 100, 1.0f, 0}, 0);
    check_shape((struct shape){2, 31, 4, 1, 32, 1.0f, 0}, 0);
    /* a sharp softmax (scores of tens): the row maximum matters */
    check_shape((struct shape){2, 129, 4, 2, 64, 3.0f, 0}, 0);
    /* more than 16 keys per subgroup round and a 16-head group */
    check_shape((struct shape){1, 1000, 16, 1, 64, 1.0f, 0}, 0);
    /* the tiled kernels' tile edges (64 rows, 32 at head_dim 256): one row past a tile, exact
     * tiles, head_dims just past a tiling's width */
    check_shape((struct shape){2, 129, 8, 2, 128, 1.0f, 0}, 0);
    check_shape((struct shape){1, 128, 4, 4, 65, 1.0f, 0}, 0);
    check_shape((struct shape){2, 97, 4, 1, 129, 1.0f, 0}, 0);
    check_shape((struct shape){1, 96, 2, 2, 200, 2.0f, 1}, 0);
}

static void test_timed(void) {
    if (!timing) return;
    check_shape((struct shape){1, 2048, 32, 8, 128, 1.0f, 0}, 1);
    check_shape((struct shape){1, 2048, 32, 32, 128, 1.0f, 0}, 1);
    check_shape((struct shape){2, 512, 32, 32, 128, 1.0f, 0}, 1);
}

int main(int argc, char **argv) {
    struct lq_error err = {0};
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--time") == 0) timing = 1;
    if (lq_backend_cuda_create(0, 0, &gpu, &err)) {
        printf("SKIP: %s\n", err.message);
        return 77;
    }
    if (!gpu->ops->attention_backward) {
        fprintf(stderr, "the CUDA backend has no attention_backward\n");
        gpu->ops->destroy(gpu);
        return 1;
    }
    CHECK_OK(lq_backend_cpu_create(&cpu, &err));
    lq_rng_seed(&rng, 20260412);
    static const struct lq_test_case cases[] = {
        LQ_TEST(test_shapes),
        LQ_TEST(test_odd_cases),
        LQ_TEST(test_timed),
    };
    /* every case (the arguments are options here, not a case filter) */
    const int failed = lq_test_run(cases, sizeof cases / sizeof cases[0], 1, argv);
    gpu->ops->destroy(gpu);
    cpu->ops->destroy(cpu);
    return failed;
}
