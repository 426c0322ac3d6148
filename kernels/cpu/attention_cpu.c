/* Causal grouped-query attention on the CPU: one task per (token, head), in parallel. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/parallel.h"
#include "kernels/cpu/cpu_ops.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#endif
typedef float attention_v8 __attribute__((vector_size(32)));

/* q·k over hd values in 8 lanes (lane j takes d ≡ j mod 8), the lanes summed in a fixed tree,
 * then the leftover values in order: the same bits for a task whatever else runs, and 8
 * independent additions per step where one chain of hd dependent ones was the decode profile's
 * third largest item. */
static inline float dot_lanes(const float *q, const float *k, int hd) {
    attention_v8 acc = {0};
    int d = 0;
    for (; d + 8 <= hd; d += 8) {
        attention_v8 a, b;
        memcpy(&a, q + d, sizeof a);
        memcpy(&b, k + d, sizeof b);
        acc += a * b;
    }
    float dot = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; d < hd; d++) dot += q[d] * k[d];
    return dot;
}

/* One (token, head) of decode-style attention: q_h (hd values) against cache positions
 * 0..last, into o (hd values). scores holds last + 1 floats. Both the single-sequence op and the
 * batch op run every task through here, so a token's output has the same bits either way. */
LQ_VECTOR_CLONES
static void attend_one(const float *q, const float *k, const float *v, int last, int hd, int kv_dim,
                       float *scores, float *o) {
    const float scale = 1.0f / sqrtf((float)hd);
    float max = -INFINITY;
    for (int t = 0; t <= last; t++) {
        scores[t] = dot_lanes(q, k + (size_t)t * kv_dim, hd) * scale;
        max = scores[t] > max ? scores[t] : max;
    }
    double sum = 0.0;
    for (int t = 0; t <= last; t++) {
        scores[t] = expf(scores[t] - max);
        sum += scores[t];
    }
    for (int d = 0; d < hd; d++) o[d] = 0.0f;
    float inverse = (float)(1.0 / sum);
    for (int t = 0; t <= last; t++) {
        const float *vt = v + (size_t)t * kv_dim;
        float p = scores[t] * inverse;
        for (int d = 0; d < hd; d++) o[d] += p * vt[d];
    }
}

/* Tasks (token, head) of decode-style attention: token i's query row q + i * heads * hd attends
 * to positions 0..positions[i] of caches[i] (one sequence's caches each, or one shared). */
struct attention_job {
    const float *q;
    const float *const *k_caches, *const *v_caches; /* [tokens] */
    const int *positions;                           /* [tokens]: the last position each sees */
    int heads, kv_heads, head_dim;
    float *out;
};

static void attention_body(void *context, size_t begin, size_t end) {
    const struct attention_job *job = context;
    const int hd = job->head_dim, kv_dim = job->kv_heads * hd, group = job->heads / job->kv_heads;
    int capacity = 0;
    float *scores = NULL;
    for (size_t task = begin; task < end; task++) {
        int token = (int)(task / (size_t)job->heads), head = (int)(task % (size_t)job->heads);
        int last = job->positions[token];
        if (last + 1 > capacity) {
            free(scores);
            capacity = last + 1;
            scores = malloc((size_t)capacity * sizeof *scores);
            if (!scores) return; /* leaves out untouched; the caller's poisoning shows it */
        }
        size_t offset = ((size_t)token * job->heads + head) * hd;
        attend_one(job->q + offset, job->k_caches[token] + (size_t)(head / group) * hd,
                   job->v_caches[token] + (size_t)(head / group) * hd, last, hd, kv_dim, scores,
                   job->out + offset);
    }
    free(scores);
}

/* Runs the tasks of tokens whose last positions are `positions`; `span` is about the positions
 * each attends to (the work of a task is span · hd). */
static void attention_run(struct attention_job *job, int tokens, size_t span) {
    size_t tasks = (size_t)tokens * (size_t)job->heads;
    /* each task costs ~ span * head_dim: split only when that is worth a thread (16K, since the
     * pool's threads spin between loops) */
    size_t per_task = span * (size_t)job->head_dim;
    lq_parallel_for(tasks, per_task >= 16384 ? 1 : 16384 / per_task + 1, attention_body, job);
}

/* Prefill: per head, scores = Q_h·K_hᵀ and out_h = softmax(scores)·V_h as two GEMMs over all n
 * new tokens at once (strided views of q and the cache, no copies). */
struct prefill_job {
    const float *q, *k_cache, *v_cache;
    int n, start, heads, kv_heads, head_dim;
    float *out;
};

static void prefill_body(void *context, size_t first_head, size_t end_head) {
    const struct prefill_job *job = context;
    const int hd = job->head_dim, n = job->n, total = job->start + n;
    const int q_ld = job->heads * hd, kv_ld = job->kv_heads * hd,
              group = job->heads / job->kv_heads;
    float *scores = malloc((size_t)n * total * sizeof *scores);
    if (!scores) return;
    const float scale = 1.0f / sqrtf((float)hd);
    for (size_t h = first_head; h < end_head; h++) {
        const float *q = job->q + h * (size_t)hd;
        const float *k = job->k_cache + (size_t)(h / (size_t)group) * hd;
        const float *v = job->v_cache + (size_t)(h / (size_t)group) * hd;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, total, hd, scale, q, q_ld, k, kv_ld,
                    0.0f, scores, total);
        for (int i = 0; i < n; i++) {
            float *row = scores + (size_t)i * total;
            int last = job->start + i;
            float max = -INFINITY;
            for (int t = 0; t <= last; t++) max = row[t] > max ? row[t] : max;
            double sum = 0.0;
            for (int t = 0; t <= last; t++) {
                row[t] = expf(row[t] - max);
                sum += row[t];
            }
            float inverse = (float)(1.0 / sum);
            for (int t = 0; t <= last; t++) row[t] *= inverse;
            for (int t = last + 1; t < total; t++) row[t] = 0.0f; /* causal mask */
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hd, total, 1.0f, scores, total, v,
                    kv_ld, 0.0f, job->out + h * (size_t)hd, q_ld);
    }
    free(scores);
}

int lq_cpu_attention(struct lq_backend *backend, const float *q, const float *k_cache,
                     const float *v_cache, int n, int start, int heads, int kv_heads, int head_dim,
                     float *out) {
    (void)backend;
    if (n >= 16) {
        struct prefill_job job = {q, k_cache, v_cache, n, start, heads, kv_heads, head_dim, out};
        size_t per_head = (size_t)n * (size_t)(start + n) * (size_t)head_dim;
        lq_parallel_for((size_t)heads, per_head >= 65536 ? 1 : 65536 / per_head + 1, prefill_body,
                        &job);
        return LQ_OK;
    }
    /* the cache pointers and last positions of each token, for the shared task body */
    const float *k_caches[16], *v_caches[16];
    int positions[16];
    for (int i = 0; i < n; i++)
        k_caches[i] = k_cache, v_caches[i] = v_cache, positions[i] = start + i;
    struct attention_job job = {q, k_caches, v_caches, positions, heads, kv_heads, head_dim, out};
    attention_run(&job, n, (size_t)(start + n));
    return LQ_OK;
}

int lq_cpu_attention_decode(const float *q, const float *const *k_caches,
                            const float *const *v_caches, const int *positions, int n, int heads,
                            int kv_heads, int head_dim, float *out) {
    size_t span = 0;
    for (int i = 0; i < n; i++) span += (size_t)positions[i] + 1;
    struct attention_job job = {q, k_caches, v_caches, positions, heads, kv_heads, head_dim, out};
    attention_run(&job, n, n ? span / (size_t)n : 1);
    return LQ_OK;
}
