/* The output head on the CPU in bf16 (LQ_CPU_HEAD=bf16) or int8 (LQ_CPU_HEAD=int8): decode reads
 * the head once per token, and for a small model it is most of the bytes read (SmolLM2-135M:
 * 49152 x 576, 113 MB in fp32 against ~40 MB for all its 3-bit layers), so shrinking it is the
 * largest single saving. The copy is the backend's own; the fp32 weight stays the model's (the
 * embedding table when tied). bf16: 2 bytes per weight, the bf16 kernel (bf16_gemv.h);
 * int8: 1.125 bytes per weight (int8 values, a float scale per 32), the integer kernel
 * (int_gemv.h): 3.6x fewer bytes per token read than fp32, and integer multiply-adds. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/half.h"
#include "core/parallel.h"
#include "kernels/cpu/bf16_gemv.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/int_gemv.h"

struct lq_cpu_head {
    int rows, cols;
    enum lq_cpu_head_precision precision; /* bf16 or int8 */
    uint16_t *bf16;                       /* rows x cols, round-to-nearest-even from fp32 */
    struct lq_int8_matrix int8;
};

enum lq_cpu_head_precision lq_cpu_head_precision_from_env(void) {
    const char *name = getenv("LQ_CPU_HEAD");
    if (!name || !*name || !strcmp(name, "auto")) return LQ_CPU_HEAD_AUTO;
    if (!strcmp(name, "fp32")) return LQ_CPU_HEAD_FP32;
    if (!strcmp(name, "bf16")) return LQ_CPU_HEAD_BF16;
    if (!strcmp(name, "int8")) return LQ_CPU_HEAD_INT8;
    fprintf(stderr, "lqd: LQ_CPU_HEAD=%s is not auto, fp32, bf16 or int8; using auto\n", name);
    return LQ_CPU_HEAD_AUTO;
}

struct convert_job {
    const float *w;
    uint16_t *out;
};

static void convert_body(void *context, size_t begin, size_t end) {
    const struct convert_job *job = context;
    for (size_t i = begin; i < end; i++) job->out[i] = lq_float_to_bf16(job->w[i]);
}

int lq_cpu_head_create(const float *w, int rows, int cols, enum lq_cpu_head_precision precision,
                       struct lq_cpu_head **out, struct lq_error *err) {
    size_t count = (size_t)rows * (size_t)cols;
    *out = NULL;
    if (precision == LQ_CPU_HEAD_INT8) {
        struct lq_cpu_head *head = calloc(1, sizeof *head);
        if (!head) return lq_error_set(err, LQ_ENOMEM, "out of memory");
        int rc =
            lq_int8_matrix_quantize(w, (size_t)rows, (size_t)cols, LQ_INT_RUN, &head->int8, err);
        if (rc) {
            free(head);
            return rc;
        }
        head->rows = rows, head->cols = cols, head->precision = LQ_CPU_HEAD_INT8;
        *out = head;
        return LQ_OK;
    }
    struct lq_cpu_head *head = calloc(1, sizeof *head);
    if (head) head->bf16 = malloc(count * sizeof *head->bf16);
    if (!head || !head->bf16) {
        free(head);
        return lq_error_set(err, LQ_ENOMEM, "out of memory for a %d x %d bf16 output head", rows,
                            cols);
    }
    head->rows = rows;
    head->cols = cols;
    head->precision = LQ_CPU_HEAD_BF16;
    struct convert_job job = {w, head->bf16};
    lq_parallel_for(count, (size_t)1 << 20, convert_body, &job);
    *out = head;
    return LQ_OK;
}

void lq_cpu_head_embed(const struct lq_cpu_head *head, const int *ids, int n, float *out) {
    const size_t cols = (size_t)head->cols;
    for (int i = 0; i < n; i++) {
        float *row = out + (size_t)i * cols;
        if (head->precision == LQ_CPU_HEAD_INT8)
            lq_int8_matrix_dequantize_rows(&head->int8, (size_t)ids[i], 1, row);
        else
            lq_bf16_widen(head->bf16 + (size_t)ids[i] * cols, cols, row);
    }
}

void lq_cpu_head_free(struct lq_cpu_head *head) {
    if (!head) return;
    free(head->bf16);
    lq_int8_matrix_free(&head->int8);
    free(head);
}

size_t lq_cpu_head_bytes(const struct lq_cpu_head *head) {
    if (head->precision == LQ_CPU_HEAD_INT8) return lq_int8_matrix_bytes(&head->int8);
    return (size_t)head->rows * (size_t)head->cols * sizeof *head->bf16;
}

struct head_job {
    const struct lq_cpu_head *head;
    const float *x;
    int n;
    float *y;
    struct lq_int_activations a; /* int8: x quantized once for all threads */
};

static void head_body(void *context, size_t begin, size_t end) {
    const struct head_job *job = context;
    if (job->head->precision == LQ_CPU_HEAD_INT8) {
        lq_int8_matrix_gemv_avx512(&job->head->int8, begin, end, &job->a, job->y,
                                   (size_t)job->head->rows);
        return;
    }
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
        if (head->precision == LQ_CPU_HEAD_INT8)
            lq_int8_matrix_dequantize_rows(&head->int8, (size_t)r0, (size_t)count, tile);
        else
            lq_bf16_widen(head->bf16 + (size_t)r0 * cols, (size_t)count * cols, tile);
        lq_cpu_gemm_nt(n, count, cols, x, tile, y + r0, rows, 0.0f);
    }
    free(tile);
    return LQ_OK;
}

int lq_cpu_head_matmul(const struct lq_cpu_head *head, const float *x, int n, float *y) {
    if (n > LQ_BF16_GEMV_MAX_TOKENS) return head_gemm(head, x, n, y);
    struct head_job job = {head, x, n, y, {0}};
    void *buffer = NULL;
    if (head->precision == LQ_CPU_HEAD_INT8) {
        size_t bytes = lq_int_activations_bytes(n, (size_t)head->cols);
        buffer = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!buffer) return LQ_ENOMEM;
        lq_int_activations_quantize(x, n, (size_t)head->cols, head->int8.run, LQ_INT_INT8_UNIT,
                                    buffer, &job.a);
    }
    /* a thread is worth ~2^18 multiply-adds, as in lq_cpu_gemm_nt */
    size_t per_row = (size_t)n * (size_t)head->cols;
    size_t min_rows = per_row >= ((size_t)1 << 18) ? 16 : ((size_t)1 << 18) / per_row + 1;
    lq_parallel_for((size_t)head->rows, min_rows, head_body, &job);
    free(buffer);
    return LQ_OK;
}
