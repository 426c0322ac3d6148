/* Decode throughput of continuous batching: tokens per second of lq_forward_batch with 1, 8 and
 * 32 sequences, against the same sequences stepped one lq_session_forward at a time. Each
 * sequence decodes positions 1..255 (attention over 128 positions on average; 1..31 for the
 * synthetic model). Wall time;
 * prints figures, no pass/fail (exit status 1 only if a forward pass fails).
 * Usage: bench_forward_batch [MODEL] (default $LQ_REPO_ROOT/models/stories260K-hf), or
 * bench_forward_batch --synthetic: random weights shaped like a 110M-parameter LLaMA (dim 768,
 * 12 layers, hidden 2048, vocab 32000), where the linear layers dominate as in real models;
 * stories260K, with head_dim 8, spends most of its time in attention, which batching does not
 * share. Options after MODEL: --positions N (default 256), --rounds R (best of R, default 3),
 * --batched-only (skip the one-at-a-time comparison: quick A/B runs of a kernel change). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/forward.h"

enum { MAX_BATCH = 32 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Tokens per second decoding n sequences, batched or one by one. */
static double measure(struct lq_runtime *runtime, struct lq_session **sessions, int n, int batched,
                      int positions, int rounds, float *logits, struct lq_error *err) {
    struct lq_batch *batch = NULL;
    if (lq_batch_create(runtime, n, &batch, err)) return -1;
    int vocab = lq_runtime_config(runtime)->vocab_size, tokens[MAX_BATCH];
    double best = 0;
    for (int round = 0; round < rounds; round++) {
        for (int i = 0; i < n; i++) {
            lq_session_reset(sessions[i]);
            int bos = 1;
            if (lq_session_forward(sessions[i], &bos, 1, 0, logits, err)) return -1;
        }
        double start = now();
        for (int step = 1; step < positions; step++) {
            for (int i = 0; i < n; i++) tokens[i] = (step * 31 + i * 7) % vocab;
            if (batched) {
                if (lq_forward_batch(batch, sessions, tokens, n, logits, err)) return -1;
            } else {
                for (int i = 0; i < n; i++)
                    if (lq_session_forward(sessions[i], &tokens[i], 1, 0, logits, err)) return -1;
            }
        }
        double rate = (double)n * (positions - 1) / (now() - start);
        best = rate > best ? rate : best;
    }
    lq_batch_free(batch);
    return best;
}

static float *random_array(size_t count, float scale, unsigned *state) {
    float *a = malloc(count * sizeof *a);
    for (size_t i = 0; a && i < count; i++) {
        *state = *state * 1664525u + 1013904223u;
        a[i] = scale * ((float)(*state >> 8) / 16777216.0f - 0.5f);
    }
    return a;
}

static int synthetic_model(struct lq_model **out, struct lq_error *err) {
    struct lq_model *m = calloc(1, sizeof *m);
    if (!m) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    struct lq_model_config c = {768, 12, 12, 12, 64, 2048, 32000, 1024, 10000.0f, 1e-5f, 1, 1, 2};
    m->config = c;
    unsigned state = 1;
    m->embed = random_array((size_t)c.vocab_size * c.dim, 0.1f, &state);
    m->lm_head = m->embed;
    m->final_norm = random_array((size_t)c.dim, 0.1f, &state);
    m->layers = calloc((size_t)c.n_layers, sizeof *m->layers);
    int ok = m->embed && m->final_norm && m->layers;
    for (int l = 0; l < c.n_layers && ok; l++) {
        struct lq_layer *layer = &m->layers[l];
        layer->attn_norm = random_array((size_t)c.dim, 2.0f, &state);
        layer->ffn_norm = random_array((size_t)c.dim, 2.0f, &state);
        ok = layer->attn_norm && layer->ffn_norm;
        const int rows[] = {c.dim, c.dim, c.dim, c.dim, c.hidden_dim, c.hidden_dim, c.dim};
        const int cols[] = {c.dim, c.dim, c.dim, c.dim, c.dim, c.dim, c.hidden_dim};
        for (int k = 0; k < LQ_LINEARS_PER_LAYER && ok; k++) {
            struct lq_linear *w = &layer->linear[k];
            w->rows = rows[k], w->cols = cols[k];
            ok = (w->dense = random_array((size_t)rows[k] * cols[k], 0.1f, &state)) != NULL;
        }
    }
    *out = m;
    return ok ? LQ_OK : lq_error_set(err, LQ_ENOMEM, "out of memory");
}

int main(int argc, char **argv) {
    char path[1024];
    const char *root = getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
    snprintf(path, sizeof path, "%s/models/stories260K-hf", root);
    const char *model_path = argc > 1 && argv[1][0] != '-' ? argv[1] : path;
    int synthetic = argc > 1 && strcmp(argv[1], "--synthetic") == 0;
    int positions_option = 0, rounds_option = 0, batched_only = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--positions") == 0 && i + 1 < argc)
            positions_option = atoi(argv[++i]);
        else if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc)
            rounds_option = atoi(argv[++i]);
        else if (strcmp(argv[i], "--batched-only") == 0)
            batched_only = 1;
    }
    struct lq_error err = {0};
    struct lq_model *model = NULL;
    struct lq_backend *backend = NULL;
    struct lq_runtime *runtime = NULL;
    struct lq_session *sessions[MAX_BATCH] = {0};
    float *logits = NULL;
    int status = 1;
    if ((synthetic ? synthetic_model(&model, &err) : lq_model_load(model_path, &model, &err)) ||
        lq_backend_cpu_create(&backend, &err) || lq_runtime_create(backend, model, &runtime, &err))
        goto done;
    logits = malloc((size_t)MAX_BATCH * model->config.vocab_size * sizeof *logits);
    /* the synthetic model is ~400 times slower per token: fewer positions, one round */
    int positions = synthetic ? 32 : 256, rounds = synthetic ? 1 : 3;
    if (positions_option >= 2) positions = positions_option;
    if (rounds_option >= 1) rounds = rounds_option;
    int context = model->config.max_seq_len < positions ? model->config.max_seq_len : positions;
    for (int i = 0; i < MAX_BATCH; i++)
        if (lq_session_create(runtime, context, 1, &sessions[i], &err)) goto done;
    printf("%s on %s: decode tokens/s, %d positions per sequence\n", model_path, backend->ops->name,
           context);
    const int sizes[] = {1, 8, 32};
    for (int k = 0; k < 3; k++) {
        double batched = measure(runtime, sessions, sizes[k], 1, context, rounds, logits, &err);
        double alone = batched_only
                           ? 1.0
                           : measure(runtime, sessions, sizes[k], 0, context, rounds, logits, &err);
        if (batched < 0 || alone < 0) goto done;
        printf("batch %2d: lq_forward_batch %9.0f tokens/s, one session at a time %9.0f tokens/s "
               "(x%.2f)\n",
               sizes[k], batched, alone, batched / alone);
    }
    status = 0;
done:
    if (status) fprintf(stderr, "bench_forward_batch: %s\n", err.message);
    for (int i = 0; i < MAX_BATCH; i++) lq_session_free(sessions[i]);
    free(logits);
    lq_runtime_free(runtime);
    if (backend) backend->ops->destroy(backend);
    lq_model_free(model);
    return status;
}
