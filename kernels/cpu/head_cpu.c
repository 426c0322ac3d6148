/* The output head on the CPU in bf16 (LQ_CPU_HEAD=bf16): decode reads the head once per token,
 * and for a small model it is most of the bytes read (SmolLM2-135M: 49152 x 576, 113 MB in
 * fp32 against ~40 MB for all its 3-bit layers), so halving it is the largest single saving.
 * The bf16 copy is the backend's own; the fp32 weight stays the model's (the embedding table
 * when tied), so the option costs 2 bytes per head weight of memory and saves 2 per token read. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/half.h"
#include "core/parallel.h"
#include "kernels/cpu/bf16_gemv.h"
#include "kernels/cpu/cpu_ops.h"

struct lq_cpu_head {
    int rows, cols;
    uint16_t *bf16; /* rows x cols, round-to-nearest-even from the fp32 head */
};

enum lq_cpu_head_precision lq_cpu_head_precision_from_env(void) {
    const char *name = getenv("LQ_CPU_HEAD");
    if (!name || !*name || !strcmp(name, "fp32")) return LQ_CPU_HEAD_FP32;
    if (!strcmp(name, "bf16")) return LQ_CPU_HEAD_BF16;
    fprintf(stderr, "lqd: LQ_CPU_HEAD=%s is not fp32 or bf16; using fp32\n", name);
    return LQ_CPU_HEAD_FP32;
}

struct convert_job {
    const float *w;
    uint16_t *out;
};

static void convert_body(void *context, size_t begin, size_t end) {
    const struct convert_job *job = context;
    for (size_t i = begin; i < end; i++) job->out[i] = lq_float_to_bf16(job->w[i]);
}

int lq_cpu_head_create(const float *w, int rows, int cols, struct lq_cpu_head **out,
                       struct lq_error *err) {
    size_t count = (size_t)rows * (size_t)cols;
    struct lq_cpu_head *head = calloc(1, sizeof *head);
    *out = NULL;
    if (head) head->bf16 = malloc(count * sizeof *head->bf16);
    if (!head || !head->bf16) {
        free(head);
        return lq_error_set(err, LQ_ENOMEM, "out of memory for a %d x %d bf16 output head", rows,
                            cols);
    }
    head->rows = rows;
    head->cols = cols;
    struct convert_job job = {w, head->bf16};
    lq_parallel_for(count, (size_t)1 << 20, convert_body, &job);
    *out = head;
    return LQ_OK;
}

void lq_cpu_head_free(struct lq_cpu_head *head) {
    if (!head) return;
    free(head->bf16);
    free(head);
}

size_t lq_cpu_head_bytes(const struct lq_cpu_head *head) {
    return (size_t)head->rows * (size_t)head->cols * sizeof *head->bf16;
}

struct head_job {
    const struct lq_cpu_head *head;
    const float *x;
    int n;
    float *y;
};

static void head_body(void *context, size_t begin, size_t end) {
    const struct head_job *job = context;
    lq_bf16_gemv_avx2(job->head->bf16, (size_t)job->head->cols, begin, end, job->x, job->n, job->y,
                      (size_t)job->head->rows);
}

/* Many tokens (eval's all-position logits): widen a tile of rows to fp32, one GEMM per tile,
 * as linear_cpu.c does for quantized layers. */
static int head_gemm(const struct lq_cpu_head *head, const float *x, int n, float *y) {
    const int rows = head->rows, cols = head->cols;
    int step = (1 << 20) / (cols > 0 ? cols : 1);
    if (step < 1) step = 1;
    if (step > rows) step = rows;
    float *tile = malloc((size_t)step * cols * sizeof *tile);
    if (!tile) return LQ_ENOMEM;
    for (int r0 = 0; r0 < rows; r0 += step) {
        int count = rows - r0 < step ? rows - r0 : step;
        lq_bf16_widen(head->bf16 + (size_t)r0 * cols, (size_t)count * cols, tile);
        lq_cpu_gemm_nt(n, count, cols, x, tile, y + r0, rows, 0.0f);
    }
    free(tile);
    return LQ_OK;
}

int lq_cpu_head_matmul(const struct lq_cpu_head *head, const float *x, int n, float *y) {
    if (n > LQ_BF16_GEMV_MAX_TOKENS) return head_gemm(head, x, n, y);
    struct head_job job = {head, x, n, y};
    /* a thread is worth ~2^18 multiply-adds, as in lq_cpu_gemm_nt */
    size_t per_row = (size_t)n * (size_t)head->cols;
    size_t min_rows = per_row >= ((size_t)1 << 18) ? 16 : ((size_t)1 << 18) / per_row + 1;
    lq_parallel_for((size_t)head->rows, min_rows, head_body, &job);
    return LQ_OK;
}
