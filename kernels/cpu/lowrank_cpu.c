/* The adapter ops of the CPU backend: a linear layer's shared part alone, and a low-rank term
 * added on top. lq_cpu_linear itself adds its own low-rank part with lq_cpu_lowrank_add, so
 * linear_base followed by lowrank_add of the layer's own pair is, row for row, the very
 * sequence of rounded operations linear performs: up to 64 tokens (the recipe of
 * lowrank_kernels.h, each dot product computed alone) a request's logits are the same bits
 * whichever adapters its batch-mates use, and whichever kernel (AVX-512, AVX2, portable) runs.
 * Above 64 tokens (prefill) OpenBLAS runs, with no such guarantee. */
#include <math.h>
#include <stdlib.h>

#include "core/parallel.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/lowrank_kernels.h"

/* fmaf must stay one rounding per multiply-add, and nothing else may be fused or reassociated
 * (ISO C mode keeps GCC's contraction off; Clang is told here). */
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#if defined(__FAST_MATH__)
#error "lowrank_cpu.c relies on IEEE evaluation order: build it without -ffast-math"
#endif

/* The recipe's tree over the 16 lanes. */
static inline float lanes_sum(const float *l) {
    return (((l[0] + l[2]) + (l[1] + l[3])) + ((l[4] + l[6]) + (l[5] + l[7]))) +
           (((l[8] + l[10]) + (l[9] + l[11])) + ((l[12] + l[14]) + (l[13] + l[15])));
}

/* One dot product w·x of length len by the recipe (lowrank_kernels.h). */
static inline float recipe_dot(const float *w, const float *x, int len) {
    float acc[16] = {0};
    int c = 0;
    for (; c + 16 <= len; c += 16)
        for (int j = 0; j < 16; j++) acc[j] = fmaf(w[c + j], x[c + j], acc[j]);
    if (c < len)
        for (int j = 0; j < 16; j++) {
            float a = c + j < len ? w[c + j] : 0.0f, b = c + j < len ? x[c + j] : 0.0f;
            acc[j] = fmaf(a, b, acc[j]); /* the AVX-512 kernel's zero-masked lanes */
        }
    return lanes_sum(acc);
}

/* The reference: plain C (fmaf from the C library where FMA is not an instruction). */
void lq_lowrank_dots_portable(const float *w, int len, size_t begin, size_t end, const float *x,
                              int n, float *y, int ldy, int accumulate) {
    for (size_t r = begin; r < end; r++)
        for (int t = 0; t < n; t++) {
            float d = recipe_dot(w + r * (size_t)len, x + (size_t)t * len, len);
            float *out = y + (size_t)t * ldy + r;
            *out = accumulate ? *out + d : d;
        }
}

enum lq_lowrank_kernel lq_lowrank_default_kernel(void) {
    return lq_lowrank_avx512_supported() ? LQ_LOWRANK_AVX512
           : lq_lowrank_avx2_supported() ? LQ_LOWRANK_AVX2
                                         : LQ_LOWRANK_PORTABLE;
}

int lq_lowrank_kernel_supported(enum lq_lowrank_kernel kernel) {
    switch (kernel) {
    case LQ_LOWRANK_PORTABLE:
        return 1;
    case LQ_LOWRANK_AVX2:
        return lq_lowrank_avx2_supported();
    case LQ_LOWRANK_AVX512:
        return lq_lowrank_avx512_supported();
    }
    return 0;
}

struct dots_job {
    enum lq_lowrank_kernel kernel;
    const float *w, *x;
    float *y;
    int len, n, ldy, accumulate;
};

static void dots_body(void *context, size_t begin, size_t end) {
    const struct dots_job *job = context;
    if (job->kernel == LQ_LOWRANK_AVX512)
        lq_lowrank_dots_avx512(job->w, job->len, begin, end, job->x, job->n, job->y, job->ldy,
                               job->accumulate);
    else if (job->kernel == LQ_LOWRANK_AVX2)
        lq_lowrank_dots_avx2(job->w, job->len, begin, end, job->x, job->n, job->y, job->ldy,
                             job->accumulate);
    else
        lq_lowrank_dots_portable(job->w, job->len, begin, end, job->x, job->n, job->y, job->ldy,
                                 job->accumulate);
}

/* The rows of one product over the thread pool: a part is worth ~2^15 multiply-adds (the pool's
 * threads spin between loops, so a hand-off costs about a microsecond; at 2^18 a decode step's
 * low-rank products all ran on one thread while the other spun); each dot product is computed
 * alone, so the split never changes a bit. */
static void run_dots(struct dots_job *job, size_t rows) {
    size_t per_row = (size_t)job->n * (size_t)job->len;
    size_t min_rows = per_row >= ((size_t)1 << 15) ? 1 : ((size_t)1 << 15) / per_row + 1;
    lq_parallel_for(rows, min_rows, dots_body, job);
}

int lq_lowrank_add_kernel(enum lq_lowrank_kernel kernel, const float *L1, const float *L2, int rows,
                          int cols, int rank, const float *x, int n, float *y) {
    if (n < 0 || rows < 0 || cols < 0 || rank < 0 || n > LQ_LOWRANK_MAX_TOKENS) return LQ_EINVAL;
    if (n == 0 || rank == 0 || rows == 0) return LQ_OK;
    if (!lq_lowrank_kernel_supported(kernel)) return LQ_EINVAL;
    /* tmp[n, rank] = x · L2ᵀ, then y += tmp · L1ᵀ; small enough for the stack in decode */
    float stack[4096];
    size_t size = (size_t)n * (size_t)rank;
    float *t = size <= sizeof stack / sizeof *stack ? stack : malloc(size * sizeof *t);
    if (!t) return LQ_ENOMEM;
    struct dots_job first = {kernel, L2, x, t, cols, n, rank, 0};
    run_dots(&first, (size_t)rank);
    struct dots_job second = {kernel, L1, t, y, rank, n, rows, 1};
    run_dots(&second, (size_t)rows);
    if (t != stack) free(t);
    return LQ_OK;
}

int lq_cpu_linear_base(struct lq_backend *backend, const struct lq_linear *w, const float *x, int n,
                       float *y) {
    struct lq_linear base = *w; /* a shallow copy that only forgets the low-rank part */
    base.rank = 0;
    base.lora_A = base.lora_B = NULL;
    return lq_cpu_linear(backend, &base, x, n, y);
}

int lq_cpu_lowrank_add(struct lq_backend *backend, const float *L1, const float *L2, int rows,
                       int cols, int rank, const float *x, int n, float *y) {
    (void)backend;
    if (n < 0 || rows < 0 || cols < 0 || rank < 0) return LQ_EINVAL;
    if (n == 0 || rank == 0 || rows == 0) return LQ_OK;
    /* decode and short prompts: the batch-invariant recipe, AVX-512 where the CPU has it */
    if (n <= LQ_LOWRANK_MAX_TOKENS)
        return lq_lowrank_add_kernel(lq_lowrank_default_kernel(), L1, L2, rows, cols, rank, x, n,
                                     y);
    /* prefill: y += (x · L2ᵀ) · L1ᵀ through OpenBLAS, two thin products instead of a dense L1·L2 */
    float *t = malloc((size_t)n * (size_t)rank * sizeof *t);
    if (!t) return LQ_ENOMEM;
    lq_cpu_gemm_nt(n, rank, cols, x, L2, t, rank, 0.0f);
    lq_cpu_gemm_nt(n, rows, rank, t, L1, y, rows, 1.0f);
    free(t);
    return LQ_OK;
}
