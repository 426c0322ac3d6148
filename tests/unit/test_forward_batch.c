/* lq_forward_batch against lq_session_forward: a decode step of many sequences at once must
 * give each sequence the logits it gets alone, bit for bit on the CPU (whose linear layers are
 * batch-invariant), for dense and LQ models, with sequences at uneven positions joining and
 * leaving the batch. */
#include "core/forward.h"
#include "core/lq.h"
#include "tests/unit/lq_test.h"

#include <stdint.h>

static const char *root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

static uint32_t next_random(uint32_t *state) {
    *state = *state * 1664525u + 1013904223u;
    return *state >> 8;
}

/* Replaces every linear layer by its LQ decomposition W ≈ Q + L1·L2 (NF3, rank 4), as lqd
 * compress would store it: Q quantized, lora_B = L1, lora_A = L2. */
static int make_lq(struct lq_model *model) {
    struct lq_decompose_options options;
    lq_decompose_options_default(&options);
    options.rank = 4;
    options.max_iters = 2;
    struct lq_nf_config config = LQ_NF_CONFIG_NF3;
    for (int l = 0; l < model->config.n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            struct lq_linear *w = &model->layers[l].linear[k];
            struct lq_decomposition d;
            struct lq_error err = {0};
            if (lq_decompose(w->dense, (size_t)w->rows, (size_t)w->cols, &config, &options, &d,
                             &err)) {
                fprintf(stderr, "lq_decompose: %s\n", err.message);
                return -1;
            }
            free(w->dense);
            w->dense = NULL;
            w->is_lq = 1, w->q = d.Q, w->rank = d.rank, w->lora_A = d.L2, w->lora_B = d.L1;
            memset(&d.Q, 0, sizeof d.Q);
            d.L1 = d.L2 = NULL;
            lq_decomposition_free(&d);
        }
    model->is_lq = 1;
    return 0;
}

#define SEQUENCES 33
#define STEPS 48

/* SEQUENCES pairs of sessions get the same prompts (1..23 tokens: uneven positions); then at
 * each step a changing subset decodes one random token, batched on one side and one by one
 * on the other. */
static void check_batched_equals_single(struct lq_runtime *runtime, const char *label) {
    const int vocab = lq_runtime_config(runtime)->vocab_size;
    struct lq_session *batched[SEQUENCES], *alone[SEQUENCES];
    struct lq_batch *batch = NULL;
    struct lq_error err = {0};
    CHECK(lq_batch_create(runtime, SEQUENCES, &batch, &err) == 0);
    float *logits = malloc((size_t)SEQUENCES * vocab * sizeof *logits);
    float *reference = malloc((size_t)vocab * sizeof *reference);
    uint32_t random = 12345;
    for (int i = 0; i < SEQUENCES; i++) {
        CHECK(lq_session_create(runtime, 512, 64, &batched[i], &err) == 0);
        CHECK(lq_session_create(runtime, 512, 64, &alone[i], &err) == 0);
        int prompt[32], length = 1 + (i * 7) % 23;
        for (int t = 0; t < length; t++) prompt[t] = 3 + (int)(next_random(&random) % 500);
        CHECK(lq_session_forward(batched[i], prompt, length, 0, logits, &err) == 0);
        CHECK(lq_session_forward(alone[i], prompt, length, 0, reference, &err) == 0);
    }
    double worst = 0;
    size_t mismatched_rows = 0, rows = 0;
    for (int step = 0; step < STEPS; step++) {
        struct lq_session *members[SEQUENCES];
        int tokens[SEQUENCES], index[SEQUENCES], n = 0;
        for (int i = 0; i < SEQUENCES; i++)
            if ((i * 5 + step) % 4 != 0 || step % 11 == 0) { /* some steps take everyone */
                members[n] = batched[i], index[n] = i;
                tokens[n++] = (int)(next_random(&random) % (uint32_t)vocab);
            }
        CHECK(lq_forward_batch(batch, members, tokens, n, logits, &err) == 0);
        for (int j = 0; j < n; j++) {
            int i = index[j];
            CHECK(lq_session_forward(alone[i], &tokens[j], 1, 0, reference, &err) == 0);
            CHECK(lq_session_position(batched[i]) == lq_session_position(alone[i]));
            const float *row = logits + (size_t)j * vocab;
            for (int v = 0; v < vocab; v++) worst = fmax(worst, fabs(row[v] - reference[v]));
            mismatched_rows += memcmp(row, reference, (size_t)vocab * sizeof(float)) != 0;
            rows++;
        }
    }
    CHECK_MSG(worst <= 1e-5, "%s: batched logits differ from single ones by %g", label, worst);
    CHECK_MSG(mismatched_rows == 0, "%s: %zu of %zu rows are not bit-identical (worst %g)", label,
              mismatched_rows, rows, worst);
    for (int i = 0; i < SEQUENCES; i++) {
        lq_session_free(batched[i]);
        lq_session_free(alone[i]);
    }
    lq_batch_free(batch);
    free(logits);
    free(reference);
}

static void run_model(int lq) {
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K-hf", root());
    struct lq_model *model = NULL;
    struct lq_backend *backend = NULL;
    struct lq_runtime *runtime = NULL;
    struct lq_error err = {0};
    CHECK(lq_model_load(path, &model, &err) == 0);
    if (!model) return;
    if (lq) CHECK(make_lq(model) == 0);
    CHECK(lq_backend_cpu_create(&backend, &err) == 0);
    CHECK(lq_runtime_create(backend, model, &runtime, &err) == 0);
    check_batched_equals_single(runtime, lq ? "LQ" : "dense");
    lq_runtime_free(runtime);
    backend->ops->destroy(backend);
    lq_model_free(model);
}

static void test_dense_batched_equals_single(void) {
    run_model(0);
}

static void test_lq_batched_equals_single(void) {
    run_model(1);
}

/* Misuse is refused with a message and leaves every position where it was. */
static void test_batch_errors(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K-hf", root());
    struct lq_model *model = NULL;
    struct lq_backend *backend = NULL;
    struct lq_runtime *runtime = NULL, *other = NULL;
    struct lq_session *a = NULL, *b = NULL, *foreign = NULL;
    struct lq_batch *batch = NULL;
    struct lq_error err = {0};
    CHECK(lq_model_load(path, &model, &err) == 0);
    if (!model) return;
    CHECK(lq_backend_cpu_create(&backend, &err) == 0);
    CHECK(lq_runtime_create(backend, model, &runtime, &err) == 0);
    CHECK(lq_runtime_create(backend, model, &other, &err) == 0);
    CHECK(lq_batch_create(runtime, 0, &batch, &err) == LQ_EINVAL);
    CHECK(lq_batch_create(runtime, 2, &batch, &err) == 0);
    CHECK(lq_batch_max_sequences(batch) == 2);
    CHECK(lq_session_create(runtime, 2, 2, &a, &err) == 0);
    CHECK(lq_session_create(runtime, 8, 2, &b, &err) == 0);
    CHECK(lq_session_create(other, 8, 2, &foreign, &err) == 0);
    float *logits = malloc(3 * 512 * sizeof *logits);
    int tokens[3] = {1, 2, 3};
    struct lq_session *three[3] = {a, b, b}, *twice[2] = {b, b}, *mixed[2] = {a, foreign};
    CHECK(lq_forward_batch(batch, three, tokens, 0, logits, &err) == LQ_EINVAL);
    CHECK(lq_forward_batch(batch, three, tokens, 3, logits, &err) == LQ_EINVAL);
    CHECK(lq_forward_batch(batch, twice, tokens, 2, logits, &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "twice") != NULL);
    CHECK(lq_forward_batch(batch, mixed, tokens, 2, logits, &err) == LQ_EINVAL);
    int bad[2] = {1, 512};
    CHECK(lq_forward_batch(batch, three, bad, 2, logits, &err) == LQ_EINVAL);
    CHECK(lq_session_position(a) == 0 && lq_session_position(b) == 0);
    CHECK(lq_forward_batch(batch, three, tokens, 2, logits, &err) == 0);
    CHECK(lq_forward_batch(batch, three, tokens, 2, logits, &err) == 0);
    CHECK(lq_session_position(a) == 2 && lq_session_position(b) == 2);
    CHECK(lq_forward_batch(batch, three, tokens, 2, logits, &err) == LQ_EINVAL); /* a is full */
    CHECK(strstr(err.message, "context full") != NULL);
    CHECK(lq_session_position(b) == 2);
    free(logits);
    lq_session_free(a);
    lq_session_free(b);
    lq_session_free(foreign);
    lq_batch_free(batch);
    lq_runtime_free(runtime);
    lq_runtime_free(other);
    backend->ops->destroy(backend);
    lq_model_free(model);
}

LQ_TEST_MAIN(LQ_TEST(test_dense_batched_equals_single), LQ_TEST(test_lq_batched_equals_single),
             LQ_TEST(test_batch_errors))
