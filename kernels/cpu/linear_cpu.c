/* Linear layers on the CPU. Dense: OpenBLAS for many tokens, a row-wise kernel for few. LQ: Q is
 * dequantized tile by tile (never a full dense copy) and multiplied, then the low-rank part
 * L1·(L2·x) is added.
 *
 * Batch invariance: for up to LQ_CPU_ROWWISE_MAX_TOKENS tokens every output y[i, r] is computed
 * by the same sequence of rounded operations whatever the other tokens of the call, the row
 * split between threads, and the position of r in its block. So a sequence decoded alone (one
 * token per call) and the same sequence decoded in a batch with others (one call for all) get
 * bit-identical logits, and the daemon gives a request the same text whether or not it was
 * batched. OpenBLAS gives no such guarantee: its sgemv (one token) and sgemm (several) sum in
 * different orders. */
#include <assert.h>
#include <cblas.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "core/parallel.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/nf_gemv.h"
#include "kernels/cpu/int_gemv.h"

/* Up to this many tokens per call the batch-invariant row-wise kernel runs (decode, batched
 * decode, short prompts); above it OpenBLAS sgemm (prefill), whose speed it cannot match. */
#define LQ_CPU_ROWWISE_MAX_TOKENS 64
_Static_assert(LQ_CPU_ROWWISE_MAX_TOKENS == LQ_NF_GEMV_MAX_TOKENS, "one decode limit");

/* The row-wise kernel sums each dot product in 8 lanes (lane j takes the columns c ≡ j mod 8),
 * adds the lanes in a fixed tree, then the leftover columns in order. The vector type is a
 * GCC/Clang extension: lanes are independent, so the result does not depend on how the
 * compiler maps them to SSE, AVX or scalar registers (the x86-64 build carries an AVX2 clone
 * of the kernel, chosen at load time, that gives the same bits); with floating-point
 * contraction off (ISO C mode; Clang is told below) no multiply-add is fused in one place and
 * not in another. */
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#if defined(__FAST_MATH__)
#error "linear_cpu.c relies on IEEE evaluation order: build it without -ffast-math"
#endif
typedef float lq_v8 __attribute__((vector_size(32)));

/* Macros, not functions: passing 32-byte vectors by value changes the ABI with AVX. */
#define LQ_LOAD8(target, pointer) memcpy(&(target), (pointer), sizeof(lq_v8))
#define LQ_LANES_SUM(v) (((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])))

#if defined(__clang__)
#define LQ_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define LQ_UNROLL _Pragma("GCC unroll 8")
#else
#define LQ_UNROLL
#endif

/* Stores (or adds, when accumulate) the dot products of a block: dots[t][k] is row k, token t. */
static inline void store_block(float *y, int ldy, int count, int tokens, int stride,
                               const float *dots, int accumulate) {
    for (int t = 0; t < tokens; t++) {
        float *yt = y + (size_t)t * ldy;
        const float *d = dots + (size_t)t * stride;
        for (int k = 0; k < count; k++) yt[k] = accumulate ? yt[k] + d[k] : d[k];
    }
}

/* The dot products of ROWS rows w[0..ROWS) with TOKENS tokens x[0..TOKENS) into
 * dots[TOKENS][ROWS]. Every product follows one recipe, whatever the block shape: per lane j,
 * the running sum over the columns c ≡ j mod 8 (each product rounded, then added); the lanes
 * summed in a fixed tree; the leftover columns added in order. */
#define LQ_DOT_BLOCK(ROWS, TOKENS, w, x, cols, dots)                                               \
    do {                                                                                           \
        lq_v8 acc[TOKENS][ROWS], xv[TOKENS], wv[ROWS], product;                                    \
        memset(acc, 0, sizeof acc);                                                                \
        int c = 0;                                                                                 \
        for (; c + 8 <= (cols); c += 8) {                                                          \
            LQ_UNROLL for (int t = 0; t < (TOKENS); t++) LQ_LOAD8(xv[t], (x)[t] + c);              \
            LQ_UNROLL for (int k = 0; k < (ROWS); k++) LQ_LOAD8(wv[k], (w)[k] + c);                \
            LQ_UNROLL for (int t = 0; t < (TOKENS); t++)                                           \
                LQ_UNROLL for (int k = 0; k < (ROWS); k++) product = wv[k] * xv[t],                \
                                                           acc[t][k] += product;                   \
        }                                                                                          \
        for (int t = 0; t < (TOKENS); t++)                                                         \
            for (int k = 0; k < (ROWS); k++) (dots)[t][k] = LQ_LANES_SUM(acc[t][k]);               \
        for (; c < (cols); c++)                                                                    \
            for (int t = 0; t < (TOKENS); t++)                                                     \
                for (int k = 0; k < (ROWS); k++) {                                                 \
                    float p = (w)[k][c] * (x)[t][c];                                               \
                    (dots)[t][k] += p;                                                             \
                }                                                                                  \
    } while (0)

/* Rows [r0, r0 + ROWS) of w as pointers; past end, the first row again (padding whose
 * products are dropped), so a short last block runs the same code. */
static inline int block_rows(const float *w, int cols, size_t r0, size_t end, int rows,
                             const float **out) {
    int count = end - r0 < (size_t)rows ? (int)(end - r0) : rows;
    for (int k = 0; k < rows; k++) out[k] = w + (r0 + (size_t)(k < count ? k : 0)) * (size_t)cols;
    return count;
}

/* y[i, r] = w[r]·x[i] (+ y[i, r] when accumulate) for rows [begin, end) of w[rows, cols] and
 * all n tokens: four rows by four tokens at a time, so that each loaded vector serves four
 * products; the tokens left over (all of them in single-sequence decode) eight rows at a time,
 * which keeps more loads in flight where the weights' memory bandwidth is the limit. */
LQ_VECTOR_CLONES
static void rowwise(const float *w, int cols, size_t begin, size_t end, const float *x, int n,
                    float *y, int ldy, int accumulate) {
    const int blocked = n / 4 * 4;
    const float *rows[8];
    for (size_t r0 = begin; r0 < end && blocked > 0; r0 += 4) {
        int count = block_rows(w, cols, r0, end, 4, rows);
        for (int i = 0; i < blocked; i += 4) {
            const float *tokens[4] = {x + (size_t)i * cols, x + (size_t)(i + 1) * cols,
                                      x + (size_t)(i + 2) * cols, x + (size_t)(i + 3) * cols};
            float dots[4][4];
            LQ_DOT_BLOCK(4, 4, rows, tokens, cols, dots);
            store_block(y + (size_t)i * ldy + r0, ldy, count, 4, 4, &dots[0][0], accumulate);
        }
    }
    for (size_t r0 = begin; r0 < end && blocked < n; r0 += 8) {
        int count = block_rows(w, cols, r0, end, 8, rows);
        for (int i = blocked; i < n; i++) {
            const float *tokens[1] = {x + (size_t)i * cols};
            float dots[1][8];
            LQ_DOT_BLOCK(8, 1, rows, tokens, cols, dots);
            store_block(y + (size_t)i * ldy + r0, ldy, count, 1, 8, &dots[0][0], accumulate);
        }
    }
}

struct gemm_job {
    int n, cols, ldy;
    const float *x, *w;
    float *y;
    float beta;
};

static void gemm_body(void *context, size_t begin, size_t end) {
    const struct gemm_job *job = context;
    if (job->n <= LQ_CPU_ROWWISE_MAX_TOKENS) {
        rowwise(job->w, job->cols, begin, end, job->x, job->n, job->y, job->ldy, job->beta != 0.0f);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, job->n, (int)(end - begin), job->cols,
                1.0f, job->x, job->cols, job->w + begin * (size_t)job->cols, job->cols, job->beta,
                job->y + begin, job->ldy);
}

void lq_cpu_gemm_nt(int n, int rows, int cols, const float *x, const float *w, float *y, int ldy,
                    float beta) {
    /* the row-wise kernel overwrites (beta 0) or accumulates (beta 1): all callers need */
    assert(beta == 0.0f || beta == 1.0f);
    struct gemm_job job = {n, cols, ldy, x, w, y, beta};
    /* a thread is worth ~2^18 multiply-adds: below that the work stays on the caller */
    size_t per_row = (size_t)n * (size_t)cols;
    size_t min_rows = per_row >= ((size_t)1 << 18) ? 16 : ((size_t)1 << 18) / per_row + 1;
    lq_parallel_for((size_t)rows, min_rows, gemm_body, &job);
}

/* Rows of W dequantized per tile: bounded so a tile stays in cache-sized memory. */
static int tile_rows(int cols) {
    int rows = (1 << 16) / (cols > 0 ? cols : 1);
    return rows < 1 ? 1 : rows;
}

/* Few tokens (decode): each thread dequantizes its rows into a small tile and runs the
 * row-wise kernel on it, so every packed byte is read once per call. */
struct gemv_job {
    const struct lq_linear *w;
    const float *x;
    int n;
    float *y;
    int failed;
};

static void gemv_body(void *context, size_t first_row, size_t end_row) {
    struct gemv_job *job = context;
    const int cols = job->w->cols, rows = job->w->rows, step = tile_rows(cols);
    float *tile = malloc((size_t)step * cols * sizeof *tile);
    if (!tile) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (size_t r0 = first_row; r0 < end_row; r0 += (size_t)step) {
        size_t count = end_row - r0 < (size_t)step ? end_row - r0 : (size_t)step;
        lq_nf_dequantize_range(&job->w->q, r0 * (size_t)cols, count * (size_t)cols, tile);
        rowwise(tile, cols, 0, count, job->x, job->n, job->y + r0, rows, 0);
    }
    free(tile);
}

/* The fused kernels (nf_gemv.h) read the packed codes directly: no tile. */
struct fused_job {
    const struct lq_nf_matrix *q;
    const float *x;
    int n;
    float *y;
    enum lq_nf_gemv_kernel kernel;
};

static void fused_body(void *context, size_t begin, size_t end) {
    const struct fused_job *job = context;
    if (job->kernel == LQ_NF_GEMV_AVX2)
        lq_nf_gemv_avx2(job->q, begin, end, job->x, job->n, job->y, job->q->rows);
    else
        lq_nf_gemv_portable(job->q, begin, end, job->x, job->n, job->y, job->q->rows);
}

/* The integer kernel (int_gemv.h) on x quantized once for all threads. */
struct int_job {
    const struct lq_nf_matrix *q;
    struct lq_int_activations a;
    float *y;
};

static void int_body(void *context, size_t begin, size_t end) {
    const struct int_job *job = context;
    if (lq_int_gemv_avx512_supported())
        lq_int_gemv_avx512(job->q, begin, end, &job->a, job->y, job->q->rows);
    else
        lq_int_gemv_portable(job->q, begin, end, &job->a, job->y, job->q->rows);
}

static int int_gemv(const struct lq_nf_matrix *q, const float *x, int n, float *y) {
    size_t bytes = lq_int_activations_bytes(n, q->cols);
    void *buffer = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!buffer) return LQ_ENOMEM;
    struct int_job job = {q, {0}, y};
    lq_int_activations_quantize(x, n, q->cols, lq_int_run_length(q->config.B0), LQ_INT_NF_UNIT,
                                buffer, &job.a);
    /* a part is worth ~16K multiply-adds per token now that the pool's threads spin between
     * loops: 576x192 projections split in two rather than running on one thread */
    size_t grain = (size_t)16384 / q->cols;
    lq_parallel_for(q->rows, grain < 4 ? 4 : grain, int_body, &job);
    free(buffer);
    return LQ_OK;
}

int lq_cpu_quantized_gemv(const struct lq_nf_matrix *q, const float *x, int n, float *y,
                          enum lq_nf_gemv_kernel kernel) {
    assert(n >= 1 && n <= LQ_CPU_ROWWISE_MAX_TOKENS && q->rows <= (size_t)INT_MAX &&
           q->cols <= (size_t)INT_MAX);
    const int rows = (int)q->rows, cols = (int)q->cols;
    if (kernel == LQ_NF_GEMV_INT) {
        if (lq_int_gemv_supports(q)) return int_gemv(q, x, n, y);
        kernel = lq_nf_gemv_avx2_supported() ? LQ_NF_GEMV_AVX2 : LQ_NF_GEMV_PORTABLE;
    }
    if (kernel == LQ_NF_GEMV_TILE) {
        struct lq_linear w = {.rows = rows, .cols = cols, .is_lq = 1, .q = *q};
        struct gemv_job job = {&w, x, n, y, 0};
        lq_parallel_for((size_t)rows, (size_t)tile_rows(cols), gemv_body, &job);
        return job.failed ? LQ_ENOMEM : LQ_OK;
    }
    struct fused_job job = {q, x, n, y, kernel};
    lq_parallel_for((size_t)rows, (size_t)tile_rows(cols), fused_body, &job);
    return LQ_OK;
}

/* Many tokens (prefill, eval): dequantize a tile in parallel, then one GEMM per tile. */
struct dequant_job {
    const struct lq_nf_matrix *q;
    size_t first;
    int cols;
    float *tile;
};

static void dequant_body(void *context, size_t begin, size_t end) {
    const struct dequant_job *job = context;
    lq_nf_dequantize_range(job->q, job->first + begin * (size_t)job->cols,
                           (end - begin) * (size_t)job->cols,
                           job->tile + begin * (size_t)job->cols);
}

static int quantized_gemm(const struct lq_linear *w, const float *x, int n, float *y) {
    const int rows = w->rows, cols = w->cols;
    int step = tile_rows(cols) * 16; /* a larger tile amortises the GEMM call */
    if (step > rows) step = rows;
    float *tile = malloc((size_t)step * cols * sizeof *tile);
    if (!tile) return LQ_ENOMEM;
    for (int r0 = 0; r0 < rows; r0 += step) {
        int count = rows - r0 < step ? rows - r0 : step;
        struct dequant_job job = {&w->q, (size_t)r0 * cols, cols, tile};
        lq_parallel_for((size_t)count, 16, dequant_body, &job);
        lq_cpu_gemm_nt(n, count, cols, x, tile, y + r0, rows, 0.0f);
    }
    free(tile);
    return LQ_OK;
}

int lq_cpu_linear(struct lq_backend *backend, const struct lq_linear *w, const float *x, int n,
                  float *y) {
    const int rows = w->rows, cols = w->cols;
    if (!w->is_lq) {
        lq_cpu_gemm_nt(n, rows, cols, x, w->dense, y, rows, 0.0f);
        return LQ_OK;
    }
    const enum lq_nf_gemv_kernel kernel = lq_nf_gemv_default_kernel();
    if (n <= LQ_CPU_ROWWISE_MAX_TOKENS) {
        int rc = lq_cpu_quantized_gemv(&w->q, x, n, y, kernel);
        if (rc) return rc;
    } else if (kernel == LQ_NF_GEMV_INT && lq_int_gemv_supports(&w->q) &&
               lq_int_gemv_avx512_supported()) {
        /* prefill too: integer multiply-adds beat fp32 tiles through sgemm (README) */
        int rc = int_gemv(&w->q, x, n, y);
        if (rc) return rc;
    } else if (quantized_gemm(w, x, n, y)) {
        return LQ_ENOMEM;
    }
    /* y += (x · L2ᵀ) · L1ᵀ, the one code path adapters use too (lowrank_cpu.c), so a row's
     * bits are the same through linear as through linear_base + lowrank_add */
    if (w->rank > 0)
        return lq_cpu_lowrank_add(backend, w->lora_B, w->lora_A, rows, cols, w->rank, x, n, y);
    return LQ_OK;
}
