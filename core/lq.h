/* Low-rank plus quantized decomposition W ≈ Q + L1·L2 (LQ-LoRA paper §3.1, Algorithm 2),
 * optionally Fisher-weighted (§3.3, Algorithm 4). */
#ifndef LQ_LQ_H
#define LQ_LQ_H

#include <stddef.h>

#include "core/error.h"
#include "core/nf.h"
#include "core/svd.h"

/* Where the alternation starts. */
enum lq_init {
    LQ_INIT_ZERO,      /* Q = 0, as Algorithm 2 */
    LQ_INIT_QUANTIZED, /* Q = Quantize(W) (Yao et al. 2023): never worse than plain quantization */
};

struct lq_decompose_options {
    int rank; /* r >= 0; 0 is plain quantization */
    enum lq_init init;
    int max_iters; /* T >= 1: steps at most */
    /* Also stop once a step lowers the error by less than this fraction (0 = off: stop only
     * when the error stops falling, as the paper does). */
    double min_improvement;
    struct lq_svd_options svd; /* randomized SVD settings; the seed is mixed with the step */
    /* Optional Fisher information, rows*cols values >= 0 (borrowed). The factorization then
     * minimises ||diag(D_row)(W - Q - L1L2)diag(D_col)|| with D_row/D_col the row/column
     * means of sqrt(F) (the paper's text), and the error ||sqrt(F) ⊙ (W - Q - L1L2)||_F
     * drives the stopping rule. Quantization itself stays unweighted. */
    const float *fisher;
};

/* rank 64, Q = 0 start, at most 20 steps, stop when the error stops falling, default SVD. */
void lq_decompose_options_default(struct lq_decompose_options *options);
const char *lq_init_name(enum lq_init init); /* "zero", "quantized" */
int lq_init_parse(const char *text, enum lq_init *out, struct lq_error *err);

struct lq_decomposition {
    size_t rows, cols;
    int rank;
    float *L1;             /* rows x rank, row-major: U·sqrt(Σ) (owned) */
    float *L2;             /* rank x cols, row-major: sqrt(Σ)·Vᵀ (owned) */
    struct lq_nf_matrix Q; /* Quantize(W - L1·L2) of the kept step (owned) */
    double error;          /* ||W - Q - L1·L2||_F of the kept step, Fisher-weighted if given */
    double norm;           /* ||W||_F, weighted the same way: error / norm is relative */
    int iters;             /* steps run */
    int best_iter;         /* the step (1-based) whose L1, L2 are kept */
    int best_is_half_step; /* 1 when the kept pair is (Q of step best_iter - 1, L of step
                              best_iter): the SVD step alone lowered the error there */
    double *history;       /* error after each step, `iters` values (owned) */
};

/* Decomposes the rows x cols row-major matrix w under configuration c. From the initial Q,
 * each step sets L1, L2 to the rank-r SVD of W - Q and Q to Quantize(W - L1·L2); the loop
 * stops after a step whose error is not below the previous one, or after max_iters steps.
 * Both pairs each step produces, (old Q, new L) and (new Q, new L), are candidates, and the
 * one with the lowest error is kept (the reference returns the last, worse, step).
 * Deterministic for a given seed. On success free out with lq_decomposition_free. */
int lq_decompose(const float *w, size_t rows, size_t cols, const struct lq_nf_config *c,
                 const struct lq_decompose_options *options, struct lq_decomposition *out,
                 struct lq_error *err);

/* out (rows*cols) = dequantize(Q) + L1·L2. */
void lq_decomposition_reconstruct(const struct lq_decomposition *d, float *out);

void lq_decomposition_free(struct lq_decomposition *d);

/* ||sqrt(F) ⊙ (a - b)||_F, or ||a - b||_F when fisher is NULL; accumulated in double. */
double lq_weighted_distance(const float *a, const float *b, const float *fisher, size_t n);

#endif
