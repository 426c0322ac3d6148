/* bf16 × fp32 products (bf16_gemv.h): a portable kernel and an AVX2 one chosen per call by
 * __builtin_cpu_supports, since the build has no global -mavx2. */
#include "kernels/cpu/bf16_gemv.h"

#include <string.h>

#include "core/half.h"

#if defined(__FAST_MATH__)
#error "bf16_gemv.c relies on IEEE evaluation order: build it without -ffast-math"
#endif

void lq_bf16_widen(const uint16_t *w, size_t count, float *out) {
    for (size_t i = 0; i < count; i++) out[i] = lq_bf16_to_float(w[i]);
}

static float dot_portable(const uint16_t *w, const float *x, size_t cols) {
    float lane[8] = {0};
    size_t body = cols / 8 * 8;
    for (size_t c = 0; c < body; c += 8)
        for (int j = 0; j < 8; j++) {
            float product = lq_bf16_to_float(w[c + j]) * x[c + j];
            lane[j] += product;
        }
    float sum =
        ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
    for (size_t c = body; c < cols; c++) {
        float product = lq_bf16_to_float(w[c]) * x[c];
        sum += product;
    }
    return sum;
}

void lq_bf16_gemv_portable(const uint16_t *w, size_t cols, size_t row_begin, size_t row_end,
                           const float *x, int n, float *y, size_t ldy) {
    for (size_t r = row_begin; r < row_end; r++)
        for (int t = 0; t < n; t++)
            y[(size_t)t * ldy + r] = dot_portable(w + r * cols, x + (size_t)t * cols, cols);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define LQ_AVX2 __attribute__((target("avx2")))

int lq_bf16_gemv_avx2_supported(void) {
    return __builtin_cpu_supports("avx2");
}

/* Eight bf16 weights widened to fp32: zero-extend to 32 bits, shift into the high half. */
LQ_AVX2 static inline __m256 load_bf16x8(const uint16_t *w) {
    __m128i packed = _mm_loadu_si128((const __m128i *)w);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(packed), 16));
}

/* ((0+4)+(2+6))+((1+5)+(3+7)), as dot_portable sums its lanes. */
LQ_AVX2 static inline float sum_lanes(__m256 lanes) {
    __m128 pairs = _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
    __m128 quads = _mm_add_ps(pairs, _mm_movehl_ps(pairs, pairs));
    return _mm_cvtss_f32(quads) + _mm_cvtss_f32(_mm_shuffle_ps(quads, quads, 1));
}

/* Tokens in registers at once: each widened weight vector is used for this many dots. */
#define TOKENS_PER_PASS 4

LQ_AVX2 static void gemv_avx2(const uint16_t *w, size_t cols, size_t row_begin, size_t row_end,
                              const float *x, int n, float *y, size_t ldy) {
    const size_t body = cols / 8 * 8;
    for (size_t r = row_begin; r < row_end; r++) {
        const uint16_t *row = w + r * cols;
        for (int t0 = 0; t0 < n; t0 += TOKENS_PER_PASS) {
            int count = n - t0 < TOKENS_PER_PASS ? n - t0 : TOKENS_PER_PASS;
            __m256 acc[TOKENS_PER_PASS];
            for (int k = 0; k < TOKENS_PER_PASS; k++) acc[k] = _mm256_setzero_ps();
            for (size_t c = 0; c < body; c += 8) {
                __m256 weights = load_bf16x8(row + c);
                for (int k = 0; k < count; k++) {
                    __m256 xs = _mm256_loadu_ps(x + (size_t)(t0 + k) * cols + c);
                    acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(weights, xs));
                }
            }
            for (int k = 0; k < count; k++) {
                const float *xt = x + (size_t)(t0 + k) * cols;
                float sum = sum_lanes(acc[k]);
                for (size_t c = body; c < cols; c++) {
                    float product = lq_bf16_to_float(row[c]) * xt[c];
                    sum += product;
                }
                y[(size_t)(t0 + k) * ldy + r] = sum;
            }
        }
    }
}

void lq_bf16_gemv_avx2(const uint16_t *w, size_t cols, size_t row_begin, size_t row_end,
                       const float *x, int n, float *y, size_t ldy) {
    if (lq_bf16_gemv_avx2_supported())
        gemv_avx2(w, cols, row_begin, row_end, x, n, y, ldy);
    else
        lq_bf16_gemv_portable(w, cols, row_begin, row_end, x, n, y, ldy);
}
#else
int lq_bf16_gemv_avx2_supported(void) {
    return 0;
}

void lq_bf16_gemv_avx2(const uint16_t *w, size_t cols, size_t row_begin, size_t row_end,
                       const float *x, int n, float *y, size_t ldy) {
    lq_bf16_gemv_portable(w, cols, row_begin, row_end, x, n, y, ldy);
}
#endif
