/* The AVX2 fused decode kernel. Eight columns at a time: the eight codes are read with one
 * unaligned 64-bit load (3-bit codes straddle bytes; the shift realigns them), spread into
 * 32-bit lanes by per-lane shifts (cvtepu8 for 8-bit codes), and looked up in the block's
 * scaled table held in registers (one permute for b0 <= 3, two and a blend for b0 = 4, a gather
 * from the NF table times the scale for b0 = 8). The products are rounded and added exactly as
 * the portable kernel does (nf_gemv.h), so the two agree bit for bit; a fused multiply-add would
 * be one instruction fewer per eight products but would change the bits against the portable
 * kernel and the tile path. Compiled for AVX2 per function, chosen at run time: the build needs
 * no -mavx2. Layouts whose blocks and rows are multiples of eight long take the aligned path
 * (gemv_aligned), which reads codes from whole bytes and schedules rows and tokens for
 * throughput; others take the general one (gemv_bits). */
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

/* The aligned path, taken when blocks hold a multiple of eight values and rows a multiple of
 * eight columns (the default B0 = 64 on any width a multiple of 8): each step of eight columns then
 * lies inside one block and starts on a byte boundary, since eight codes of b0 bits are exactly
 * b0 bytes. It keeps the recipe and changes only the schedule:
 *  - one or two tokens: four rows at a time, so that several independent chains of additions
 *    keep the adders busy (one row's chain waits for each add before the next);
 *  - three or four tokens: two rows at a time;
 *  - five or more: blocks of rows by spans of columns, so x is read from L1 (many_tokens_aligned),
 *    each row decoded once whatever the number of tokens.
 * A lane still sees its products in column order, so the bits do not change. The block scales
 * of a span are computed before its loop: a call inside the loop would spill every register. */

/* Most columns per span: the scales of its blocks (at most SPAN_COLS / 8) and, with many
 * tokens, its decoded weights (2 KiB) stay in L1. */
#define SPAN_COLS 512

/* Columns per span of rows_aligned, which keeps only the block scales (at most ROW_SPAN_COLS / 8
 * per row, 4 KiB for four rows): the model widths in use take one span per row. */
#define ROW_SPAN_COLS 2048

struct row_block {
    size_t end;        /* one past the flat index of the current block's last value */
    const float *next; /* the next block's scale */
    __m256 low, high;  /* table[0..8) and table[8..16) times the block's scale (b0 <= 4) */
    __m256 scale;      /* the scale in every lane (b0 = 8) */
};

LQ_AVX2_INLINE void row_block_set(const struct avx2_cursor *cursor, struct row_block *block,
                                  float scale) {
    block->scale = _mm256_set1_ps(scale);
    block->low = _mm256_mul_ps(_mm256_loadu_ps(cursor->padded), block->scale);
    block->high = _mm256_mul_ps(_mm256_loadu_ps(cursor->padded + 8), block->scale);
}

/* The scales of the blocks of flat indices [flat, flat + count) into scales (flat and count
 * multiples of 8), and the block of flat made current. */
LQ_AVX2 __attribute__((noinline)) static void span_start(const struct avx2_cursor *cursor,
                                                         struct row_block *block, size_t flat,
                                                         size_t count, float *scales) {
    const size_t first = flat / cursor->block_size, last = (flat + count - 1) / cursor->block_size;
    lq_nf_block_scales(cursor->m, first, last - first + 1, scales);
    block->end = (first + 1) * cursor->block_size;
    block->next = scales + 1;
    row_block_set(cursor, block, scales[0]);
}

/* Codes [flat, flat + 8) in 32-bit lanes, flat a multiple of 8: b0 whole bytes. */
LQ_AVX2_INLINE __m256i load_codes8_aligned(const struct avx2_cursor *cursor, size_t flat, int b0) {
    const uint8_t *p = cursor->codes + flat / 8 * (size_t)b0;
    if (b0 == 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)word));
    }
    uint32_t word;
    if (b0 == 4) {
        memcpy(&word, p, 4);
    } else if (b0 == 2) {
        uint16_t half;
        memcpy(&half, p, 2);
        word = half;
    } else if (p + 4 <= cursor->codes + cursor->codes_bytes) { /* b0 = 3: read a spare byte */
        memcpy(&word, p, 4);
    } else {
        word = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
    }
    const __m256i shifts = _mm256_setr_epi32(0, b0, 2 * b0, 3 * b0, 4 * b0, 5 * b0, 6 * b0, 7 * b0);
    __m256i lanes = _mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts);
    return _mm256_and_si256(lanes, _mm256_set1_epi32((1 << b0) - 1));
}

/* The eight weights at flat (a multiple of 8, not below the previous call's for this row).
 * Blocks are multiples of eight long, so a step never skips a block: the next is the next. */
LQ_AVX2_INLINE __m256 weights8_aligned(const struct avx2_cursor *cursor, struct row_block *block,
                                       size_t flat, int b0) {
    if (flat >= block->end) {
        block->end += cursor->block_size;
        row_block_set(cursor, block, *block->next++);
    }
    __m256i codes = load_codes8_aligned(cursor, flat, b0);
    if (b0 <= 3) return _mm256_permutevar8x32_ps(block->low, codes);
    if (b0 == 4) {
        __m256 low = _mm256_permutevar8x32_ps(block->low, codes);
        __m256 high = _mm256_permutevar8x32_ps(block->high, codes);
        return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
    }
    return _mm256_mul_ps(_mm256_i32gather_ps(cursor->table, codes, 4), block->scale);
}

/* The lanes of one accumulator summed in the recipe's order. */
LQ_AVX2_INLINE float lanes_sum(__m256 acc) {
    float a[8];
    _mm256_storeu_ps(a, acc);
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

/* Rows [row, row + ROWS) with TOKENS tokens, ROWS <= 4 and ROWS * TOKENS <= 8 accumulators. */
LQ_AVX2_INLINE void rows_aligned(const struct avx2_cursor *cursor, size_t row, const int rows,
                                 const float *x, const int tokens, const int b0, float *y,
                                 size_t ldy) {
    const size_t cols = cursor->m->cols;
    struct row_block blocks[4];
    float scales[4][ROW_SPAN_COLS / 8];
    __m256 acc[8];
#pragma GCC unroll 8
    for (int k = 0; k < rows * tokens; k++) acc[k] = _mm256_setzero_ps();
    for (size_t c0 = 0; c0 < cols; c0 += ROW_SPAN_COLS) {
        const size_t span_end = cols - c0 < ROW_SPAN_COLS ? cols : c0 + ROW_SPAN_COLS;
#pragma GCC unroll 4
        for (int i = 0; i < rows; i++)
            span_start(cursor, &blocks[i], (row + (size_t)i) * cols + c0, span_end - c0, scales[i]);
        for (size_t c = c0; c < span_end; c += 8) {
#pragma GCC unroll 4
            for (int i = 0; i < rows; i++) {
                __m256 w = weights8_aligned(cursor, &blocks[i], (row + (size_t)i) * cols + c, b0);
#pragma GCC unroll 8
                for (int t = 0; t < tokens; t++) {
                    __m256 product = _mm256_mul_ps(w, _mm256_loadu_ps(x + (size_t)t * cols + c));
                    acc[i * tokens + t] = _mm256_add_ps(acc[i * tokens + t], product);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < rows; i++)
#pragma GCC unroll 8
        for (int t = 0; t < tokens; t++)
            y[(size_t)t * ldy + row + (size_t)i] = lanes_sum(acc[i * tokens + t]);
}

/* TOKENS tokens over columns [c0, c0 + span) with their decoded weights w; the accumulators
 * are read from and written back to acc_memory. */
LQ_AVX2_INLINE void group_span(const float *w, size_t span, const float *x, size_t cols, size_t c0,
                               const int tokens, float *acc_memory) {
    __m256 acc[8];
#pragma GCC unroll 8
    for (int t = 0; t < tokens; t++) acc[t] = _mm256_load_ps(acc_memory + 8 * t);
    for (size_t c = 0; c < span; c += 8) {
        __m256 weights = _mm256_load_ps(w + c);
#pragma GCC unroll 8
        for (int t = 0; t < tokens; t++) {
            __m256 product = _mm256_mul_ps(weights, _mm256_loadu_ps(x + (size_t)t * cols + c0 + c));
            acc[t] = _mm256_add_ps(acc[t], product);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < tokens; t++) _mm256_store_ps(acc_memory + 8 * t, acc[t]);
}

/* As group_span, decoding the weights of flat indices [flat, flat + span) on the way. */
LQ_AVX2_INLINE void decode_group_span(const struct avx2_cursor *cursor, struct row_block *block,
                                      size_t flat, size_t span, const float *x, size_t c0,
                                      const int tokens, const int b0, float *acc_memory) {
    const size_t cols = cursor->m->cols;
    __m256 acc[8];
#pragma GCC unroll 8
    for (int t = 0; t < tokens; t++) acc[t] = _mm256_load_ps(acc_memory + 8 * t);
    for (size_t c = 0; c < span; c += 8) {
        __m256 weights = weights8_aligned(cursor, block, flat + c, b0);
#pragma GCC unroll 8
        for (int t = 0; t < tokens; t++) {
            __m256 product = _mm256_mul_ps(weights, _mm256_loadu_ps(x + (size_t)t * cols + c0 + c));
            acc[t] = _mm256_add_ps(acc[t], product);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < tokens; t++) _mm256_store_ps(acc_memory + 8 * t, acc[t]);
}

/* Rows per block of the many-token path: each span of x is read from L2 once per block. */
#define BLOCK_ROWS 8

/* Five or more tokens, rows [begin, end), in blocks of rows by spans of columns: a span of every
 * token's x (at most 24 KiB) stays in L1 while the block's rows run over it, where walking whole
 * rows would stream all of x from L2 once per row. Up to eight tokens are multiplied as the row
 * is decoded; more, and the span is decoded once into w and each group of eight reads it back. */
LQ_AVX2_INLINE void many_tokens_aligned(const struct avx2_cursor *cursor, size_t begin, size_t end,
                                        const float *x, int n, float *y, size_t ldy, const int b0) {
    const size_t cols = cursor->m->cols;
    float acc[BLOCK_ROWS][LQ_NF_GEMV_MAX_TOKENS * 8] __attribute__((aligned(32)));
    float w[SPAN_COLS] __attribute__((aligned(32)));
    float scales[SPAN_COLS / 8];
    struct row_block block;
    size_t span_cols = (size_t)(6144 / n) / 8 * 8;
    if (span_cols > SPAN_COLS) span_cols = SPAN_COLS;
    if (span_cols < 64) span_cols = 64;
    for (size_t r0 = begin; r0 < end; r0 += BLOCK_ROWS) {
        const size_t rows = end - r0 < BLOCK_ROWS ? end - r0 : BLOCK_ROWS;
        for (size_t i = 0; i < rows; i++) memset(acc[i], 0, (size_t)n * 8 * sizeof(float));
        for (size_t c0 = 0; c0 < cols; c0 += span_cols) {
            const size_t span = cols - c0 < span_cols ? cols - c0 : span_cols;
            for (size_t i = 0; i < rows; i++) {
                const size_t flat = (r0 + i) * cols + c0;
                span_start(cursor, &block, flat, span, scales);
                int t0 = 0;
                if (n > 8) {
                    for (size_t c = 0; c < span; c += 8)
                        _mm256_store_ps(w + c, weights8_aligned(cursor, &block, flat + c, b0));
                    for (; t0 + 8 <= n; t0 += 8)
                        group_span(w, span, x + (size_t)t0 * cols, cols, c0, 8, acc[i] + 8 * t0);
                }
                const float *xt = x + (size_t)t0 * cols;
                float *at = acc[i] + 8 * t0;
                switch (n - t0) {
                case 0:
                    break;
                case 1:
                    group_span(w, span, xt, cols, c0, 1, at);
                    break;
                case 2:
                    group_span(w, span, xt, cols, c0, 2, at);
                    break;
                case 3:
                    group_span(w, span, xt, cols, c0, 3, at);
                    break;
                case 4:
                    group_span(w, span, xt, cols, c0, 4, at);
                    break;
                case 5:
                    if (n > 8)
                        group_span(w, span, xt, cols, c0, 5, at);
                    else
                        decode_group_span(cursor, &block, flat, span, xt, c0, 5, b0, at);
                    break;
                case 6:
                    if (n > 8)
                        group_span(w, span, xt, cols, c0, 6, at);
                    else
                        decode_group_span(cursor, &block, flat, span, xt, c0, 6, b0, at);
                    break;
                case 7:
                    if (n > 8)
                        group_span(w, span, xt, cols, c0, 7, at);
                    else
                        decode_group_span(cursor, &block, flat, span, xt, c0, 7, b0, at);
                    break;
                default:
                    decode_group_span(cursor, &block, flat, span, xt, c0, 8, b0, at);
                    break;
                }
            }
        }
        for (size_t i = 0; i < rows; i++)
            for (int t = 0; t < n; t++)
                y[(size_t)t * ldy + r0 + i] = lanes_sum(_mm256_load_ps(acc[i] + 8 * t));
    }
}

/* ROWS rows per step over [begin, end), then the rows left one at a time. */
#define ROWS_STEP(ROWS, TOKENS)                                                                    \
    do {                                                                                           \
        size_t r = begin;                                                                          \
        for (; r + (ROWS) <= end; r += (ROWS))                                                     \
            rows_aligned(cursor, r, (ROWS), x, (TOKENS), b0, y, ldy);                              \
        for (; r < end; r++) rows_aligned(cursor, r, 1, x, (TOKENS), b0, y, ldy);                  \
    } while (0)

LQ_AVX2_INLINE void gemv_aligned(const struct avx2_cursor *cursor, size_t begin, size_t end,
                                 const float *x, int n, float *y, size_t ldy, const int b0) {
    switch (n) {
    case 1:
        ROWS_STEP(4, 1);
        break;
    case 2:
        ROWS_STEP(4, 2);
        break;
    case 3:
        ROWS_STEP(2, 3);
        break;
    case 4:
        ROWS_STEP(2, 4);
        break;
    default:
        many_tokens_aligned(cursor, begin, end, x, n, y, ldy, b0);
        break;
    }
}
#undef ROWS_STEP

/* b0 made a compile-time constant for each specialised copy. */
#define GEMV_SPECIALISE(B0)                                                                        \
    LQ_AVX2 static void gemv_b##B0(struct avx2_cursor *cursor, size_t begin, size_t end,           \
                                   const float *x, int n, float *y, size_t ldy) {                  \
        if (cursor->block_size % 8 == 0 && cursor->m->cols % 8 == 0)                               \
            gemv_aligned(cursor, begin, end, x, n, y, ldy, B0);                                    \
        else                                                                                       \
            gemv_bits(cursor, begin, end, x, n, y, ldy, B0);                                       \
    }
GEMV_SPECIALISE(2)
GEMV_SPECIALISE(3)
GEMV_SPECIALISE(4)
GEMV_SPECIALISE(8)
#undef GEMV_SPECIALISE

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
