/* Adapters in the registry and the scheduler:
 *  - requests on the bare LQ model, two REPLACE adapters and an ADD adapter, decoded together
 *    in continuous batches, each give the text and the log-probability bits they give alone;
 *  - loading an adapter under a name in use while requests run (hot swap): requests running
 *    and queued finish on the version they started with, new ones get the new version, and
 *    once all are done only the test's own reference to the old version is left;
 *  - what does not fit or does not load is refused and leaves the old adapter serving;
 *  - unloading, and swapping or unloading the base model, take the adapters away.
 * Adapters go through lq_adapter_save and the registry's loader, as the daemon's would. */
#include "core/adapter.h"
#include "core/rng.h"
#include "server/registry.h"
#include "server/scheduler.h"
#include "tests/unit/lq_test.h"

#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

static const char *root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

/* ---------- collecting results (scheduler thread) ---------- */

struct collected {
    char text[8192];
    size_t length;
    int finishes, texts, error_code, completion_tokens, gate_at;
    double logprobs;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static int gate_closed, gate_waiting, finished_total;

static void on_text(void *context, const char *text, size_t length, int token, float logprob) {
    struct collected *c = context;
    pthread_mutex_lock(&lock);
    if (token >= 0) c->logprobs += logprob;
    if (c->length + length < sizeof c->text) {
        memcpy(c->text + c->length, text, length);
        c->length += length;
    }
    if (++c->texts == c->gate_at) {
        gate_waiting = 1;
        pthread_cond_broadcast(&changed);
        while (gate_closed) pthread_cond_wait(&changed, &lock);
        gate_waiting = 0;
    }
    pthread_mutex_unlock(&lock);
}

static void on_finish(void *context, enum lq_finish_reason reason, int prompt_tokens,
                      int completion_tokens, const struct lq_error *error) {
    (void)reason, (void)prompt_tokens;
    struct collected *c = context;
    pthread_mutex_lock(&lock);
    c->finishes++;
    c->completion_tokens = completion_tokens;
    c->error_code = error ? error->code : 0;
    finished_total++;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
}

static void wait_finished(int total) {
    pthread_mutex_lock(&lock);
    while (finished_total < total) pthread_cond_wait(&changed, &lock);
    pthread_mutex_unlock(&lock);
}

static void reset_counters(void) {
    pthread_mutex_lock(&lock);
    finished_total = 0, gate_closed = 0, gate_waiting = 0;
    pthread_mutex_unlock(&lock);
}

static void set_gate(int closed) {
    pthread_mutex_lock(&lock);
    gate_closed = closed;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
}

static void wait_at_gate(void) {
    pthread_mutex_lock(&lock);
    while (!gate_waiting) pthread_cond_wait(&changed, &lock);
    pthread_mutex_unlock(&lock);
}

/* ---------- adapters on disk ---------- */

static char directory[256];

/* Writes an adapter for model to directory/name: REPLACE (the model's own pairs perturbed by
 * noise of `scale`, with `rank` overriding the model's when nonzero) or ADD (fresh pairs of
 * `rank` on q, v and up_proj). */
static void write_adapter(const struct lq_model *model, const char *name, enum lq_adapter_mode mode,
                          int rank, float scale, uint64_t seed) {
    struct lq_adapter *a = NULL;
    CHECK(lq_adapter_create(model->config.n_layers, mode, &a, NULL) == 0);
    if (!a) return;
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    for (int l = 0; l < model->config.n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            const struct lq_linear *w = &model->layers[l].linear[k];
            int r = mode == LQ_ADAPTER_REPLACE ? (rank ? rank : w->rank) : rank;
            if (mode == LQ_ADAPTER_ADD && k != LQ_Q_PROJ && k != LQ_V_PROJ && k != LQ_UP_PROJ)
                continue;
            struct lq_adapter_matrix *m = lq_adapter_matrix(a, l, (enum lq_linear_kind)k);
            m->rank = r, m->rows = w->rows, m->cols = w->cols;
            size_t n1 = (size_t)w->rows * r, n2 = (size_t)r * w->cols;
            m->L1 = malloc(n1 * sizeof(float)), m->L2 = malloc(n2 * sizeof(float));
            lq_rng_fill_normal(&rng, m->L1, n1);
            lq_rng_fill_normal(&rng, m->L2, n2);
            int own = mode == LQ_ADAPTER_REPLACE && r == w->rank;
            for (size_t i = 0; i < n1; i++) m->L1[i] = (own ? w->lora_B[i] : 0) + scale * m->L1[i];
            for (size_t i = 0; i < n2; i++) m->L2[i] = (own ? w->lora_A[i] : 0) + scale * m->L2[i];
        }
    char path[512];
    snprintf(path, sizeof path, "%s/%s", directory, name);
    struct lq_error err = {0};
    CHECK_MSG(lq_adapter_save(a, path, 1, &err) == 0, "%s", err.message);
    lq_adapter_free(a);
}

static const char *adapter_path(const char *name) {
    static char path[4][512];
    static int next;
    char *out = path[next++ % 4];
    snprintf(out, sizeof path[0], "%s/%s", directory, name);
    return out;
}

static struct lq_registry *open_registry(struct lq_backend **backend) {
    struct lq_registry *registry = NULL;
    struct lq_error err = {0};
    char path[1024];
    CHECK(lq_backend_cpu_create(backend, &err) == 0);
    CHECK(lq_registry_create(*backend, &registry, &err) == 0);
    snprintf(path, sizeof path, "%s/models/stories260K-lq", root());
    CHECK_MSG(lq_registry_load(registry, "lq", path, NULL, &err) == 0, "%s", err.message);
    snprintf(path, sizeof path, "%s/models/stories260K-hf", root());
    CHECK_MSG(lq_registry_load(registry, "dense", path, NULL, &err) == 0, "%s", err.message);
    return registry;
}

static int references(const int *count) {
    return __atomic_load_n(count, __ATOMIC_SEQ_CST);
}

/* ---------- requests ---------- */

static int *encode(const struct lq_served_model *model, const char *prompt, int *count) {
    int *ids = NULL;
    size_t n = 0;
    CHECK(lq_tokenizer_encode(model->tokenizer, prompt, strlen(prompt), 1, &ids, &n, NULL) == 0);
    *count = (int)n;
    return ids;
}

/* Submits prompt on model (adapter: NULL or one of model's). */
static struct lq_request *submit(struct lq_scheduler *scheduler, struct lq_served_model *model,
                                 struct lq_served_adapter *adapter, const char *prompt,
                                 const struct lq_generate_options *options, struct collected *c) {
    struct lq_request_params params = {0};
    params.model = lq_served_model_retain(model);
    params.adapter = adapter ? lq_served_adapter_retain(adapter) : NULL;
    params.prompt = encode(model, prompt, &params.prompt_tokens);
    params.generate = *options;
    params.logprobs = 1;
    struct lq_request_callbacks callbacks = {on_text, on_finish, c};
    struct lq_request *request = NULL;
    struct lq_error err = {0};
    int rc = lq_scheduler_submit(scheduler, &params, &callbacks, &request, &err);
    CHECK_MSG(rc == 0, "submit: %s", err.message);
    CHECK(params.model == NULL && params.adapter == NULL && params.prompt == NULL);
    return request;
}

static int append_text(void *context, const char *text, size_t length) {
    struct collected *c = context;
    if (c->length + length < sizeof c->text) {
        memcpy(c->text + c->length, text, length);
        c->length += length;
    }
    return 0;
}

/* What prompt gives alone with lq_generate on a fresh session on the adapter. */
static void generate_alone(struct lq_served_model *model, struct lq_served_adapter *adapter,
                           const char *prompt, const struct lq_generate_options *options,
                           struct collected *out) {
    memset(out, 0, sizeof *out);
    struct lq_session *session = NULL;
    struct lq_generate_result result;
    struct lq_error err = {0};
    CHECK(lq_session_create(model->runtime, 512, 512, &session, &err) == 0);
    CHECK(lq_session_set_adapter(session, adapter ? adapter->weights : NULL, &err) == 0);
    CHECK_MSG(lq_generate(session, model->tokenizer, prompt, options, append_text, out, &result,
                          &err) == 0,
              "%s", err.message);
    out->completion_tokens = result.completion_tokens;
    lq_session_free(session);
}

static void check_same(const struct collected *got, const struct collected *want, const char *label,
                       int index) {
    CHECK_MSG(got->finishes == 1 && got->error_code == 0, "%s %d: %d finishes, error %d", label,
              index, got->finishes, got->error_code);
    CHECK_MSG(got->length == want->length && memcmp(got->text, want->text, want->length) == 0,
              "%s %d: text differs from its text alone:\n%.*s\n---\n%.*s", label, index,
              (int)got->length, got->text, (int)want->length, want->text);
    CHECK(got->completion_tokens == want->completion_tokens);
}

static const char *const prompts[] = {"Once upon a time",       "The cat",
                                      "Lily and Tom went",      "One day, a little bird",
                                      "Sam had a red ball. He", ""};

#define REQUESTS 24

/* Bare, two REPLACE adapters and an ADD adapter, mixed in one batch (and in batches of 1 and
 * of 5 joining and leaving): each request's text is its text alone, and its log-probabilities
 * are the same bits whatever the batch. */
static void test_mixed_adapters_equal_solo(void) {
    struct lq_backend *backend = NULL;
    struct lq_registry *registry = open_registry(&backend);
    struct lq_served_model *model = lq_registry_get(registry, "lq");
    if (!model) return;
    write_adapter(model->model, "r1", LQ_ADAPTER_REPLACE, 0, 0.05f, 1);
    write_adapter(model->model, "r2", LQ_ADAPTER_REPLACE, 0, 0.05f, 2);
    write_adapter(model->model, "a1", LQ_ADAPTER_ADD, 4, 0.1f, 3);
    struct lq_error err = {0};
    const char *names[] = {"r1", "r2", "a1"};
    for (int i = 0; i < 3; i++)
        CHECK_MSG(
            lq_registry_adapter_load(registry, "lq", names[i], adapter_path(names[i]), &err) == 0,
            "%s", err.message);
    struct lq_served_adapter *adapters[4] = {NULL};
    for (int i = 0; i < 3; i++) adapters[1 + i] = lq_registry_adapter_get(registry, "lq", names[i]);
    CHECK(adapters[1] && adapters[2] && adapters[3]);
    if (!adapters[1] || !adapters[2] || !adapters[3]) return;
    CHECK(adapters[1]->version == 1 && adapters[1]->rank == 8 && adapters[3]->rank == 4);
    static struct collected want[REQUESTS], got[REQUESTS];
    struct lq_generate_options options[REQUESTS];
    for (int i = 0; i < REQUESTS; i++) {
        lq_generate_options_default(&options[i]);
        options[i].sampler.temperature = i % 3 == 0 ? 0.0f : 0.9f;
        options[i].sampler.seed = 50u + (uint64_t)i;
        options[i].max_tokens = 30 + (i * 13) % 60;
        generate_alone(model, adapters[i % 4], prompts[i % 6], &options[i], &want[i]);
    }
    /* greedy on each adapter from the same prompt: they differ from the bare model */
    int differs = 0;
    for (int a = 1; a < 4; a++) {
        struct collected bare, adapted;
        generate_alone(model, NULL, "Once upon a time", &options[0], &bare);
        generate_alone(model, adapters[a], "Once upon a time", &options[0], &adapted);
        differs += bare.length != adapted.length || memcmp(bare.text, adapted.text, bare.length);
    }
    CHECK_MSG(differs == 3, "only %d of 3 adapters change the greedy text", differs);
    static double logprobs[REQUESTS];
    const int max_running[] = {1, REQUESTS, 5};
    for (int pass = 0; pass < 3; pass++) {
        reset_counters();
        struct lq_scheduler_options scheduler_options;
        lq_scheduler_options_default(&scheduler_options);
        scheduler_options.max_running = max_running[pass];
        struct lq_scheduler *scheduler = NULL;
        CHECK(lq_scheduler_create(&scheduler_options, &scheduler, NULL) == 0);
        struct lq_request *requests[REQUESTS];
        memset(got, 0, sizeof got);
        for (int i = 0; i < REQUESTS; i++)
            requests[i] =
                submit(scheduler, model, adapters[i % 4], prompts[i % 6], &options[i], &got[i]);
        wait_finished(REQUESTS);
        unsigned long long completion = 0;
        for (int i = 0; i < REQUESTS; i++)
            completion += (unsigned long long)got[i].completion_tokens;
        struct lq_scheduler_stats stats;
        lq_scheduler_stats(scheduler, &stats);
        /* one forward call per step for every adapter together: far fewer calls than tokens */
        if (pass == 1)
            CHECK_MSG(stats.decode_steps < completion / 8, "%llu decode calls for %llu tokens",
                      stats.decode_steps, completion);
        for (int i = 0; i < REQUESTS; i++) {
            check_same(&got[i], &want[i], "mixed", i);
            if (pass == 0) logprobs[i] = got[i].logprobs;
            CHECK_MSG(got[i].logprobs == logprobs[i],
                      "request %d (adapter %d): log-probabilities %.17g in batches of %d, %.17g "
                      "alone",
                      i, i % 4, got[i].logprobs, max_running[pass], logprobs[i]);
            lq_request_release(requests[i]);
        }
        lq_scheduler_free(scheduler);
    }
    for (int i = 1; i < 4; i++) {
        CHECK(references(&adapters[i]->references) == 2); /* the registry's and ours */
        lq_served_adapter_release(adapters[i]);
    }
    lq_served_model_release(model);
    lq_registry_free(registry);
    backend->ops->destroy(backend);
}

/* Replacing an adapter while requests run on it, and everything that must not replace it. */
static void test_adapter_hot_swap(void) {
    reset_counters();
    struct lq_backend *backend = NULL;
    struct lq_registry *registry = open_registry(&backend);
    struct lq_served_model *model = lq_registry_get(registry, "lq");
    struct lq_served_model *dense = lq_registry_get(registry, "dense");
    if (!model || !dense) return;
    write_adapter(model->model, "v1", LQ_ADAPTER_REPLACE, 0, 0.05f, 21);
    write_adapter(model->model, "v2", LQ_ADAPTER_REPLACE, 0, 0.05f, 22);
    write_adapter(model->model, "rank4", LQ_ADAPTER_REPLACE, 4, 0.1f, 23);
    write_adapter(dense->model, "dense_add", LQ_ADAPTER_ADD, 2, 0.1f, 24);
    struct lq_error err = {0};
    CHECK(lq_registry_adapter_load(registry, "lq", "x", adapter_path("v1"), &err) == 0);
    struct lq_served_adapter *v1 = lq_registry_adapter_get(registry, "lq", "x");
    if (!v1) return;
    CHECK(v1->version == 1 && v1->model == model);

    /* refusals leave v1 serving */
    CHECK(lq_registry_adapter_load(registry, "lq", "x", adapter_path("rank4"), &err) == LQ_EINVAL);
    CHECK(strstr(err.message, "rank") != NULL);
    CHECK(lq_registry_adapter_load(registry, "nope", "x", adapter_path("v1"), &err) ==
          LQ_ENOTFOUND);
    CHECK(lq_registry_adapter_load(registry, "lq", "x", adapter_path("missing"), &err) != 0);
    CHECK(lq_registry_adapter_load(registry, "lq", "bad:name", adapter_path("v1"), &err) ==
          LQ_EINVAL);
    /* a REPLACE adapter of the LQ model does not fit the dense one; an ADD one does */
    CHECK(lq_registry_adapter_load(registry, "dense", "x", adapter_path("v1"), &err) == LQ_EINVAL);
    CHECK(lq_registry_adapter_load(registry, "dense", "add", adapter_path("dense_add"), &err) == 0);
    /* a corrupt copy of v2: its weights cut short */
    char command[1024];
    snprintf(command, sizeof command,
             "cp -r '%s' '%s' && truncate -s 2000 '%s/adapter_model.safetensors'",
             adapter_path("v2"), adapter_path("corrupt"), adapter_path("corrupt"));
    CHECK(system(command) == 0);
    CHECK(lq_registry_adapter_load(registry, "lq", "x", adapter_path("corrupt"), &err) != 0);
    struct lq_served_adapter *still = lq_registry_adapter_get(registry, "lq", "x");
    CHECK(still == v1 && v1->version == 1);
    lq_served_adapter_release(still);

    /* a request on v1 held at the gate, two more queued behind it */
    struct lq_scheduler_options scheduler_options;
    lq_scheduler_options_default(&scheduler_options);
    scheduler_options.max_running = 4;
    struct lq_scheduler *scheduler = NULL;
    CHECK(lq_scheduler_create(&scheduler_options, &scheduler, NULL) == 0);
    struct lq_generate_options options;
    lq_generate_options_default(&options);
    options.sampler.temperature = 0.7f;
    options.sampler.seed = 3;
    options.max_tokens = 60;
    enum { EACH = 3 };
    static struct collected before[EACH], after[EACH], bare;
    memset(before, 0, sizeof before), memset(after, 0, sizeof after), memset(&bare, 0, sizeof bare);
    before[0].gate_at = 2;
    set_gate(1);
    struct lq_request *requests[2 * EACH + 1];
    for (int i = 0; i < EACH; i++) {
        requests[i] = submit(scheduler, model, v1, prompts[i], &options, &before[i]);
        if (i == 0) wait_at_gate();
    }
    CHECK_MSG(lq_registry_adapter_load(registry, "lq", "x", adapter_path("v2"), &err) == 0, "%s",
              err.message);
    struct lq_served_adapter *v2 = lq_registry_adapter_get(registry, "lq", "x");
    if (!v2) return;
    CHECK(v2 != v1 && v2->version == 2 && v2->model == model);
    /* the registry let go of v1: ours and the three requests' remain */
    CHECK(references(&v1->references) == 1 + EACH);
    for (int i = 0; i < EACH; i++)
        requests[EACH + i] = submit(scheduler, model, v2, prompts[i], &options, &after[i]);
    requests[2 * EACH] = submit(scheduler, model, NULL, prompts[0], &options, &bare);
    set_gate(0);
    wait_finished(2 * EACH + 1);
    lq_scheduler_free(scheduler); /* joins: the batch workspaces are gone too */
    struct collected want;
    for (int i = 0; i < EACH; i++) {
        generate_alone(model, v1, prompts[i], &options, &want);
        check_same(&before[i], &want, "before the swap", i);
        generate_alone(model, v2, prompts[i], &options, &want);
        check_same(&after[i], &want, "after the swap", i);
        CHECK(before[i].length != after[i].length ||
              memcmp(before[i].text, after[i].text, before[i].length) != 0);
    }
    generate_alone(model, NULL, prompts[0], &options, &want);
    check_same(&bare, &want, "bare", 0);
    for (int i = 0; i < 2 * EACH + 1; i++) lq_request_release(requests[i]);
    /* every request has let go: v1 is ours alone, v2 the registry's and ours */
    CHECK(references(&v1->references) == 1);
    CHECK(references(&v2->references) == 2);
    lq_served_adapter_release(v1);

    size_t count = 0;
    struct lq_served_adapter **list = lq_registry_adapter_list(registry, &count);
    CHECK(count == 2 && list[0] == v2 && strcmp(list[1]->name, "add") == 0);
    for (size_t i = 0; i < count; i++) lq_served_adapter_release(list[i]);
    free(list);

    /* unload; then a swap of the base model takes its adapters along */
    CHECK(lq_registry_adapter_unload(registry, "lq", "x", &err) == 0);
    CHECK(lq_registry_adapter_unload(registry, "lq", "x", &err) == LQ_ENOTFOUND);
    CHECK(lq_registry_adapter_get(registry, "lq", "x") == NULL);
    CHECK(references(&v2->references) == 1);
    lq_served_adapter_release(v2);
    CHECK(lq_registry_adapter_load(registry, "lq", "x", adapter_path("v1"), &err) == 0);
    struct lq_served_adapter *again = lq_registry_adapter_get(registry, "lq", "x");
    CHECK(again && again->version == 1);
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K-lq", root());
    CHECK(lq_registry_load(registry, "lq", path, NULL, &err) == 0);
    CHECK(lq_registry_adapter_get(registry, "lq", "x") == NULL);
    if (again) {
        CHECK(references(&again->references) == 1);
        lq_served_adapter_release(again);
    }
    CHECK(lq_registry_unload(registry, "dense", &err) == 0);
    list = lq_registry_adapter_list(registry, &count);
    CHECK(count == 0);
    free(list);
    /* our references to the old models are the last ones */
    CHECK(references(&model->references) == 1 && references(&dense->references) == 1);
    lq_served_model_release(model);
    lq_served_model_release(dense);
    lq_registry_free(registry);
    backend->ops->destroy(backend);
}

static void cleanup(void) {
    char command[512];
    snprintf(command, sizeof command, "rm -rf '%s'", directory);
    if (system(command) != 0) fprintf(stderr, "could not remove %s\n", directory);
}

int main(int argc, char **argv) {
    snprintf(directory, sizeof directory, "%s/lqd-adapters-XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(directory)) {
        perror("mkdtemp");
        return 1;
    }
    static const struct lq_test_case cases[] = {LQ_TEST(test_mixed_adapters_equal_solo),
                                                LQ_TEST(test_adapter_hot_swap)};
    int rc = lq_test_run(cases, sizeof cases / sizeof cases[0], argc, argv);
    cleanup();
    return rc;
}
