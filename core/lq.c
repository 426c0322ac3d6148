#include "lq.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

/* Elements per chunk of the parallel error passes (see error_pass). */
#define LQ_CHUNK ((size_t)1 << 16)

void lq_decompose_options_default(struct lq_decompose_options *options) {
    memset(options, 0, sizeof *options);
    options->rank = 64;
    options->init = LQ_INIT_ZERO;
    options->max_iters = 20;
    options->min_improvement = 0.0;
    lq_svd_options_default(&options->svd);
    options->fisher = NULL;
}

const char *lq_init_name(enum lq_init init) {
    return init == LQ_INIT_QUANTIZED ? "quantized" : "zero";
}

int lq_init_parse(const char *text, enum lq_init *out, struct lq_error *err) {
    if (strcmp(text, "zero") == 0)
        *out = LQ_INIT_ZERO;
    else if (strcmp(text, "quantized") == 0)
        *out = LQ_INIT_QUANTIZED;
    else
        return lq_error_set(err, LQ_EINVAL, "init '%s': expected zero or quantized", text);
    return LQ_OK;
}

double lq_weighted_distance(const float *a, const float *b, const float *fisher, size_t n) {
    double sum = 0.0;
    if (fisher) {
        for (size_t i = 0; i < n; i++) {
            double d = (double)a[i] - (b ? b[i] : 0.0f);
            sum += fisher[i] * d * d;
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            double d = (double)a[i] - (b ? b[i] : 0.0f);
            sum += d * d;
        }
    }
    return sqrt(sum);
}

/* Row and column weights from the Fisher information: means of sqrt(F) (paper §3.3).
 * Zero rows or columns would make the weighted factors undefined, so every weight is
 * floored at 1e-6 of the largest one. */
static int fisher_weights(const float *fisher, size_t rows, size_t cols, float *row_weight,
                          float *col_weight, struct lq_error *err) {
    double *col_sum = calloc(cols, sizeof *col_sum);
    if (!col_sum) return lq_error_set(err, LQ_ENOMEM, "out of memory for Fisher weights");
    double largest = 0.0;
    for (size_t i = 0; i < rows; i++) {
        double row_sum = 0.0;
        for (size_t j = 0; j < cols; j++) {
            float f = fisher[i * cols + j];
            if (!(f >= 0.0f) || isinf(f)) {
                free(col_sum);
                return lq_error_set(
                    err, LQ_EINVAL,
                    "Fisher information at (%zu, %zu) is %g: must be finite and >= 0", i, j,
                    (double)f);
            }
            double root = sqrt((double)f);
            row_sum += root;
            col_sum[j] += root;
        }
        row_weight[i] = (float)(row_sum / (double)cols);
        largest = fmax(largest, row_weight[i]);
    }
    for (size_t j = 0; j < cols; j++) col_weight[j] = (float)(col_sum[j] / (double)rows);
    free(col_sum);
    if (largest == 0.0) return lq_error_set(err, LQ_EINVAL, "Fisher information is all zero");
    float row_floor = 0.0f, col_floor = 0.0f;
    for (size_t i = 0; i < rows; i++) row_floor = fmaxf(row_floor, row_weight[i]);
    for (size_t j = 0; j < cols; j++) col_floor = fmaxf(col_floor, col_weight[j]);
    row_floor *= 1e-6f, col_floor *= 1e-6f;
    for (size_t i = 0; i < rows; i++) row_weight[i] = fmaxf(row_weight[i], row_floor);
    for (size_t j = 0; j < cols; j++) col_weight[j] = fmaxf(col_weight[j], col_floor);
    return LQ_OK;
}

/* Workspace of one decomposition; every array is owned here. */
struct lq_workspace {
    float *quantized;             /* dense Q of the current step */
    float *residual;              /* W - Q (weighted), then W - L1·L2 */
    float *lowrank;               /* L1·L2 */
    float *u, *s, *vt;            /* SVD factors */
    float *L1, *L2;               /* factors of the current step */
    float *prev_L1, *prev_L2;     /* factors that produced the current Q */
    float *best_q_L1, *best_q_L2; /* factors that produced the kept Q */
    float *row_weight, *col_weight;
    double *chunk_sums; /* partial sums of error_pass */
};

static void workspace_free(struct lq_workspace *ws) {
    free(ws->quantized), free(ws->residual), free(ws->lowrank);
    free(ws->u), free(ws->s), free(ws->vt), free(ws->L1), free(ws->L2);
    free(ws->prev_L1), free(ws->prev_L2), free(ws->best_q_L1), free(ws->best_q_L2);
    free(ws->row_weight), free(ws->col_weight), free(ws->chunk_sums);
}

static int workspace_alloc(struct lq_workspace *ws, size_t rows, size_t cols, int rank,
                           int weighted) {
    size_t n = rows * cols, r = (size_t)rank;
    memset(ws, 0, sizeof *ws);
    ws->quantized = calloc(n, sizeof(float));
    ws->residual = malloc(n * sizeof(float));
    ws->lowrank = calloc(n, sizeof(float)); /* stays zero when rank is 0 */
    ws->chunk_sums = malloc((n / LQ_CHUNK + 1) * sizeof(double));
    int ok = ws->quantized && ws->residual && ws->lowrank && ws->chunk_sums;
    if (rank > 0) {
        ws->u = malloc(rows * r * sizeof(float));
        ws->s = malloc(r * sizeof(float));
        ws->vt = malloc(r * cols * sizeof(float));
        ws->L1 = malloc(rows * r * sizeof(float));
        ws->L2 = malloc(r * cols * sizeof(float));
        ws->prev_L1 = malloc(rows * r * sizeof(float));
        ws->prev_L2 = malloc(r * cols * sizeof(float));
        ws->best_q_L1 = malloc(rows * r * sizeof(float));
        ws->best_q_L2 = malloc(r * cols * sizeof(float));
        ok = ok && ws->u && ws->s && ws->vt && ws->L1 && ws->L2 && ws->prev_L1 && ws->prev_L2 &&
             ws->best_q_L1 && ws->best_q_L2;
    }
    if (weighted) {
        ws->row_weight = malloc(rows * sizeof(float));
        ws->col_weight = malloc(cols * sizeof(float));
        ok = ok && ws->row_weight && ws->col_weight;
    }
    if (!ok) {
        workspace_free(ws);
        return LQ_ENOMEM;
    }
    return LQ_OK;
}

/* One factorization step: L1, L2 <- SVD_r(W - Q), weighted by diag(D_row), diag(D_col)
 * when Fisher weights are on (Algorithm 4), then lowrank = L1·L2. */
static int factorize(const float *w, size_t rows, size_t cols, int rank,
                     const struct lq_svd_options *svd, struct lq_workspace *ws,
                     struct lq_error *err) {
    size_t n = rows * cols;
    for (size_t i = 0; i < n; i++) ws->residual[i] = w[i] - ws->quantized[i];
    if (ws->row_weight) {
        for (size_t i = 0; i < rows; i++)
            for (size_t j = 0; j < cols; j++)
                ws->residual[i * cols + j] *= ws->row_weight[i] * ws->col_weight[j];
    }
    int rc = lq_svd_truncated(ws->residual, rows, cols, rank, svd, ws->u, ws->s, ws->vt, err);
    if (rc) return rc;
    /* L1 = U·sqrt(Σ), L2 = sqrt(Σ)·Vᵀ: the balanced split of the paper. */
    for (int k = 0; k < rank; k++) ws->s[k] = sqrtf(fmaxf(ws->s[k], 0.0f));
    for (size_t i = 0; i < rows; i++) {
        float inverse_row = ws->row_weight ? 1.0f / ws->row_weight[i] : 1.0f;
        for (int k = 0; k < rank; k++)
            ws->L1[i * (size_t)rank + k] = ws->u[i * (size_t)rank + k] * ws->s[k] * inverse_row;
    }
    for (int k = 0; k < rank; k++)
        for (size_t j = 0; j < cols; j++) {
            float inverse_col = ws->col_weight ? 1.0f / ws->col_weight[j] : 1.0f;
            ws->L2[(size_t)k * cols + j] = ws->s[k] * ws->vt[(size_t)k * cols + j] * inverse_col;
        }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)cols, rank, 1.0f, ws->L1,
                rank, ws->L2, (int)cols, 0.0f, ws->lowrank, (int)cols);
    return LQ_OK;
}

/* Elementwise passes over the whole matrix, run in parallel. Sums are accumulated per fixed
 * chunk and the chunks added in order, so errors (and the stopping decisions they drive) are
 * the same whatever the thread count. */

struct pass_job {
    const float *w, *quantized, *lowrank, *fisher;
    float *residual_out; /* if set: receives W - lowrank */
    size_t n;
    double *chunk_sums; /* per chunk: sum of F·(W - Q - lowrank)² */
};

static void pass_body(void *context, size_t first_chunk, size_t end_chunk) {
    const struct pass_job *job = context;
    for (size_t chunk = first_chunk; chunk < end_chunk; chunk++) {
        size_t begin = chunk * LQ_CHUNK,
               end = begin + LQ_CHUNK < job->n ? begin + LQ_CHUNK : job->n;
        double sum = 0.0;
        for (size_t i = begin; i < end; i++) {
            double d = (double)job->w[i] - job->quantized[i] - job->lowrank[i];
            sum += (job->fisher ? job->fisher[i] : 1.0) * d * d;
        }
        if (job->residual_out)
            for (size_t i = begin; i < end; i++) job->residual_out[i] = job->w[i] - job->lowrank[i];
        job->chunk_sums[chunk] = sum;
    }
}

/* ||W - Q - L1·L2|| (weighted) of the workspace's Q and L1·L2; with residual_out, also
 * writes W - L1·L2 there in the same pass. chunk_sums holds n / LQ_CHUNK + 1 values. */
static double error_pass(const float *w, const struct lq_workspace *ws, const float *fisher,
                         size_t n, float *residual_out, double *chunk_sums) {
    struct pass_job job = {w, ws->quantized, ws->lowrank, fisher, residual_out, n, chunk_sums};
    size_t chunks = (n + LQ_CHUNK - 1) / LQ_CHUNK;
    lq_parallel_for(chunks, 1, pass_body, &job);
    double sum = 0.0;
    for (size_t c = 0; c < chunks; c++) sum += chunk_sums[c];
    return sqrt(sum);
}

static int validate(const float *w, size_t rows, size_t cols, const struct lq_nf_config *c,
                    const struct lq_decompose_options *o, struct lq_error *err) {
    int rc = lq_nf_config_validate(c, err);
    if (rc) return rc;
    size_t k = rows < cols ? rows : cols;
    if (rows == 0 || cols == 0 || rows > (size_t)INT32_MAX || cols > (size_t)INT32_MAX)
        return lq_error_set(err, LQ_EINVAL, "cannot decompose a %zu x %zu matrix", rows, cols);
    if (o->rank < 0 || (size_t)o->rank > k)
        return lq_error_set(err, LQ_EINVAL, "rank %d: must be 0..%zu for a %zu x %zu matrix",
                            o->rank, k, rows, cols);
    if (o->max_iters < 1)
        return lq_error_set(err, LQ_EINVAL, "iterations %d: must be >= 1", o->max_iters);
    if (!(o->min_improvement >= 0.0 && o->min_improvement < 1.0))
        return lq_error_set(err, LQ_EINVAL, "minimum improvement %g: must be in [0, 1)",
                            o->min_improvement);
    for (size_t i = 0; i < rows * cols; i++)
        if (!isfinite(w[i]))
            return lq_error_set(err, LQ_ENUMERIC, "W[%zu, %zu] is %g", i / cols, i % cols,
                                (double)w[i]);
    return LQ_OK;
}

int lq_decompose(const float *w, size_t rows, size_t cols, const struct lq_nf_config *c,
                 const struct lq_decompose_options *options, struct lq_decomposition *out,
                 struct lq_error *err) {
    memset(out, 0, sizeof *out);
    int rc = validate(w, rows, cols, c, options, err);
    if (rc) return rc;
    const int rank = options->rank;
    const size_t n = rows * cols, r = (size_t)rank;
    struct lq_workspace ws;
    if (workspace_alloc(&ws, rows, cols, rank, options->fisher != NULL))
        return lq_error_set(err, LQ_ENOMEM, "out of memory decomposing %zu x %zu", rows, cols);
    out->rows = rows, out->cols = cols, out->rank = rank;
    out->L1 = malloc((r ? rows * r : 1) * sizeof(float));
    out->L2 = malloc((r ? r * cols : 1) * sizeof(float));
    out->history = malloc((size_t)options->max_iters * sizeof(double));
    if (!out->L1 || !out->L2 || !out->history) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory decomposing %zu x %zu", rows, cols);
        goto fail;
    }
    if (options->fisher &&
        (rc = fisher_weights(options->fisher, rows, cols, ws.row_weight, ws.col_weight, err)))
        goto fail;

    /* The kept candidate: its L1, L2 are out->L1, out->L2; its Q is Quantize(W) when
     * best_q_from_w, else Quantize(W - best_q_L1·best_q_L2). */
    double best = INFINITY, previous = INFINITY;
    int best_q_from_w = 1, q_from_w = 1;
    if (options->init == LQ_INIT_QUANTIZED) {
        if ((rc = lq_nf_quantize_dequantize(w, n, c, ws.quantized, err))) goto fail;
        best = error_pass(w, &ws, options->fisher, n, NULL, ws.chunk_sums); /* lowrank is 0 */
        if (rank > 0)
            memset(out->L1, 0, rows * r * sizeof(float)),
                memset(out->L2, 0, r * cols * sizeof(float));
    }
    for (int step = 1; step <= options->max_iters; step++) {
        if (rank > 0) {
            struct lq_svd_options svd = options->svd;
            svd.seed = options->svd.seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)step);
            if ((rc = factorize(w, rows, cols, rank, &svd, &ws, err))) goto fail;
            /* Half step: the previous Q with the new L is a decomposition too, and the SVD
             * step alone can only lower its error. (Q = 0 of a zero start is not a candidate.) */
            /* W - L1·L2, the next quantizer input, comes out of the same pass. */
            double half = error_pass(w, &ws, options->fisher, n, ws.residual, ws.chunk_sums);
            if (step > 1 || options->init == LQ_INIT_QUANTIZED) {
                if (half < best) {
                    best = half;
                    out->best_iter = step, out->best_is_half_step = 1;
                    best_q_from_w = q_from_w;
                    memcpy(ws.best_q_L1, ws.prev_L1, rows * r * sizeof(float));
                    memcpy(ws.best_q_L2, ws.prev_L2, r * cols * sizeof(float));
                    memcpy(out->L1, ws.L1, rows * r * sizeof(float));
                    memcpy(out->L2, ws.L2, r * cols * sizeof(float));
                }
            }
        } else {
            memcpy(ws.residual, w, n * sizeof(float));
        }
        if ((rc = lq_nf_quantize_dequantize(ws.residual, n, c, ws.quantized, err))) goto fail;
        q_from_w = rank == 0;
        if (rank > 0) {
            memcpy(ws.prev_L1, ws.L1, rows * r * sizeof(float));
            memcpy(ws.prev_L2, ws.L2, r * cols * sizeof(float));
        }
        double error = error_pass(w, &ws, options->fisher, n, NULL, ws.chunk_sums);
        out->history[step - 1] = error;
        out->iters = step;
        if (error < best) {
            best = error;
            out->best_iter = step, out->best_is_half_step = 0;
            best_q_from_w = q_from_w;
            if (rank > 0) {
                memcpy(ws.best_q_L1, ws.L1, rows * r * sizeof(float));
                memcpy(ws.best_q_L2, ws.L2, r * cols * sizeof(float));
                memcpy(out->L1, ws.L1, rows * r * sizeof(float));
                memcpy(out->L2, ws.L2, r * cols * sizeof(float));
            }
        }
        /* Without a low-rank part Q is final after one step; otherwise stop as soon as the
         * error stops falling, or falls by less than the requested fraction. */
        if (rank == 0 || error >= previous) break;
        if (options->min_improvement > 0 && previous - error < options->min_improvement * previous)
            break;
        previous = error;
    }
    out->error = best;
    out->norm = lq_weighted_distance(w, NULL, options->fisher, n);

    /* Re-quantize the kept Q's input: the same input gives the same Q bit for bit. */
    if (best_q_from_w) {
        memcpy(ws.residual, w, n * sizeof(float));
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)cols, rank, 1.0f,
                    ws.best_q_L1, rank, ws.best_q_L2, (int)cols, 0.0f, ws.lowrank, (int)cols);
        for (size_t i = 0; i < n; i++) ws.residual[i] = w[i] - ws.lowrank[i];
    }
    if ((rc = lq_nf_quantize(ws.residual, rows, cols, c, &out->Q, err))) goto fail;
    workspace_free(&ws);
    return LQ_OK;

fail:
    workspace_free(&ws);
    lq_decomposition_free(out);
    return rc;
}

void lq_decomposition_reconstruct(const struct lq_decomposition *d, float *out) {
    lq_nf_dequantize(&d->Q, out);
    if (d->rank > 0)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d->rows, (int)d->cols, d->rank,
                    1.0f, d->L1, d->rank, d->L2, (int)d->cols, 1.0f, out, (int)d->cols);
}

void lq_decomposition_free(struct lq_decomposition *d) {
    if (!d) return;
    free(d->L1);
    free(d->L2);
    free(d->history);
    lq_nf_matrix_free(&d->Q);
    d->L1 = d->L2 = NULL;
    d->history = NULL;
}
