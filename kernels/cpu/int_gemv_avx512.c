/* The integer kernels with AVX-512 (int_gemv.h states the recipe; this file follows it bit for
 * bit). A sub-run of 32 codes is b0 · 4 bytes: one byte permute places 8 codes' bytes in each
 * 64-bit lane, one multishift (VBMI: 8 arbitrary bit fields per lane) and a mask cut them out,
 * and they are widened to 16 bits and looked up in the int16 table with one word permute. One
 * vpdpwssd then does the 32 multiply-adds of each token, and per run one float multiply and one
 * multiply-add apply the scales. Four rows at a time for one token, else four rows by four tokens
 * (each row's codes decoded again per group of four tokens). Compiled per function for the
 * instruction sets it needs and chosen at run time. */
#include "kernels/cpu/int_gemv.h"

#include <math.h>
#include <string.h>

#include "core/bitpack.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#if defined(__FAST_MATH__)
#error "int_gemv_avx512.c relies on IEEE evaluation order: build it without -ffast-math"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define INT_TARGET "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,fma"
#define INT_FUNCTION __attribute__((target(INT_TARGET)))
#define INT_INLINE __attribute__((target(INT_TARGET), always_inline)) static inline

int lq_int_gemv_avx512_supported(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma");
}

INT_FUNCTION void lq_int_activations_runs_avx512(const float *x, size_t first, size_t end,
                                                 int weight_unit, struct lq_int_activations *out) {
    const size_t run = (size_t)out->run;
    for (size_t k = first; k < end; k++) {
        const float *in = x + k * run;
        __m512 largest = _mm512_abs_ps(_mm512_loadu_ps(in));
        for (size_t i = 16; i < run; i += 16)
            largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_loadu_ps(in + i)));
        const float absmax = _mm512_reduce_max_ps(largest);
        const __m512 inverse = _mm512_set1_ps(absmax > 0.0f ? (float)LQ_INT_X_UNIT / absmax : 0.0f);
        for (size_t i = 0; i < run; i += 16) {
            /* cvtps2dq rounds to nearest even, as lrintf does */
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(in + i), inverse));
            _mm256_storeu_si256((__m256i *)(out->q + k * run + i), _mm512_cvtepi32_epi16(q));
        }
        out->scale[k] = absmax / ((float)LQ_INT_X_UNIT * (float)weight_unit);
    }
}

/* What decoding a sub-run needs, in registers. */
struct decoder {
    __m256i place;    /* byte permute: 64-bit lane j takes bytes j·b0 .. j·b0 + 7 */
    __m256i cut;      /* multishift control: byte k of each lane from bit k·b0 */
    __m256i mask;     /* (1 << b0) - 1 in every byte */
    __m512i table;    /* the int16 table, entries 0..2^b0 */
    __m512i spread;   /* lane j's block among the loaded scales (blocks shorter than a run) */
    int short_blocks; /* B0 < 32 */
};

INT_FUNCTION static void decoder_init(struct decoder *d, int b0, int block_size) {
    uint8_t place[32], cut[32];
    for (int j = 0; j < 4; j++)
        for (int k = 0; k < 8; k++) {
            int byte = j * b0 + k;
            place[8 * j + k] = (uint8_t)(byte < 32 ? byte : 31);
            cut[8 * j + k] = (uint8_t)(k * b0);
        }
    d->place = _mm256_loadu_si256((const __m256i *)place);
    d->cut = _mm256_loadu_si256((const __m256i *)cut);
    d->mask = _mm256_set1_epi8((char)((1 << b0) - 1));
    int16_t padded[32] = {0};
    if (b0 >= 2 && b0 <= 4) memcpy(padded, lq_int_code_table(b0), sizeof(int16_t) << b0);
    d->table = _mm512_loadu_si512(padded);
    d->short_blocks = block_size < LQ_INT_RUN;
    int lane_block[16];
    for (int j = 0; j < 16; j++) lane_block[j] = d->short_blocks ? 2 * j / block_size : 0;
    d->spread = _mm512_loadu_si512(lane_block);
}

/* The 32 int16 weights of the sub-run of codes at p (b0 · 4 bytes); for b0 = 3, 4 bytes past
 * the sub-run are read unless p is within 16 bytes of codes_end. */
INT_INLINE __m512i decode_sub_run(const struct decoder *d, const uint8_t *p,
                                  const uint8_t *codes_end, const int b0) {
    __m128i bytes;
    if (b0 == 4)
        bytes = _mm_loadu_si128((const __m128i *)p);
    else if (b0 == 2)
        bytes = _mm_loadl_epi64((const __m128i *)p);
    else if (p + 16 <= codes_end) /* a masked load of the 12 bytes is several times slower */
        bytes = _mm_loadu_si128((const __m128i *)p);
    else
        bytes = _mm_maskz_loadu_epi8(0x0fff, p);
    __m256i placed = _mm256_permutexvar_epi8(d->place, _mm256_zextsi128_si256(bytes));
    __m256i codes = _mm256_and_si256(_mm256_multishift_epi64_epi8(d->cut, placed), d->mask);
    return _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(codes), d->table);
}

/* The block scale of each lane of a run whose first block is scales[0]. */
INT_INLINE __m512 run_scales(const struct decoder *d, const float *scales) {
    if (!d->short_blocks) return _mm512_set1_ps(scales[0]);
    return _mm512_permutexvar_ps(d->spread, _mm512_loadu_ps(scales));
}

INT_INLINE float lanes_sum(__m512 acc) {
    __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(acc), high);
    float a[8];
    _mm256_storeu_ps(a, h);
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

/* lq_int_block_scales, eight blocks of a group at a time: their b1-bit codes (b1 <= 8, so eight
 * lie within one 64-bit word from the first one's byte) cut out with one multishift. */
INT_FUNCTION static void block_scales(const struct lq_nf_matrix *m, size_t first, size_t count,
                                      float *scales) {
    const int b1 = m->config.b1;
    const size_t group_blocks = (size_t)m->config.B1, codes_bytes = lq_nf_scale_codes_bytes(m);
    const float levels = (float)((1u << b1) - 1u), offset = m->scale_offset;
    const __m128i mask = _mm_set1_epi8((char)((1 << b1) - 1));
    const __m128i cut =
        _mm_setr_epi8(0, (char)b1, (char)(2 * b1), (char)(3 * b1), (char)(4 * b1), (char)(5 * b1),
                      (char)(6 * b1), (char)(7 * b1), 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256 offsets = _mm256_set1_ps(offset);
    size_t k = 0;
    while (k < count) {
        const size_t block = first + k, group = block / group_blocks;
        size_t end = k + (group_blocks - block % group_blocks);
        if (end > count) end = count;
        const float step = lq_nf_group_scale(m, group) / levels;
        const __m256 steps = _mm256_set1_ps(step);
        for (; k + 8 <= end; k += 8) {
            const size_t bit = (first + k) * (size_t)b1, byte = bit >> 3;
            uint64_t word = 0;
            memcpy(&word, m->scale_codes + byte, byte + 8 <= codes_bytes ? 8 : codes_bytes - byte);
            __m128i at = _mm_add_epi8(cut, _mm_set1_epi8((char)(bit & 7)));
            __m128i codes = _mm_and_si128(
                _mm_multishift_epi64_epi8(at, _mm_cvtsi64_si128((long long)word)), mask);
            __m256 values = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
            _mm256_storeu_ps(scales + k, _mm256_fmadd_ps(values, steps, offsets));
        }
        for (; k < end; k++) {
            float code = (float)lq_bitpack_get(m->scale_codes, first + k, b1);
            scales[k] = fmaf(code, step, offset);
        }
    }
}

/* A matrix as the kernel reads it: b0-bit NF codes (block scales decoded per group of rows) or
 * int8 values (lq_int8_matrix, whose run scales are stored). */
struct source {
    const uint8_t *codes, *codes_end;
    size_t cols, row_bytes, blocks_per_row, block_size;
    const struct lq_nf_matrix *nf; /* NF codes, or NULL */
    const float *scales;           /* stored scales (row-major), or NULL */
};

/* Rows [row, row + ROWS) by tokens [t0, t0 + TOKENS), ROWS · TOKENS <= 16; scales[i] holds row
 * i's block scales. b0 = 0: int8 values. SUB: sub-runs of 32 per run (a.run / 32). decoded:
 * the rows' int16 weights (row stride cols), or NULL to decode them here. */
INT_INLINE void rows_tokens(const struct decoder *d, const struct source *src, size_t row,
                            const int rows, const float *const *scales,
                            const struct lq_int_activations *a, int t0, const int tokens,
                            const int b0, const int sub, const int16_t *decoded, float *y,
                            size_t ldy) {
    const size_t cols = src->cols, run = (size_t)sub * LQ_INT_RUN, runs = cols / run;
    const size_t row_bytes = src->row_bytes, block_size = src->block_size;
    /* the block of each run, walked without a division per run */
    const size_t runs_per_block = block_size >= run ? block_size / run : 1;
    const size_t blocks_per_run = block_size >= run ? 0 : run / block_size;
    size_t block = 0, run_in_block = 0;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int k = 0; k < rows * tokens; k++) acc[k] = _mm512_setzero_ps();
    const uint8_t *codes = src->codes + row * row_bytes;
    const int16_t *q = a->q + (size_t)t0 * cols;
    const float *s_x = a->scale + (size_t)t0 * runs;
    for (size_t k = 0; k < runs; k++) {
#pragma GCC unroll 4
        for (int i = 0; i < rows; i++) {
            const uint8_t *p = codes + (size_t)i * row_bytes;
            __m512i w[2];
#pragma GCC unroll 2
            for (int s = 0; s < sub; s++) {
                const size_t at = k * run + (size_t)s * LQ_INT_RUN; /* column */
                if (decoded) /* the rows decoded once for many tokens */
                    w[s] = _mm512_load_si512(decoded + (size_t)i * cols + at);
                else if (b0 == 0)
                    w[s] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + at)));
                else
                    w[s] = decode_sub_run(d, p + at / 8 * (size_t)b0, src->codes_end, b0);
            }
            const __m512 s_w = run_scales(d, scales[i] + block);
#pragma GCC unroll 4
            for (int t = 0; t < tokens; t++) {
                const int16_t *qt = q + (size_t)t * cols + k * run;
                /* vpmaddwd is vpdpwssd into zero (|v·q| < 2^28, no wrap): no zeroed register
                 * to copy per product */
                __m512i dot = _mm512_madd_epi16(w[0], _mm512_loadu_si512(qt));
                if (sub == 2)
                    dot = _mm512_dpwssd_epi32(dot, w[1], _mm512_loadu_si512(qt + LQ_INT_RUN));
                __m512 g = _mm512_mul_ps(_mm512_cvtepi32_ps(dot),
                                         _mm512_set1_ps(s_x[(size_t)t * runs + k]));
                acc[i * tokens + t] = _mm512_fmadd_ps(g, s_w, acc[i * tokens + t]);
            }
        }
        if (blocks_per_run) {
            block += blocks_per_run;
        } else if (++run_in_block == runs_per_block) {
            run_in_block = 0;
            block++;
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < rows; i++)
#pragma GCC unroll 4
        for (int t = 0; t < tokens; t++)
            y[(size_t)(t0 + t) * ldy + row + (size_t)i] = lanes_sum(acc[i * tokens + t]);
}

/* Most columns whose decoded weights rows_all_tokens keeps for four rows (64 KiB, in L2). */
#define DECODE_MAX_COLS 8192

/* The int16 weights of rows [row, row + ROWS) into out[ROWS][cols]. */
INT_INLINE void decode_rows(const struct decoder *d, const struct source *src, size_t row,
                            const int rows, const int b0, int16_t *out) {
    const size_t cols = src->cols;
    for (int i = 0; i < rows; i++) {
        const uint8_t *p = src->codes + (row + (size_t)i) * src->row_bytes;
        for (size_t c = 0; c < cols; c += LQ_INT_RUN)
            _mm512_store_si512(out + (size_t)i * cols + c,
                               decode_sub_run(d, p + c / 8 * (size_t)b0, src->codes_end, b0));
    }
}

/* Rows [row, row + ROWS) for every token: groups of four tokens, then the rest. */
INT_INLINE void token_groups(const struct decoder *d, const struct source *src, size_t row,
                             const int rows, const float *const *scales,
                             const struct lq_int_activations *a, const int b0, const int sub,
                             const int16_t *decoded, float *y, size_t ldy) {
    int t0 = 0;
    for (; t0 + 4 <= a->n; t0 += 4)
        rows_tokens(d, src, row, rows, scales, a, t0, 4, b0, sub, decoded, y, ldy);
    switch (a->n - t0) {
    case 1:
        rows_tokens(d, src, row, rows, scales, a, t0, 1, b0, sub, decoded, y, ldy);
        break;
    case 2:
        rows_tokens(d, src, row, rows, scales, a, t0, 2, b0, sub, decoded, y, ldy);
        break;
    case 3:
        rows_tokens(d, src, row, rows, scales, a, t0, 3, b0, sub, decoded, y, ldy);
        break;
    default:
        break;
    }
}

/* Rows [row, row + ROWS) for every token: groups of four tokens, then the rest. With more than
 * four tokens, NF rows are decoded once into an L2-resident buffer first (prefill: decoding per
 * group of four tokens was a third of the work). */
INT_INLINE void rows_all_tokens(const struct decoder *d, const struct source *src, size_t row,
                                const int rows, const float *const *scales,
                                const struct lq_int_activations *a, const int b0, const int sub,
                                float *y, size_t ldy) {
    static _Thread_local int16_t buffer[4 * DECODE_MAX_COLS] __attribute__((aligned(64)));
    const int16_t *decoded = NULL;
    if (a->n > 4 && b0 != 0 && src->cols <= DECODE_MAX_COLS) {
        decode_rows(d, src, row, rows, b0, buffer);
        decoded = buffer;
    }
    if (rows == 4 && a->n >= 3) {
        /* two rows by up to four tokens: eight accumulators; four by four spilled them to the
         * stack (a load and a store per multiply-add). The split changes no result's arithmetic. */
        token_groups(d, src, row, 2, scales, a, b0, sub, decoded, y, ldy);
        token_groups(d, src, row + 2, 2, scales + 2, a, b0, sub,
                     decoded ? decoded + 2 * src->cols : NULL, y, ldy);
    } else {
        token_groups(d, src, row, rows, scales, a, b0, sub, decoded, y, ldy);
    }
}

/* Block scales decoded per call of block_scales: for as many rows as fit (rows are contiguous in
 * the flat block order, so one call serves them all, and a call per four rows was a tenth of a
 * decode profile). */
#define SCRATCH_SCALES 8192

/* Rows [begin, end): four rows at a time, then one at a time, their block scales decoded (or
 * found, when stored) a chunk of rows at a time. */
INT_INLINE void gemv_rows(const struct source *src, const struct decoder *d, size_t begin,
                          size_t end, const struct lq_int_activations *a, float *y, size_t ldy,
                          float *scratch, const int b0, const int sub) {
    const size_t per_row = src->blocks_per_row;
    const size_t chunk = src->scales ? end - begin : SCRATCH_SCALES / per_row;
    for (size_t r0 = begin; r0 < end; r0 += chunk) {
        const size_t r_end = end - r0 < chunk ? end : r0 + chunk;
        const float *base;
        if (src->scales) {
            base = src->scales + r0 * per_row;
        } else {
            block_scales(src->nf, r0 * per_row, (r_end - r0) * per_row, scratch);
            memset(scratch + (r_end - r0) * per_row, 0, 16 * sizeof(float)); /* short blocks */
            base = scratch;
        }
        size_t r = r0;
        for (; r + 4 <= r_end; r += 4) {
            const float *scales[4];
            for (int i = 0; i < 4; i++) scales[i] = base + (r - r0 + (size_t)i) * per_row;
            rows_all_tokens(d, src, r, 4, scales, a, b0, sub, y, ldy);
        }
        for (; r < r_end; r++) {
            const float *scales[1] = {base + (r - r0) * per_row};
            rows_all_tokens(d, src, r, 1, scales, a, b0, sub, y, ldy);
        }
    }
}

/* b0 and the sub-runs per run made compile-time constants for each specialised copy (b0 = 0:
 * int8 values). */
#define INT_SPECIALISE(B0, SUB)                                                                    \
    INT_FUNCTION static void gemv_b##B0##_##SUB(                                                   \
        const struct source *src, const struct decoder *d, size_t begin, size_t end,               \
        const struct lq_int_activations *a, float *y, size_t ldy, float *scratch) {                \
        gemv_rows(src, d, begin, end, a, y, ldy, scratch, B0, SUB);                                \
    }
INT_SPECIALISE(0, 1)
INT_SPECIALISE(0, 2)
INT_SPECIALISE(2, 1)
INT_SPECIALISE(2, 2)
INT_SPECIALISE(3, 1)
INT_SPECIALISE(3, 2)
INT_SPECIALISE(4, 1)
INT_SPECIALISE(4, 2)
#undef INT_SPECIALISE

/* A chunk of rows' block scales plus the padding of short blocks. */
enum { SCRATCH_FLOATS = SCRATCH_SCALES + 16 };
_Static_assert(SCRATCH_SCALES >= LQ_INT_MAX_ROW_BLOCKS, "a whole row's scales fit");

void lq_int_gemv_avx512(const struct lq_nf_matrix *m, size_t row_begin, size_t row_end,
                        const struct lq_int_activations *a, float *y, size_t ldy) {
    if (!lq_int_gemv_avx512_supported()) {
        lq_int_gemv_portable(m, row_begin, row_end, a, y, ldy);
        return;
    }
    if (row_begin >= row_end || a->n < 1) return;
    const int b0 = m->config.b0;
    const size_t row_bytes = m->cols / 8 * (size_t)b0;
    const struct source src = {m->codes,
                               m->codes + m->rows * row_bytes,
                               m->cols,
                               row_bytes,
                               m->cols / (size_t)m->config.B0,
                               (size_t)m->config.B0,
                               m,
                               NULL};
    struct decoder d;
    decoder_init(&d, b0, m->config.B0);
    float scratch[SCRATCH_FLOATS];
    void (*kernel)(const struct source *, const struct decoder *, size_t, size_t,
                   const struct lq_int_activations *, float *, size_t, float *);
    const int two = a->run == 64;
    switch (b0) {
    case 2:
        kernel = two ? gemv_b2_2 : gemv_b2_1;
        break;
    case 3:
        kernel = two ? gemv_b3_2 : gemv_b3_1;
        break;
    default:
        kernel = two ? gemv_b4_2 : gemv_b4_1;
        break;
    }
    kernel(&src, &d, row_begin, row_end, a, y, ldy, scratch);
}

void lq_int8_matrix_gemv_avx512(const struct lq_int8_matrix *m, size_t row_begin, size_t row_end,
                                const struct lq_int_activations *a, float *y, size_t ldy) {
    if (!lq_int_gemv_avx512_supported()) {
        lq_int8_matrix_gemv_portable(m, row_begin, row_end, a, y, ldy);
        return;
    }
    if (row_begin >= row_end || a->n < 1) return;
    const uint8_t *values = (const uint8_t *)m->values;
    const size_t run = (size_t)m->run;
    const struct source src = {
        values, values + m->rows * m->cols, m->cols, m->cols, m->cols / run, run, NULL, m->scales};
    struct decoder d;
    decoder_init(&d, 0, m->run);
    float scratch[16];
    if (run == 64)
        gemv_b0_2(&src, &d, row_begin, row_end, a, y, ldy, scratch);
    else
        gemv_b0_1(&src, &d, row_begin, row_end, a, y, ldy, scratch);
}

#else /* not x86-64: the portable kernels */

int lq_int_gemv_avx512_supported(void) {
    return 0;
}

void lq_int_activations_runs_avx512(const float *x, size_t first, size_t end, int weight_unit,
                                    struct lq_int_activations *out) {
    lq_int_activations_runs_portable(x, first, end, weight_unit, out);
}

void lq_int_gemv_avx512(const struct lq_nf_matrix *m, size_t row_begin, size_t row_end,
                        const struct lq_int_activations *a, float *y, size_t ldy) {
    lq_int_gemv_portable(m, row_begin, row_end, a, y, ldy);
}

void lq_int8_matrix_gemv_avx512(const struct lq_int8_matrix *m, size_t row_begin, size_t row_end,
                                const struct lq_int_activations *a, float *y, size_t ldy) {
    lq_int8_matrix_gemv_portable(m, row_begin, row_end, a, y, ldy);
}

#endif
