/* The portable fused decode kernel (the reference for the SIMD ones) and the choice of kernel.
 * The recipe every kernel follows is stated in nf_gemv.h. */
#include "kernels/cpu/nf_gemv.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/bitpack.h"
#include "kernels/cpu/int_gemv.h"

/* The recipe rounds every product and sum separately: no contraction into multiply-adds (GCC
 * does none in ISO C mode; Clang is told), no reassociation. */
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#if defined(__FAST_MATH__)
#error "nf_gemv.c relies on IEEE evaluation order: build it without -ffast-math"
#endif

/* The block of the weight being read and its scaled table, moved forward as rows are walked
 * (flat indices only grow within one call, so a block's scale is computed once). */
struct block_cursor {
    const struct lq_nf_matrix *m;
    const float *table;
    size_t block_end; /* one past the flat index of the current block's last value */
    float scale;
    float lut[16]; /* table[k] * scale, for b0 <= 4 */
};

static void cursor_seek(struct block_cursor *cursor, size_t flat) {
    const struct lq_nf_config *c = &cursor->m->config;
    size_t block = flat / (size_t)c->B0;
    cursor->block_end = (block + 1) * (size_t)c->B0;
    cursor->scale = lq_nf_block_scale(cursor->m, block);
    if (c->b0 <= 4)
        for (int k = 0; k < 1 << c->b0; k++) cursor->lut[k] = cursor->table[k] * cursor->scale;
}

/* The dequantized weight at flat index `flat` (not below the previous call's). */
static inline float cursor_weight(struct block_cursor *cursor, size_t flat) {
    const int b0 = cursor->m->config.b0;
    if (flat >= cursor->block_end) cursor_seek(cursor, flat);
    unsigned code = lq_bitpack_get(cursor->m->codes, flat, b0);
    return b0 <= 4 ? cursor->lut[code] : cursor->table[code] * cursor->scale;
}

void lq_nf_gemv_portable(const struct lq_nf_matrix *m, size_t row_begin, size_t row_end,
                         const float *x, int n, float *y, size_t ldy) {
    const size_t cols = m->cols, main_cols = cols / 8 * 8;
    struct block_cursor cursor = {m, lq_nf_code_table(m->config.b0), 0, 0.0f, {0}};
    float acc[LQ_NF_GEMV_MAX_TOKENS][8], w[8];
    for (size_t r = row_begin; r < row_end; r++) {
        const size_t first = r * cols;
        memset(acc, 0, (size_t)n * sizeof acc[0]);
        for (size_t c = 0; c < main_cols; c += 8) {
            for (int j = 0; j < 8; j++) w[j] = cursor_weight(&cursor, first + c + j);
            for (int t = 0; t < n; t++) {
                const float *xt = x + (size_t)t * cols + c;
                for (int j = 0; j < 8; j++) {
                    float product = w[j] * xt[j];
                    acc[t][j] += product;
                }
            }
        }
        for (int t = 0; t < n; t++) {
            const float *a = acc[t];
            y[(size_t)t * ldy + r] =
                ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
        }
        for (size_t c = main_cols; c < cols; c++) {
            float weight = cursor_weight(&cursor, first + c);
            for (int t = 0; t < n; t++) {
                float product = weight * x[(size_t)t * cols + c];
                y[(size_t)t * ldy + r] += product;
            }
        }
    }
}

const char *lq_nf_gemv_kernel_name(enum lq_nf_gemv_kernel kernel) {
    switch (kernel) {
    case LQ_NF_GEMV_TILE:
        return "tile";
    case LQ_NF_GEMV_PORTABLE:
        return "portable";
    case LQ_NF_GEMV_AVX2:
        return "avx2";
    case LQ_NF_GEMV_INT:
        return "int";
    }
    return "?";
}

enum lq_nf_gemv_kernel lq_nf_gemv_default_kernel(void) {
    static int chosen = -1; /* written once; racing first callers compute the same value */
    int kernel = __atomic_load_n(&chosen, __ATOMIC_RELAXED);
    if (kernel >= 0) return (enum lq_nf_gemv_kernel)kernel;
    kernel = lq_int_gemv_avx512_supported() ? LQ_NF_GEMV_INT
             : lq_nf_gemv_avx2_supported()  ? LQ_NF_GEMV_AVX2
                                            : LQ_NF_GEMV_PORTABLE;
    const char *name = getenv("LQ_CPU_KERNEL");
    if (name && *name) {
        if (!strcmp(name, "tile"))
            kernel = LQ_NF_GEMV_TILE;
        else if (!strcmp(name, "portable"))
            kernel = LQ_NF_GEMV_PORTABLE;
        else if (!strcmp(name, "avx2") && lq_nf_gemv_avx2_supported())
            kernel = LQ_NF_GEMV_AVX2;
        else if (!strcmp(name, "int"))
            kernel = LQ_NF_GEMV_INT;
        else
            fprintf(stderr,
                    "lqd: LQ_CPU_KERNEL=%s is not tile, portable, int or a supported avx2; "
                    "using %s\n",
                    name, lq_nf_gemv_kernel_name((enum lq_nf_gemv_kernel)kernel));
    }
    __atomic_store_n(&chosen, kernel, __ATOMIC_RELAXED);
    return (enum lq_nf_gemv_kernel)kernel;
}
