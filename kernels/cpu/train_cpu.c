/* Training ops on the CPU: the backward passes of the forward ops, the loss and the optimizer
 * (kernels/backend.h, "training ops"). OpenBLAS does the matrix products, one single-threaded
 * call per block of output rows (or columns) on lqd's thread pool; the elementwise ops split
 * their ranges over the pool too. They are the reference the device backends are checked
 * against; tests/unit/test_train.c checks each against finite differences in double. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/parallel.h"
#include "kernels/cpu/cpu_ops.h"

/* A thread is worth about this many multiply-adds (the same threshold as linear_cpu.c). */
#define WORK_PER_THREAD ((size_t)1 << 18)
/* Elementwise ops: values per thread at least. */
#define ELEMENTS_PER_THREAD ((size_t)1 << 14)

static size_t min_per_thread(size_t work_per_item) {
    if (work_per_item == 0) work_per_item = 1;
    return work_per_item >= WORK_PER_THREAD ? 1 : WORK_PER_THREAD / work_per_item + 1;
}

/* ---------- matrix products on the pool ---------- */

/* C[m, n] = alpha · op(A) · op(B) + beta · C, cut into blocks of rows of C (or of columns when
 * C is wider than tall: the thin products of LoRA, [rank, cols]); each block is one OpenBLAS
 * call over the full inner dimension k, so the sums do not depend on the cut. */
struct sgemm_job {
    enum CBLAS_TRANSPOSE ta, tb;
    int m, n, k, lda, ldb, ldc, split_rows;
    float alpha, beta;
    const float *a, *b;
    float *c;
};

static void sgemm_body(void *context, size_t begin, size_t end) {
    const struct sgemm_job *j = context;
    int count = (int)(end - begin);
    if (j->split_rows) {
        const float *a = j->ta == CblasNoTrans ? j->a + begin * (size_t)j->lda : j->a + begin;
        cblas_sgemm(CblasRowMajor, j->ta, j->tb, count, j->n, j->k, j->alpha, a, j->lda, j->b,
                    j->ldb, j->beta, j->c + begin * (size_t)j->ldc, j->ldc);
    } else {
        const float *b = j->tb == CblasNoTrans ? j->b + begin : j->b + begin * (size_t)j->ldb;
        cblas_sgemm(CblasRowMajor, j->ta, j->tb, j->m, count, j->k, j->alpha, j->a, j->lda, b,
                    j->ldb, j->beta, j->c + begin, j->ldc);
    }
}

static void sgemm(enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, int m, int n, int k,
                  float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                  float *c, int ldc) {
    if (m <= 0 || n <= 0 || k <= 0) return; /* callers never pass an empty inner dimension */
    struct sgemm_job job = {ta, tb, m, n, k, lda, ldb, ldc, m >= n, alpha, beta, a, b, c};
    size_t along = (size_t)(job.split_rows ? m : n), across = (size_t)(job.split_rows ? n : m);
    lq_parallel_for(along, min_per_thread(across * (size_t)k), sgemm_body, &job);
}

/* ---------- small elementwise ops ---------- */

struct fill_job {
    float *x;
    const float *y;
    float scale;
};

static void zero_body(void *context, size_t begin, size_t end) {
    const struct fill_job *job = context;
    memset(job->x + begin, 0, (end - begin) * sizeof(float));
}

int lq_cpu_zero(struct lq_backend *backend, float *x, size_t count) {
    (void)backend;
    struct fill_job job = {x, NULL, 0.0f};
    lq_parallel_for(count, ELEMENTS_PER_THREAD * 4, zero_body, &job);
    return LQ_OK;
}

static void squares_body(void *context, size_t begin, size_t end) {
    const struct fill_job *job = context;
    for (size_t i = begin; i < end; i++) job->x[i] += job->scale * (job->y[i] * job->y[i]);
}

int lq_cpu_accumulate_squares(struct lq_backend *backend, float *acc, const float *x, size_t count,
                              float scale) {
    (void)backend;
    struct fill_job job = {acc, x, scale};
    lq_parallel_for(count, ELEMENTS_PER_THREAD, squares_body, &job);
    return LQ_OK;
}

/* Σ x² over fixed chunks summed in chunk order: the same bits for any thread count. */
#define SUM_CHUNK ((size_t)1 << 16)

struct sum_job {
    const float *x;
    size_t count;
    double *partial;
};

static void sum_body(void *context, size_t begin, size_t end) {
    const struct sum_job *job = context;
    for (size_t chunk = begin; chunk < end; chunk++) {
        size_t first = chunk * SUM_CHUNK, last = first + SUM_CHUNK;
        if (last > job->count) last = job->count;
        double sum = 0.0;
        for (size_t i = first; i < last; i++) sum += (double)job->x[i] * job->x[i];
        job->partial[chunk] = sum;
    }
}

int lq_cpu_sum_squares(struct lq_backend *backend, const float *x, size_t count, double *out) {
    (void)backend;
    size_t chunks = (count + SUM_CHUNK - 1) / SUM_CHUNK;
    double *partial = malloc((chunks ? chunks : 1) * sizeof *partial);
    if (!partial) return LQ_ENOMEM;
    struct sum_job job = {x, count, partial};
    lq_parallel_for(chunks, 4, sum_body, &job);
    double total = 0.0;
    for (size_t i = 0; i < chunks; i++) total += partial[i];
    free(partial);
    *out = total;
    return LQ_OK;
}

/* ---------- linear layers ---------- */

/* Rows of Q dequantized per tile: about a million values (4 MB), as linear_cpu.c's prefill. */
static int tile_rows(int cols) {
    int rows = (1 << 20) / (cols > 0 ? cols : 1);
    return rows < 1 ? 1 : rows;
}

struct dequant_job {
    const struct lq_nf_matrix *q;
    size_t first;
    int cols;
    float *tile;
};

static void dequant_body(void *context, size_t begin, size_t end) {
    const struct dequant_job *job = context;
    lq_nf_dequantize_range(job->q, job->first + begin * (size_t)job->cols,
                           (end - begin) * (size_t)job->cols,
                           job->tile + begin * (size_t)job->cols);
}

/* dx[n, cols] += dy[n, rows] · Q, one tile of Q's rows at a time: dx += dy[:, tile] · Q[tile]. */
static int quantized_input_gradient(const struct lq_linear *w, const float *dy, int n, float *dx) {
    const int rows = w->rows, cols = w->cols;
    int step = tile_rows(cols);
    if (step > rows) step = rows;
    float *tile = malloc((size_t)step * cols * sizeof *tile);
    if (!tile) return LQ_ENOMEM;
    for (int r0 = 0; r0 < rows; r0 += step) {
        int count = rows - r0 < step ? rows - r0 : step;
        struct dequant_job job = {&w->q, (size_t)r0 * cols, cols, tile};
        lq_parallel_for((size_t)count, 16, dequant_body, &job);
        sgemm(CblasNoTrans, CblasNoTrans, n, cols, count, 1.0f, dy + r0, rows, tile, cols, 1.0f, dx,
              cols);
    }
    free(tile);
    return LQ_OK;
}

int lq_cpu_linear_lora(struct lq_backend *backend, const struct lq_linear *w, const float *L1,
                       const float *L2, int rank, const float *x, int n, float *y) {
    int rc = lq_cpu_linear(backend, w, x, n, y);
    if (rc || rank <= 0) return rc;
    /* y += (x · L2ᵀ) · L1ᵀ with the kernel lq_cpu_linear uses for a model's own pair, so a
     * trainable copy of that pair gives the logits inference gives, bit for bit. */
    float *t = malloc((size_t)n * rank * sizeof *t);
    if (!t) return LQ_ENOMEM;
    lq_cpu_gemm_nt(n, rank, w->cols, x, L2, t, rank, 0.0f);
    lq_cpu_gemm_nt(n, w->rows, rank, t, L1, y, w->rows, 1.0f);
    free(t);
    return LQ_OK;
}

int lq_cpu_linear_backward(struct lq_backend *backend, const struct lq_linear *w, const float *L1,
                           const float *L2, int rank, const float *x, const float *dy, int n,
                           float *dx, int accumulate_dx, float *dL1, float *dL2, float *dW) {
    const int rows = w->rows, cols = w->cols;
    if (dW && w->is_lq) return LQ_EINVAL; /* a quantized weight has no gradient here */
    if (dx && !w->is_lq) {
        sgemm(CblasNoTrans, CblasNoTrans, n, cols, rows, 1.0f, dy, rows, w->dense, cols,
              accumulate_dx ? 1.0f : 0.0f, dx, cols);
    } else if (dx) {
        if (!accumulate_dx) lq_cpu_zero(backend, dx, (size_t)n * cols);
        if (quantized_input_gradient(w, dy, n, dx)) return LQ_ENOMEM;
        if (w->rank > 0) { /* the frozen pair: dx += (dy · lora_B) · lora_A */
            float *u = malloc((size_t)n * w->rank * sizeof *u);
            if (!u) return LQ_ENOMEM;
            sgemm(CblasNoTrans, CblasNoTrans, n, w->rank, rows, 1.0f, dy, rows, w->lora_B, w->rank,
                  0.0f, u, w->rank);
            sgemm(CblasNoTrans, CblasNoTrans, n, cols, w->rank, 1.0f, u, w->rank, w->lora_A, cols,
                  1.0f, dx, cols);
            free(u);
        }
    }
    if (dW) sgemm(CblasTrans, CblasNoTrans, rows, cols, n, 1.0f, dy, rows, x, cols, 1.0f, dW, cols);
    if (rank <= 0) return LQ_OK;
    /* t = x · L2ᵀ and u = dy · L1, both [n, rank]: every gradient of the pair goes through
     * these thin products, never through a [rows, cols] matrix. */
    float *t = malloc((size_t)n * rank * sizeof *t), *u = malloc((size_t)n * rank * sizeof *u);
    if (!t || !u) {
        free(t), free(u);
        return LQ_ENOMEM;
    }
    sgemm(CblasNoTrans, CblasTrans, n, rank, cols, 1.0f, x, cols, L2, cols, 0.0f, t, rank);
    sgemm(CblasNoTrans, CblasNoTrans, n, rank, rows, 1.0f, dy, rows, L1, rank, 0.0f, u, rank);
    if (dL1)
        sgemm(CblasTrans, CblasNoTrans, rows, rank, n, 1.0f, dy, rows, t, rank, 1.0f, dL1, rank);
    if (dL2)
        sgemm(CblasTrans, CblasNoTrans, rank, cols, n, 1.0f, u, rank, x, cols, 1.0f, dL2, cols);
    if (dx)
        sgemm(CblasNoTrans, CblasNoTrans, n, cols, rank, 1.0f, u, rank, L2, cols, 1.0f, dx, cols);
    free(t), free(u);
    return LQ_OK;
}

int lq_cpu_matmul_backward(struct lq_backend *backend, const float *w, int rows, int cols,
                           const float *dy, int n, float *dx, int accumulate) {
    (void)backend;
    sgemm(CblasNoTrans, CblasNoTrans, n, cols, rows, 1.0f, dy, rows, w, cols,
          accumulate ? 1.0f : 0.0f, dx, cols);
    return LQ_OK;
}

/* ---------- normalization, rotary embedding, activation ---------- */

struct rmsnorm_job {
    const float *x, *weight, *dy;
    int dim;
    float eps;
    float *dx;
};

/* y = x·r⊙w with r = (mean x² + eps)^(-1/2), so ∂r/∂x_k = −r³·x_k/dim and
 * dx_k = r·w_k·dy_k − r³·x_k/dim · Σ_j dy_j·w_j·x_j. */
static void rmsnorm_backward_body(void *context, size_t begin, size_t end) {
    const struct rmsnorm_job *job = context;
    const int dim = job->dim;
    for (size_t i = begin; i < end; i++) {
        const float *x = job->x + i * dim, *dy = job->dy + i * dim, *w = job->weight;
        float *dx = job->dx + i * dim;
        double sum = 0.0, dot = 0.0;
        for (int j = 0; j < dim; j++) {
            sum += (double)x[j] * x[j];
            dot += (double)dy[j] * w[j] * x[j];
        }
        double r = 1.0 / sqrt(sum / dim + job->eps), coefficient = r * r * r * dot / dim;
        for (int j = 0; j < dim; j++) dx[j] += (float)(r * w[j] * dy[j] - coefficient * x[j]);
    }
}

int lq_cpu_rmsnorm_backward(struct lq_backend *backend, const float *x, const float *weight,
                            const float *dy, int n, int dim, float eps, float *dx) {
    (void)backend;
    struct rmsnorm_job job = {x, weight, dy, dim, eps, dx};
    lq_parallel_for((size_t)n, min_per_thread((size_t)dim * 8), rmsnorm_backward_body, &job);
    return LQ_OK;
}

struct rope_job {
    float *x;
    int heads, head_dim;
    const int *positions;
    float theta;
};

/* The forward rotates each pair (x0, x1) by +angle; its transpose rotates the gradient by
 * −angle. The angle is computed exactly as backend_cpu.c's rope computes it. */
static void rope_backward_body(void *context, size_t begin, size_t end) {
    const struct rope_job *job = context;
    const int hd = job->head_dim, half = hd / 2;
    for (size_t i = begin; i < end; i++) {
        for (int k = 0; k < half; k++) {
            double angle = job->positions[i] * pow((double)job->theta, -2.0 * k / hd);
            float c = (float)cos(angle), s = (float)sin(angle);
            for (int h = 0; h < job->heads; h++) {
                float *v = job->x + (i * job->heads + h) * hd;
                float g0 = v[k], g1 = v[k + half];
                v[k] = g0 * c + g1 * s;
                v[k + half] = g1 * c - g0 * s;
            }
        }
    }
}

int lq_cpu_rope_backward(struct lq_backend *backend, float *dx, int n, int heads, int head_dim,
                         const int *positions, float theta) {
    (void)backend;
    struct rope_job job = {dx, heads, head_dim, positions, theta};
    lq_parallel_for((size_t)n, min_per_thread((size_t)head_dim * 64), rope_backward_body, &job);
    return LQ_OK;
}

struct swiglu_job {
    const float *gate, *up, *dout;
    float *dgate, *dup;
};

static void swiglu_backward_body(void *context, size_t begin, size_t end) {
    const struct swiglu_job *job = context;
    for (size_t i = begin; i < end; i++) {
        float g = job->gate[i], d = job->dout[i], s = 1.0f / (1.0f + expf(-g));
        job->dup[i] = d * (g * s);
        job->dgate[i] =
            d * job->up[i] * (s * (1.0f + g * (1.0f - s))); /* silu' = s(1 + g(1 − s)) */
    }
}

int lq_cpu_swiglu_backward(struct lq_backend *backend, const float *gate, const float *up,
                           const float *dout, size_t count, float *dgate, float *dup) {
    (void)backend;
    struct swiglu_job job = {gate, up, dout, dgate, dup};
    lq_parallel_for(count, ELEMENTS_PER_THREAD, swiglu_backward_body, &job);
    return LQ_OK;
}

/* ---------- attention ---------- */

struct attention_backward_job {
    const float *q, *k, *v, *dout;
    int n, heads, kv_heads, head_dim;
    float *dq, *dk, *dv;
    int failed;
};

/* Rows of scores[n, n] (scale already applied) to causal softmax probabilities, as the
 * forward's prefill path computes them; the masked upper triangle is set to 0. */
static void causal_softmax(float *scores, int n) {
    for (int i = 0; i < n; i++) {
        float *row = scores + (size_t)i * n, max = -INFINITY;
        for (int t = 0; t <= i; t++) max = row[t] > max ? row[t] : max;
        double sum = 0.0;
        for (int t = 0; t <= i; t++) {
            row[t] = expf(row[t] - max);
            sum += row[t];
        }
        float inverse = (float)(1.0 / sum);
        for (int t = 0; t <= i; t++) row[t] *= inverse;
        for (int t = i + 1; t < n; t++) row[t] = 0.0f;
    }
}

/* One task is one (sequence, KV head): it owns that head's columns of dk and dv, and the
 * columns of dq of the query heads that share it, so tasks never write the same memory. Per
 * query head h: S = scale·Q_h·Kᵀ, P = softmax(S), dV += Pᵀ·dO_h, dP = dO_h·Vᵀ,
 * dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ_h = scale·dS·K, dK += scale·dSᵀ·Q_h. */
static void attention_backward_body(void *context, size_t begin, size_t end) {
    struct attention_backward_job *job = context;
    const int n = job->n, hd = job->head_dim, group = job->heads / job->kv_heads;
    const int q_ld = job->heads * hd, kv_ld = job->kv_heads * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float *p = malloc((size_t)n * n * sizeof *p), *dp = malloc((size_t)n * n * sizeof *dp);
    if (!p || !dp) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
        free(p), free(dp);
        return;
    }
    for (size_t task = begin; task < end; task++) {
        size_t sequence = task / (size_t)job->kv_heads, g = task % (size_t)job->kv_heads;
        size_t q_base = sequence * n * (size_t)q_ld,
               kv_base = sequence * n * (size_t)kv_ld + g * hd;
        const float *k = job->k + kv_base, *v = job->v + kv_base;
        float *dk = job->dk + kv_base, *dv = job->dv + kv_base;
        for (int j = 0; j < group; j++) {
            size_t column = q_base + (g * group + j) * (size_t)hd;
            const float *q = job->q + column, *dout = job->dout + column;
            float *dq = job->dq + column;
            float first = j == 0 ? 0.0f : 1.0f; /* the first head of the group overwrites */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, hd, scale, q, q_ld, k, kv_ld,
                        0.0f, p, n);
            causal_softmax(p, n);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, hd, n, 1.0f, p, n, dout, q_ld,
                        first, dv, kv_ld);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, hd, 1.0f, dout, q_ld, v,
                        kv_ld, 0.0f, dp, n);
            for (int i = 0; i < n; i++) {
                const float *pi = p + (size_t)i * n;
                float *di = dp + (size_t)i * n;
                double dot = 0.0;
                for (int t = 0; t <= i; t++) dot += (double)pi[t] * di[t];
                for (int t = 0; t <= i; t++) di[t] = pi[t] * (di[t] - (float)dot);
                for (int t = i + 1; t < n; t++) di[t] = 0.0f;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hd, n, scale, dp, n, k, kv_ld,
                        0.0f, dq, q_ld);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, hd, n, scale, dp, n, q, q_ld,
                        first, dk, kv_ld);
        }
    }
    free(p), free(dp);
}

int lq_cpu_attention_backward(struct lq_backend *backend, const float *q, const float *k,
                              const float *v, const float *dout, int batch, int n, int heads,
                              int kv_heads, int head_dim, float *dq, float *dk, float *dv) {
    (void)backend;
    if (heads % kv_heads) return LQ_EINVAL;
    struct attention_backward_job job = {q,        k,        v,  dout, n,  heads,
                                         kv_heads, head_dim, dq, dk,   dv, 0};
    size_t tasks = (size_t)batch * kv_heads;
    size_t per_task = (size_t)(heads / kv_heads) * n * n * head_dim * 5;
    lq_parallel_for(tasks, min_per_thread(per_task), attention_backward_body, &job);
    return job.failed ? LQ_ENOMEM : LQ_OK;
}

/* ---------- loss ---------- */

struct cross_entropy_job {
    const float *logits;
    const int *targets;
    const unsigned char *mask;
    int vocab;
    float grad_scale;
    double *losses;
    float *dlogits;
};

static void cross_entropy_body(void *context, size_t begin, size_t end) {
    const struct cross_entropy_job *job = context;
    const int vocab = job->vocab;
    for (size_t i = begin; i < end; i++) {
        const float *row = job->logits + i * vocab;
        float *d = job->dlogits ? job->dlogits + i * vocab : NULL;
        if (job->mask && !job->mask[i]) {
            job->losses[i] = 0.0;
            if (d) memset(d, 0, (size_t)vocab * sizeof *d);
            continue;
        }
        float max = -INFINITY;
        for (int j = 0; j < vocab; j++) max = row[j] > max ? row[j] : max;
        double sum = 0.0;
        for (int j = 0; j < vocab; j++) sum += exp((double)row[j] - max);
        int target = job->targets[i];
        job->losses[i] = log(sum) + max - row[target]; /* read before d overwrites row */
        if (!d) continue;
        double inverse = 1.0 / sum;
        for (int j = 0; j < vocab; j++) {
            double probability = exp((double)row[j] - max) * inverse;
            d[j] = (float)(job->grad_scale * (probability - (j == target)));
        }
    }
}

int lq_cpu_cross_entropy(struct lq_backend *backend, const float *logits, const int *targets,
                         const unsigned char *mask, int n, int vocab, float grad_scale,
                         double *loss_sum, float *dlogits) {
    (void)backend;
    for (int i = 0; i < n; i++)
        if ((!mask || mask[i]) && (targets[i] < 0 || targets[i] >= vocab)) return LQ_EINVAL;
    double *losses = malloc((size_t)(n > 0 ? n : 1) * sizeof *losses);
    if (!losses) return LQ_ENOMEM;
    struct cross_entropy_job job = {logits, targets, mask, vocab, grad_scale, losses, dlogits};
    lq_parallel_for((size_t)n, min_per_thread((size_t)vocab * 16), cross_entropy_body, &job);
    double total = 0.0;
    for (int i = 0; i < n; i++) total += losses[i]; /* in token order, whatever the threads */
    free(losses);
    *loss_sum += total;
    return LQ_OK;
}

/* ---------- optimizer ---------- */

struct adamw_job {
    float *params, *m, *v;
    const float *grads;
    float decay, beta1, beta2, step_size, correction2_sqrt, eps, grad_scale;
};

static void adamw_body(void *context, size_t begin, size_t end) {
    const struct adamw_job *job = context;
    for (size_t i = begin; i < end; i++) {
        float g = job->grads[i] * job->grad_scale;
        float m = job->beta1 * job->m[i] + (1.0f - job->beta1) * g;
        float v = job->beta2 * job->v[i] + (1.0f - job->beta2) * (g * g);
        float p = job->params[i] * job->decay;
        job->m[i] = m, job->v[i] = v;
        job->params[i] = p - job->step_size * (m / (sqrtf(v) / job->correction2_sqrt + job->eps));
    }
}

int lq_cpu_adamw(struct lq_backend *backend, float *params, const float *grads, float *m, float *v,
                 size_t count, const struct lq_adamw_params *hyper) {
    (void)backend;
    if (hyper->step < 1) return LQ_EINVAL;
    double correction1 = 1.0 - pow(hyper->beta1, (double)hyper->step);
    double correction2 = 1.0 - pow(hyper->beta2, (double)hyper->step);
    struct adamw_job job = {params,
                            m,
                            v,
                            grads,
                            (float)(1.0 - (double)hyper->learning_rate * hyper->weight_decay),
                            hyper->beta1,
                            hyper->beta2,
                            (float)(hyper->learning_rate / correction1),
                            (float)sqrt(correction2),
                            hyper->eps,
                            hyper->grad_scale};
    lq_parallel_for(count, ELEMENTS_PER_THREAD, adamw_body, &job);
    return LQ_OK;
}
