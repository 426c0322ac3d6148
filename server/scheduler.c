/* Continuous batching on one thread. Each iteration: drop queued requests that were cancelled
 * or timed out; admit queued requests while fewer than max_running sequences run (each gets
 * its own session, its prompt prefilled and its first token sampled); then one decode step:
 * the running sequences of each model go through lq_forward_batch together, and each samples
 * its next token with its own sampler. A sequence's tokens depend only on its own logits,
 * sampler and history, and its logits do not depend on its batch-mates, so a request gives the
 * text lq_generate gives it alone. Requests on different adapters of a model decode in the
 * same step: their sessions are ordered by adapter, so each adapter's rows are one run.
 *
 * Threads: the HTTP threads call submit, cancel, release and stats; everything else (the
 * running set, sessions, batches, callbacks) belongs to the scheduler thread. They share only
 * the queue and the statistics (under `lock`), and each request's reference count and cancel
 * flag (atomics). */
#include "server/scheduler.h"

#include <assert.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

/* Prompt tokens per forward call at most, as lqd generate uses: prefill in the same chunks
 * gives the same logits. */
#define LQ_SCHEDULER_PREFILL_CHUNK 512

struct lq_request {
    int references; /* atomic: the scheduler's (until on_finish returns) and the caller's */
    int cancelled;  /* atomic */
    struct lq_request *next; /* in the queue (under the scheduler's lock) */
    struct lq_served_model *model;
    struct lq_served_adapter *adapter; /* NULL: the bare model */
    int *prompt, prompt_tokens;
    int max_tokens, logprobs, context;
    double deadline; /* monotonic seconds; 0: none */
    struct lq_request_callbacks callbacks;
    struct lq_sampler *sampler;
    struct lq_text_stream *stream;
    /* from admission on (scheduler thread) */
    struct lq_session *session;
    int *history; /* prompt then generated tokens, for the repetition penalty */
    size_t seen;
    int next_token; /* sampled, to be fed at the next decode step */
    int token;      /* what on_text reports: the token being pushed, -1 at the end */
    float logprob;
};

/* The decode workspace of one model that has running sequences. */
struct model_batch {
    struct lq_served_model *model; /* a reference: the workspace borrows its runtime */
    struct lq_batch *batch;
    float *logits; /* host [max_running, vocab] */
    int vocab;
};

struct lq_scheduler {
    struct lq_scheduler_options options;
    pthread_t thread;
    pthread_mutex_t lock; /* guards the queue, stopping and stats */
    pthread_cond_t wake;  /* work arrived, or stopping */
    struct lq_request *head, *tail;
    int queued, stopping;
    struct lq_scheduler_stats stats;
    /* the scheduler thread's own */
    struct lq_request **running;
    int running_count;
    /* one per model with running sequences, plus (within a step) those whose sequences were
     * all just cancelled: fewer than 2 * max_running */
    struct model_batch *batches;
    int batch_count;
    int *members; /* one decode group, as indices into running: [max_running] */
    int *order;   /* the group's members gathered by adapter: [max_running] */
    struct lq_session **sessions;
    int *tokens;
    char *grouped;                     /* running[i] already stepped this iteration */
    struct lq_sample_row *sample_rows; /* one step's rows for the sample op: [max_running] */
    int *sampled;                      /* its tokens and logprobs: [max_running] */
    float *sampled_logprob;
    float *prefill_logits;
    size_t prefill_capacity;
};

static double monotonic_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

void lq_scheduler_options_default(struct lq_scheduler_options *options) {
    options->max_running = 16;
    options->max_queued = 64;
    options->context = 0;
}

/* Frees what the request holds; the struct itself goes with its last reference. */
static void request_release_resources(struct lq_request *r) {
    lq_session_free(r->session); /* before the model whose runtime it uses */
    r->session = NULL;
    lq_sampler_free(r->sampler);
    r->sampler = NULL;
    lq_text_stream_free(r->stream);
    r->stream = NULL;
    free(r->history);
    r->history = NULL;
    free(r->prompt);
    r->prompt = NULL;
    lq_served_adapter_release(r->adapter); /* after the session that used it */
    r->adapter = NULL;
    lq_served_model_release(r->model);
    r->model = NULL;
}

void lq_request_release(struct lq_request *request) {
    if (!request) return;
    if (__atomic_sub_fetch(&request->references, 1, __ATOMIC_ACQ_REL) == 0) {
        request_release_resources(request);
        free(request);
    }
}

void lq_request_cancel(struct lq_request *request) {
    if (request) __atomic_store_n(&request->cancelled, 1, __ATOMIC_RELAXED);
}

/* The stream's callback: final text goes to the request's on_text with the current token. */
static int forward_text(void *context, const char *text, size_t length) {
    struct lq_request *r = context;
    if (r->callbacks.on_text)
        r->callbacks.on_text(r->callbacks.context, text, length, r->token, r->logprob);
    return 0; /* cancellation comes through the flag, checked between steps */
}

/* Ends a request: held-back text, on_finish, statistics, then the scheduler's reference. */
static void request_finish(struct lq_scheduler *s, struct lq_request *r,
                           enum lq_finish_reason reason, const struct lq_error *error) {
    r->token = -1, r->logprob = 0.0f;
    if (r->stream) lq_text_stream_flush(r->stream);
    int completion = r->stream ? lq_text_stream_tokens(r->stream) : 0;
    /* counted first: whoever on_finish wakes sees the request in the statistics */
    pthread_mutex_lock(&s->lock);
    s->stats.completion_tokens += (unsigned long long)completion;
    s->stats.requests_finished++;
    pthread_mutex_unlock(&s->lock);
    if (r->callbacks.on_finish)
        r->callbacks.on_finish(r->callbacks.context, reason, r->prompt_tokens, completion, error);
    request_release_resources(r);
    lq_request_release(r);
}

static void request_fail(struct lq_scheduler *s, struct lq_request *r, int code,
                         enum lq_finish_reason reason, const char *message) {
    struct lq_error error;
    lq_error_set(&error, code, "%s", message);
    request_finish(s, r, reason, &error);
}

/* Finishes r if it was cancelled or ran out of time; returns 1 then. */
static int request_interrupted(struct lq_scheduler *s, struct lq_request *r, double now) {
    if (__atomic_load_n(&r->cancelled, __ATOMIC_RELAXED)) {
        request_fail(s, r, LQ_ECANCELED, LQ_FINISH_STOP, "the request was cancelled");
        return 1;
    }
    if (r->deadline > 0 && now >= r->deadline) {
        request_fail(s, r, LQ_ETIMEDOUT, LQ_FINISH_LENGTH, "the request timed out");
        return 1;
    }
    return 0;
}

/* Hands r's next token (or a negative code: sampling failed) to its text, as lq_generate's
 * loop does; returns 1 when r has finished (and was finished here). */
static int request_take(struct lq_scheduler *s, struct lq_request *r, int token, float logprob) {
    struct lq_error err = {0};
    if (token < 0) {
        lq_error_set(&err, token, "sampling failed");
        request_finish(s, r, LQ_FINISH_STOP, &err);
        return 1;
    }
    r->token = token, r->logprob = logprob;
    enum lq_finish_reason reason = LQ_FINISH_LENGTH;
    int ended = lq_text_stream_push(r->stream, token, &reason, &err);
    if (ended) {
        request_finish(s, r, reason, ended < 0 ? &err : NULL);
        return 1;
    }
    r->history[r->seen++] = token;
    if (lq_text_stream_tokens(r->stream) >= r->max_tokens ||
        lq_session_position(r->session) >= lq_session_context(r->session)) {
        request_finish(s, r, LQ_FINISH_LENGTH, NULL);
        return 1;
    }
    r->next_token = token;
    return 0;
}

/* Samples r's next token from host logits; returns 1 when r has finished. */
static int request_advance(struct lq_scheduler *s, struct lq_request *r, float *logits) {
    float logprob = 0.0f;
    int token =
        lq_sampler_sample(r->sampler, logits, r->history, r->seen, r->logprobs ? &logprob : NULL);
    return request_take(s, r, token, logprob);
}

/* Whether `bytes` more fit under the backend's memory limit (always, where it has none),
 * keeping back a headroom for what the running sequences' steps may still take: a device's
 * workspaces grow with a step's batch (the tensor-core GEMM's partial sums, prefill tiles), and
 * a step that cannot grow one fails every request in it. The headroom is a twentieth of the
 * limit, at most 256 MiB (prefill's fp16 tiles of Q are 16 MiB, cuBLAS's workspace 32). */
static int backend_fits(struct lq_backend *backend, size_t bytes) {
    struct lq_backend_memory m;
    backend->ops->memory(backend, &m);
    if (m.limit == 0) return 1;
    size_t headroom = m.limit / 20;
    if (headroom > ((size_t)256 << 20)) headroom = (size_t)256 << 20;
    const size_t used = m.weights + m.buffers + m.scratch + m.jobs + headroom;
    return used <= m.limit && bytes <= m.limit - used;
}

/* request_admit's answers. */
enum { ADMIT_FINISHED = 0, ADMIT_RUNNING = 1, ADMIT_DEFERRED = 2 };

/* Starts a queued request: session, prefill, first token. ADMIT_RUNNING when it runs on,
 * ADMIT_FINISHED when it has ended (refused, failed or done), ADMIT_DEFERRED when its session
 * does not fit the device's memory while other requests run: it goes back to the head of the
 * queue untouched and starts when they have freed enough (alone, it fails with the backend's
 * out-of-memory error instead). */
static int request_admit(struct lq_scheduler *s, struct lq_request *r) {
    if (request_interrupted(s, r, monotonic_seconds())) return ADMIT_FINISHED;
    struct lq_error err = {0};
    int chunk = r->prompt_tokens < LQ_SCHEDULER_PREFILL_CHUNK ? r->prompt_tokens
                                                              : LQ_SCHEDULER_PREFILL_CHUNK;
    /* The session holds the positions this request can reach, its prompt and max_tokens (their
     * sum was checked against the context at submission), not the whole context: a KV cache
     * is allocated whole, in device memory on a GPU, and a 7B model's takes 1 MiB a position
     * (4 GiB at 4096): 256 tokens after a 100-token prompt now hold 356 positions, not 4096. */
    const long reach = (long)r->prompt_tokens + r->max_tokens;
    const int positions = reach < r->context ? (int)reach : r->context;
    int rc = LQ_OK;
    if (r->max_tokens > 0) {
        struct lq_runtime *runtime = r->model->runtime;
        /* weighed first: a session that fails half-way frees what it got, and on a GPU each
         * free waits for the device */
        if (s->running_count > 0 &&
            !backend_fits(r->model->backend, lq_session_bytes(runtime, positions, chunk)))
            return ADMIT_DEFERRED;
        rc = lq_session_create(runtime, positions, chunk, &r->session, &err);
        if (rc == LQ_ENOMEM && s->running_count > 0) return ADMIT_DEFERRED;
    }
    pthread_mutex_lock(&s->lock);
    s->stats.prompt_tokens += (unsigned long long)r->prompt_tokens;
    pthread_mutex_unlock(&s->lock);
    if (r->max_tokens == 0) {
        request_finish(s, r, LQ_FINISH_LENGTH, NULL);
        return ADMIT_FINISHED;
    }
    if (!rc && r->adapter) rc = lq_session_set_adapter(r->session, r->adapter->weights, &err);
    size_t vocab = (size_t)lq_runtime_config(r->model->runtime)->vocab_size;
    if (!rc && s->prefill_capacity < vocab) {
        float *grown = realloc(s->prefill_logits, vocab * sizeof *grown);
        if (!grown)
            rc = lq_error_set(&err, LQ_ENOMEM, "out of memory");
        else
            s->prefill_logits = grown, s->prefill_capacity = vocab;
    }
    /* the same chunks as lq_generate on a session of LQ_SCHEDULER_PREFILL_CHUNK */
    for (int i = 0; i < r->prompt_tokens && !rc;) {
        int n = r->prompt_tokens - i < lq_session_max_batch(r->session)
                    ? r->prompt_tokens - i
                    : lq_session_max_batch(r->session);
        rc = lq_session_forward(r->session, r->prompt + i, n, 0, s->prefill_logits, &err);
        i += n;
    }
    if (rc) {
        request_finish(s, r, LQ_FINISH_STOP, &err);
        return ADMIT_FINISHED;
    }
    free(r->prompt); /* history keeps a copy */
    r->prompt = NULL;
    return request_advance(s, r, s->prefill_logits) ? ADMIT_FINISHED : ADMIT_RUNNING;
}

static struct model_batch *model_batch_get(struct lq_scheduler *s, struct lq_served_model *model,
                                           struct lq_error *err) {
    for (int i = 0; i < s->batch_count; i++)
        if (s->batches[i].model == model) return &s->batches[i];
    assert(s->batch_count < 2 * s->options.max_running);
    struct model_batch *b = &s->batches[s->batch_count];
    memset(b, 0, sizeof *b);
    b->vocab = lq_runtime_config(model->runtime)->vocab_size;
    if (lq_batch_create(model->runtime, s->options.max_running, &b->batch, err)) return NULL;
    b->logits = malloc((size_t)s->options.max_running * b->vocab * sizeof *b->logits);
    if (!b->logits) {
        lq_batch_free(b->batch);
        lq_error_set(err, LQ_ENOMEM, "out of memory");
        return NULL;
    }
    b->model = lq_served_model_retain(model);
    s->batch_count++;
    return b;
}

/* Frees the workspaces of models no running sequence uses (all of them when everything has
 * finished), so a swapped-out model is not kept alive by its workspace. */
static void model_batches_prune(struct lq_scheduler *s) {
    for (int i = 0; i < s->batch_count;) {
        int used = 0;
        for (int j = 0; j < s->running_count && !used; j++)
            used = s->running[j]->model == s->batches[i].model;
        if (used) {
            i++;
            continue;
        }
        lq_batch_free(s->batches[i].batch);
        free(s->batches[i].logits);
        lq_served_model_release(s->batches[i].model);
        s->batches[i] = s->batches[--s->batch_count];
    }
}

/* Samples the n rows of a decode step where they are, with one call of the backend's sample
 * op: each request's uniform is drawn from its own sampler as lq_sampler_sample would draw it,
 * so the text is the same as on the host (bit for bit on the CPU backend). The op has no
 * repetition penalty: rows that use one are copied to the host and sampled there (the op gets
 * a greedy placeholder for them, which draws nothing). Fills s->sampled and s->sampled_logprob. */
static int sample_step(struct lq_scheduler *s, struct model_batch *b, struct lq_backend *backend,
                       int n, struct lq_error *err) {
    const float *logits = lq_batch_device_logits(b->batch);
    int vocab = lq_sampler_vocab_size(s->running[s->members[0]]->sampler), logprobs = 0;
    if (vocab > b->vocab)
        return lq_error_set(err, LQ_EINVAL,
                            "the tokenizer's vocabulary (%d) exceeds the model's (%d)", vocab,
                            b->vocab);
    for (int j = 0; j < n; j++) {
        struct lq_request *r = s->running[s->members[j]];
        const struct lq_sampler_params *p = lq_sampler_get_params(r->sampler);
        logprobs |= r->logprobs;
        s->sample_rows[j] = p->repetition_penalty != 1.0f
                                ? (struct lq_sample_row){0.0f, 0, 1.0f, 0.0f, 0.0}
                                : (struct lq_sample_row){p->temperature, p->top_k, p->top_p,
                                                         p->min_p, lq_sampler_draw(r->sampler)};
    }
    int rc = backend->ops->sample(backend, logits, n, vocab, b->vocab, s->sample_rows, s->sampled,
                                  logprobs ? s->sampled_logprob : NULL);
    if (rc) return lq_error_set(err, rc, "sampling failed on the %s backend", backend->ops->name);
    for (int j = 0; j < n; j++) {
        struct lq_request *r = s->running[s->members[j]];
        if (lq_sampler_get_params(r->sampler)->repetition_penalty == 1.0f) {
            if (!r->logprobs) s->sampled_logprob[j] = 0.0f;
            continue;
        }
        float *row = b->logits + (size_t)j * b->vocab;
        rc = backend->ops->copy_to_host(backend, row, logits + (size_t)j * b->vocab,
                                        (size_t)b->vocab * sizeof *row);
        if (rc)
            return lq_error_set(err, rc, "copying logits from the %s backend", backend->ops->name);
        s->sampled_logprob[j] = 0.0f;
        s->sampled[j] = lq_sampler_sample(r->sampler, row, r->history, r->seen,
                                          r->logprobs ? &s->sampled_logprob[j] : NULL);
    }
    return LQ_OK;
}

/* One decode step of every running sequence, a lq_forward_batch per model, sampled where the
 * logits are when the backend can (sample_step), else on the host. */
static void decode_step(struct lq_scheduler *s) {
    double now = monotonic_seconds();
    int kept = 0;
    for (int i = 0; i < s->running_count; i++)
        if (!request_interrupted(s, s->running[i], now)) s->running[kept++] = s->running[i];
    s->running_count = kept;
    memset(s->grouped, 0, (size_t)s->options.max_running);
    int steps = 0;
    for (int first = 0; first < s->running_count; first++) {
        if (s->grouped[first]) continue;
        struct lq_served_model *model = s->running[first]->model;
        int n = 0;
        for (int i = first; i < s->running_count; i++)
            if (!s->grouped[i] && s->running[i]->model == model) {
                s->grouped[i] = 1;
                s->order[n++] = i;
            }
        /* gathered by adapter (in order of first appearance), so each adapter's sequences are
         * one run of rows and its low-rank part one product */
        for (int k = 0, placed = 0; k < n; k++) {
            if (s->order[k] < 0) continue;
            const struct lq_served_adapter *adapter = s->running[s->order[k]]->adapter;
            for (int j = k; j < n; j++) {
                int i = s->order[j];
                if (i < 0 || s->running[i]->adapter != adapter) continue;
                s->order[j] = -1;
                s->members[placed] = i;
                s->sessions[placed] = s->running[i]->session;
                s->tokens[placed++] = s->running[i]->next_token;
            }
        }
        struct lq_error err = {0};
        struct model_batch *b = model_batch_get(s, model, &err);
        int on_device = model->backend->ops->sample != NULL;
        int failed = !b || lq_forward_batch(b->batch, s->sessions, s->tokens, n,
                                            on_device ? NULL : b->logits, &err);
        if (!failed && on_device) failed = sample_step(s, b, model->backend, n, &err) != 0;
        steps += !failed;
        for (int j = 0; j < n; j++) {
            struct lq_request **slot = &s->running[s->members[j]];
            if (failed) request_finish(s, *slot, LQ_FINISH_STOP, &err);
            if (failed || (on_device ? request_take(s, *slot, s->sampled[j], s->sampled_logprob[j])
                                     : request_advance(s, *slot, b->logits + (size_t)j * b->vocab)))
                *slot = NULL; /* finished: it leaves the running set below */
        }
    }
    kept = 0;
    for (int i = 0; i < s->running_count; i++)
        if (s->running[i]) s->running[kept++] = s->running[i];
    s->running_count = kept;
    model_batches_prune(s);
    pthread_mutex_lock(&s->lock);
    s->stats.running = s->running_count;
    s->stats.decode_steps += (unsigned long long)steps;
    pthread_mutex_unlock(&s->lock);
}

/* Under the lock: unlinks queued requests that were cancelled or timed out into *dropped, and
 * up to `slots` others, oldest first, into *admitted (both in queue order). */
static void queue_take(struct lq_scheduler *s, int slots, double now, struct lq_request **admitted,
                       struct lq_request **dropped) {
    struct lq_request **admitted_tail = admitted, **dropped_tail = dropped, **link = &s->head;
    s->tail = NULL;
    while (*link) {
        struct lq_request *r = *link;
        int drop = __atomic_load_n(&r->cancelled, __ATOMIC_RELAXED) ||
                   (r->deadline > 0 && now >= r->deadline);
        if (drop || slots > 0) {
            *link = r->next;
            r->next = NULL;
            if (drop)
                *dropped_tail = r, dropped_tail = &r->next;
            else
                *admitted_tail = r, admitted_tail = &r->next, slots--;
            s->queued--;
        } else {
            s->tail = r;
            link = &r->next;
        }
    }
    s->stats.queued = s->queued;
}

/* Puts a list of requests taken by queue_take back at the head of the queue, in its order. */
static void queue_return(struct lq_scheduler *s, struct lq_request *list) {
    if (!list) return;
    int count = 1;
    struct lq_request *last = list;
    for (; last->next; last = last->next) count++;
    pthread_mutex_lock(&s->lock);
    last->next = s->head;
    if (!s->head) s->tail = last;
    s->head = list;
    s->queued += count;
    s->stats.queued = s->queued;
    pthread_mutex_unlock(&s->lock);
}

/* Finishes every request of a list (each with error when given, else by its own state). */
static void finish_list(struct lq_scheduler *s, struct lq_request *list, int code,
                        const char *message) {
    while (list) {
        struct lq_request *r = list;
        list = r->next;
        if (code)
            request_fail(s, r, code, LQ_FINISH_STOP, message);
        else
            request_interrupted(s, r, monotonic_seconds());
    }
}

static void release_free_memory(void) {
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
}

static void *scheduler_main(void *argument) {
    struct lq_scheduler *s = argument;
    for (;;) {
        struct lq_request *admitted = NULL, *dropped = NULL;
        pthread_mutex_lock(&s->lock);
        if (!s->stopping && !s->head && s->running_count == 0) {
            /* idle: hand back what the finished requests' sessions and buffers left in
             * malloc's free lists (glibc keeps it: 100 MB after 96 requests of SmolLM2) */
            pthread_mutex_unlock(&s->lock);
            release_free_memory();
            pthread_mutex_lock(&s->lock);
        }
        while (!s->stopping && !s->head && s->running_count == 0)
            pthread_cond_wait(&s->wake, &s->lock);
        if (s->stopping) {
            pthread_mutex_unlock(&s->lock);
            break;
        }
        queue_take(s, s->options.max_running - s->running_count, monotonic_seconds(), &admitted,
                   &dropped);
        pthread_mutex_unlock(&s->lock);
        finish_list(s, dropped, 0, NULL);
        while (admitted) {
            struct lq_request *r = admitted;
            admitted = r->next;
            r->next = NULL;
            const int state = request_admit(s, r);
            if (state == ADMIT_RUNNING) s->running[s->running_count++] = r;
            if (state == ADMIT_DEFERRED) { /* it and those after it wait, in order */
                r->next = admitted;
                queue_return(s, r);
                pthread_mutex_lock(&s->lock);
                s->stats.deferred++;
                pthread_mutex_unlock(&s->lock);
                break;
            }
        }
        decode_step(s);
    }
    /* stopping: everything still here ends, with on_finish */
    for (int i = 0; i < s->running_count; i++)
        request_fail(s, s->running[i], LQ_ECANCELED, LQ_FINISH_STOP, "the server is stopping");
    s->running_count = 0;
    pthread_mutex_lock(&s->lock);
    struct lq_request *queued = s->head;
    s->head = s->tail = NULL;
    s->queued = s->stats.queued = s->stats.running = 0;
    pthread_mutex_unlock(&s->lock);
    finish_list(s, queued, LQ_ECANCELED, "the server is stopping");
    model_batches_prune(s);
    return NULL;
}

int lq_scheduler_create(const struct lq_scheduler_options *options, struct lq_scheduler **out,
                        struct lq_error *err) {
    *out = NULL;
    struct lq_scheduler_options o;
    lq_scheduler_options_default(&o);
    if (options) o = *options;
    if (o.max_running < 1 || o.max_running > 4096)
        return lq_error_set(err, LQ_EINVAL, "max_running %d: must be 1..4096", o.max_running);
    if (o.max_queued < 1)
        return lq_error_set(err, LQ_EINVAL, "max_queued %d: must be >= 1", o.max_queued);
    if (o.context < 0) return lq_error_set(err, LQ_EINVAL, "context %d: must be >= 0", o.context);
    struct lq_scheduler *s = calloc(1, sizeof *s);
    if (!s) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    s->options = o;
    size_t n = (size_t)o.max_running;
    s->running = calloc(n, sizeof *s->running);
    s->batches = calloc(2 * n, sizeof *s->batches);
    s->members = calloc(n, sizeof *s->members);
    s->order = calloc(n, sizeof *s->order);
    s->sessions = calloc(n, sizeof *s->sessions);
    s->tokens = calloc(n, sizeof *s->tokens);
    s->grouped = calloc(n, 1);
    s->sample_rows = calloc(n, sizeof *s->sample_rows);
    s->sampled = calloc(n, sizeof *s->sampled);
    s->sampled_logprob = calloc(n, sizeof *s->sampled_logprob);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->wake, NULL);
    int rc = !s->running || !s->batches || !s->members || !s->order || !s->sessions || !s->tokens ||
                     !s->grouped || !s->sample_rows || !s->sampled || !s->sampled_logprob
                 ? lq_error_set(err, LQ_ENOMEM, "out of memory")
                 : 0;
    if (!rc && pthread_create(&s->thread, NULL, scheduler_main, s))
        rc = lq_error_set(err, LQ_ENOMEM, "cannot start the scheduler thread");
    if (rc) {
        pthread_cond_destroy(&s->wake);
        pthread_mutex_destroy(&s->lock);
        free(s->running), free(s->batches), free(s->members), free(s->order), free(s->sessions);
        free(s->tokens), free(s->grouped), free(s->sample_rows), free(s->sampled);
        free(s->sampled_logprob), free(s);
        return rc;
    }
    *out = s;
    return LQ_OK;
}

void lq_scheduler_free(struct lq_scheduler *s) {
    if (!s) return;
    pthread_mutex_lock(&s->lock);
    s->stopping = 1;
    pthread_cond_broadcast(&s->wake);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->thread, NULL);
    pthread_cond_destroy(&s->wake);
    pthread_mutex_destroy(&s->lock);
    free(s->running), free(s->batches), free(s->members), free(s->order), free(s->sessions);
    free(s->tokens), free(s->grouped), free(s->prefill_logits), free(s->sample_rows);
    free(s->sampled), free(s->sampled_logprob), free(s);
}

/* Positions a sequence of model gets. */
static int context_for(const struct lq_scheduler *s, const struct lq_served_model *model) {
    int limit = lq_runtime_config(model->runtime)->max_seq_len;
    return s->options.context > 0 && s->options.context < limit ? s->options.context : limit;
}

static int check_params(const struct lq_scheduler *s, const struct lq_request_params *p,
                        struct lq_error *err) {
    if (!p->model || !p->model->runtime || !p->model->tokenizer)
        return lq_error_set(err, LQ_EINVAL, "the request names no loaded model");
    if (p->adapter && p->adapter->model != p->model)
        return lq_error_set(err, LQ_EINVAL, "adapter '%s' belongs to another model",
                            p->adapter->name);
    if (!p->prompt || p->prompt_tokens < 1)
        return lq_error_set(err, LQ_EINVAL, "the prompt is empty");
    int vocab = lq_runtime_config(p->model->runtime)->vocab_size;
    for (int i = 0; i < p->prompt_tokens; i++)
        if (p->prompt[i] < 0 || p->prompt[i] >= vocab)
            return lq_error_set(err, LQ_EINVAL, "prompt token %d is outside the vocabulary (%d)",
                                p->prompt[i], vocab);
    if (p->generate.max_tokens < 0) return lq_error_set(err, LQ_EINVAL, "max_tokens must be >= 0");
    int context = context_for(s, p->model);
    if ((long)p->prompt_tokens + p->generate.max_tokens > context)
        return lq_error_set(err, LQ_EINVAL,
                            "the prompt (%d tokens) plus max_tokens (%d) exceed the context of "
                            "%d positions",
                            p->prompt_tokens, p->generate.max_tokens, context);
    if (!(p->timeout_seconds >= 0) || !isfinite(p->timeout_seconds))
        return lq_error_set(err, LQ_EINVAL, "timeout must be a number of seconds >= 0");
    return LQ_OK;
}

int lq_scheduler_submit(struct lq_scheduler *s, struct lq_request_params *params,
                        const struct lq_request_callbacks *callbacks, struct lq_request **handle,
                        struct lq_error *err) {
    if (handle) *handle = NULL;
    int rc = check_params(s, params, err);
    if (rc) return rc;
    struct lq_request *r = calloc(1, sizeof *r);
    if (!r) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    r->references = handle ? 2 : 1;
    r->prompt_tokens = params->prompt_tokens;
    r->max_tokens = params->generate.max_tokens;
    r->logprobs = params->logprobs;
    r->context = context_for(s, params->model);
    if (callbacks) r->callbacks = *callbacks;
    if (params->timeout_seconds > 0) r->deadline = monotonic_seconds() + params->timeout_seconds;
    /* the sampler chooses among the tokenizer's pieces, as lq_generate's does */
    const struct lq_tokenizer *tokenizer = params->model->tokenizer;
    int vocab = lq_tokenizer_vocab_size(tokenizer);
    size_t history = (size_t)params->prompt_tokens + (size_t)r->max_tokens + 1;
    if ((rc = lq_sampler_create(&params->generate.sampler, vocab, &r->sampler, err)) ||
        (rc = lq_text_stream_create(tokenizer, params->generate.stop,
                                    params->prompt[params->prompt_tokens - 1], forward_text, r,
                                    &r->stream, err)))
        goto fail;
    if (!(r->history = malloc(history * sizeof *r->history))) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
        goto fail;
    }
    memcpy(r->history, params->prompt, (size_t)params->prompt_tokens * sizeof *r->history);
    r->seen = (size_t)params->prompt_tokens;
    /* from here the scheduler may run it: it must own its model, adapter and prompt */
    r->model = params->model, r->adapter = params->adapter, r->prompt = params->prompt;
    pthread_mutex_lock(&s->lock);
    if (s->stopping)
        rc = lq_error_set(err, LQ_EBUSY, "the server is stopping");
    else if (s->queued >= s->options.max_queued)
        rc = lq_error_set(err, LQ_EBUSY, "too many requests waiting (%d)", s->queued);
    if (!rc) {
        if (s->tail)
            s->tail->next = r;
        else
            s->head = r;
        s->tail = r;
        s->stats.queued = ++s->queued;
        pthread_cond_signal(&s->wake);
    }
    pthread_mutex_unlock(&s->lock);
    if (rc) {
        r->model = NULL, r->adapter = NULL, r->prompt = NULL; /* still the caller's */
        goto fail;
    }
    params->model = NULL, params->adapter = NULL, params->prompt = NULL;
    if (handle) *handle = r;
    return LQ_OK;
fail:
    request_release_resources(r);
    free(r);
    return rc;
}

void lq_scheduler_stats(struct lq_scheduler *s, struct lq_scheduler_stats *out) {
    pthread_mutex_lock(&s->lock);
    *out = s->stats;
    pthread_mutex_unlock(&s->lock);
}
