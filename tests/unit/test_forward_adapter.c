/* Adapters in the forward pass (core/forward_adapter.c) on the CPU backend:
 *  - a decode step mixing sequences on two REPLACE adapters, an ADD adapter and the bare LQ
 *    model gives every sequence, bit for bit, the logits it gets decoded alone (in any order
 *    of the batch, adapters interleaved or grouped);
 *  - a REPLACE adapter is bit for bit the LQ model whose L1, L2 were replaced by the adapter's
 *    (prefill of 100 tokens, above the row-wise kernel's 64, and decode);
 *  - an ADD adapter on the dense model is the model with W + L1·L2 (to rounding), and also
 *    batches bit-identically with the bare model;
 *  - misuse is refused: an adapter that does not fit, one prepared for another runtime. */
#include "core/adapter.h"
#include "core/forward.h"
#include "core/rng.h"
#include "tests/unit/lq_test.h"

#include <stdint.h>

static const char *root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

static struct lq_model *load(const char *relative) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", root(), relative);
    struct lq_model *model = NULL;
    struct lq_error err = {0};
    CHECK_MSG(lq_model_load(path, &model, &err) == 0, "%s", err.message);
    return model;
}

static float *copy_floats(const float *from, size_t count) {
    float *to = malloc(count * sizeof *to);
    memcpy(to, from, count * sizeof *to);
    return to;
}

/* Gives matrix m a pair: the model's own (REPLACE) plus noise of `scale`, or a fresh one of
 * `rank` (ADD). */
static void fill_pair(struct lq_adapter_matrix *m, const struct lq_linear *w, int rank,
                      const float *own_L1, const float *own_L2, float scale, struct lq_rng *rng) {
    m->rank = rank, m->rows = w->rows, m->cols = w->cols;
    size_t n1 = (size_t)w->rows * rank, n2 = (size_t)rank * w->cols;
    m->L1 = malloc(n1 * sizeof(float));
    m->L2 = malloc(n2 * sizeof(float));
    lq_rng_fill_normal(rng, m->L1, n1);
    lq_rng_fill_normal(rng, m->L2, n2);
    for (size_t i = 0; i < n1; i++) m->L1[i] = (own_L1 ? own_L1[i] : 0.0f) + scale * m->L1[i];
    for (size_t i = 0; i < n2; i++) m->L2[i] = (own_L2 ? own_L2[i] : 0.0f) + scale * m->L2[i];
}

/* A REPLACE adapter: every LQ pair of model, perturbed. */
static struct lq_adapter *replace_adapter(const struct lq_model *model, uint64_t seed) {
    struct lq_adapter *a = NULL;
    CHECK(lq_adapter_create(model->config.n_layers, LQ_ADAPTER_REPLACE, &a, NULL) == 0);
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    for (int l = 0; l < model->config.n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            const struct lq_linear *w = &model->layers[l].linear[k];
            fill_pair(lq_adapter_matrix(a, l, (enum lq_linear_kind)k), w, w->rank, w->lora_B,
                      w->lora_A, 0.05f, &rng);
        }
    return a;
}

/* An ADD adapter of `rank` on the kinds whose bit is set in `kinds` (others rank 0). */
static struct lq_adapter *add_adapter(const struct lq_model *model, int rank, unsigned kinds,
                                      uint64_t seed) {
    struct lq_adapter *a = NULL;
    CHECK(lq_adapter_create(model->config.n_layers, LQ_ADAPTER_ADD, &a, NULL) == 0);
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    for (int l = 0; l < model->config.n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++)
            if (kinds & (1u << k))
                fill_pair(lq_adapter_matrix(a, l, (enum lq_linear_kind)k),
                          &model->layers[l].linear[k], rank, NULL, NULL, 0.1f, &rng);
    return a;
}

static uint32_t next_random(uint32_t *state) {
    *state = *state * 1664525u + 1013904223u;
    return *state >> 8;
}

#define SEQUENCES 24
#define STEPS 24

/* SEQUENCES pairs of sessions, sequence i on adapters[i % n_adapters] (NULL: bare); decode
 * steps of changing subsets, batched (in shuffled order) on one side and one by one on the
 * other, must agree bit for bit. Returns the number of rows compared. */
static size_t check_mixed_batches(struct lq_runtime *runtime,
                                  const struct lq_adapter_weights *const *adapters, int n_adapters,
                                  const char *label) {
    const int vocab = lq_runtime_config(runtime)->vocab_size;
    struct lq_session *batched[SEQUENCES], *alone[SEQUENCES];
    struct lq_batch *batch = NULL;
    struct lq_error err = {0};
    CHECK(lq_batch_create(runtime, SEQUENCES, &batch, &err) == 0);
    float *logits = malloc((size_t)SEQUENCES * vocab * sizeof *logits);
    float *reference = malloc((size_t)vocab * sizeof *reference);
    uint32_t random = 777;
    for (int i = 0; i < SEQUENCES; i++) {
        const struct lq_adapter_weights *adapter = adapters[i % n_adapters];
        CHECK(lq_session_create(runtime, 256, 64, &batched[i], &err) == 0);
        CHECK(lq_session_create(runtime, 256, 64, &alone[i], &err) == 0);
        CHECK(lq_session_set_adapter(batched[i], adapter, &err) == 0);
        CHECK(lq_session_set_adapter(alone[i], adapter, &err) == 0);
        CHECK(lq_session_adapter(alone[i]) == adapter);
        int prompt[32], length = 1 + (i * 5) % 19;
        for (int t = 0; t < length; t++) prompt[t] = 3 + (int)(next_random(&random) % 500);
        CHECK(lq_session_forward(batched[i], prompt, length, 0, logits, &err) == 0);
        CHECK(lq_session_forward(alone[i], prompt, length, 0, reference, &err) == 0);
    }
    size_t mismatched = 0, rows = 0;
    double worst = 0;
    for (int step = 0; step < STEPS; step++) {
        struct lq_session *members[SEQUENCES];
        int tokens[SEQUENCES], index[SEQUENCES], n = 0;
        for (int i = 0; i < SEQUENCES; i++)
            if ((i * 3 + step) % 5 != 0 || step % 7 == 0) index[n++] = i;
        /* even steps: a shuffled order (adapters interleaved, many runs); odd: grouped */
        for (int j = n - 1; j > 0 && step % 2 == 0; j--) {
            int k = (int)(next_random(&random) % (uint32_t)(j + 1)), t = index[j];
            index[j] = index[k], index[k] = t;
        }
        if (step % 2 == 1) {
            int grouped = 0, order[SEQUENCES];
            for (int a = 0; a < n_adapters; a++)
                for (int j = 0; j < n; j++)
                    if (index[j] % n_adapters == a) order[grouped++] = index[j];
            memcpy(index, order, (size_t)n * sizeof *index);
        }
        for (int j = 0; j < n; j++) {
            members[j] = batched[index[j]];
            tokens[j] = (int)(next_random(&random) % (uint32_t)vocab);
        }
        CHECK_MSG(lq_forward_batch(batch, members, tokens, n, logits, &err) == 0, "%s",
                  err.message);
        for (int j = 0; j < n; j++) {
            CHECK(lq_session_forward(alone[index[j]], &tokens[j], 1, 0, reference, &err) == 0);
            const float *row = logits + (size_t)j * vocab;
            for (int v = 0; v < vocab; v++) worst = fmax(worst, fabs(row[v] - reference[v]));
            mismatched += memcmp(row, reference, (size_t)vocab * sizeof(float)) != 0;
            rows++;
        }
    }
    CHECK_MSG(mismatched == 0, "%s: %zu of %zu rows differ from the sequence decoded alone (%g)",
              label, mismatched, rows, worst);
    for (int i = 0; i < SEQUENCES; i++) {
        lq_session_free(batched[i]);
        lq_session_free(alone[i]);
    }
    lq_batch_free(batch);
    free(logits);
    free(reference);
    return rows;
}

/* The last-token logits of `tokens` (n of them, prefilled in one call) then of each of
 * `decode` more, on a fresh session of runtime with adapter. */
static float *run_sequence(struct lq_runtime *runtime, const struct lq_adapter_weights *adapter,
                           const int *tokens, int n, int decode) {
    const int vocab = lq_runtime_config(runtime)->vocab_size;
    float *out = malloc((size_t)(1 + decode) * vocab * sizeof *out);
    struct lq_session *session = NULL;
    struct lq_error err = {0};
    CHECK(lq_session_create(runtime, 256, 128, &session, &err) == 0);
    CHECK(lq_session_set_adapter(session, adapter, &err) == 0);
    CHECK(lq_session_forward(session, tokens, n, 0, out, &err) == 0);
    for (int i = 0; i < decode; i++)
        CHECK(lq_session_forward(session, &tokens[i], 1, 0, out + (size_t)(1 + i) * vocab, &err) ==
              0);
    lq_session_free(session);
    return out;
}

static void test_lq_mixed_batch_is_batch_invariant(void) {
    struct lq_model *model = load("models/stories260K-lq");
    if (!model) return;
    struct lq_backend *backend = NULL;
    struct lq_runtime *runtime = NULL;
    struct lq_error err = {0};
    CHECK(lq_backend_cpu_create(&backend, &err) == 0);
    CHECK(lq_runtime_create(backend, model, &runtime, &err) == 0);
    struct lq_adapter *a = replace_adapter(model, 1), *b = replace_adapter(model, 2);
    /* q, v and down_proj only */
    struct lq_adapter *c =
        add_adapter(model, 3, (1u << LQ_Q_PROJ) | (1u << LQ_V_PROJ) | (1u << LQ_DOWN_PROJ), 3);
    struct lq_adapter_weights *wa = NULL, *wb = NULL, *wc = NULL;
    CHECK_MSG(lq_adapter_weights_create(runtime, a, &wa, &err) == 0, "%s", err.message);
    CHECK_MSG(lq_adapter_weights_create(runtime, b, &wb, &err) == 0, "%s", err.message);
    CHECK_MSG(lq_adapter_weights_create(runtime, c, &wc, &err) == 0, "%s", err.message);
    CHECK(lq_adapter_weights_bytes(wa) > 0 && lq_adapter_weights_bytes(wc) > 0);
    const struct lq_adapter_weights *mix[] = {NULL, wa, wb, wc};
    CHECK(check_mixed_batches(runtime, mix, 4, "LQ, bare + 2 replace + add") > 300);
    /* the adapters do change the model */
    int tokens[8] = {1, 403, 407, 261, 378, 13, 59, 300};
    float *bare = run_sequence(runtime, NULL, tokens, 8, 0);
    float *on_a = run_sequence(runtime, wa, tokens, 8, 0);
    float *on_c = run_sequence(runtime, wc, tokens, 8, 0);
    CHECK(memcmp(bare, on_a, 512 * sizeof(float)) != 0);
    CHECK(memcmp(bare, on_c, 512 * sizeof(float)) != 0);
    free(bare), free(on_a), free(on_c);
    lq_adapter_weights_free(wa), lq_adapter_weights_free(wb), lq_adapter_weights_free(wc);
    lq_adapter_free(a), lq_adapter_free(b), lq_adapter_free(c);
    lq_runtime_free(runtime);
    backend->ops->destroy(backend);
    lq_model_free(model);
}

/* Serving with a REPLACE adapter is the LQ model with its L1, L2 replaced, bit for bit, on
 * both paths of the CPU linear (OpenBLAS above 64 tokens, the row-wise kernel below). */
static void test_replace_equals_replaced_model(void) {
    struct lq_model *model = load("models/stories260K-lq");
    struct lq_model *replaced = load("models/stories260K-lq");
    if (!model || !replaced) return;
    struct lq_adapter *a = replace_adapter(model, 9);
    for (int l = 0; l < model->config.n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            struct lq_linear *w = &replaced->layers[l].linear[k];
            const struct lq_adapter_matrix *m = lq_adapter_matrix(a, l, (enum lq_linear_kind)k);
            memcpy(w->lora_B, m->L1, (size_t)m->rows * m->rank * sizeof(float));
            memcpy(w->lora_A, m->L2, (size_t)m->rank * m->cols * sizeof(float));
        }
    struct lq_backend *backend = NULL;
    struct lq_runtime *runtime = NULL, *reference = NULL;
    struct lq_adapter_weights *weights = NULL;
    struct lq_error err = {0};
    CHECK(lq_backend_cpu_create(&backend, &err) == 0);
    CHECK(lq_runtime_create(backend, model, &runtime, &err) == 0);
    CHECK(lq_runtime_create(backend, replaced, &reference, &err) == 0);
    CHECK(lq_adapter_weights_create(runtime, a, &weights, &err) == 0);
    int tokens[100];
    uint32_t random = 5;
    tokens[0] = 1;
    for (int i = 1; i < 100; i++) tokens[i] = 3 + (int)(next_random(&random) % 500);
    const int lengths[] = {100, 7};
    for (int t = 0; t < 2; t++) {
        float *served = run_sequence(runtime, weights, tokens, lengths[t], 20);
        float *direct = run_sequence(reference, NULL, tokens, lengths[t], 20);
        CHECK_MSG(memcmp(served, direct, 21 * 512 * sizeof(float)) == 0,
                  "prompt of %d: the adapter's logits are not the replaced model's", lengths[t]);
        free(served), free(direct);
    }
    /* sessions of another runtime cannot use these weights */
    struct lq_session *foreign = NULL;
    CHECK(lq_session_create(reference, 8, 1, &foreign, &err) == 0);
    CHECK(lq_session_set_adapter(foreign, weights, &err) == LQ_EINVAL);
    lq_session_free(foreign);
    lq_adapter_weights_free(weights);
    lq_adapter_free(a);
    lq_runtime_free(runtime);
    lq_runtime_free(reference);
    backend->ops->destroy(backend);
    lq_model_free(model);
    lq_model_free(replaced);
}

/* ADD on the dense model: W + L1·L2 to within rounding, and batch-invariant. */
static void test_add_on_dense_model(void) {
    struct lq_model *model = load("models/stories260K-hf");
    struct lq_model *merged = load("models/stories260K-hf");
    if (!model || !merged) return;
    struct lq_adapter *d = add_adapter(model, 4, 0x7f, 11);
    for (int l = 0; l < model->config.n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            struct lq_linear *w = &merged->layers[l].linear[k];
            const struct lq_adapter_matrix *m = lq_adapter_matrix(d, l, (enum lq_linear_kind)k);
            for (int r = 0; r < w->rows; r++)
                for (int c = 0; c < w->cols; c++) {
                    double sum = 0;
                    for (int j = 0; j < m->rank; j++)
                        sum +=
                            (double)m->L1[(size_t)r * m->rank + j] * m->L2[(size_t)j * m->cols + c];
                    w->dense[(size_t)r * w->cols + c] += (float)sum;
                }
        }
    struct lq_backend *backend = NULL;
    struct lq_runtime *runtime = NULL, *reference = NULL;
    struct lq_adapter_weights *weights = NULL;
    struct lq_error err = {0};
    CHECK(lq_backend_cpu_create(&backend, &err) == 0);
    CHECK(lq_runtime_create(backend, model, &runtime, &err) == 0);
    CHECK(lq_runtime_create(backend, merged, &reference, &err) == 0);
    CHECK_MSG(lq_adapter_weights_create(runtime, d, &weights, &err) == 0, "%s", err.message);
    int tokens[12] = {1, 403, 407, 261, 378, 13, 59, 300, 42, 17, 99, 250};
    float *served = run_sequence(runtime, weights, tokens, 12, 6);
    float *direct = run_sequence(reference, NULL, tokens, 12, 6);
    float *bare = run_sequence(runtime, NULL, tokens, 12, 6);
    double worst = 0, moved = 0;
    for (size_t i = 0; i < 7 * 512; i++) {
        worst = fmax(worst, fabs(served[i] - direct[i]));
        moved = fmax(moved, fabs(served[i] - bare[i]));
    }
    CHECK_MSG(worst < 1e-3, "ADD adapter vs W + L1·L2: logits differ by %g", worst);
    CHECK_MSG(moved > 1e-2, "the ADD adapter hardly changes the logits (%g)", moved);
    free(served), free(direct), free(bare);
    const struct lq_adapter_weights *mix[] = {weights, NULL};
    check_mixed_batches(runtime, mix, 2, "dense, bare + add");
    lq_adapter_weights_free(weights);
    lq_adapter_free(d);
    lq_runtime_free(runtime);
    lq_runtime_free(reference);
    backend->ops->destroy(backend);
    lq_model_free(model);
    lq_model_free(merged);
}

/* Adapters that do not fit are refused with a message naming the mismatch. */
static void test_mismatch_refused(void) {
    struct lq_model *lq = load("models/stories260K-lq");
    struct lq_model *dense = load("models/stories260K-hf");
    if (!lq || !dense) return;
    struct lq_backend *backend = NULL;
    struct lq_runtime *lq_runtime = NULL, *dense_runtime = NULL;
    struct lq_adapter_weights *weights = NULL;
    struct lq_error err = {0};
    CHECK(lq_backend_cpu_create(&backend, &err) == 0);
    CHECK(lq_runtime_create(backend, lq, &lq_runtime, &err) == 0);
    CHECK(lq_runtime_create(backend, dense, &dense_runtime, &err) == 0);
    struct lq_adapter *replace = replace_adapter(lq, 1);
    /* REPLACE needs an LQ model */
    CHECK(lq_adapter_weights_create(dense_runtime, replace, &weights, &err) == LQ_EINVAL);
    CHECK(weights == NULL && strstr(err.message, "dense") != NULL);
    /* REPLACE of another rank */
    struct lq_adapter *low = add_adapter(lq, 4, 0x7f, 2);
    low->mode = LQ_ADAPTER_REPLACE;
    CHECK(lq_adapter_weights_create(lq_runtime, low, &weights, &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "rank") != NULL);
    /* a pair of the wrong shape */
    struct lq_adapter *wrong = add_adapter(lq, 2, 1u << LQ_UP_PROJ, 3);
    lq_adapter_matrix(wrong, 2, LQ_UP_PROJ)->cols = 32;
    CHECK(lq_adapter_weights_create(lq_runtime, wrong, &weights, &err) == LQ_EINVAL);
    lq_adapter_matrix(wrong, 2, LQ_UP_PROJ)->cols = 64;
    CHECK(lq_adapter_weights_create(lq_runtime, wrong, &weights, &err) == 0);
    lq_adapter_weights_free(weights);
    lq_adapter_free(replace), lq_adapter_free(low), lq_adapter_free(wrong);
    lq_runtime_free(lq_runtime);
    lq_runtime_free(dense_runtime);
    backend->ops->destroy(backend);
    lq_model_free(lq);
    lq_model_free(dense);
}

/* linear_base + lowrank_add of a layer's own pair is linear, bit for bit, on the CPU, for
 * any number of rows (both kernels of the CPU linear). */
static void test_ops_compose_to_linear(void) {
    struct lq_model *model = load("models/stories260K-lq");
    if (!model) return;
    struct lq_backend *backend = NULL;
    CHECK(lq_backend_cpu_create(&backend, NULL) == 0);
    const struct lq_backend_ops *ops = backend->ops;
    struct lq_rng rng;
    lq_rng_seed(&rng, 4);
    const int counts[] = {1, 3, 64, 65, 130};
    for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
        const struct lq_linear *w = &model->layers[1].linear[k];
        for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
            int n = counts[c];
            float *x = malloc((size_t)n * w->cols * sizeof *x);
            float *y = malloc((size_t)n * w->rows * sizeof *y);
            float *z = malloc((size_t)n * w->rows * sizeof *z);
            lq_rng_fill_normal(&rng, x, (size_t)n * w->cols);
            CHECK(ops->linear(backend, w, x, n, y) == 0);
            CHECK(ops->linear_base(backend, w, x, n, z) == 0);
            CHECK(memcmp(y, z, (size_t)n * w->rows * sizeof *y) != 0); /* the pair matters */
            CHECK(ops->lowrank_add(backend, w->lora_B, w->lora_A, w->rows, w->cols, w->rank, x, n,
                                   z) == 0);
            CHECK_MSG(memcmp(y, z, (size_t)n * w->rows * sizeof *y) == 0,
                      "%s, %d rows: linear_base + lowrank_add is not linear",
                      lq_linear_kind_name((enum lq_linear_kind)k), n);
            free(x), free(y), free(z);
        }
    }
    float *copy = copy_floats(model->layers[0].linear[0].lora_A, 8);
    CHECK(ops->lowrank_add(backend, NULL, NULL, 4, 4, 0, copy, 1, copy) == 0); /* rank 0 */
    free(copy);
    backend->ops->destroy(backend);
    lq_model_free(model);
}

LQ_TEST_MAIN(LQ_TEST(test_ops_compose_to_linear), LQ_TEST(test_lq_mixed_batch_is_batch_invariant),
             LQ_TEST(test_replace_equals_replaced_model), LQ_TEST(test_add_on_dense_model),
             LQ_TEST(test_mismatch_refused))
