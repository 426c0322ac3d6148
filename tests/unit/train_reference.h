/* A tiny random LLaMA and the same network written again in double, differentiated by central
 * differences in the trainer's and the Fisher estimate's tests (test_train.c, test_fisher.c).
 * Everything is static: each test program includes it once. */
#ifndef LQ_TRAIN_REFERENCE_H
#define LQ_TRAIN_REFERENCE_H

#include <stdint.h>

#include "core/rng.h"
#include "core/train.h"
#include "tests/unit/lq_test.h"

static struct lq_backend *cpu(void) {
    static struct lq_backend *backend;
    if (!backend && lq_backend_cpu_create(&backend, NULL)) abort();
    return backend;
}

/* ---------- a tiny random model ---------- */

enum { DIM = 16, LAYERS = 2, HEADS = 4, KV_HEADS = 2, HEAD_DIM = 4, HIDDEN = 24, VOCAB = 40 };

static float *random_array(struct lq_rng *rng, size_t n, double mean, double scale) {
    float *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = (float)(mean + scale * lq_rng_normal(rng));
    return x;
}

/* Dense, or LQ: every linear quantized (NF4 with blocks of 16) from random weights, plus its
 * own random pair of rank own_rank (0: none). The same seed gives the same model. */
static struct lq_model *tiny_model(int lq, int own_rank, uint64_t seed) {
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    struct lq_model *m = calloc(1, sizeof *m);
    struct lq_model_config c = {DIM, LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB,
                                64,  10000,  1e-5f, 0,        1,        2};
    m->config = c, m->is_lq = lq;
    m->embed = random_array(&rng, (size_t)VOCAB * DIM, 0, 1);
    m->lm_head = random_array(&rng, (size_t)VOCAB * DIM, 0, 0.5);
    m->final_norm = random_array(&rng, DIM, 1, 0.1);
    m->layers = calloc(LAYERS, sizeof *m->layers);
    const int rows[] = {
        HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, DIM, HIDDEN, HIDDEN, DIM};
    const int cols[] = {DIM, DIM, DIM, HEADS * HEAD_DIM, DIM, DIM, HIDDEN};
    for (int l = 0; l < LAYERS; l++) {
        m->layers[l].attn_norm = random_array(&rng, DIM, 1, 0.1);
        m->layers[l].ffn_norm = random_array(&rng, DIM, 1, 0.1);
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            struct lq_linear *w = &m->layers[l].linear[k];
            w->rows = rows[k], w->cols = cols[k];
            float *dense = random_array(&rng, (size_t)w->rows * w->cols, 0, 1 / sqrt(w->cols));
            if (!lq) {
                w->dense = dense;
                continue;
            }
            struct lq_nf_config config = {4, 8, LQ_SCALE_FP32, 16, 4};
            if (lq_nf_quantize(dense, w->rows, w->cols, &config, &w->q, NULL)) abort();
            free(dense);
            w->is_lq = 1, w->rank = own_rank;
            if (own_rank) {
                w->lora_B = random_array(&rng, (size_t)w->rows * own_rank, 0, 0.3);
                w->lora_A = random_array(&rng, (size_t)own_rank * w->cols, 0, 0.3);
            }
        }
    }
    return m;
}

/* ---------- the same network in double ---------- */

enum { MAX_T = 16, MAX_W = 64 };

struct ref_linear {
    int rows, cols, rank;
    double *w;             /* the frozen part, dense */
    const double *L1, *L2; /* the trainable pair (into a flat parameter array) */
};

struct ref_model {
    double *embed, *lm_head, *final_norm, *attn_norm[LAYERS], *ffn_norm[LAYERS];
    struct ref_linear linear[LAYERS][LQ_LINEARS_PER_LAYER];
};

static double *to_double(const float *x, size_t n) {
    double *d = malloc(n * sizeof *d);
    for (size_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

/* The frozen part of each linear: dequantized Q, plus the model's own pair when with_own_pair
 * (LQ_LORA_INIT_ZERO keeps it frozen; LQ_LORA_INIT_LQ trains it). */
static void ref_build(struct ref_model *r, const struct lq_model *m, int with_own_pair) {
    r->embed = to_double(m->embed, (size_t)VOCAB * DIM);
    r->lm_head = to_double(m->lm_head, (size_t)VOCAB * DIM);
    r->final_norm = to_double(m->final_norm, DIM);
    for (int l = 0; l < LAYERS; l++) {
        r->attn_norm[l] = to_double(m->layers[l].attn_norm, DIM);
        r->ffn_norm[l] = to_double(m->layers[l].ffn_norm, DIM);
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            const struct lq_linear *w = &m->layers[l].linear[k];
            struct ref_linear *rl = &r->linear[l][k];
            size_t n = (size_t)w->rows * w->cols;
            float *dense = malloc(n * sizeof *dense);
            if (w->is_lq)
                lq_nf_dequantize(&w->q, dense);
            else
                memcpy(dense, w->dense, n * sizeof *dense);
            rl->rows = w->rows, rl->cols = w->cols, rl->rank = 0;
            rl->w = to_double(dense, n);
            free(dense);
            if (w->is_lq && with_own_pair)
                for (int i = 0; i < w->rows; i++)
                    for (int j = 0; j < w->cols; j++)
                        for (int t = 0; t < w->rank; t++)
                            rl->w[i * w->cols + j] +=
                                (double)w->lora_B[i * w->rank + t] * w->lora_A[t * w->cols + j];
        }
    }
}

static void ref_free(struct ref_model *r) {
    free(r->embed), free(r->lm_head), free(r->final_norm);
    for (int l = 0; l < LAYERS; l++) {
        free(r->attn_norm[l]), free(r->ffn_norm[l]);
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) free(r->linear[l][k].w);
    }
}

static void ref_apply(const struct ref_linear *w, const double *x, double *y) {
    double t[MAX_W] = {0};
    for (int j = 0; j < w->rank; j++)
        for (int c = 0; c < w->cols; c++) t[j] += w->L2[j * w->cols + c] * x[c];
    for (int r = 0; r < w->rows; r++) {
        double sum = 0;
        for (int c = 0; c < w->cols; c++) sum += w->w[r * w->cols + c] * x[c];
        for (int j = 0; j < w->rank; j++) sum += w->L1[r * w->rank + j] * t[j];
        y[r] = sum;
    }
}

static void ref_rmsnorm(const double *x, const double *weight, double *y) {
    double sum = 0;
    for (int j = 0; j < DIM; j++) sum += x[j] * x[j];
    double r = 1 / sqrt(sum / DIM + 1e-5f);
    for (int j = 0; j < DIM; j++) y[j] = x[j] * r * weight[j];
}

static void ref_rope(double *v, int heads, int position) {
    const int half = HEAD_DIM / 2;
    for (int h = 0; h < heads; h++)
        for (int k = 0; k < half; k++) {
            double angle = position * pow(10000.0, -2.0 * k / HEAD_DIM);
            double *p = v + h * HEAD_DIM, x0 = p[k], x1 = p[k + half];
            p[k] = x0 * cos(angle) - x1 * sin(angle);
            p[k + half] = x0 * sin(angle) + x1 * cos(angle);
        }
}

/* The summed cross-entropy of one row's masked-in targets. */
static double ref_row_loss(const struct ref_model *r, const int *inputs, const int *targets,
                           const unsigned char *mask, int T) {
    static double x[MAX_T][MAX_W], h[MAX_T][MAX_W], q[MAX_T][MAX_W], k[MAX_T][MAX_W],
        v[MAX_T][MAX_W], attn[MAX_T][MAX_W], gate[MAX_T][MAX_W], up[MAX_T][MAX_W],
        out[MAX_T][MAX_W];
    for (int t = 0; t < T; t++) memcpy(x[t], r->embed + inputs[t] * DIM, DIM * sizeof(double));
    for (int l = 0; l < LAYERS; l++) {
        const struct ref_linear *w = r->linear[l];
        for (int t = 0; t < T; t++) {
            ref_rmsnorm(x[t], r->attn_norm[l], h[t]);
            ref_apply(&w[LQ_Q_PROJ], h[t], q[t]), ref_apply(&w[LQ_K_PROJ], h[t], k[t]);
            ref_apply(&w[LQ_V_PROJ], h[t], v[t]);
            ref_rope(q[t], HEADS, t), ref_rope(k[t], KV_HEADS, t);
        }
        for (int t = 0; t < T; t++)
            for (int head = 0; head < HEADS; head++) {
                int g = head / (HEADS / KV_HEADS);
                double scores[MAX_T], max = -INFINITY, sum = 0;
                for (int s = 0; s <= t; s++) {
                    double dot = 0;
                    for (int d = 0; d < HEAD_DIM; d++)
                        dot += q[t][head * HEAD_DIM + d] * k[s][g * HEAD_DIM + d];
                    scores[s] = dot / sqrt((double)HEAD_DIM);
                    max = fmax(max, scores[s]);
                }
                for (int s = 0; s <= t; s++) sum += scores[s] = exp(scores[s] - max);
                for (int d = 0; d < HEAD_DIM; d++) {
                    double o = 0;
                    for (int s = 0; s <= t; s++) o += scores[s] / sum * v[s][g * HEAD_DIM + d];
                    attn[t][head * HEAD_DIM + d] = o;
                }
            }
        for (int t = 0; t < T; t++) {
            ref_apply(&w[LQ_O_PROJ], attn[t], out[t]);
            for (int j = 0; j < DIM; j++) x[t][j] += out[t][j];
            ref_rmsnorm(x[t], r->ffn_norm[l], h[t]);
            ref_apply(&w[LQ_GATE_PROJ], h[t], gate[t]), ref_apply(&w[LQ_UP_PROJ], h[t], up[t]);
            for (int j = 0; j < HIDDEN; j++)
                gate[t][j] = gate[t][j] / (1 + exp(-gate[t][j])) * up[t][j];
            ref_apply(&w[LQ_DOWN_PROJ], gate[t], out[t]);
            for (int j = 0; j < DIM; j++) x[t][j] += out[t][j];
        }
    }
    double loss = 0;
    for (int t = 0; t < T; t++) {
        if (mask && !mask[t]) continue;
        ref_rmsnorm(x[t], r->final_norm, h[t]);
        double logits[VOCAB], max = -INFINITY, sum = 0;
        for (int i = 0; i < VOCAB; i++) {
            logits[i] = 0;
            for (int j = 0; j < DIM; j++) logits[i] += r->lm_head[i * DIM + j] * h[t][j];
            max = fmax(max, logits[i]);
        }
        for (int i = 0; i < VOCAB; i++) sum += exp(logits[i] - max);
        loss += log(sum) + max - logits[targets[t]];
    }
    return loss;
}

/* The batch's mean masked cross-entropy. */
static double ref_loss(const struct ref_model *r, const struct lq_train_batch *b) {
    double sum = 0;
    long count = 0;
    for (int row = 0; row < b->rows; row++) {
        size_t o = (size_t)row * b->seq_len;
        sum += ref_row_loss(r, b->inputs + o, b->targets + o, b->mask ? b->mask + o : NULL,
                            b->seq_len);
        for (int t = 0; t < b->seq_len; t++) count += !b->mask || b->mask[o + t];
    }
    return sum / count;
}

/* ‖a − b‖/‖b‖ over n values. */
static double relative_error(const float *a, const double *b, size_t n) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < n; i++) diff += (a[i] - b[i]) * (a[i] - b[i]), norm += b[i] * b[i];
    return sqrt(diff) / fmax(sqrt(norm), 1e-30);
}

#endif
