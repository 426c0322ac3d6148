/* Decode-step graphs (kernels/cuda/graph_cuda.cu) against running the same ops eagerly:
 *   - the protocol: a key runs eagerly, is recorded, then replays, and a replay computes on the
 *     device data of its own step (not the recording's); a recording that stages a host
 *     argument is refused and nothing of it runs; freeing weights drops recorded graphs;
 *   - lq_forward_batch on the shipped LQ model (models/stories260K-lq) with graphs gives, step
 *     for step, the logits of a backend without them (LQ_CUDA_GRAPHS=0) bit for bit, while
 *     sequences join and leave the batch and positions cross the keys bounds; and graphs
 *     really replayed (a counting wrapper around graph_begin).
 * Skips (77) without a GPU. */
#include "core/forward.h"
#include "tests/unit/lq_test.h"

#include "tests/kernels/kernel_check.h"

#include <stdint.h>

#define TOL_FP32 2e-5

/* ---------- the protocol ---------- */

/* out = rmsnorm(in) + in, the step recorded below. */
static int step_ops(struct lq_backend *b, const float *in, const float *weight, int n, int dim,
                    float *out) {
    int rc = b->ops->rmsnorm(b, in, weight, n, dim, 1e-5f, out);
    return rc ? rc : b->ops->add(b, out, in, (size_t)n * dim);
}

static void test_protocol(void) {
    const int n = 3, dim = 200;
    const size_t count = (size_t)n * dim;
    float *weight = random_floats(dim, 1.0f);
    float *dweight = device_floats(weight, dim), *din = device_floats(NULL, count);
    float *dout = device_floats(NULL, count);
    const uint64_t key = 0x1234;
    const int expected[] = {LQ_GRAPH_EAGER, LQ_GRAPH_RECORDING, LQ_GRAPH_REPLAYED,
                            LQ_GRAPH_REPLAYED};
    for (int step = 0; step < 4; step++) {
        float *in = random_floats(count, 1.0f), *ref = malloc(count * sizeof *ref);
        CHECK_OK(step_ops(cpu, in, weight, n, dim, ref));
        CHECK_OK(gpu->ops->copy_to_device(gpu, din, in, count * sizeof(float)));
        const int mode = gpu->ops->graph_begin(gpu, key);
        CHECK_MSG(mode == expected[step], "step %d: graph_begin answered %d", step, mode);
        if (mode != LQ_GRAPH_REPLAYED) {
            int rc = step_ops(gpu, din, dweight, n, dim, dout);
            if (mode == LQ_GRAPH_RECORDING) CHECK_OK(gpu->ops->graph_end(gpu, rc));
            CHECK_OK(rc);
        }
        float *out = to_host(dout, count);
        CHECK_CLOSE(out, ref, count, TOL_FP32, "graph step %d", step);
        free(in), free(ref), free(out);
    }

    /* a host argument cannot be recorded: refused, nothing ran, the eager call works */
    const uint64_t key2 = 0x5678;
    int positions[3] = {0, 5, 9};
    float *x = random_floats(count, 1.0f);
    CHECK_OK(gpu->ops->copy_to_device(gpu, din, x, count * sizeof(float)));
    CHECK(gpu->ops->graph_begin(gpu, key2) == LQ_GRAPH_EAGER);
    CHECK(gpu->ops->graph_begin(gpu, key2) == LQ_GRAPH_RECORDING);
    const int rc = gpu->ops->rope(gpu, din, n, 2, 100, positions, 10000.0f);
    CHECK(rc != 0);
    CHECK(gpu->ops->graph_end(gpu, rc) != 0);
    float *untouched = to_host(din, count);
    CHECK(memcmp(untouched, x, count * sizeof *x) == 0);
    CHECK_OK(gpu->ops->rope(gpu, din, n, 2, 100, positions, 10000.0f));

    /* weights freed: the recorded graph of `key` is dropped, not replayed */
    const float *weights = NULL;
    struct lq_error err = {0};
    CHECK_OK(gpu->ops->weights_upload(gpu, weight, dim, &weights, &err));
    gpu->ops->weights_release(gpu, weights);
    const int mode = gpu->ops->graph_begin(gpu, key);
    CHECK_MSG(mode == LQ_GRAPH_RECORDING, "after a weights release graph_begin answered %d", mode);
    CHECK_OK(gpu->ops->graph_end(gpu, step_ops(gpu, din, dweight, n, dim, dout)));

    gpu->ops->buffer_free(gpu, dweight), gpu->ops->buffer_free(gpu, din);
    gpu->ops->buffer_free(gpu, dout);
    free(weight), free(x), free(untouched);
}

/* ---------- lq_forward_batch with and without graphs ---------- */

static struct lq_backend_ops counting_ops;
static const struct lq_backend_ops *real_ops;
static int replays;

static int counting_graph_begin(struct lq_backend *backend, uint64_t key) {
    const int mode = real_ops->graph_begin(backend, key);
    if (mode == LQ_GRAPH_REPLAYED) replays++;
    return mode;
}

static const char *root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

enum { SEQUENCES = 5, STEPS = 48 };

static void test_forward(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s/models/stories260K-lq", root());
    struct lq_error err = {0};
    struct lq_model *m1 = NULL, *m2 = NULL;
    CHECK_MSG(lq_model_load(path, &m1, &err) == 0, "%s", err.message);
    CHECK_MSG(lq_model_load(path, &m2, &err) == 0, "%s", err.message);

    /* the same device twice: graphs on (through the counting wrapper) and off */
    setenv("LQ_CUDA_GRAPHS", "0", 1);
    struct lq_backend *eager = NULL;
    CHECK_MSG(lq_backend_cuda_create(0, 0, &eager, &err) == 0, "%s", err.message);
    unsetenv("LQ_CUDA_GRAPHS");
    real_ops = gpu->ops;
    counting_ops = *gpu->ops;
    counting_ops.graph_begin = counting_graph_begin;
    struct lq_backend counted = {&counting_ops, gpu->impl};

    struct lq_runtime *r1 = NULL, *r2 = NULL;
    CHECK_MSG(lq_runtime_create(&counted, m1, &r1, &err) == 0, "%s", err.message);
    CHECK_MSG(lq_runtime_create(eager, m2, &r2, &err) == 0, "%s", err.message);
    const int vocab = m1->config.vocab_size, context = 256;
    struct lq_batch *b1 = NULL, *b2 = NULL;
    CHECK_OK(lq_batch_create(r1, SEQUENCES, &b1, &err));
    CHECK_OK(lq_batch_create(r2, SEQUENCES, &b2, &err));
    struct lq_session *s1[SEQUENCES], *s2[SEQUENCES];
    float *logits1 = malloc((size_t)context * vocab * sizeof(float));
    float *logits2 = malloc((size_t)context * vocab * sizeof(float));
    const int prompt_lengths[SEQUENCES] = {1, 7, 90, 120, 33};
    int tokens[SEQUENCES];
    for (int i = 0; i < SEQUENCES; i++) {
        CHECK_OK(lq_session_create(r1, context, 128, &s1[i], &err));
        CHECK_OK(lq_session_create(r2, context, 128, &s2[i], &err));
        int prompt[128];
        for (int t = 0; t < prompt_lengths[i]; t++)
            prompt[t] = (int)(lq_rng_next(&rng) % (uint64_t)vocab);
        CHECK_OK(lq_session_forward(s1[i], prompt, prompt_lengths[i], 0, logits1, &err));
        CHECK_OK(lq_session_forward(s2[i], prompt, prompt_lengths[i], 0, logits2, &err));
        CHECK(memcmp(logits1, logits2, (size_t)vocab * sizeof(float)) == 0);
        tokens[i] = (int)(lq_rng_next(&rng) % (uint64_t)vocab);
    }
    /* who decodes at each step: all, then the last three, then all again, one alone */
    int mismatches = 0;
    for (int step = 0; step < STEPS; step++) {
        struct lq_session *m1s[SEQUENCES], *m2s[SEQUENCES];
        int step_tokens[SEQUENCES], n = 0;
        for (int i = 0; i < SEQUENCES; i++) {
            const int member = step < 12 || step >= 36 ? 1 : step < 24 ? i >= 2 : i == 3;
            if (!member) continue;
            m1s[n] = s1[i], m2s[n] = s2[i], step_tokens[n] = tokens[i], n++;
        }
        CHECK_MSG(lq_forward_batch(b1, m1s, step_tokens, n, logits1, &err) == 0, "%s", err.message);
        CHECK_MSG(lq_forward_batch(b2, m2s, step_tokens, n, logits2, &err) == 0, "%s", err.message);
        if (memcmp(logits1, logits2, (size_t)n * vocab * sizeof(float)) != 0) mismatches++;
        for (int i = 0, j = 0; i < SEQUENCES && j < n; i++)
            if (m1s[j] == s1[i]) tokens[i] = (int)(lq_rng_next(&rng) % (uint64_t)vocab), j++;
    }
    CHECK_MSG(mismatches == 0, "%d of %d steps differ with graphs", mismatches, STEPS);
    /* each composition's first step runs eagerly, its second is recorded: the rest replay */
    CHECK_MSG(replays >= STEPS / 2, "only %d of %d steps replayed a graph", replays, STEPS);
    printf("forward: %d steps equal with and without graphs; %d replayed\n", STEPS, replays);

    for (int i = 0; i < SEQUENCES; i++) lq_session_free(s1[i]), lq_session_free(s2[i]);
    lq_batch_free(b1), lq_batch_free(b2);
    lq_runtime_free(r1), lq_runtime_free(r2);
    lq_model_free(m1), lq_model_free(m2);
    eager->ops->destroy(eager);
    free(logits1), free(logits2);
}

int main(void) {
    struct lq_error err = {0};
    if (lq_backend_cuda_create(0, 0, &gpu, &err)) {
        printf("SKIP: %s\n", err.message);
        return 77;
    }
    CHECK_OK(lq_backend_cpu_create(&cpu, &err));
    lq_rng_seed(&rng, (uint64_t)time(NULL));
    test_protocol();
    test_forward();
    gpu->ops->destroy(gpu);
    cpu->ops->destroy(cpu);
    return lq_test_failures ? 1 : 0;
}
