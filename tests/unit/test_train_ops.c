/* The CPU backend's training ops (kernels/backend.h, "training ops") against finite
 * differences: each op's forward is written again here in double, a scalar f = Σ dout ⊙ op(x)
 * is differentiated by central differences in double, and the op's backward must give the
 * same gradient (relative error per tensor, fp32 against double). AdamW against a step worked
 * by hand and against PyTorch's formula. */
#include "core/lq.h"
#include "core/rng.h"
#include "kernels/backend.h"
#include "tests/unit/lq_test.h"

static struct lq_backend *cpu(void) {
    static struct lq_backend *backend;
    if (!backend && lq_backend_cpu_create(&backend, NULL)) abort();
    return backend;
}

static struct lq_rng rng;

static void random_fill(double *x, size_t n, double scale) {
    for (size_t i = 0; i < n; i++) x[i] = scale * lq_rng_normal(&rng);
}

static float *to_float(const double *x, size_t n) {
    float *f = malloc((n ? n : 1) * sizeof *f);
    for (size_t i = 0; i < n; i++) f[i] = (float)x[i];
    return f;
}

/* Rounds x to what float holds, so the op and the reference see the same inputs. */
static void round_to_float(double *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = (float)x[i];
}

/* ‖a − b‖ / ‖b‖ (a from the op, b the reference), with a floor for all-zero references. */
static double relative_error(const float *a, const double *b, size_t n) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < n; i++) {
        diff += (a[i] - b[i]) * (a[i] - b[i]);
        norm += b[i] * b[i];
    }
    return sqrt(diff) / fmax(sqrt(norm), 1e-30);
}

typedef double (*scalar_fn)(void *context);

/* Central differences of f with respect to x[0..n), in double. */
static void numeric_gradient(double *x, size_t n, scalar_fn f, void *context, double *out) {
    const double step = 1e-5;
    for (size_t i = 0; i < n; i++) {
        double saved = x[i];
        x[i] = saved + step;
        double plus = f(context);
        x[i] = saved - step;
        double minus = f(context);
        x[i] = saved;
        out[i] = (plus - minus) / (2 * step);
    }
}

/* The op's gradient (after subtracting what the buffer held, for the "+=" outputs) must match
 * the numeric one to 1e-4 relative: fp32 arithmetic against double. */
#define CHECK_GRADIENT(label, op, numeric, n, preset)                                              \
    do {                                                                                           \
        size_t n_ = (n);                                                                           \
        float *g_ = malloc(n_ * sizeof *g_);                                                       \
        for (size_t i_ = 0; i_ < n_; i_++) g_[i_] = (op)[i_] - (float)(preset);                    \
        double e_ = relative_error(g_, numeric, n_);                                               \
        CHECK_MSG(e_ < 1e-4, "%s: gradient relative error %g", label, e_);                         \
        printf("  %s: relative error %.2e\n", label, e_);                                          \
        free(g_);                                                                                  \
    } while (0)

/* ---------- linear ---------- */

struct linear_case {
    int rows, cols, n, own_rank, rank;
    double *x, *W, *B, *A, *L1, *L2, *dy; /* W: dequantized Q, or the dense weight */
};

static double linear_f(void *context) {
    const struct linear_case *c = context;
    double f = 0;
    for (int i = 0; i < c->n; i++) {
        const double *x = c->x + (size_t)i * c->cols;
        double a[16] = {0}, t[16] = {0};
        for (int j = 0; j < c->own_rank; j++)
            for (int k = 0; k < c->cols; k++) a[j] += c->A[j * c->cols + k] * x[k];
        for (int j = 0; j < c->rank; j++)
            for (int k = 0; k < c->cols; k++) t[j] += c->L2[j * c->cols + k] * x[k];
        for (int r = 0; r < c->rows; r++) {
            double y = 0;
            for (int k = 0; k < c->cols; k++) y += c->W[(size_t)r * c->cols + k] * x[k];
            for (int j = 0; j < c->own_rank; j++) y += c->B[r * c->own_rank + j] * a[j];
            for (int j = 0; j < c->rank; j++) y += c->L1[r * c->rank + j] * t[j];
            f += c->dy[(size_t)i * c->rows + r] * y;
        }
    }
    return f;
}

static void check_linear(int quantized) {
    struct linear_case c = {
        .rows = 12, .cols = 20, .n = 5, .own_rank = quantized ? 2 : 0, .rank = 3};
    const size_t nx = (size_t)c.n * c.cols, ny = (size_t)c.n * c.rows, nw = (size_t)c.rows * c.cols;
    c.x = malloc(nx * sizeof(double)), c.dy = malloc(ny * sizeof(double));
    c.W = malloc(nw * sizeof(double));
    /* the factors have at most 64 values here (12 x 3, 3 x 20, 12 x 2, 2 x 20) */
    c.B = malloc(64 * sizeof(double)), c.A = malloc(64 * sizeof(double));
    c.L1 = malloc(64 * sizeof(double)), c.L2 = malloc(64 * sizeof(double));
    random_fill(c.x, nx, 1), random_fill(c.dy, ny, 1), random_fill(c.W, nw, 0.3);
    random_fill(c.B, 64, 0.5), random_fill(c.A, 64, 0.5);
    random_fill(c.L1, 64, 0.5), random_fill(c.L2, 64, 0.5);
    round_to_float(c.x, nx), round_to_float(c.dy, ny);
    round_to_float(c.B, 64), round_to_float(c.A, 64), round_to_float(c.L1, 64);
    round_to_float(c.L2, 64);
    struct lq_linear w = {.rows = c.rows, .cols = c.cols, .is_lq = quantized, .rank = c.own_rank};
    float *wf = to_float(c.W, nw);
    if (quantized) {
        struct lq_nf_config config = {4, 8, LQ_SCALE_FP32, 16, 4};
        CHECK_OK(lq_nf_quantize(wf, c.rows, c.cols, &config, &w.q, NULL));
        lq_nf_dequantize(&w.q, wf); /* the reference uses Q as the op sees it */
        for (size_t i = 0; i < nw; i++) c.W[i] = wf[i];
        w.lora_B = to_float(c.B, 64);
        w.lora_A = to_float(c.A, 64);
        free(wf);
    } else {
        round_to_float(c.W, nw);
        w.dense = wf;
    }
    struct lq_backend *b = cpu();
    float *x = to_float(c.x, nx), *dy = to_float(c.dy, ny), *L1 = to_float(c.L1, 64),
          *L2 = to_float(c.L2, 64);
    float *dx = malloc(nx * sizeof *dx), *dx_acc = malloc(nx * sizeof *dx_acc);
    float *dL1 = malloc(64 * sizeof *dL1), *dL2 = malloc(64 * sizeof *dL2);
    float *dW = malloc(nw * sizeof *dW);
    for (size_t i = 0; i < nx; i++) dx[i] = 123.0f, dx_acc[i] = 1.0f; /* "=" and "+=" */
    for (int i = 0; i < 64; i++) dL1[i] = dL2[i] = 0.5f;
    for (size_t i = 0; i < nw; i++) dW[i] = 0.25f;
    CHECK_OK(b->ops->linear_backward(b, &w, L1, L2, c.rank, x, dy, c.n, dx, 0, dL1, dL2,
                                     quantized ? NULL : dW));
    CHECK_OK(
        b->ops->linear_backward(b, &w, L1, L2, c.rank, x, dy, c.n, dx_acc, 1, NULL, NULL, NULL));
    double *numeric = malloc((nx + nw) * sizeof *numeric);
    const char *kind = quantized ? "LQ" : "dense";
    char label[64];
    numeric_gradient(c.x, nx, linear_f, &c, numeric);
    snprintf(label, sizeof label, "%s linear dx", kind);
    CHECK_GRADIENT(label, dx, numeric, nx, 0.0f);
    snprintf(label, sizeof label, "%s linear dx +=", kind);
    CHECK_GRADIENT(label, dx_acc, numeric, nx, 1.0f);
    numeric_gradient(c.L1, (size_t)c.rows * c.rank, linear_f, &c, numeric);
    snprintf(label, sizeof label, "%s linear dL1", kind);
    CHECK_GRADIENT(label, dL1, numeric, (size_t)c.rows * c.rank, 0.5f);
    numeric_gradient(c.L2, (size_t)c.rank * c.cols, linear_f, &c, numeric);
    snprintf(label, sizeof label, "%s linear dL2", kind);
    CHECK_GRADIENT(label, dL2, numeric, (size_t)c.rank * c.cols, 0.5f);
    if (!quantized) {
        numeric_gradient(c.W, nw, linear_f, &c, numeric);
        CHECK_GRADIENT("dense dW", dW, numeric, nw, 0.25f);
    } else {
        CHECK(b->ops->linear_backward(b, &w, L1, L2, c.rank, x, dy, c.n, dx, 0, NULL, NULL, dW) ==
              LQ_EINVAL); /* no gradient for a quantized weight */
    }
    /* the forward: f = Σ dy ⊙ linear_lora(x) */
    float *y = malloc(ny * sizeof *y);
    CHECK_OK(b->ops->linear_lora(b, &w, L1, L2, c.rank, x, c.n, y));
    double f = 0;
    for (size_t i = 0; i < ny; i++) f += (double)dy[i] * y[i];
    CHECK_NEAR(f, linear_f(&c), 1e-4 * fabs(linear_f(&c)) + 1e-5);
    free(y), free(numeric), free(x), free(dy), free(L1), free(L2), free(dx), free(dx_acc);
    free(dL1), free(dL2), free(dW);
    free(c.x), free(c.dy), free(c.W), free(c.B), free(c.A), free(c.L1), free(c.L2);
    lq_linear_free(&w);
}

static void test_linear_backward(void) {
    lq_rng_seed(&rng, 1);
    check_linear(1);
    check_linear(0);
}

/* A matrix larger than one dequantization tile (a million values): dx = dy·Q must not depend
 * on the tiling. */
static void test_linear_backward_tiles(void) {
    lq_rng_seed(&rng, 2);
    const int rows = 1100, cols = 1000, n = 3;
    float *w = malloc((size_t)rows * cols * sizeof *w),
          *q = malloc((size_t)rows * cols * sizeof *q);
    lq_rng_fill_normal(&rng, w, (size_t)rows * cols);
    struct lq_linear linear = {.rows = rows, .cols = cols, .is_lq = 1};
    struct lq_nf_config nf4 = LQ_NF_CONFIG_NF4;
    CHECK_OK(lq_nf_quantize(w, rows, cols, &nf4, &linear.q, NULL));
    lq_nf_dequantize(&linear.q, q);
    float dy[3 * 1100], *dx = malloc((size_t)n * cols * sizeof *dx);
    lq_rng_fill_normal(&rng, dy, (size_t)n * rows);
    struct lq_backend *b = cpu();
    CHECK_OK(
        b->ops->linear_backward(b, &linear, NULL, NULL, 0, NULL, dy, n, dx, 0, NULL, NULL, NULL));
    double *reference = calloc((size_t)n * cols, sizeof *reference);
    for (int i = 0; i < n; i++)
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++)
                reference[(size_t)i * cols + c] +=
                    (double)dy[i * rows + r] * q[(size_t)r * cols + c];
    double e = relative_error(dx, reference, (size_t)n * cols);
    CHECK_MSG(e < 1e-5, "tiled dy·Q: relative error %g", e);
    free(w), free(q), free(dx), free(reference);
    lq_linear_free(&linear);
}

/* The output head's input gradient: dx = dy · w ("=" or "+="), against double. */
static void test_matmul_backward(void) {
    lq_rng_seed(&rng, 10);
    enum { ROWS = 9, COLS = 5, N = 4 };
    float w[ROWS * COLS], dy[N * ROWS], dx[N * COLS], dx_acc[N * COLS];
    double reference[N * COLS] = {0};
    lq_rng_fill_normal(&rng, w, ROWS * COLS);
    lq_rng_fill_normal(&rng, dy, N * ROWS);
    for (int i = 0; i < N; i++)
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < COLS; c++)
                reference[i * COLS + c] += (double)dy[i * ROWS + r] * w[r * COLS + c];
    for (int i = 0; i < N * COLS; i++) dx[i] = 7.0f, dx_acc[i] = 2.0f;
    struct lq_backend *b = cpu();
    CHECK_OK(b->ops->matmul_backward(b, w, ROWS, COLS, dy, N, dx, 0));
    CHECK_OK(b->ops->matmul_backward(b, w, ROWS, COLS, dy, N, dx_acc, 1));
    CHECK_GRADIENT("matmul", dx, reference, (size_t)N * COLS, 0.0f);
    CHECK_GRADIENT("matmul +=", dx_acc, reference, (size_t)N * COLS, 2.0f);
}

/* ---------- rmsnorm, rope, swiglu ---------- */

struct rows_case {
    int n, dim;
    double *x, *weight, *dy;
    double eps;
};

static double rmsnorm_f(void *context) {
    const struct rows_case *c = context;
    double f = 0;
    for (int i = 0; i < c->n; i++) {
        const double *x = c->x + (size_t)i * c->dim;
        double sum = 0;
        for (int j = 0; j < c->dim; j++) sum += x[j] * x[j];
        double r = 1 / sqrt(sum / c->dim + c->eps);
        for (int j = 0; j < c->dim; j++) f += c->dy[i * c->dim + j] * x[j] * r * c->weight[j];
    }
    return f;
}

static void test_rmsnorm_backward(void) {
    lq_rng_seed(&rng, 3);
    struct rows_case c = {3, 10, NULL, NULL, NULL, 1e-5};
    size_t n = (size_t)c.n * c.dim;
    double x[30], weight[10], dy[30], numeric[30];
    c.x = x, c.weight = weight, c.dy = dy;
    random_fill(x, n, 1), random_fill(weight, 10, 1), random_fill(dy, n, 1);
    round_to_float(x, n), round_to_float(weight, 10), round_to_float(dy, n);
    float *xf = to_float(x, n), *wf = to_float(weight, 10), *dyf = to_float(dy, n), dx[30];
    for (size_t i = 0; i < n; i++) dx[i] = 0.25f;
    struct lq_backend *b = cpu();
    CHECK_OK(b->ops->rmsnorm_backward(b, xf, wf, dyf, c.n, c.dim, (float)c.eps, dx));
    numeric_gradient(x, n, rmsnorm_f, &c, numeric);
    CHECK_GRADIENT("rmsnorm", dx, numeric, n, 0.25f);
    free(xf), free(wf), free(dyf);
}

struct rope_case {
    int n, heads, hd;
    const int *positions;
    double theta, *x, *dy;
};

static double rope_f(void *context) {
    const struct rope_case *c = context;
    double f = 0;
    const int half = c->hd / 2;
    for (int i = 0; i < c->n; i++)
        for (int h = 0; h < c->heads; h++) {
            const double *v = c->x + ((size_t)i * c->heads + h) * c->hd;
            const double *d = c->dy + ((size_t)i * c->heads + h) * c->hd;
            for (int k = 0; k < half; k++) {
                double angle = c->positions[i] * pow(c->theta, -2.0 * k / c->hd);
                f += d[k] * (v[k] * cos(angle) - v[k + half] * sin(angle));
                f += d[k + half] * (v[k] * sin(angle) + v[k + half] * cos(angle));
            }
        }
    return f;
}

static void test_rope_backward(void) {
    lq_rng_seed(&rng, 4);
    static const int positions[] = {0, 5, 17, 100};
    struct rope_case c = {4, 3, 6, positions, 10000.0, NULL, NULL};
    size_t n = (size_t)c.n * c.heads * c.hd;
    double x[72], dy[72], numeric[72];
    c.x = x, c.dy = dy;
    random_fill(x, n, 1), random_fill(dy, n, 1);
    round_to_float(dy, n);
    float *g = to_float(dy, n);
    struct lq_backend *b = cpu();
    CHECK_OK(b->ops->rope_backward(b, g, c.n, c.heads, c.hd, positions, (float)c.theta));
    numeric_gradient(x, n, rope_f, &c, numeric);
    CHECK_GRADIENT("rope", g, numeric, n, 0.0f);
    free(g);
}

struct swiglu_case {
    size_t count;
    double *gate, *up, *dout;
};

static double swiglu_f(void *context) {
    const struct swiglu_case *c = context;
    double f = 0;
    for (size_t i = 0; i < c->count; i++)
        f += c->dout[i] * c->gate[i] / (1 + exp(-c->gate[i])) * c->up[i];
    return f;
}

static void test_swiglu_backward(void) {
    lq_rng_seed(&rng, 5);
    enum { N = 50 };
    double gate[N], up[N], dout[N], numeric[N];
    struct swiglu_case c = {N, gate, up, dout};
    random_fill(gate, N, 2), random_fill(up, N, 1), random_fill(dout, N, 1);
    round_to_float(gate, N), round_to_float(up, N), round_to_float(dout, N);
    float *g = to_float(gate, N), *u = to_float(up, N), *d = to_float(dout, N), dg[N], du[N];
    struct lq_backend *b = cpu();
    CHECK_OK(b->ops->swiglu_backward(b, g, u, d, N, dg, du));
    numeric_gradient(gate, N, swiglu_f, &c, numeric);
    CHECK_GRADIENT("swiglu gate", dg, numeric, N, 0.0f);
    numeric_gradient(up, N, swiglu_f, &c, numeric);
    CHECK_GRADIENT("swiglu up", du, numeric, N, 0.0f);
    CHECK_OK(b->ops->swiglu_backward(b, g, u, d, N, d, du)); /* dgate may be dout itself */
    CHECK(memcmp(d, dg, sizeof dg) == 0);
    free(g), free(u), free(d);
}

/* ---------- attention ---------- */

struct attention_case {
    int batch, n, heads, kv_heads, hd;
    double *q, *k, *v, *dout;
};

static double attention_f(void *context) {
    const struct attention_case *c = context;
    const int q_ld = c->heads * c->hd, kv_ld = c->kv_heads * c->hd, group = c->heads / c->kv_heads;
    double f = 0, scores[64];
    for (int s = 0; s < c->batch; s++)
        for (int h = 0; h < c->heads; h++)
            for (int i = 0; i < c->n; i++) {
                const double *q = c->q + ((size_t)s * c->n + i) * q_ld + h * c->hd;
                double max = -INFINITY, sum = 0;
                for (int t = 0; t <= i; t++) {
                    const double *k = c->k + ((size_t)s * c->n + t) * kv_ld + h / group * c->hd;
                    double dot = 0;
                    for (int d = 0; d < c->hd; d++) dot += q[d] * k[d];
                    scores[t] = dot / sqrt((double)c->hd);
                    max = fmax(max, scores[t]);
                }
                for (int t = 0; t <= i; t++) sum += scores[t] = exp(scores[t] - max);
                const double *dout = c->dout + ((size_t)s * c->n + i) * q_ld + h * c->hd;
                for (int t = 0; t <= i; t++) {
                    const double *v = c->v + ((size_t)s * c->n + t) * kv_ld + h / group * c->hd;
                    for (int d = 0; d < c->hd; d++) f += dout[d] * scores[t] / sum * v[d];
                }
            }
    return f;
}

static void check_attention(int n) {
    struct attention_case c = {2, n, 4, 2, 4, NULL, NULL, NULL, NULL};
    const size_t nq = (size_t)c.batch * n * c.heads * c.hd,
                 nkv = (size_t)c.batch * n * c.kv_heads * c.hd;
    c.q = malloc(nq * sizeof(double)), c.dout = malloc(nq * sizeof(double));
    c.k = malloc(nkv * sizeof(double)), c.v = malloc(nkv * sizeof(double));
    random_fill(c.q, nq, 1), random_fill(c.dout, nq, 1), random_fill(c.k, nkv, 1);
    random_fill(c.v, nkv, 1);
    round_to_float(c.q, nq), round_to_float(c.dout, nq), round_to_float(c.k, nkv);
    round_to_float(c.v, nkv);
    float *q = to_float(c.q, nq), *k = to_float(c.k, nkv), *v = to_float(c.v, nkv);
    float *dout = to_float(c.dout, nq), *dq = malloc(nq * sizeof *dq);
    float *dk = malloc(nkv * sizeof *dk), *dv = malloc(nkv * sizeof *dv), *out = malloc(nq * 4);
    struct lq_backend *b = cpu();
    CHECK_OK(b->ops->attention_backward(b, q, k, v, dout, c.batch, n, c.heads, c.kv_heads, c.hd, dq,
                                        dk, dv));
    double *numeric = malloc(nq * sizeof *numeric);
    char label[64];
    snprintf(label, sizeof label, "attention (n = %d) dq", n);
    numeric_gradient(c.q, nq, attention_f, &c, numeric);
    CHECK_GRADIENT(label, dq, numeric, nq, 0.0f);
    numeric_gradient(c.k, nkv, attention_f, &c, numeric);
    CHECK_GRADIENT("attention dk", dk, numeric, nkv, 0.0f);
    numeric_gradient(c.v, nkv, attention_f, &c, numeric);
    CHECK_GRADIENT("attention dv", dv, numeric, nkv, 0.0f);
    /* the forward op, per sequence from position 0, is the function differentiated */
    const size_t q_row = (size_t)n * c.heads * c.hd, kv_row = (size_t)n * c.kv_heads * c.hd;
    for (int s = 0; s < c.batch; s++)
        CHECK_OK(b->ops->attention(b, q + s * q_row, k + s * kv_row, v + s * kv_row, n, 0, c.heads,
                                   c.kv_heads, c.hd, out + s * q_row));
    double f = 0;
    for (size_t i = 0; i < nq; i++) f += (double)dout[i] * out[i];
    CHECK_NEAR(f, attention_f(&c), 1e-4 * fabs(f) + 1e-5);
    free(numeric), free(q), free(k), free(v), free(dout), free(dq), free(dk), free(dv), free(out);
    free(c.q), free(c.k), free(c.v), free(c.dout);
}

static void test_attention_backward(void) {
    lq_rng_seed(&rng, 6);
    check_attention(7);
    check_attention(19); /* the forward takes its prefill path from 16 tokens */
}

/* ---------- loss ---------- */

struct cross_entropy_case {
    int n, vocab;
    const int *targets;
    const unsigned char *mask;
    double scale, *logits;
};

static double cross_entropy_f(void *context) {
    const struct cross_entropy_case *c = context;
    double f = 0;
    for (int i = 0; i < c->n; i++) {
        if (!c->mask[i]) continue;
        const double *row = c->logits + (size_t)i * c->vocab;
        double sum = 0;
        for (int j = 0; j < c->vocab; j++) sum += exp(row[j]);
        f += log(sum) - row[c->targets[i]];
    }
    return c->scale * f;
}

static void test_cross_entropy(void) {
    lq_rng_seed(&rng, 7);
    static const int targets[] = {3, 99, 0, 8, 99, 5}; /* masked-out targets are never read */
    static const unsigned char mask[] = {1, 0, 1, 1, 0, 1};
    enum { N = 6, V = 9 };
    double logits[N * V], numeric[N * V];
    struct cross_entropy_case c = {N, V, targets, mask, 0.37, logits};
    random_fill(logits, N * V, 3);
    round_to_float(logits, N * V);
    float *l = to_float(logits, N * V), d[N * V];
    double loss = 2.0;
    struct lq_backend *b = cpu();
    CHECK_OK(b->ops->cross_entropy(b, l, targets, mask, N, V, (float)c.scale, &loss, d));
    CHECK_NEAR(loss - 2.0, cross_entropy_f(&c) / c.scale, 1e-5);
    numeric_gradient(logits, N * V, cross_entropy_f, &c, numeric);
    CHECK_GRADIENT("cross-entropy", d, numeric, (size_t)N * V, 0.0f);
    for (int j = 0; j < V; j++) CHECK(d[V + j] == 0.0f && d[4 * V + j] == 0.0f);
    double again = 0;
    CHECK_OK(
        b->ops->cross_entropy(b, l, targets, mask, N, V, (float)c.scale, &again, l)); /* in place */
    CHECK(memcmp(l, d, sizeof d) == 0);
    CHECK(again == loss - 2.0);
    static const int bad[] = {3, 1, 0, 9, 1, 5}; /* 9 is outside a vocabulary of 9 */
    CHECK(b->ops->cross_entropy(b, l, bad, mask, N, V, 1.0f, &again, NULL) == LQ_EINVAL);
    free(l);
}

/* ---------- evaluation ---------- */

/* lqd eval's formula before token_nll existed (core/eval.c computed it from host logits): the
 * CPU op must give these bits, so the perplexities it reports never move. */
static double eval_formula(const float *logits, int vocab, int target) {
    float max = logits[0];
    for (int v = 1; v < vocab; v++) max = logits[v] > max ? logits[v] : max;
    double sum = 0.0;
    for (int v = 0; v < vocab; v++) sum += exp((double)logits[v] - max);
    return log(sum) + max - logits[target];
}

/* token_nll bit for bit the formula above (on enough rows that several threads share them),
 * and within 1e-12 of a long-double log-sum-exp; bad targets refused. */
static void test_token_nll(void) {
    lq_rng_seed(&rng, 10);
    enum { N = 301, V = 1003 };
    float *logits = malloc((size_t)N * V * sizeof *logits);
    int targets[N];
    double nll[N];
    lq_rng_fill_normal(&rng, logits, (size_t)N * V);
    for (int i = 0; i < N; i++) {
        float *row = logits + (size_t)i * V;
        /* scale 4, 300 (exp underflows) and a +-1e4 shift (the max subtraction matters) */
        for (int v = 0; v < V; v++)
            row[v] = i % 3 == 0 ? 4 * row[v] : i % 3 == 1 ? 300 * row[v] : row[v] + 1e4f;
        targets[i] = (int)(lq_rng_next(&rng) % V);
    }
    struct lq_backend *b = cpu();
    CHECK_OK(b->ops->token_nll(b, logits, targets, N, V, nll));
    for (int i = 0; i < N; i++) {
        const float *row = logits + (size_t)i * V;
        double old = eval_formula(row, V, targets[i]);
        CHECK_MSG(memcmp(&nll[i], &old, sizeof old) == 0, "row %d: %.17g, eval's formula %.17g", i,
                  nll[i], old);
        long double max = row[0], sum = 0;
        for (int v = 1; v < V; v++) max = row[v] > max ? row[v] : max;
        for (int v = 0; v < V; v++) sum += expl(row[v] - max);
        double exact = (double)(logl(sum) + max - row[targets[i]]);
        CHECK_MSG(fabs(nll[i] - exact) <= 1e-12 * fmax(1.0, fabs(exact)), "row %d: %.17g vs %.17g",
                  i, nll[i], exact);
    }
    targets[N / 2] = V;
    CHECK(b->ops->token_nll(b, logits, targets, N, V, nll) == LQ_EINVAL);
    targets[N / 2] = -1;
    CHECK(b->ops->token_nll(b, logits, targets, N, V, nll) == LQ_EINVAL);
    CHECK(b->ops->token_nll(b, logits, targets, N, 0, nll) == LQ_EINVAL);
    CHECK_OK(b->ops->token_nll(b, logits, targets, 0, V, nll));
    free(logits);
}

/* ---------- reductions and AdamW ---------- */

static void test_sum_squares(void) {
    lq_rng_seed(&rng, 8);
    const size_t n = 200003; /* several chunks, the last partial */
    float *x = malloc(n * sizeof *x), *acc = malloc(n * sizeof *acc);
    lq_rng_fill_normal(&rng, x, n);
    double reference = 0, sum = 0;
    for (size_t i = 0; i < n; i++) reference += (double)x[i] * x[i], acc[i] = 1.0f;
    struct lq_backend *b = cpu();
    CHECK_OK(b->ops->sum_squares(b, x, n, &sum));
    CHECK_NEAR(sum, reference, 1e-9 * reference);
    CHECK_OK(b->ops->accumulate_squares(b, acc, x, n, 0.5f));
    double worst = 0;
    for (size_t i = 0; i < n; i++) worst = fmax(worst, fabs(acc[i] - (1.0 + 0.5 * x[i] * x[i])));
    CHECK(worst < 1e-5);
    CHECK_OK(b->ops->zero(b, acc, n));
    for (size_t i = 0; i < n; i++) worst = fmax(worst, fabs(acc[i]));
    CHECK(worst < 1e-5);
    free(x), free(acc);
}

static void test_adamw(void) {
    struct lq_backend *b = cpu();
    /* by hand: p = 1, g = 0.5, lr 0.1, weight decay 0.01, step 1 → m̂ = g, v̂ = g², and
     * p = 1·(1 − 0.001) − 0.1 · 0.5/(0.5 + 1e-8) = 0.899000002 */
    float p = 1.0f, g = 0.5f, m = 0.0f, v = 0.0f;
    struct lq_adamw_params hyper = {0.1f, 0.9f, 0.999f, 1e-8f, 0.01f, 1.0f, 1};
    CHECK_OK(b->ops->adamw(b, &p, &g, &m, &v, 1, &hyper));
    CHECK_NEAR(p, 0.899000002, 1e-6);
    CHECK_NEAR(m, 0.05, 1e-7);
    CHECK_NEAR(v, 0.00025, 1e-8); /* 1 − 0.999 in float is 0.00099999 */
    /* three steps of PyTorch's formula in double, with a gradient scale (clipping) */
    enum { N = 7 };
    float params[N], grads[N], ms[N] = {0}, vs[N] = {0};
    double rp[N], rm[N] = {0}, rv[N] = {0};
    lq_rng_seed(&rng, 9);
    for (int i = 0; i < N; i++) rp[i] = params[i] = (float)lq_rng_normal(&rng);
    const double lr = 0.01, b1 = 0.8, b2 = 0.95, eps = 1e-3, wd = 0.1, scale = 0.5;
    for (int step = 1; step <= 3; step++) {
        for (int i = 0; i < N; i++) grads[i] = (float)lq_rng_normal(&rng);
        struct lq_adamw_params h = {(float)lr, (float)b1,    (float)b2, (float)eps,
                                    (float)wd, (float)scale, step};
        CHECK_OK(b->ops->adamw(b, params, grads, ms, vs, N, &h));
        for (int i = 0; i < N; i++) {
            double gi = scale * grads[i];
            rp[i] *= 1 - lr * wd;
            rm[i] = b1 * rm[i] + (1 - b1) * gi;
            rv[i] = b2 * rv[i] + (1 - b2) * gi * gi;
            double denom = sqrt(rv[i]) / sqrt(1 - pow(b2, step)) + eps;
            rp[i] -= lr / (1 - pow(b1, step)) * rm[i] / denom;
        }
    }
    CHECK_MSG(relative_error(params, rp, N) < 1e-6, "AdamW: %g", relative_error(params, rp, N));
    CHECK_MSG(relative_error(ms, rm, N) < 1e-6, "AdamW m: %g", relative_error(ms, rm, N));
    CHECK_MSG(relative_error(vs, rv, N) < 1e-6, "AdamW v: %g", relative_error(vs, rv, N));
    hyper.step = 0;
    CHECK(b->ops->adamw(b, &p, &g, &m, &v, 1, &hyper) == LQ_EINVAL);
}

LQ_TEST_MAIN(LQ_TEST(test_linear_backward), LQ_TEST(test_linear_backward_tiles),
             LQ_TEST(test_matmul_backward), LQ_TEST(test_rmsnorm_backward),
             LQ_TEST(test_rope_backward), LQ_TEST(test_swiglu_backward),
             LQ_TEST(test_attention_backward), LQ_TEST(test_cross_entropy), LQ_TEST(test_token_nll),
             LQ_TEST(test_sum_squares), LQ_TEST(test_adamw))
