/* Integer kernels for LQ layers on the CPU: y = x · Qᵀ for any number of tokens, where each NF
 * code is looked up in an int16 copy of its NF table (round(8191 · value)) and x is rounded to
 * int16 in runs of 32 or 64 columns (one float scale per run), so the dot products are integer
 * multiply-adds (AVX-512 VNNI vpdpwssd: 32 per instruction) and one float multiply and one
 * multiply-add per 16 lanes remain. The first version used int8 on both sides (llama.cpp's
 * Q8_0 activations): the int8 table alone moved NF4's perplexity by 0.6%; int16 carries codes to
 * 1/16000 and x to 1/32000 of their scales. Not exact against the fp32 kernels of nf_gemv.h; the
 * perplexity cost is measured (README, "CPU kernels").
 *
 * The recipe, which the portable kernel states in C and the AVX-512 kernel follows bit for bit:
 *  - weights: v = lrintf(8191 · table[code]) (int16), or an int8 matrix's own values (the int8
 *    head); weight unit W = 8191 (NF) or 1 (int8 matrix: its scales hold the 1/127);
 *  - x: per token and run of A columns (A = lq_int_run_length(B0): 64 where blocks hold whole runs
 *    of 64, else 32), a = max |x|; q = lrintf(x · (16383 / a)) (0 when a = 0);
 *    s_x = a / (16383 · W);
 *  - lane j < 16 of a run holds columns 2j, 2j + 1 of each of its A/32 sub-runs of 32:
 *    i = Σ v·q over them (exact int32); g = (float)i · s_x; acc[j] = fmaf(g, s_w, acc[j]) with s_w
 *    the scale of the lane's block: s_w = fmaf(code, step, offset), step = group scale /
 *    (2^b1 - 1) (lq_int_block_scales: within an ulp of lq_nf_block_scale, one division per
 *    group), or the int8 matrix's scale of the run;
 *  - y: h[j] = acc[j] + acc[j + 8] (j < 8), then ((h0 + h4) + (h1 + h5)) + ((h2 + h6) + (h3 + h7)).
 * Each y[t, r] depends on token t alone: batch-invariant like the exact kernels. */
#ifndef LQ_INT_GEMV_H
#define LQ_INT_GEMV_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/nf.h"

/* Columns per sub-run (one 512-bit multiply-add instruction), lanes per sub-run. */
#define LQ_INT_RUN 32
#define LQ_INT_LANES 16
/* The int16 scales of weights and activations. */
#define LQ_INT_NF_UNIT 8191
#define LQ_INT_INT8_UNIT 1
#define LQ_INT_X_UNIT 16383
/* Most blocks per row the kernels take (their block scales live on the stack). */
#define LQ_INT_MAX_ROW_BLOCKS 2048

/* x of n tokens quantized by the recipe above. The arrays are views into one buffer the caller
 * owns (lq_int_activations_bytes long). */
struct lq_int_activations {
    int n;
    size_t cols;  /* a multiple of run */
    int run;      /* A: 32 or 64 columns per scale */
    int16_t *q;   /* [n][cols] */
    float *scale; /* [n][cols / run] */
};

/* The run length A of the recipe for blocks of B0 values: 64 if B0 is a multiple of 64, else 32. */
int lq_int_run_length(int block_size);

/* Bytes of the buffer lq_int_activations_quantize needs for n tokens of cols columns. */
size_t lq_int_activations_bytes(int n, size_t cols);

/* Quantizes x[n][cols] (cols a multiple of run) for weights of the given unit into buffer
 * (lq_int_activations_bytes, 64-byte aligned) and describes it in out: with AVX-512 where the CPU
 * has it, the same bits either way. */
void lq_int_activations_quantize(const float *x, int n, size_t cols, int run, int weight_unit,
                                 void *buffer, struct lq_int_activations *out);
/* The two halves of lq_int_activations_quantize: runs [first, end) of all tokens' runs (n · cols /
 * run of them) into an out already laid out (q, scale, run, cols set). */
void lq_int_activations_runs_portable(const float *x, size_t first, size_t end, int weight_unit,
                                      struct lq_int_activations *out);
void lq_int_activations_runs_avx512(const float *x, size_t first, size_t end, int weight_unit,
                                    struct lq_int_activations *out);

/* Whether the integer kernels take m: b0 in {2, 3, 4} (a 256-entry table does not fit the
 * in-register lookup: b0 = 8 runs the exact kernels), rows a multiple of LQ_INT_RUN long,
 * blocks that either hold whole runs within a row (B0 a multiple of 32 dividing the row) or split
 * runs into whole lanes (B0 in {2, 4, 8, 16}), at most LQ_INT_MAX_ROW_BLOCKS blocks per row. */
int lq_int_gemv_supports(const struct lq_nf_matrix *m);

/* The block scales of the recipe for blocks [first, first + count) of m into scales. */
void lq_int_block_scales(const struct lq_nf_matrix *m, size_t first, size_t count, float *scales);

/* The int16 table of NF-b0 codes, 2^b0 entries (b0 in 2..4): lrintf(8191 · value). */
const int16_t *lq_int_code_table(int b0);

/* y[t * ldy + r] = row r of Q · token t of a, rows [row_begin, row_end), for every token of a.
 * m must satisfy lq_int_gemv_supports, a.cols == m->cols, a.run == lq_int_run_length(B0) and a
 * quantized with LQ_INT_NF_UNIT. Borrows everything. */
void lq_int_gemv_portable(const struct lq_nf_matrix *m, size_t row_begin, size_t row_end,
                          const struct lq_int_activations *a, float *y, size_t ldy);
void lq_int_gemv_avx512(const struct lq_nf_matrix *m, size_t row_begin, size_t row_end,
                        const struct lq_int_activations *a, float *y, size_t ldy);

/* An int8 matrix for the same kernels (the output head, LQ_CPU_HEAD=int8): per row and run of
 * `run` columns (32 or 64), w ≈ v · s with v = lrintf(127 · w / m) (int8) and s = m / 127, m the
 * run's largest |w|. Owns its buffers. The head uses runs of 32: with 64 the 3-bit SmolLM2's
 * perplexity moved by -0.13%, with 32 by less than 0.001%. */
struct lq_int8_matrix {
    size_t rows, cols; /* cols a multiple of run */
    int run;           /* 32 or 64 */
    int8_t *values;    /* [rows][cols] */
    float *scales;     /* [rows][cols / run] */
};

/* Quantizes w[rows][cols] (cols a multiple of run, run 32 or 64, finite values). On success
 * free out with lq_int8_matrix_free. */
int lq_int8_matrix_quantize(const float *w, size_t rows, size_t cols, int run,
                            struct lq_int8_matrix *out, struct lq_error *err);
void lq_int8_matrix_free(struct lq_int8_matrix *m);
size_t lq_int8_matrix_bytes(const struct lq_int8_matrix *m);
/* Rows [r0, r0 + count) dequantized into out[count][cols]. */
void lq_int8_matrix_dequantize_rows(const struct lq_int8_matrix *m, size_t r0, size_t count,
                                    float *out);
/* As lq_int_gemv_*, for an int8 matrix (a.run == m->run, quantized with LQ_INT_INT8_UNIT). */
void lq_int8_matrix_gemv_portable(const struct lq_int8_matrix *m, size_t row_begin, size_t row_end,
                                  const struct lq_int_activations *a, float *y, size_t ldy);
void lq_int8_matrix_gemv_avx512(const struct lq_int8_matrix *m, size_t row_begin, size_t row_end,
                                const struct lq_int_activations *a, float *y, size_t ldy);

/* Whether this CPU (and build) runs the AVX-512 (F, BW, VL, VBMI, VNNI) kernels rather than
 * falling back to the portable ones. */
int lq_int_gemv_avx512_supported(void);

#endif
