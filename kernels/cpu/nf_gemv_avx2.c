/* The AVX2 fused decode kernel. Eight columns at a time: the eight codes are read with one
 * unaligned 64-bit load (3-bit codes straddle bytes; the shift realigns them), spread into
 * 32-bit lanes by per-lane shifts (cvtepu8 for 8-bit codes), and looked up in the block's
 * scaled table held in registers (one permute for b0 <= 3, two and a blend for b0 = 4, a gather
 * from the NF table times the scale for b0 = 8). The products are rounded and added exactly as
 * the portable kernel does (nf_gemv.h), so the two agree bit for bit; a fused multiply-add would
 * be one instruction fewer per eight products but would change the bits against the portable
 * kernel and the tile path. Compiled for AVX2 per function, chosen at run time: the build needs
 * no -mavx2. */
#include "kernels/cpu/nf_gemv.h"

#include <stdint.h>
#include <string.h>

#include "core/bitpack.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#if defined(__FAST_MATH__)
#error "nf_gemv_avx2.c relies on IEEE evaluation order: build it without -ffast-math"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define LQ_AVX2 __attribute__((target("avx2")))
#define LQ_AVX2_INLINE __attribute__((target("avx2"), always_inline)) static inline

int lq_nf_gemv_avx2_supported(void) {
    return __builtin_cpu_supports("avx2");
}

/* As the portable cursor: the current block, its scale and its scaled table in registers. */
struct avx2_cursor {
    const struct lq_nf_matrix *m;
    const uint8_t *codes;
    size_t codes_bytes, block_size, block_start, block_end;
    const float *table; /* the NF-b0 table */
    float padded[16];   /* the table for b0 <= 4, zero-padded to 16 entries */
    float scale;
    __m256 lut_low, lut_high; /* padded[0..8) and padded[8..16) times scale */
};

LQ_AVX2_INLINE void cursor_seek(struct avx2_cursor *cursor, size_t flat) {
    size_t block = flat / cursor->block_size;
    cursor->block_start = block * cursor->block_size;
    cursor->block_end = cursor->block_start + cursor->block_size;
    cursor->scale = lq_nf_block_scale(cursor->m, block);
    __m256 scale = _mm256_set1_ps(cursor->scale);
    cursor->lut_low = _mm256_mul_ps(_mm256_loadu_ps(cursor->padded), scale);
    cursor->lut_high = _mm256_mul_ps(_mm256_loadu_ps(cursor->padded + 8), scale);
}

/* Codes [flat, flat + 8) in 32-bit lanes. */
LQ_AVX2_INLINE __m256i load_codes8(const struct avx2_cursor *cursor, size_t flat, int b0) {
    size_t bit = flat * (size_t)b0, byte = bit >> 3;
    uint64_t word = 0;
    if (byte + 8 <= cursor->codes_bytes) {
        memcpy(&word, cursor->codes + byte, 8);
    } else { /* the stream's last bytes: read no further than its end */
        for (size_t k = 0; byte + k < cursor->codes_bytes; k++)
            word |= (uint64_t)cursor->codes[byte + k] << (8 * k);
    }
    word >>= bit & 7; /* 8 codes of b0 <= 4 bits need at most 7 + 32 bits of the word */
    if (b0 == 8) return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)word));
    const __m256i shifts = _mm256_setr_epi32(0, b0, 2 * b0, 3 * b0, 4 * b0, 5 * b0, 6 * b0, 7 * b0);
    __m256i lanes = _mm256_srlv_epi32(_mm256_set1_epi32((int)(uint32_t)word), shifts);
    return _mm256_and_si256(lanes, _mm256_set1_epi32((1 << b0) - 1));
}

/* The eight weights of codes in the current block: table[code] * scale, rounded once. */
LQ_AVX2_INLINE __m256 lookup8(const struct avx2_cursor *cursor, __m256i codes, int b0) {
    if (b0 <= 3) return _mm256_permutevar8x32_ps(cursor->lut_low, codes);
    if (b0 == 4) {
        __m256 low = _mm256_permutevar8x32_ps(cursor->lut_low, codes);
        __m256 high = _mm256_permutevar8x32_ps(cursor->lut_high, codes);
        /* bit 3 of the code, moved to the sign bit, picks the upper half of the table */
        return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
    }
    return _mm256_mul_ps(_mm256_i32gather_ps(cursor->table, codes, 4),
                         _mm256_set1_ps(cursor->scale));
}

/* One weight by the scalar route (leftover columns, blocks that end inside eight columns). */
LQ_AVX2_INLINE float scalar_weight(struct avx2_cursor *cursor, size_t flat, int b0) {
    if (flat >= cursor->block_end) cursor_seek(cursor, flat);
    return cursor->table[lq_bitpack_get(cursor->codes, flat, b0)] * cursor->scale;
}

/* Dot products of row `row` with TOKENS tokens x[0..TOKENS) (stride cols) into out. */
LQ_AVX2_INLINE void row_dots(struct avx2_cursor *cursor, size_t row, size_t cols, const float *x,
                             const int tokens, const int b0, float *out) {
    const size_t first = row * cols, main_cols = cols / 8 * 8;
    __m256 acc[4];
    for (int t = 0; t < tokens; t++) acc[t] = _mm256_setzero_ps();
    if (first < cursor->block_start || first >= cursor->block_end) cursor_seek(cursor, first);
    for (size_t c = 0; c < main_cols; c += 8) {
        size_t flat = first + c;
        if (flat >= cursor->block_end) cursor_seek(cursor, flat);
        __m256 w;
        if (flat + 8 <= cursor->block_end) {
            w = lookup8(cursor, load_codes8(cursor, flat, b0), b0);
        } else {
            float lanes[8];
            for (int j = 0; j < 8; j++) lanes[j] = scalar_weight(cursor, flat + (size_t)j, b0);
            w = _mm256_loadu_ps(lanes);
        }
        for (int t = 0; t < tokens; t++) {
            __m256 product = _mm256_mul_ps(w, _mm256_loadu_ps(x + (size_t)t * cols + c));
            acc[t] = _mm256_add_ps(acc[t], product);
        }
    }
    for (int t = 0; t < tokens; t++) {
        float a[8];
        _mm256_storeu_ps(a, acc[t]);
        out[t] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    }
    for (size_t c = main_cols; c < cols; c++) {
        float weight = scalar_weight(cursor, first + c, b0);
        for (int t = 0; t < tokens; t++) {
            float product = weight * x[(size_t)t * cols + c];
            out[t] += product;
        }
    }
}

/* Rows [begin, end) for b0 = B0_BITS: tokens four at a time (each row's weights are decoded
 * again per group of four, which keeps the accumulators in registers). */
LQ_AVX2_INLINE void gemv_bits(struct avx2_cursor *cursor, size_t begin, size_t end, const float *x,
                              int n, float *y, size_t ldy, const int b0) {
    const size_t cols = cursor->m->cols;
    float dots[4];
    for (size_t r = begin; r < end; r++) {
        for (int t0 = 0; t0 < n; t0 += 4) {
            const float *xt = x + (size_t)t0 * cols;
            int tokens = n - t0 < 4 ? n - t0 : 4;
            switch (tokens) {
            case 1:
                row_dots(cursor, r, cols, xt, 1, b0, dots);
                break;
            case 2:
                row_dots(cursor, r, cols, xt, 2, b0, dots);
                break;
            case 3:
                row_dots(cursor, r, cols, xt, 3, b0, dots);
                break;
            default:
                row_dots(cursor, r, cols, xt, 4, b0, dots);
                break;
            }
            for (int t = 0; t < tokens; t++) y[(size_t)(t0 + t) * ldy + r] = dots[t];
        }
    }
}

LQ_AVX2 static void gemv_b2(struct avx2_cursor *cursor, size_t begin, size_t end, const float *x,
                            int n, float *y, size_t ldy) {
    gemv_bits(cursor, begin, end, x, n, y, ldy, 2);
}
LQ_AVX2 static void gemv_b3(struct avx2_cursor *cursor, size_t begin, size_t end, const float *x,
                            int n, float *y, size_t ldy) {
    gemv_bits(cursor, begin, end, x, n, y, ldy, 3);
}
LQ_AVX2 static void gemv_b4(struct avx2_cursor *cursor, size_t begin, size_t end, const float *x,
                            int n, float *y, size_t ldy) {
    gemv_bits(cursor, begin, end, x, n, y, ldy, 4);
}
LQ_AVX2 static void gemv_b8(struct avx2_cursor *cursor, size_t begin, size_t end, const float *x,
                            int n, float *y, size_t ldy) {
    gemv_bits(cursor, begin, end, x, n, y, ldy, 8);
}

void lq_nf_gemv_avx2(const struct lq_nf_matrix *m, size_t row_begin, size_t row_end, const float *x,
                     int n, float *y, size_t ldy) {
    const int b0 = m->config.b0;
    if (!lq_nf_gemv_avx2_supported() || (b0 != 2 && b0 != 3 && b0 != 4 && b0 != 8)) {
        lq_nf_gemv_portable(m, row_begin, row_end, x, n, y, ldy);
        return;
    }
    if (row_begin >= row_end) return;
    struct avx2_cursor cursor;
    memset(&cursor, 0, sizeof cursor);
    cursor.m = m;
    cursor.codes = m->codes;
    cursor.codes_bytes = lq_nf_codes_bytes(m);
    cursor.block_size = (size_t)m->config.B0;
    cursor.table = lq_nf_code_table(b0);
    if (b0 <= 4) memcpy(cursor.padded, cursor.table, sizeof(float) << b0);
    /* block_start > block_end: the first row seeks */
    cursor.block_start = 1;
    cursor.block_end = 0;
    switch (b0) {
    case 2:
        gemv_b2(&cursor, row_begin, row_end, x, n, y, ldy);
        break;
    case 3:
        gemv_b3(&cursor, row_begin, row_end, x, n, y, ldy);
        break;
    case 4:
        gemv_b4(&cursor, row_begin, row_end, x, n, y, ldy);
        break;
    default:
        gemv_b8(&cursor, row_begin, row_end, x, n, y, ldy);
        break;
    }
}

#else /* no AVX2 build: the portable kernel */

int lq_nf_gemv_avx2_supported(void) {
    return 0;
}

void lq_nf_gemv_avx2(const struct lq_nf_matrix *m, size_t row_begin, size_t row_end, const float *x,
                     int n, float *y, size_t ldy) {
    lq_nf_gemv_portable(m, row_begin, row_end, x, n, y, ldy);
}

#endif
