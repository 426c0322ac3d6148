/* Linear layers on the CPU. Dense: one OpenBLAS call. LQ: Q is dequantized tile by tile (never
 * a full dense copy) and multiplied, then the low-rank part L1·(L2·x) is added. */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "core/parallel.h"
#include "kernels/cpu/cpu_ops.h"

struct gemm_job {
    int n, cols, ldy;
    const float *x, *w;
    float *y;
    float beta;
};

static void gemm_body(void *context, size_t begin, size_t end) {
    const struct gemm_job *job = context;
    int rows = (int)(end - begin);
    if (job->n == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, rows, job->cols, 1.0f,
                    job->w + begin * (size_t)job->cols, job->cols, job->x, 1, job->beta,
                    job->y + begin, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, job->n, rows, job->cols, 1.0f, job->x,
                    job->cols, job->w + begin * (size_t)job->cols, job->cols, job->beta,
                    job->y + begin, job->ldy);
}

void lq_cpu_gemm_nt(int n, int rows, int cols, const float *x, const float *w, float *y, int ldy,
                    float beta) {
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

/* Few tokens (decode): each thread dequantizes its rows into a small tile and takes dot
 * products, so every packed byte is read once per call. */
struct gemv_job {
    const struct lq_linear *w;
    const float *x;
    int n;
    float *y;
};

static void gemv_body(void *context, size_t first_row, size_t end_row) {
    const struct gemv_job *job = context;
    const int cols = job->w->cols, rows = job->w->rows, step = tile_rows(cols);
    float *tile = malloc((size_t)step * cols * sizeof *tile);
    if (!tile) return;
    for (size_t r0 = first_row; r0 < end_row; r0 += (size_t)step) {
        size_t count = end_row - r0 < (size_t)step ? end_row - r0 : (size_t)step;
        lq_nf_dequantize_range(&job->w->q, r0 * (size_t)cols, count * (size_t)cols, tile);
        for (int i = 0; i < job->n; i++) {
            const float *x = job->x + (size_t)i * cols;
            for (size_t r = 0; r < count; r++) {
                const float *wr = tile + r * (size_t)cols;
                float dot = 0.0f;
                for (int c = 0; c < cols; c++) dot += wr[c] * x[c];
                job->y[(size_t)i * rows + r0 + r] = dot;
            }
        }
    }
    free(tile);
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
    (void)backend;
    const int rows = w->rows, cols = w->cols;
    if (!w->is_lq) {
        lq_cpu_gemm_nt(n, rows, cols, x, w->dense, y, rows, 0.0f);
        return LQ_OK;
    }
    if (n < 8) {
        struct gemv_job job = {w, x, n, y};
        lq_parallel_for((size_t)rows, (size_t)tile_rows(cols), gemv_body, &job);
    } else if (quantized_gemm(w, x, n, y)) {
        return LQ_ENOMEM;
    }
    if (w->rank > 0) {
        /* y += (x · L2ᵀ) · L1ᵀ: two thin products instead of a dense L1·L2 */
        float *t = malloc((size_t)n * w->rank * sizeof *t);
        if (!t) return LQ_ENOMEM;
        lq_cpu_gemm_nt(n, w->rank, cols, x, w->lora_A, t, w->rank, 0.0f);
        lq_cpu_gemm_nt(n, rows, w->rank, t, w->lora_B, y, rows, 1.0f);
        free(t);
    }
    return LQ_OK;
}
