/* Fused dequantize-and-multiply for decode on the CPU: y = x · Qᵀ for a few tokens, straight
 * from Q's packed NormalFloat codes (core/nf.h). Each row is walked block by block; a block's
 * weights are its codes looked up in the NF table times the block's dequantized scale, and are
 * multiplied into the dot products of every token at once, with no fp32 tile in memory.
 *
 * Every kernel here computes each y[t, r] by the recipe of the row-wise kernel of linear_cpu.c
 * (the "tile" path, which dequantizes rows to fp32 first): the weight w = table[code] · scale
 * rounded to float; per lane j = c mod 8 the products w·x rounded and added in column order
 * over the columns below cols rounded down to 8; the lanes summed ((0+4)+(1+5))+((2+6)+(3+7));
 * then the remaining columns added in order. No multiply-add is fused. So the portable kernel,
 * the AVX2 one and the tile path give the same bits, whatever the number of tokens in the call
 * (batch invariance) and whatever the block layout. */
#ifndef LQ_NF_GEMV_H
#define LQ_NF_GEMV_H

#include <stddef.h>

#include "core/nf.h"

/* Tokens one call may carry (the row-wise limit of linear_cpu.c). */
#define LQ_NF_GEMV_MAX_TOKENS 64

/* The decode kernels lq_cpu_linear can run for up to LQ_NF_GEMV_MAX_TOKENS tokens. */
enum lq_nf_gemv_kernel {
    LQ_NF_GEMV_TILE,     /* dequantize row tiles to fp32, then the row-wise kernel */
    LQ_NF_GEMV_PORTABLE, /* fused, plain C */
    LQ_NF_GEMV_AVX2,     /* fused, AVX2 (x86-64 with AVX2; else it runs the portable one) */
    /* integer multiply-adds on int16 codes and activations (int_gemv.h): not exact; AVX-512
     * where the CPU has it, else the portable integer kernel; layouts it does not take run AVX2
     * (or portable) */
    LQ_NF_GEMV_INT,
};

/* y[t * ldy + r] = row r of dequantize(m) · x[t * m->cols ...] for rows [row_begin, row_end)
 * and tokens t < n, 1 <= n <= LQ_NF_GEMV_MAX_TOKENS. Borrows everything. */
void lq_nf_gemv_portable(const struct lq_nf_matrix *m, size_t row_begin, size_t row_end,
                         const float *x, int n, float *y, size_t ldy);
void lq_nf_gemv_avx2(const struct lq_nf_matrix *m, size_t row_begin, size_t row_end, const float *x,
                     int n, float *y, size_t ldy);

/* Whether this CPU (and build) runs lq_nf_gemv_avx2 with AVX2 rather than falling back. */
int lq_nf_gemv_avx2_supported(void);

/* The kernel lq_cpu_linear uses: LQ_CPU_KERNEL=tile|portable|avx2|int from the environment,
 * else int where the CPU runs its AVX-512 kernel, else AVX2 where supported, else portable. Read
 * once; an unknown value is reported on stderr and ignored. */
enum lq_nf_gemv_kernel lq_nf_gemv_default_kernel(void);
const char *lq_nf_gemv_kernel_name(enum lq_nf_gemv_kernel kernel);

#endif
