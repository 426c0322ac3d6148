/* The low-rank dot products with AVX-512 (lowrank_kernels.h states the recipe; this file follows
 * it bit for bit). Sixteen dot products at once, one zmm accumulator each: sixteen rows for one
 * token, or four rows by four tokens (each loaded vector then serves four products). Lane j of
 * an accumulator takes the elements c ≡ j (mod 16) with one FMA per chunk of 16, the last chunk
 * loaded under a mask (zeros past the end); then a transpose-add tree turns the 16 accumulators
 * into one vector whose lane i is the sum of accumulator i's lanes, adding the same pairs in the
 * same order as the recipe's tree. Below, an AVX2 kernel for CPUs without AVX-512. Compiled per
 * function for the instruction sets each needs and chosen at run time. */
#include "kernels/cpu/lowrank_kernels.h"

#include <stdint.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#if defined(__FAST_MATH__)
#error "lowrank_avx512.c relies on IEEE evaluation order: build it without -ffast-math"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define LR_TARGET "avx512f,fma"
#define LR_FUNCTION __attribute__((target(LR_TARGET)))
#define LR_INLINE __attribute__((target(LR_TARGET), always_inline)) static inline

#if defined(__clang__)
#define LR_UNROLL _Pragma("unroll")
#else
#define LR_UNROLL _Pragma("GCC unroll 16")
#endif

int lq_lowrank_avx512_supported(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

/* Lane i of the result = the recipe's tree over the 16 lanes l0..l15 of v[i]:
 * (((l0+l2)+(l1+l3)) + ((l4+l6)+(l5+l7))) + (((l8+l10)+(l9+l11)) + ((l12+l14)+(l13+l15))). */
LR_INLINE __m512 reduce16(const __m512 *v) {
    __m512 s[8], u[4], z[2];
    /* per 128-bit chunk q of a pair (a, b): [a0+a2, b0+b2, a1+a3, b1+b3] (lanes 4q + ·) */
    LR_UNROLL for (int i = 0; i < 8; i++) s[i] = _mm512_add_ps(
        _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    /* chunk q of u[i]: lane m = (l4q+l4q+2) + (l4q+1+l4q+3) of v[4i + m] */
    LR_UNROLL for (int i = 0; i < 4; i++) u[i] =
        _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44),
                      _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
    /* chunks of z[i]: (c0+c1), (c2+c3) of u[2i], then of u[2i + 1] */
    LR_UNROLL for (int i = 0; i < 2; i++) z[i] =
        _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                      _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    /* chunk k: (c0+c1) + (c2+c3) of u[k] */
    return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                         _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

/* The R·T = 16 dot products of rows w[0..R) with tokens x[0..T): lane t·R + k of the result is
 * w[k]·x[t]. */
LR_INLINE __m512 block(const int R, const int T, const float *const *w, const float *const *x,
                       int len) {
    __m512 acc[16], xv[16], wv[16];
    LR_UNROLL for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    int c = 0;
    for (; c + 16 <= len; c += 16) {
        LR_UNROLL for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_ps(x[t] + c);
        LR_UNROLL for (int k = 0; k < R; k++) wv[k] = _mm512_loadu_ps(w[k] + c);
        LR_UNROLL for (int t = 0; t < T; t++) LR_UNROLL for (int k = 0; k < R; k++) acc[t * R + k] =
            _mm512_fmadd_ps(wv[k], xv[t], acc[t * R + k]);
    }
    if (c < len) {
        const __mmask16 m = (__mmask16)((1u << (len - c)) - 1u);
        LR_UNROLL for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_ps(m, x[t] + c);
        LR_UNROLL for (int k = 0; k < R; k++) wv[k] = _mm512_maskz_loadu_ps(m, w[k] + c);
        LR_UNROLL for (int t = 0; t < T; t++) LR_UNROLL for (int k = 0; k < R; k++) acc[t * R + k] =
            _mm512_fmadd_ps(wv[k], xv[t], acc[t * R + k]);
    }
    return reduce16(acc);
}

/* Rows [r0, r0 + R) of w as pointers; past end, the first row again (padding whose products are
 * dropped), so a short last block runs the same code. */
static inline int block_rows(const float *w, int len, size_t r0, size_t end, int R,
                             const float **out) {
    int count = end - r0 < (size_t)R ? (int)(end - r0) : R;
    for (int k = 0; k < R; k++) out[k] = w + (r0 + (size_t)(k < count ? k : 0)) * (size_t)len;
    return count;
}

LR_FUNCTION void lq_lowrank_dots_avx512(const float *w, int len, size_t begin, size_t end,
                                        const float *x, int n, float *y, int ldy, int accumulate) {
    const int blocked = n / 4 * 4;
    const float *rows[16];
    for (size_t r0 = begin; r0 < end && blocked > 0; r0 += 4) {
        int count = block_rows(w, len, r0, end, 4, rows);
        for (int i = 0; i < blocked; i += 4) {
            const float *tokens[4] = {x + (size_t)i * len, x + (size_t)(i + 1) * len,
                                      x + (size_t)(i + 2) * len, x + (size_t)(i + 3) * len};
            float dots[16];
            _mm512_storeu_ps(dots, block(4, 4, rows, tokens, len));
            for (int t = 0; t < 4; t++) {
                float *yt = y + (size_t)(i + t) * ldy + r0;
                for (int k = 0; k < count; k++)
                    yt[k] = accumulate ? yt[k] + dots[t * 4 + k] : dots[t * 4 + k];
            }
        }
    }
    for (size_t r0 = begin; r0 < end && blocked < n; r0 += 16) {
        int count = block_rows(w, len, r0, end, 16, rows);
        const __mmask16 m = (__mmask16)(count == 16 ? 0xFFFFu : (1u << count) - 1u);
        for (int i = blocked; i < n; i++) {
            const float *token = x + (size_t)i * len;
            __m512 d = block(16, 1, rows, &token, len);
            float *yt = y + (size_t)i * ldy + r0;
            if (accumulate) d = _mm512_add_ps(_mm512_maskz_loadu_ps(m, yt), d);
            _mm512_mask_storeu_ps(yt, m, d);
        }
    }
}

/* AVX2 with FMA (no AVX-512): four rows at a time for one token, each dot product's 16 lanes
 * in two ymm accumulators (lanes 0..7 and 8..15). The recipe's tree is (tree of lanes 0..7) +
 * (tree of lanes 8..15); each half is reduced for the four rows at once by unpack, shuffle_ps
 * and the sum of the two 128-bit halves, adding the same pairs as the tree. */
#define LR2_TARGET "avx2,fma"
#define LR2_FUNCTION __attribute__((target(LR2_TARGET)))
#define LR2_INLINE __attribute__((target(LR2_TARGET), always_inline)) static inline

int lq_lowrank_avx2_supported(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* Lanes 0..3 of the result: ((l0+l2)+(l1+l3)) + ((l4+l6)+(l5+l7)) of v[0..3]. */
LR2_INLINE __m128 reduce4x8(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
    __m256 s0 = _mm256_add_ps(_mm256_unpacklo_ps(v0, v1), _mm256_unpackhi_ps(v0, v1));
    __m256 s1 = _mm256_add_ps(_mm256_unpacklo_ps(v2, v3), _mm256_unpackhi_ps(v2, v3));
    __m256 u = _mm256_add_ps(_mm256_shuffle_ps(s0, s1, 0x44), _mm256_shuffle_ps(s0, s1, 0xEE));
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

LR2_FUNCTION void lq_lowrank_dots_avx2(const float *w, int len, size_t begin, size_t end,
                                       const float *x, int n, float *y, int ldy, int accumulate) {
    const float *rows[4];
    const int tail = len % 16;
    int32_t maskbits[16];
    for (int j = 0; j < 16; j++) maskbits[j] = j < tail ? -1 : 0;
    const __m256i mask_lo = _mm256_loadu_si256((const __m256i *)maskbits);
    const __m256i mask_hi = _mm256_loadu_si256((const __m256i *)(maskbits + 8));
    for (size_t r0 = begin; r0 < end; r0 += 4) {
        int count = block_rows(w, len, r0, end, 4, rows);
        for (int i = 0; i < n; i++) {
            const float *xt = x + (size_t)i * len;
            __m256 lo[4], hi[4];
            for (int k = 0; k < 4; k++) lo[k] = hi[k] = _mm256_setzero_ps();
            int c = 0;
            for (; c + 16 <= len; c += 16) {
                __m256 xl = _mm256_loadu_ps(xt + c), xh = _mm256_loadu_ps(xt + c + 8);
                for (int k = 0; k < 4; k++) {
                    lo[k] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[k] + c), xl, lo[k]);
                    hi[k] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[k] + c + 8), xh, hi[k]);
                }
            }
            if (c < len) {
                __m256 xl = _mm256_maskload_ps(xt + c, mask_lo);
                __m256 xh = _mm256_maskload_ps(xt + c + 8, mask_hi);
                for (int k = 0; k < 4; k++) {
                    lo[k] = _mm256_fmadd_ps(_mm256_maskload_ps(rows[k] + c, mask_lo), xl, lo[k]);
                    hi[k] =
                        _mm256_fmadd_ps(_mm256_maskload_ps(rows[k] + c + 8, mask_hi), xh, hi[k]);
                }
            }
            float dots[4];
            _mm_storeu_ps(dots, _mm_add_ps(reduce4x8(lo[0], lo[1], lo[2], lo[3]),
                                           reduce4x8(hi[0], hi[1], hi[2], hi[3])));
            float *yt = y + (size_t)i * ldy + r0;
            for (int k = 0; k < count; k++) yt[k] = accumulate ? yt[k] + dots[k] : dots[k];
        }
    }
}

#else

int lq_lowrank_avx512_supported(void) {
    return 0;
}
int lq_lowrank_avx2_supported(void) {
    return 0;
}

void lq_lowrank_dots_avx2(const float *w, int len, size_t begin, size_t end, const float *x, int n,
                          float *y, int ldy, int accumulate) {
    lq_lowrank_dots_portable(w, len, begin, end, x, n, y, ldy, accumulate);
}

void lq_lowrank_dots_avx512(const float *w, int len, size_t begin, size_t end, const float *x,
                            int n, float *y, int ldy, int accumulate) {
    lq_lowrank_dots_portable(w, len, begin, end, x, n, y, ldy, accumulate);
}

#endif
