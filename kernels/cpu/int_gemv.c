/* The integer kernels in plain C (the reference for the AVX-512 ones), the quantization of x, the
 * int16 NF tables and the int8 matrix. The recipe is stated in int_gemv.h. */
#include "kernels/cpu/int_gemv.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/bitpack.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#if defined(__FAST_MATH__)
#error "int_gemv.c relies on IEEE evaluation order: build it without -ffast-math"
#endif

#define LANES LQ_INT_LANES

static size_t align64(size_t bytes) {
    return (bytes + 63) / 64 * 64;
}

int lq_int_run_length(int block_size) {
    return block_size % 64 == 0 ? 64 : LQ_INT_RUN;
}

size_t lq_int_activations_bytes(int n, size_t cols) {
    size_t values = (n > 0 ? (size_t)n : 0) * cols;
    /* the scale array at its largest (runs of 32) */
    return align64(values * sizeof(int16_t)) + align64(values / LQ_INT_RUN * sizeof(float));
}

static float x_inverse(float absmax) {
    return absmax > 0.0f ? (float)LQ_INT_X_UNIT / absmax : 0.0f;
}

static float x_scale(float absmax, int weight_unit) {
    return absmax / ((float)LQ_INT_X_UNIT * (float)weight_unit);
}

void lq_int_activations_runs_portable(const float *x, size_t first, size_t end, int weight_unit,
                                      struct lq_int_activations *out) {
    const size_t run = (size_t)out->run;
    for (size_t k = first; k < end; k++) {
        const float *in = x + k * run;
        float absmax = 0.0f;
        for (size_t i = 0; i < run; i++) {
            float a = fabsf(in[i]);
            absmax = a > absmax ? a : absmax;
        }
        const float inverse = x_inverse(absmax);
        for (size_t i = 0; i < run; i++) out->q[k * run + i] = (int16_t)lrintf(in[i] * inverse);
        out->scale[k] = x_scale(absmax, weight_unit);
    }
}

void lq_int_activations_quantize(const float *x, int n, size_t cols, int run, int weight_unit,
                                 void *buffer, struct lq_int_activations *out) {
    const size_t values = (size_t)n * cols;
    out->n = n;
    out->cols = cols;
    out->run = run;
    out->q = buffer;
    out->scale = (float *)((uint8_t *)buffer + align64(values * sizeof(int16_t)));
    if (lq_int_gemv_avx512_supported())
        lq_int_activations_runs_avx512(x, 0, values / (size_t)run, weight_unit, out);
    else
        lq_int_activations_runs_portable(x, 0, values / (size_t)run, weight_unit, out);
}

int lq_int_gemv_supports(const struct lq_nf_matrix *m) {
    const struct lq_nf_config *c = &m->config;
    if (c->b0 != 2 && c->b0 != 3 && c->b0 != 4) return 0;
    if (m->cols == 0 || m->cols % LQ_INT_RUN || m->cols / (size_t)c->B0 > LQ_INT_MAX_ROW_BLOCKS)
        return 0;
    if (c->B0 % LQ_INT_RUN == 0) return m->cols % (size_t)c->B0 == 0; /* blocks within rows */
    return c->B0 == 2 || c->B0 == 4 || c->B0 == 8 || c->B0 == 16;
}

const int16_t *lq_int_code_table(int b0) {
    static int16_t tables[5][16];
    static int built[5];
    if (b0 < 2 || b0 > 4) return NULL;
    if (!__atomic_load_n(&built[b0], __ATOMIC_ACQUIRE)) {
        /* racing first callers write the same values */
        const float *table = lq_nf_code_table(b0);
        for (int k = 0; k < 1 << b0; k++)
            tables[b0][k] = (int16_t)lrintf((float)LQ_INT_NF_UNIT * table[k]);
        __atomic_store_n(&built[b0], 1, __ATOMIC_RELEASE);
    }
    return tables[b0];
}

void lq_int_block_scales(const struct lq_nf_matrix *m, size_t first, size_t count, float *scales) {
    const int b1 = m->config.b1;
    const size_t group_blocks = (size_t)m->config.B1;
    const float levels = (float)((1u << b1) - 1u);
    size_t group = first / group_blocks, in_group = first % group_blocks;
    float step = lq_nf_group_scale(m, group) / levels;
    for (size_t k = 0; k < count; k++, in_group++) {
        if (in_group == group_blocks) {
            in_group = 0;
            step = lq_nf_group_scale(m, ++group) / levels;
        }
        float code = (float)lq_bitpack_get(m->scale_codes, first + k, b1);
        scales[k] = fmaf(code, step, m->scale_offset);
    }
}

/* The sum of a row's 16 lanes in the recipe's order. */
static float lanes_sum(const float *acc) {
    float h[8];
    for (int j = 0; j < 8; j++) h[j] = acc[j] + acc[j + 8];
    return ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]));
}

/* Row r for token t: v(context, r, column) gives a weight, lane_scale(context, r, run, lane) the
 * scale of a lane's block. */
static float row_dot(const struct lq_int_activations *a, int t, size_t r,
                     int (*v)(const void *, size_t, size_t),
                     float (*lane_scale)(const void *, size_t, size_t, int), const void *context) {
    const size_t cols = a->cols, run = (size_t)a->run, runs = cols / run;
    float acc[LANES] = {0};
    for (size_t k = 0; k < runs; k++) {
        const size_t index = (size_t)t * runs + k;
        const int16_t *q = a->q + (size_t)t * cols + k * run;
        for (int j = 0; j < LANES; j++) {
            int32_t i = 0;
            for (size_t s = 0; s < run / LQ_INT_RUN; s++)
                for (int e = 0; e < 2; e++) {
                    size_t c = s * LQ_INT_RUN + (size_t)(2 * j + e);
                    i += (int32_t)v(context, r, k * run + c) * q[c];
                }
            float g = (float)i * a->scale[index];
            acc[j] = fmaf(g, lane_scale(context, r, k, j), acc[j]);
        }
    }
    return lanes_sum(acc);
}

/* An NF matrix row for row_dot: its block scales decoded once. */
struct nf_row {
    const struct lq_nf_matrix *m;
    const int16_t *table;
    size_t run;
    const float *scales;
};

static int nf_value(const void *context, size_t r, size_t c) {
    const struct nf_row *row = context;
    return row->table[lq_bitpack_get(row->m->codes, r * row->m->cols + c, row->m->config.b0)];
}

static float nf_lane_scale(const void *context, size_t r, size_t k, int lane) {
    const struct nf_row *row = context;
    (void)r;
    return row->scales[(k * row->run + (size_t)(2 * lane)) / (size_t)row->m->config.B0];
}

void lq_int_gemv_portable(const struct lq_nf_matrix *m, size_t row_begin, size_t row_end,
                          const struct lq_int_activations *a, float *y, size_t ldy) {
    const size_t cols = m->cols, block_size = (size_t)m->config.B0;
    const size_t blocks_per_row = (cols + block_size - 1) / block_size;
    float scales[LQ_INT_MAX_ROW_BLOCKS];
    struct nf_row row = {m, lq_int_code_table(m->config.b0), (size_t)a->run, scales};
    for (size_t r = row_begin; r < row_end; r++) {
        /* rows hold whole blocks or whole lanes of blocks (lq_int_gemv_supports) */
        lq_int_block_scales(m, r * cols / block_size, blocks_per_row, scales);
        for (int t = 0; t < a->n; t++)
            y[(size_t)t * ldy + r] = row_dot(a, t, r, nf_value, nf_lane_scale, &row);
    }
}

int lq_int8_matrix_quantize(const float *w, size_t rows, size_t cols, int run,
                            struct lq_int8_matrix *out, struct lq_error *err) {
    memset(out, 0, sizeof *out);
    if (run != 32 && run != 64)
        return lq_error_set(err, LQ_EINVAL, "int8 matrix runs are 32 or 64 columns, not %d", run);
    if (cols == 0 || cols % (size_t)run)
        return lq_error_set(err, LQ_EINVAL,
                            "an int8 matrix needs rows of a multiple of %d, not %zu", run, cols);
    const size_t length = (size_t)run;
    out->values = malloc(rows * cols);
    out->scales = malloc(rows * (cols / length) * sizeof *out->scales);
    if (!out->values || !out->scales) {
        lq_int8_matrix_free(out);
        return lq_error_set(err, LQ_ENOMEM, "out of memory for a %zu x %zu int8 matrix", rows,
                            cols);
    }
    out->rows = rows;
    out->cols = cols;
    out->run = (int)length;
    for (size_t run = 0; run < rows * (cols / length); run++) {
        const float *in = w + run * length;
        float absmax = 0.0f;
        for (size_t k = 0; k < length; k++) {
            float a = fabsf(in[k]);
            absmax = a > absmax ? a : absmax;
        }
        if (!isfinite(absmax)) {
            lq_int8_matrix_free(out);
            return lq_error_set(err, LQ_ENUMERIC, "non-finite weight in row %zu",
                                run / (cols / length));
        }
        out->scales[run] = absmax / 127.0f;
        const float inverse = absmax > 0.0f ? 127.0f / absmax : 0.0f;
        for (size_t k = 0; k < length; k++)
            out->values[run * length + k] = (int8_t)lrintf(in[k] * inverse);
    }
    return LQ_OK;
}

void lq_int8_matrix_free(struct lq_int8_matrix *m) {
    free(m->values);
    free(m->scales);
    memset(m, 0, sizeof *m);
}

size_t lq_int8_matrix_bytes(const struct lq_int8_matrix *m) {
    return m->rows * m->cols + m->rows * (m->cols / (size_t)m->run) * sizeof *m->scales;
}

void lq_int8_matrix_dequantize_rows(const struct lq_int8_matrix *m, size_t r0, size_t count,
                                    float *out) {
    for (size_t i = 0; i < count * m->cols; i++) {
        size_t flat = r0 * m->cols + i;
        out[i] = (float)m->values[flat] * m->scales[flat / (size_t)m->run];
    }
}

static int int8_value(const void *context, size_t r, size_t c) {
    const struct lq_int8_matrix *m = context;
    return m->values[r * m->cols + c];
}

static float int8_lane_scale(const void *context, size_t r, size_t k, int lane) {
    const struct lq_int8_matrix *m = context;
    (void)lane;
    return m->scales[r * (m->cols / (size_t)m->run) + k];
}

void lq_int8_matrix_gemv_portable(const struct lq_int8_matrix *m, size_t row_begin, size_t row_end,
                                  const struct lq_int_activations *a, float *y, size_t ldy) {
    for (size_t r = row_begin; r < row_end; r++)
        for (int t = 0; t < a->n; t++)
            y[(size_t)t * ldy + r] = row_dot(a, t, r, int8_value, int8_lane_scale, m);
}
