/* The scheduler against lq_generate: requests decoded together in continuous batches give
 * each the text it gets alone; plus cancellation, the queue limit, hot swap of a model while
 * requests run, and shutdown with requests in flight. Every request's on_finish must come
 * exactly once, and every reference must be dropped (ASan checks that nothing leaks). */
#include "server/registry.h"
#include "server/scheduler.h"
#include "core/file_util.h"
#include "tests/unit/lq_test.h"

#include <pthread.h>
#include <time.h>

static const char *root(void) {
    return getenv("LQ_REPO_ROOT") ? getenv("LQ_REPO_ROOT") : ".";
}

/* One request's results, written on the scheduler thread and read under `lock`. */
struct collected {
    char text[8192];
    size_t length;
    int texts, finishes;
    enum lq_finish_reason reason;
    int prompt_tokens, completion_tokens, error_code;
    int gate_at; /* the scheduler waits at the gate during this on_text call (1-based; 0: never) */
    double logprobs; /* sum of the reported log-probabilities */
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
    struct collected *c = context;
    pthread_mutex_lock(&lock);
    c->finishes++;
    c->reason = reason;
    c->prompt_tokens = prompt_tokens, c->completion_tokens = completion_tokens;
    c->error_code = error ? error->code : 0;
    finished_total++;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
}

static void close_gate(void) {
    pthread_mutex_lock(&lock);
    gate_closed = 1;
    pthread_mutex_unlock(&lock);
}

static void wait_at_gate(void) {
    pthread_mutex_lock(&lock);
    while (!gate_waiting) pthread_cond_wait(&changed, &lock);
    pthread_mutex_unlock(&lock);
}

static void open_gate(void) {
    pthread_mutex_lock(&lock);
    gate_closed = 0;
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

static struct lq_registry *open_registry(struct lq_backend **backend) {
    struct lq_registry *registry = NULL;
    struct lq_error err = {0};
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K-hf", root());
    CHECK(lq_backend_cpu_create(backend, &err) == 0);
    CHECK(lq_registry_create(*backend, &registry, &err) == 0);
    CHECK_MSG(lq_registry_load(registry, "stories", path, NULL, &err) == 0, "%s", err.message);
    return registry;
}

/* The prompt as tokens, BOS first (what lq_generate encodes). */
static int *encode(const struct lq_served_model *model, const char *prompt, int *count) {
    int *ids = NULL;
    size_t n = 0;
    CHECK(lq_tokenizer_encode(model->tokenizer, prompt, strlen(prompt), 1, &ids, &n, NULL) == 0);
    *count = (int)n;
    return ids;
}

static int append_text(void *context, const char *text, size_t length) {
    struct collected *c = context;
    if (c->length + length < sizeof c->text) {
        memcpy(c->text + c->length, text, length);
        c->length += length;
    }
    return 0;
}

/* What the request gives alone, through lq_generate on a fresh session. */
static void generate_alone(struct lq_served_model *model, const char *prompt,
                           const struct lq_generate_options *options, struct collected *out) {
    memset(out, 0, sizeof *out);
    struct lq_session *session = NULL;
    struct lq_generate_result result;
    struct lq_error err = {0};
    int context = lq_runtime_config(model->runtime)->max_seq_len;
    CHECK(lq_session_create(model->runtime, context, 512, &session, &err) == 0);
    CHECK_MSG(lq_generate(session, model->tokenizer, prompt, options, append_text, out, &result,
                          &err) == 0,
              "%s", err.message);
    out->reason = result.finish;
    out->prompt_tokens = result.prompt_tokens, out->completion_tokens = result.completion_tokens;
    lq_session_free(session);
}

static struct lq_request *submit(struct lq_scheduler *scheduler, struct lq_served_model *model,
                                 const char *prompt, const struct lq_generate_options *options,
                                 struct collected *c, int expect) {
    struct lq_request_params params = {0};
    params.model = lq_served_model_retain(model);
    params.prompt = encode(model, prompt, &params.prompt_tokens);
    params.generate = *options;
    params.logprobs = 1;
    struct lq_request_callbacks callbacks = {on_text, on_finish, c};
    struct lq_request *request = NULL;
    struct lq_error err = {0};
    int rc = lq_scheduler_submit(scheduler, &params, &callbacks, &request, &err);
    CHECK_MSG(rc == expect, "submit returned %d (%s), expected %d", rc, err.message, expect);
    if (rc) { /* still ours */
        CHECK(params.model != NULL && params.prompt != NULL);
        lq_served_model_release(params.model);
        free(params.prompt);
    } else {
        CHECK(params.model == NULL && params.prompt == NULL);
    }
    return request;
}

static void check_same(const struct collected *got, const struct collected *want, int index) {
    CHECK_MSG(got->finishes == 1, "request %d: on_finish called %d times", index, got->finishes);
    CHECK_MSG(got->error_code == 0, "request %d: error %d", index, got->error_code);
    CHECK_MSG(got->length == want->length && memcmp(got->text, want->text, want->length) == 0,
              "request %d: text differs from lq_generate's:\n%.*s\n---\n%.*s", index,
              (int)got->length, got->text, (int)want->length, want->text);
    CHECK_MSG(got->reason == want->reason, "request %d: finish %d, alone %d", index, got->reason,
              want->reason);
    CHECK(got->completion_tokens == want->completion_tokens);
    CHECK(got->prompt_tokens == want->prompt_tokens);
}

#define CONCURRENT 32

static const char *const prompts[] = {"",
                                      "Once upon a time",
                                      "The cat",
                                      "Lily and Tom went to the park",
                                      "One day, a little bird",
                                      "Sam had a red ball. He"};

/* Request i's options: temperatures from greedy to hot, its own seed, assorted filters. */
static void concurrent_options(int i, struct lq_generate_options *o) {
    lq_generate_options_default(o);
    static const float temperatures[] = {0.0f, 0.5f, 0.8f, 1.0f, 1.3f};
    o->sampler.temperature = temperatures[i % 5];
    o->sampler.seed = 1000u + (uint64_t)i * 7919u;
    o->sampler.top_k = i % 3 == 0 ? 40 : 0;
    o->sampler.top_p = i % 4 == 1 ? 0.9f : 1.0f;
    o->sampler.repetition_penalty = i % 5 == 2 ? 1.1f : 1.0f;
    o->max_tokens = 20 + (i * 37) % 180;
    if (i % 6 == 5) o->stop[0] = "Lily", o->stop[1] = ".";
}

/* 32 requests with different seeds and temperatures, decoded together (and, with room for
 * only 5 at a time, joining and leaving the batch), each give lq_generate's text alone. Texts
 * rarely show a difference in the last bits of the logits; the log-probabilities do, and they
 * must be the same bits whatever the batch (1, 5 or 32 sequences). */
static void test_concurrent_equals_sequential(void) {
    struct lq_backend *backend = NULL;
    struct lq_registry *registry = open_registry(&backend);
    struct lq_served_model *model = lq_registry_get(registry, "stories");
    CHECK(model != NULL);
    if (!model) return;
    static struct collected want[CONCURRENT], got[CONCURRENT];
    struct lq_generate_options options[CONCURRENT];
    for (int i = 0; i < CONCURRENT; i++) {
        concurrent_options(i, &options[i]);
        generate_alone(model, prompts[i % 6], &options[i], &want[i]);
    }
    static double logprobs[CONCURRENT];
    const int max_running[] = {1, CONCURRENT, 5};
    for (int pass = 0; pass < 3; pass++) {
        reset_counters();
        struct lq_scheduler_options scheduler_options;
        lq_scheduler_options_default(&scheduler_options);
        scheduler_options.max_running = max_running[pass];
        struct lq_scheduler *scheduler = NULL;
        CHECK(lq_scheduler_create(&scheduler_options, &scheduler, NULL) == 0);
        struct lq_request *requests[CONCURRENT];
        memset(got, 0, sizeof got);
        for (int i = 0; i < CONCURRENT; i++)
            requests[i] = submit(scheduler, model, prompts[i % 6], &options[i], &got[i], 0);
        wait_finished(CONCURRENT);
        unsigned long long completion = 0, prompt = 0;
        for (int i = 0; i < CONCURRENT; i++) {
            check_same(&got[i], &want[i], i);
            if (pass == 0) logprobs[i] = got[i].logprobs;
            CHECK_MSG(got[i].logprobs == logprobs[i],
                      "request %d: log-probabilities %.17g in "
                      "batches of up to %d, %.17g alone",
                      i, got[i].logprobs, max_running[pass], logprobs[i]);
            CHECK(got[i].logprobs < 0 || want[i].completion_tokens == 0);
            completion += (unsigned long long)want[i].completion_tokens;
            prompt += (unsigned long long)want[i].prompt_tokens;
            lq_request_release(requests[i]);
        }
        struct lq_scheduler_stats stats;
        lq_scheduler_stats(scheduler, &stats);
        CHECK(stats.requests_finished == CONCURRENT);
        CHECK(stats.completion_tokens == completion && stats.prompt_tokens == prompt);
        CHECK(stats.queued == 0);
        /* whole batches: far fewer steps than tokens */
        if (pass == 1) CHECK(stats.decode_steps < completion / 4);
        lq_scheduler_free(scheduler);
    }
    lq_served_model_release(model);
    lq_registry_free(registry);
    backend->ops->destroy(backend);
}

/* Greedy from BOS equals llama2.c's run.c -t 0 -n 200. */
static void test_greedy_matches_llama2c(void) {
    reset_counters();
    struct lq_backend *backend = NULL;
    struct lq_registry *registry = open_registry(&backend);
    struct lq_served_model *model = lq_registry_get(registry, "stories");
    struct lq_scheduler *scheduler = NULL;
    CHECK(lq_scheduler_create(NULL, &scheduler, NULL) == 0);
    struct lq_generate_options options;
    lq_generate_options_default(&options);
    options.sampler.temperature = 0;
    options.max_tokens = 200;
    static struct collected got;
    memset(&got, 0, sizeof got);
    struct lq_request *request = submit(scheduler, model, "", &options, &got, 0);
    wait_finished(1);
    char path[1024], *expected = NULL;
    size_t length = 0;
    snprintf(path, sizeof path, "%s/models/stories260K/expected_run_t0_n200.txt", root());
    CHECK(lq_file_read_all(path, 1 << 20, &expected, &length, NULL) == 0);
    while (length > 0 && expected[length - 1] == '\n') length--;
    size_t got_length = got.length;
    while (got_length > 0 && got.text[got_length - 1] == '\n') got_length--;
    CHECK_MSG(got_length == length && memcmp(got.text, expected, length) == 0, "%.*s",
              (int)got.length, got.text);
    CHECK(got.completion_tokens == 200 && got.reason == LQ_FINISH_LENGTH);
    free(expected);
    lq_request_release(request);
    lq_scheduler_free(scheduler);
    lq_served_model_release(model);
    lq_registry_free(registry);
    backend->ops->destroy(backend);
}

/* A running request cancelled mid-way and a queued one cancelled before it starts both end
 * with LQ_ECANCELED; a full queue refuses with LQ_EBUSY and leaves the parameters to the
 * caller; impossible requests are refused up front. */
static void test_cancel_and_queue_full(void) {
    reset_counters();
    struct lq_backend *backend = NULL;
    struct lq_registry *registry = open_registry(&backend);
    struct lq_served_model *model = lq_registry_get(registry, "stories");
    struct lq_scheduler_options scheduler_options;
    lq_scheduler_options_default(&scheduler_options);
    scheduler_options.max_running = 1, scheduler_options.max_queued = 2;
    struct lq_scheduler *scheduler = NULL;
    CHECK(lq_scheduler_create(&scheduler_options, &scheduler, NULL) == 0);
    struct lq_generate_options options;
    lq_generate_options_default(&options);
    options.sampler.temperature = 0;
    options.max_tokens = 400;
    static struct collected running, queued, waiting, refused;
    memset(&running, 0, sizeof running), memset(&queued, 0, sizeof queued);
    memset(&waiting, 0, sizeof waiting), memset(&refused, 0, sizeof refused);
    running.gate_at = 3;
    close_gate();
    struct lq_request *a = submit(scheduler, model, "", &options, &running, 0);
    wait_at_gate(); /* the scheduler is inside a's third on_text: a runs, nothing else can */
    struct lq_request *b = submit(scheduler, model, "The cat", &options, &queued, 0);
    struct lq_request *c = submit(scheduler, model, "The dog", &options, &waiting, 0);
    submit(scheduler, model, "The bird", &options, &refused, LQ_EBUSY);
    struct lq_scheduler_stats stats;
    lq_scheduler_stats(scheduler, &stats);
    CHECK(stats.queued == 2 && stats.running <= 1);
    lq_request_cancel(a);
    lq_request_cancel(b);
    open_gate();
    wait_finished(3);
    CHECK(running.finishes == 1 && running.error_code == LQ_ECANCELED);
    CHECK(running.reason == LQ_FINISH_STOP && running.completion_tokens == 3);
    CHECK(queued.finishes == 1 && queued.error_code == LQ_ECANCELED);
    CHECK(queued.completion_tokens == 0 && queued.texts == 0);
    CHECK(waiting.finishes == 1 && waiting.error_code == 0 && waiting.completion_tokens > 3);
    CHECK(refused.finishes == 0);
    /* up-front refusals */
    options.max_tokens = 512; /* plus the prompt's BOS: one more than the context */
    submit(scheduler, model, "", &options, &refused, LQ_EINVAL);
    options.max_tokens = 10;
    options.sampler.temperature = -1;
    submit(scheduler, model, "", &options, &refused, LQ_EINVAL);
    lq_request_release(a);
    lq_request_release(b);
    lq_request_release(c);
    lq_scheduler_free(scheduler);
    CHECK(refused.finishes == 0);
    lq_served_model_release(model);
    lq_registry_free(registry);
    backend->ops->destroy(backend);
}

/* The buffers the backend holds while one request of this prompt and max_tokens runs (read
 * with the scheduler inside the request's second on_text), less those it holds idle; returns
 * once the scheduler has freed what the request held (after on_finish, and the batch once no
 * request runs). */
static long running_buffers(struct lq_backend *backend, struct lq_scheduler *scheduler,
                            struct lq_served_model *model, int max_tokens) {
    reset_counters();
    struct lq_backend_memory idle, running;
    backend->ops->memory(backend, &idle);
    struct lq_generate_options options;
    lq_generate_options_default(&options);
    options.sampler.temperature = 0;
    options.max_tokens = max_tokens;
    static struct collected c;
    memset(&c, 0, sizeof c);
    c.gate_at = 2;
    close_gate();
    struct lq_request *request = submit(scheduler, model, "Once upon a time", &options, &c, 0);
    wait_at_gate();
    backend->ops->memory(backend, &running);
    open_gate();
    wait_finished(1);
    CHECK(c.finishes == 1 && c.error_code == 0 && c.completion_tokens == max_tokens);
    lq_request_release(request);
    struct lq_backend_memory after;
    for (int i = 0; i < 5000; i++) { /* up to 5 s */
        backend->ops->memory(backend, &after);
        if (after.buffers == idle.buffers) break;
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    CHECK_MSG(after.buffers == idle.buffers, "the scheduler still holds %ld bytes of buffers",
              (long)after.buffers - (long)idle.buffers);
    return (long)running.buffers - (long)idle.buffers;
}

/* A request's session holds the positions it can reach (its prompt and max_tokens), not the
 * whole context: two requests that differ only in max_tokens differ in the KV cache they hold
 * by exactly that many positions (the CPU backend counts each buffer rounded to 64 bytes, plus
 * a 64-byte header). */
static void test_session_holds_request_positions(void) {
    struct lq_backend *backend = NULL;
    struct lq_registry *registry = open_registry(&backend);
    struct lq_served_model *model = lq_registry_get(registry, "stories");
    struct lq_scheduler_options scheduler_options;
    lq_scheduler_options_default(&scheduler_options);
    struct lq_scheduler *scheduler = NULL;
    CHECK(lq_scheduler_create(&scheduler_options, &scheduler, NULL) == 0);
    const struct lq_model_config *config = lq_runtime_config(model->runtime);
    int prompt_tokens = 0;
    free(encode(model, "Once upon a time", &prompt_tokens));
    const int short_tokens = 20, long_tokens = 300;
    const long short_bytes = running_buffers(backend, scheduler, model, short_tokens);
    const long long_bytes = running_buffers(backend, scheduler, model, long_tokens);
    const size_t row = (size_t)config->n_kv_heads * config->head_dim * sizeof(float);
#define CPU_BUFFER(bytes) (64 + ((bytes) + 63) / 64 * 64)
    const long kv_short =
        2L * config->n_layers * (long)CPU_BUFFER((size_t)(prompt_tokens + short_tokens) * row);
    const long kv_long =
        2L * config->n_layers * (long)CPU_BUFFER((size_t)(prompt_tokens + long_tokens) * row);
    const long kv_context =
        2L * config->n_layers * (long)CPU_BUFFER((size_t)config->max_seq_len * row);
#undef CPU_BUFFER
    CHECK_MSG(long_bytes - short_bytes == kv_long - kv_short,
              "max_tokens %d and %d: the sessions' buffers differ by %ld bytes, not the %ld of "
              "their KV caches",
              short_tokens, long_tokens, long_bytes - short_bytes, kv_long - kv_short);
    CHECK_MSG(short_bytes < kv_context,
              "a request for %d tokens holds %ld bytes, the whole "
              "context's KV cache is %ld",
              short_tokens, short_bytes, kv_context);
    lq_scheduler_free(scheduler);
    lq_served_model_release(model);
    lq_registry_free(registry);
    backend->ops->destroy(backend);
}

/* A CPU backend with a memory limit (its ops swapped for a copy whose buffer_alloc refuses
 * past limited_budget and whose memory() reports it as the limit), as a GPU's --gpu-memory
 * is. */
static size_t limited_budget;
static const struct lq_backend_ops *cpu_ops_of_limited;
static int limited_buffer_alloc(struct lq_backend *backend, size_t bytes, void **out,
                                struct lq_error *err) {
    struct lq_backend_memory m;
    cpu_ops_of_limited->memory(backend, &m);
    if (m.buffers + m.weights + bytes > limited_budget) {
        *out = NULL;
        return lq_error_set(err, LQ_ENOMEM, "a %zu-byte buffer does not fit the test's budget",
                            bytes);
    }
    return cpu_ops_of_limited->buffer_alloc(backend, bytes, out, err);
}
static void limited_memory(struct lq_backend *backend, struct lq_backend_memory *out) {
    cpu_ops_of_limited->memory(backend, out);
    out->limit = limited_budget;
}
static void limit_backend(struct lq_backend *backend) {
    static struct lq_backend_ops ops;
    cpu_ops_of_limited = backend->ops;
    ops = *backend->ops;
    ops.buffer_alloc = limited_buffer_alloc;
    ops.memory = limited_memory;
    limited_budget = (size_t)-1 / 2;
    backend->ops = &ops;
}

/* Requests whose sessions do not all fit the device's memory wait at the head of the queue
 * while others run, then run: with room for two sessions, five requests admitted together
 * all finish without error and with the text each gives alone, and admissions were put off.
 * A request that does not fit even alone fails with the out-of-memory error. */
static void test_admission_waits_for_memory(void) {
    reset_counters();
    struct lq_backend *backend = NULL;
    struct lq_registry *registry = open_registry(&backend);
    limit_backend(backend); /* its limit far away until measured */
    struct lq_served_model *model = lq_registry_get(registry, "stories");
    struct lq_scheduler_options scheduler_options;
    lq_scheduler_options_default(&scheduler_options);
    scheduler_options.max_running = 5;
    struct lq_scheduler *scheduler = NULL;
    CHECK(lq_scheduler_create(&scheduler_options, &scheduler, NULL) == 0);
    const char *prompt = "Once upon a time";
    const int max_tokens = 60;
    int prompt_tokens = 0;
    free(encode(model, prompt, &prompt_tokens));
    struct lq_generate_options options;
    lq_generate_options_default(&options);
    options.sampler.temperature = 0;
    options.max_tokens = max_tokens;
    struct collected want;
    generate_alone(model, prompt, &options, &want); /* before the budget: a whole context */
    /* one request holds the batch's buffers and its session; allow one session more, and half
     * of a third (each buffer rounded up to 64 bytes plus a 64-byte header besides) */
    struct lq_backend_memory idle;
    backend->ops->memory(backend, &idle);
    const long one = running_buffers(backend, scheduler, model, max_tokens);
    const size_t session =
        lq_session_bytes(model->runtime, prompt_tokens + max_tokens, prompt_tokens) +
        128 * (2 * (size_t)lq_runtime_config(model->runtime)->n_layers + 8);
    limited_budget = idle.buffers + idle.weights + (size_t)one + session + session / 2;

    enum { N = 5 };
    static struct collected got[N];
    struct lq_request *requests[N];
    reset_counters();
    for (int i = 0; i < N; i++) {
        memset(&got[i], 0, sizeof got[i]);
        requests[i] = submit(scheduler, model, prompt, &options, &got[i], 0);
    }
    wait_finished(N);
    for (int i = 0; i < N; i++) {
        check_same(&got[i], &want, i);
        lq_request_release(requests[i]);
    }
    struct lq_scheduler_stats stats;
    lq_scheduler_stats(scheduler, &stats);
    CHECK_MSG(stats.deferred > 0, "no admission was put off");
    CHECK(stats.queued == 0);

    /* alone and still too large: refused with the backend's error, not kept waiting */
    limited_budget = idle.buffers + idle.weights + session / 2;
    static struct collected alone;
    memset(&alone, 0, sizeof alone);
    reset_counters();
    struct lq_request *request = submit(scheduler, model, prompt, &options, &alone, 0);
    wait_finished(1);
    CHECK_MSG(alone.finishes == 1 && alone.error_code == LQ_ENOMEM,
              "a session too large for the device: error %d", alone.error_code);
    lq_request_release(request);
    lq_scheduler_free(scheduler);
    lq_served_model_release(model);
    lq_registry_free(registry);
    backend->ops->destroy(backend);
}

/* Loading a model under a name in use while requests run: the running and queued requests
 * finish on the model they started with, new ones use the new model, and the old model is
 * freed when its last request is done. */
static void test_hot_swap(void) {
    reset_counters();
    struct lq_backend *backend = NULL;
    struct lq_registry *registry = open_registry(&backend);
    struct lq_served_model *old_model = lq_registry_get(registry, "stories");
    struct lq_scheduler *scheduler = NULL;
    CHECK(lq_scheduler_create(NULL, &scheduler, NULL) == 0);
    struct lq_generate_options options;
    lq_generate_options_default(&options);
    options.sampler.temperature = 0.8f;
    options.max_tokens = 60;
    enum { PER_MODEL = 4 };
    static struct collected blocker, before[PER_MODEL], after[PER_MODEL];
    memset(&blocker, 0, sizeof blocker), memset(before, 0, sizeof before);
    memset(after, 0, sizeof after);
    blocker.gate_at = 1;
    close_gate();
    struct lq_request *requests[1 + 2 * PER_MODEL];
    requests[0] = submit(scheduler, old_model, "Once upon a time", &options, &blocker, 0);
    wait_at_gate();
    for (int i = 0; i < PER_MODEL; i++) {
        options.sampler.seed = (uint64_t)i;
        requests[1 + i] = submit(scheduler, old_model, prompts[i], &options, &before[i], 0);
    }
    char bin[1024], tokenizer[1024];
    snprintf(bin, sizeof bin, "%s/models/stories260K/stories260K.bin", root());
    snprintf(tokenizer, sizeof tokenizer, "%s/models/stories260K/tok512.bin", root());
    struct lq_error err = {0};
    CHECK_MSG(lq_registry_load(registry, "stories", bin, tokenizer, &err) == 0, "%s", err.message);
    struct lq_served_model *new_model = lq_registry_get(registry, "stories");
    CHECK(new_model != old_model);
    /* the registry let go of the old model: ours, the blocker's and the queued ones' remain */
    CHECK(__atomic_load_n(&old_model->references, __ATOMIC_SEQ_CST) == 1 + 1 + PER_MODEL);
    for (int i = 0; i < PER_MODEL; i++) {
        options.sampler.seed = (uint64_t)i;
        requests[1 + PER_MODEL + i] =
            submit(scheduler, new_model, prompts[i], &options, &after[i], 0);
    }
    CHECK(__atomic_load_n(&new_model->references, __ATOMIC_SEQ_CST) == 2 + PER_MODEL);
    size_t count = 0;
    struct lq_served_model **list = lq_registry_list(registry, &count);
    CHECK(count == 1 && list[0] == new_model);
    for (size_t i = 0; i < count; i++) lq_served_model_release(list[i]);
    free(list);
    open_gate();
    wait_finished(1 + 2 * PER_MODEL);
    lq_scheduler_free(scheduler); /* joins: the batch workspaces are gone too */
    struct collected want;
    options.sampler.seed = 0;
    generate_alone(old_model, "Once upon a time", &options, &want);
    check_same(&blocker, &want, 0);
    for (int i = 0; i < PER_MODEL; i++) {
        options.sampler.seed = (uint64_t)i;
        generate_alone(old_model, prompts[i], &options, &want);
        check_same(&before[i], &want, 1 + i);
        generate_alone(new_model, prompts[i], &options, &want);
        check_same(&after[i], &want, 1 + PER_MODEL + i);
    }
    for (int i = 0; i < 1 + 2 * PER_MODEL; i++) lq_request_release(requests[i]);
    CHECK(__atomic_load_n(&old_model->references, __ATOMIC_SEQ_CST) == 1);
    CHECK(__atomic_load_n(&new_model->references, __ATOMIC_SEQ_CST) == 2);
    CHECK(lq_registry_unload(registry, "stories", NULL) == 0);
    CHECK(lq_registry_unload(registry, "stories", NULL) == LQ_ENOTFOUND);
    CHECK(lq_registry_get(registry, "stories") == NULL);
    CHECK(__atomic_load_n(&new_model->references, __ATOMIC_SEQ_CST) == 1);
    lq_served_model_release(old_model); /* the last references: both are freed here */
    lq_served_model_release(new_model);
    lq_registry_free(registry);
    backend->ops->destroy(backend);
}

/* Freeing the scheduler with requests running and queued finishes each exactly once. */
static void test_free_with_requests_in_flight(void) {
    reset_counters();
    struct lq_backend *backend = NULL;
    struct lq_registry *registry = open_registry(&backend);
    struct lq_served_model *model = lq_registry_get(registry, "stories");
    struct lq_scheduler_options scheduler_options;
    lq_scheduler_options_default(&scheduler_options);
    scheduler_options.max_running = 2;
    struct lq_scheduler *scheduler = NULL;
    CHECK(lq_scheduler_create(&scheduler_options, &scheduler, NULL) == 0);
    struct lq_generate_options options;
    lq_generate_options_default(&options);
    options.max_tokens = 400;
    options.sampler.temperature = 0;
    enum { REQUESTS = 5 };
    static struct collected got[REQUESTS];
    memset(got, 0, sizeof got);
    got[0].gate_at = 2;
    close_gate();
    struct lq_request *requests[REQUESTS];
    for (int i = 0; i < REQUESTS; i++)
        requests[i] = submit(scheduler, model, prompts[i], &options, &got[i], 0);
    wait_at_gate();
    lq_request_release(requests[4]); /* a caller may let go before the end */
    open_gate();
    lq_scheduler_free(scheduler);
    int cancelled = 0;
    for (int i = 0; i < REQUESTS; i++) {
        CHECK(got[i].finishes == 1);
        cancelled += got[i].error_code == LQ_ECANCELED;
        if (i < 4) lq_request_release(requests[i]);
    }
    CHECK(cancelled >= 3); /* at most the two running could have finished */
    CHECK(__atomic_load_n(&model->references, __ATOMIC_SEQ_CST) == 2);
    lq_served_model_release(model);
    lq_registry_free(registry);
    backend->ops->destroy(backend);
}

LQ_TEST_MAIN(LQ_TEST(test_concurrent_equals_sequential), LQ_TEST(test_greedy_matches_llama2c),
             LQ_TEST(test_cancel_and_queue_full), LQ_TEST(test_hot_swap),
             LQ_TEST(test_free_with_requests_in_flight),
             LQ_TEST(test_session_holds_request_positions),
             LQ_TEST(test_admission_waits_for_memory))
