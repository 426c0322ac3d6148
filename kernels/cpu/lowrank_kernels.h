/* The low-rank add y[n, rows] += (x[n, cols] · L2[rank, cols]ᵀ) · L1[rows, rank]ᵀ for up to
 * LQ_LOWRANK_MAX_TOKENS tokens (lowrank_cpu.c; above it OpenBLAS runs).
 *
 * The recipe. Both products are dot products d = w·x of some length len (cols for the first,
 * tmp[t, k] = L2[k]·x[t]; rank for the second, y[t, r] += L1[r]·tmp[t]), each computed alone,
 * whatever the other rows and tokens of the call (batch invariance), by one fixed sequence of
 * rounded operations:
 *   - 16 lanes, each starting at +0; lane j takes the elements c ≡ j (mod 16) in increasing c,
 *     acc[j] = fmaf(w[c], x[c], acc[j]) (one rounding per multiply-add). When len is not a
 *     multiple of 16 the last chunk pads both operands with +0: the lanes past len also do
 *     acc[j] = fmaf(0, 0, acc[j]).
 *   - the lanes summed in the tree
 *     d = (((l0+l2)+(l1+l3)) + ((l4+l6)+(l5+l7))) + (((l8+l10)+(l9+l11)) + ((l12+l14)+(l13+l15))).
 *   - tmp[t, k] = d (rounded to float, as all of the above); y[t, r] = y[t, r] + d.
 * The portable kernel writes the recipe out in C and is the reference; the AVX-512 one
 * (lowrank_avx512.c) runs 16 dot products at once, one zmm accumulator each, and reduces the 16
 * accumulators with a transpose-add tree that adds exactly the pairs of the tree above; the AVX2
 * one (same file, for CPUs without AVX-512) runs four at once in two ymm halves. All three give
 * the same bits. */
#ifndef LQ_LOWRANK_KERNELS_H
#define LQ_LOWRANK_KERNELS_H

#include <stddef.h>

#define LQ_LOWRANK_MAX_TOKENS 64

enum lq_lowrank_kernel { LQ_LOWRANK_PORTABLE, LQ_LOWRANK_AVX2, LQ_LOWRANK_AVX512 };

/* Whether this CPU runs the AVX-512 kernel (AVX-512F and FMA), the AVX2 one (AVX2 and FMA), a
 * given kernel (the portable one always). */
int lq_lowrank_avx512_supported(void);
int lq_lowrank_avx2_supported(void);
int lq_lowrank_kernel_supported(enum lq_lowrank_kernel kernel);

/* The kernel lq_cpu_lowrank_add uses up to LQ_LOWRANK_MAX_TOKENS tokens: AVX-512 where the CPU
 * has it, else AVX2, else the portable one. */
enum lq_lowrank_kernel lq_lowrank_default_kernel(void);

/* For rows r in [begin, end) of w[.., len] and tokens t in [0, n) of x[n, len]:
 * y[t·ldy + r] = w[r]·x[t] (accumulate 0) or y[t·ldy + r] + w[r]·x[t] (accumulate 1), each dot
 * product by the recipe above. The SIMD ones need the CPU support above. */
void lq_lowrank_dots_portable(const float *w, int len, size_t begin, size_t end, const float *x,
                              int n, float *y, int ldy, int accumulate);
void lq_lowrank_dots_avx2(const float *w, int len, size_t begin, size_t end, const float *x, int n,
                          float *y, int ldy, int accumulate);
void lq_lowrank_dots_avx512(const float *w, int len, size_t begin, size_t end, const float *x,
                            int n, float *y, int ldy, int accumulate);

/* The whole add y[n, rows] += (x · L2ᵀ) · L1ᵀ for 1 <= n <= LQ_LOWRANK_MAX_TOKENS by the given
 * kernel (LQ_OK; LQ_EINVAL for bad sizes or a kernel this CPU lacks; LQ_ENOMEM); split over the
 * thread pool by rows when large enough. */
int lq_lowrank_add_kernel(enum lq_lowrank_kernel kernel, const float *L1, const float *L2, int rows,
                          int cols, int rank, const float *x, int n, float *y);

#endif
