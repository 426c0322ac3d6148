/* lq_forward_batch's decode-step graph path (core/forward_batch.c graph_step) on the CPU,
 * through a fake backend: the CPU's ops plus the graph entries (embed_device, rope_device,
 * attention_batch_device read host memory, which is the CPU's "device" memory; graph_begin and
 * graph_end follow a script). Checks what a GPU backend relies on without a GPU:
 *   - the device-argument path gives the host path's logits bit for bit (the step arguments
 *     table: ids, positions, every layer's cache pointers, for changing batches);
 *   - the keys: the same for steps that differ only in positions inside a keys bound, different
 *     when the number of sequences or the bound changes;
 *   - a recording whose graph_end fails is run again, with the same logits;
 *   - an error from graph_begin fails the step and leaves every position where it was. */
#include "core/forward.h"
#include "tests/unit/lq_test.h"

#include <stdint.h>
#include <string.h>

static const char *root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

/* ---------- the fake backend ---------- */

static struct lq_backend_ops fake_ops;
static const struct lq_backend_ops *cpu_ops;

enum { MAX_KEYS = 256 };
static uint64_t seen_keys[MAX_KEYS];
static int seen_counts[MAX_KEYS], n_seen;
static uint64_t step_keys[512];
static int n_steps, recordings, failed_ends, begin_error;

static int fake_graph_begin(struct lq_backend *backend, uint64_t key) {
    (void)backend;
    if (begin_error) return begin_error;
    step_keys[n_steps++ % 512] = key;
    for (int i = 0; i < n_seen; i++)
        if (seen_keys[i] == key) {
            seen_counts[i]++;
            recordings++;
            return LQ_GRAPH_RECORDING; /* the ops run for real here: nothing to replay */
        }
    if (n_seen < MAX_KEYS) seen_keys[n_seen] = key, seen_counts[n_seen++] = 1;
    return LQ_GRAPH_EAGER;
}

/* Every other recording "fails": the caller must run the step again. */
static int fake_graph_end(struct lq_backend *backend, int failed) {
    (void)backend;
    if (failed) return failed;
    return (recordings % 2) ? (failed_ends++, LQ_EUNSUPPORTED) : LQ_OK;
}

static int fake_attention_batch_device(struct lq_backend *backend, const float *q,
                                       const float *k_new, const float *v_new,
                                       float *const *k_caches, float *const *v_caches,
                                       const int *positions, int n, int heads, int kv_heads,
                                       int head_dim, int keys_bound, float *out) {
    for (int i = 0; i < n; i++)
        if (positions[i] + 1 > keys_bound) return LQ_EINVAL; /* the bound must hold */
    return cpu_ops->attention_batch(backend, q, k_new, v_new, k_caches, v_caches, positions, n,
                                    heads, kv_heads, head_dim, out);
}

/* rope_attention_batch_device as the two ops it stands for (the step must use it, and give
 * the same logits as the host path's rope then attention). */
static int rope_attention_calls;
static int fake_rope_attention_batch_device(struct lq_backend *backend, float *q, float *k_new,
                                            const float *v_new, float *const *k_caches,
                                            float *const *v_caches, const int *positions, int n,
                                            int heads, int kv_heads, int head_dim, int keys_bound,
                                            float theta, float *out) {
    rope_attention_calls++;
    int rc = cpu_ops->rope(backend, q, n, heads, head_dim, positions, theta);
    if (!rc) rc = cpu_ops->rope(backend, k_new, n, kv_heads, head_dim, positions, theta);
    return rc ? rc
              : fake_attention_batch_device(backend, q, k_new, v_new, k_caches, v_caches, positions,
                                            n, heads, kv_heads, head_dim, keys_bound, out);
}

/* linear_group through the CPU's linear, layer by layer: the forward passes must call it with
 * Q, K, V and with gate, up (each of one input, outputs distinct and apart from it). */
static int group_calls[LQ_LINEARS_PER_LAYER + 1], group_misuse;
static int fake_linear_group(struct lq_backend *backend, const struct lq_linear *const *w,
                             int count, const float *x, int n, float *const *y) {
    if (count < 1 || count > LQ_LINEARS_PER_LAYER) return LQ_EINVAL;
    group_calls[count]++;
    for (int i = 0; i < count; i++) {
        group_misuse += y[i] == x;
        for (int j = 0; j < i; j++) group_misuse += y[i] == y[j];
        /* the kinds in order: Q, K, V (rows q_dim, kv_dim, kv_dim) or gate, up (hidden) */
        group_misuse += i > 0 && w[i] != w[i - 1] + 1;
    }
    for (int i = 0; i < count; i++) {
        const int rc = cpu_ops->linear(backend, w[i], x, n, y[i]);
        if (rc) return rc;
    }
    return LQ_OK;
}

/* linear_fused as the unfused ops it stands for, on odd steps sizes only (so that steps of both
 * kinds run): rmsnorm into scratch, then linear_group, then swiglu on the two outputs, or
 * linear into scratch and add. The CPU's ops give the unfused path's bits, so the logits must
 * not change. Counts each use: [input kind][count][output]. */
static int fused_calls[2][LQ_LINEARS_PER_LAYER + 1][3], fused_misuse;
static int fake_fuses_linears(struct lq_backend *backend, int n) {
    (void)backend;
    return n % 2 == 1;
}
static int fake_linear_fused(struct lq_backend *backend, const struct lq_linear *const *w,
                             int count, const struct lq_linear_input *in, int n, float *const *y,
                             enum lq_linear_output output) {
    if (count < 1 || count > LQ_LINEARS_PER_LAYER || (int)in->kind < 0 || in->kind > 1 ||
        (int)output < 0 || output > 2 || (output == LQ_OUTPUT_ADD && count != 1) ||
        (output == LQ_OUTPUT_SWIGLU && (count != 2 || w[0]->rows != w[1]->rows)) || n % 2 != 1)
        return LQ_EINVAL;
    fused_calls[in->kind][count][output]++;
    for (int i = 0; i < count; i++) fused_misuse += y[i] == in->x;
    const int cols = w[0]->cols;
    float *input = malloc((size_t)n * cols * sizeof(float)), *out = NULL;
    int rc = input ? LQ_OK : LQ_ENOMEM;
    if (!rc && in->kind == LQ_INPUT_RMSNORM)
        rc = cpu_ops->rmsnorm(backend, in->x, in->weight, n, cols, in->eps, input);
    else if (!rc)
        memcpy(input, in->x, (size_t)n * cols * sizeof(float));
    if (!rc && output != LQ_OUTPUT_ADD) rc = fake_linear_group(backend, w, count, input, n, y);
    if (!rc && output == LQ_OUTPUT_SWIGLU)
        rc = cpu_ops->swiglu(backend, y[0], y[1], (size_t)n * w[0]->rows);
    if (!rc && output == LQ_OUTPUT_ADD) {
        out = malloc((size_t)n * w[0]->rows * sizeof(float));
        rc = out ? cpu_ops->linear(backend, w[0], input, n, out) : LQ_ENOMEM;
        if (!rc) rc = cpu_ops->add(backend, y[0], out, (size_t)n * w[0]->rows);
    }
    free(input), free(out);
    return rc;
}

/* Both sides run the fp32 head (no head_prepare): the graph path needs the embedding table, and
 * the CPU's int8 head would serve a tied model's embeddings instead. Each side is a CPU backend
 * of its own with its ops table swapped (the CPU's state lives around its struct lq_backend). */
static struct lq_backend_ops host_ops;

static void use_host_ops(struct lq_backend *cpu) {
    host_ops = *cpu->ops;
    host_ops.head_prepare = NULL;
    cpu->ops = &host_ops;
}

static void use_fake_ops(struct lq_backend *cpu) {
    cpu_ops = cpu->ops;
    fake_ops = *cpu->ops;
    fake_ops.name = "fake-graphs";
    fake_ops.head_prepare = NULL;
    fake_ops.embed_device = cpu->ops->embed;
    fake_ops.rope_device = cpu->ops->rope;
    fake_ops.attention_batch_device = fake_attention_batch_device;
    fake_ops.graph_begin = fake_graph_begin;
    fake_ops.graph_end = fake_graph_end;
    fake_ops.linear_group = fake_linear_group;
    fake_ops.rope_attention_batch_device = fake_rope_attention_batch_device;
    fake_ops.fuses_linears = fake_fuses_linears;
    fake_ops.linear_fused = fake_linear_fused;
    cpu->ops = &fake_ops;
}

/* ---------- the test ---------- */

enum { SEQUENCES = 6, STEPS = 40 };

static void test_graph_path_equals_host_path(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K-hf", root());
    struct lq_model *model = NULL;
    struct lq_backend *host = NULL, *fake = NULL;
    struct lq_error err = {0};
    CHECK(lq_model_load(path, &model, &err) == 0);
    if (!model) return;
    CHECK(lq_backend_cpu_create(&host, &err) == 0);
    CHECK(lq_backend_cpu_create(&fake, &err) == 0);
    use_host_ops(host);
    use_fake_ops(fake);
    struct lq_runtime *plain = NULL, *graphs = NULL;
    CHECK(lq_runtime_create(host, model, &plain, &err) == 0);
    CHECK(lq_runtime_create(fake, model, &graphs, &err) == 0);
    const int vocab = model->config.vocab_size;
    struct lq_batch *b1 = NULL, *b2 = NULL;
    CHECK(lq_batch_create(plain, SEQUENCES, &b1, &err) == 0);
    CHECK(lq_batch_create(graphs, SEQUENCES, &b2, &err) == 0);
    struct lq_session *s1[SEQUENCES], *s2[SEQUENCES];
    float *l1 = malloc((size_t)SEQUENCES * vocab * sizeof(float));
    float *l2 = malloc((size_t)SEQUENCES * vocab * sizeof(float));
    const int prompts[SEQUENCES] = {1, 5, 100, 120, 30, 64};
    uint32_t random = 7;
    for (int i = 0; i < SEQUENCES; i++) {
        CHECK(lq_session_create(plain, 256, 128, &s1[i], &err) == 0);
        CHECK(lq_session_create(graphs, 256, 128, &s2[i], &err) == 0);
        int prompt[128];
        for (int t = 0; t < prompts[i]; t++)
            prompt[t] = (int)((random = random * 1664525u + 1013904223u) >> 8) % vocab;
        CHECK(lq_session_forward(s1[i], prompt, prompts[i], 0, l1, &err) == 0);
        CHECK(lq_session_forward(s2[i], prompt, prompts[i], 0, l2, &err) == 0);
    }
    int mismatches = 0, step_n[STEPS];
    int bound_of_step[STEPS];
    for (int step = 0; step < STEPS; step++) {
        struct lq_session *m1[SEQUENCES], *m2[SEQUENCES];
        int tokens[SEQUENCES], n = 0, longest = 0;
        for (int i = 0; i < SEQUENCES; i++) {
            const int member = step < 10 || step >= 30 ? 1 : step < 20 ? i >= 3 : i == 0;
            if (!member) continue;
            m1[n] = s1[i], m2[n] = s2[i];
            tokens[n++] = (int)((random = random * 1664525u + 1013904223u) >> 8) % vocab;
            if (lq_session_position(s1[i]) + 1 > longest) longest = lq_session_position(s1[i]) + 1;
        }
        step_n[step] = n;
        bound_of_step[step] = longest <= 128 ? 128 : 256;
        CHECK_MSG(lq_forward_batch(b1, m1, tokens, n, l1, &err) == 0, "%s", err.message);
        CHECK_MSG(lq_forward_batch(b2, m2, tokens, n, l2, &err) == 0, "%s", err.message);
        mismatches += memcmp(l1, l2, (size_t)n * vocab * sizeof(float)) != 0;
    }
    CHECK_MSG(mismatches == 0, "%d of %d steps differ on the graph path", mismatches, STEPS);
    CHECK(n_steps == STEPS);
    /* keys: equal exactly when (n, keys bound) are */
    int key_errors = 0;
    for (int a = 0; a < STEPS; a++)
        for (int c = a + 1; c < STEPS; c++) {
            const int same = step_n[a] == step_n[c] && bound_of_step[a] == bound_of_step[c];
            key_errors += same != (step_keys[a] == step_keys[c]);
        }
    CHECK_MSG(key_errors == 0, "%d step pairs with keys that do not follow (n, keys bound)",
              key_errors);
    CHECK(recordings > 0 && failed_ends > 0); /* both paths taken */
    /* every block of every pass: one group of Q, K, V and one of gate, up */
    CHECK_MSG(group_calls[3] > 0 && group_calls[3] == group_calls[2] && group_misuse == 0,
              "linear_group: %d calls of 3, %d of 2, %d misuses", group_calls[3], group_calls[2],
              group_misuse);
    CHECK(group_calls[3] % model->config.n_layers == 0);
    /* every block of every fused pass: Q, K, V from the attention norm, O into the residual,
     * gate and up from the FFN norm through SwiGLU, down from gate into the residual; nothing
     * else fused */
    const int fused_blocks = fused_calls[LQ_INPUT_RMSNORM][3][LQ_OUTPUT_WRITE];
    CHECK_MSG(fused_blocks > 0 && fused_blocks % model->config.n_layers == 0 &&
                  fused_calls[LQ_INPUT_RMSNORM][2][LQ_OUTPUT_SWIGLU] == fused_blocks &&
                  fused_calls[LQ_INPUT_PLAIN][1][LQ_OUTPUT_ADD] == 2 * fused_blocks &&
                  fused_misuse == 0,
              "linear_fused: %d blocks, %d gate/up, %d o and down, %d misuses", fused_blocks,
              fused_calls[LQ_INPUT_RMSNORM][2][LQ_OUTPUT_SWIGLU],
              fused_calls[LQ_INPUT_PLAIN][1][LQ_OUTPUT_ADD], fused_misuse);
    int fused_total = 0;
    for (int k = 0; k < 2; k++)
        for (int c = 0; c <= LQ_LINEARS_PER_LAYER; c++)
            for (int o = 0; o < 3; o++) fused_total += fused_calls[k][c][o];
    CHECK(fused_total == 4 * fused_blocks);
    /* every block of every graph step: rope and attention as one op */
    CHECK_MSG(rope_attention_calls > 0 && rope_attention_calls % model->config.n_layers == 0,
              "%d rope_attention calls", rope_attention_calls);
    printf("graph path: %d steps equal to the host path; %d recordings, %d failed and rerun\n",
           STEPS, recordings, failed_ends);

    /* graph_begin failing fails the step and moves no position */
    begin_error = LQ_EIO;
    int before = lq_session_position(s2[0]), token = 1;
    CHECK(lq_forward_batch(b2, &s2[0], &token, 1, l2, &err) == LQ_EIO);
    CHECK(lq_session_position(s2[0]) == before);
    begin_error = 0;

    for (int i = 0; i < SEQUENCES; i++) lq_session_free(s1[i]), lq_session_free(s2[i]);
    lq_batch_free(b1), lq_batch_free(b2);
    lq_runtime_free(plain), lq_runtime_free(graphs);
    host->ops->destroy(host), fake->ops->destroy(fake);
    lq_model_free(model);
    free(l1), free(l2);
}

LQ_TEST_MAIN(LQ_TEST(test_graph_path_equals_host_path))
