/* Dense products against bf16 weights on the CPU, for the output head kept in 16 bits
 * (LQ_CPU_HEAD=bf16, head_cpu.c). A bf16 weight widens to fp32 exactly (a 16-bit shift), so
 * the only error is the one rounding of each weight to bf16 (core/half.h).
 *
 * Every kernel here computes each y[t, r] by one recipe, so the portable and the AVX2 one give
 * the same bits for any number of tokens: per lane j = c mod 8 the products w·x rounded and
 * added in column order over the columns below cols rounded down to 8 (no fused multiply-add);
 * the lanes summed ((0+4)+(2+6))+((1+5)+(3+7)); then the remaining columns added in order. */
#ifndef LQ_BF16_GEMV_H
#define LQ_BF16_GEMV_H

#include <stddef.h>
#include <stdint.h>

/* Tokens one call may carry (the row-wise limit of linear_cpu.c). */
#define LQ_BF16_GEMV_MAX_TOKENS 64

/* y[t * ldy + r] = w[r, :] · x[t, :] for rows [row_begin, row_end) of the bf16 matrix
 * w[rows, cols] and tokens t < n, 1 <= n <= LQ_BF16_GEMV_MAX_TOKENS. Borrows everything. */
void lq_bf16_gemv_portable(const uint16_t *w, size_t cols, size_t row_begin, size_t row_end,
                           const float *x, int n, float *y, size_t ldy);
/* The same with AVX2 where the CPU has it, else the portable kernel. */
void lq_bf16_gemv_avx2(const uint16_t *w, size_t cols, size_t row_begin, size_t row_end,
                       const float *x, int n, float *y, size_t ldy);

/* Whether this CPU (and build) runs lq_bf16_gemv_avx2 with AVX2 rather than falling back. */
int lq_bf16_gemv_avx2_supported(void);

/* out[i] = w[i] widened to fp32, for i < count. */
void lq_bf16_widen(const uint16_t *w, size_t count, float *out);

#endif
