/* The scheduler: one thread that owns the serving backend and runs continuous batching.
 * Requests join the running batch between decode steps (their prompts prefilled first) and
 * leave it when they finish or are cancelled; each decode step runs one token of every
 * running sequence of a model together. Results go back through callbacks that must not
 * block (the HTTP layer queues them and wakes its connection). */
#ifndef LQ_SCHEDULER_H
#define LQ_SCHEDULER_H

#include <stddef.h>

#include "core/error.h"
#include "core/generate.h"
#include "server/registry.h"

#define LQ_EBUSY (-20)     /* the queue is full (HTTP 429), or the scheduler is stopping */
#define LQ_ECANCELED (-21) /* on_finish's error: cancelled, or the scheduler stopped */
#define LQ_ETIMEDOUT (-22) /* on_finish's error: timeout_seconds ran out */

struct lq_request;

struct lq_request_callbacks {
    /* Text that became final (stop strings already handled), with the token that completed
     * it and its log-probability (0 unless logprobs was asked for). Text held back for a stop
     * string that never came is released when the request ends, with token -1 and logprob 0.
     * Called on the scheduler thread. */
    void (*on_text)(void *context, const char *text, size_t length, int token, float logprob);
    /* Called once, last: finish reason, token counts, and an error (NULL on success; else
     * LQ_ECANCELED with reason "stop", LQ_ETIMEDOUT with reason "length", or the failure
     * of the forward pass). After it returns the scheduler never touches the request again. */
    void (*on_finish)(void *context, enum lq_finish_reason reason, int prompt_tokens,
                      int completion_tokens, const struct lq_error *error);
    void *context;
};

struct lq_request_params {
    struct lq_served_model *model; /* a reference the request takes over */
    /* NULL (the bare model), or a reference the request takes over to an adapter of model
     * (adapter->model == model): the request runs on it from start to end, whatever is loaded
     * under its name meanwhile */
    struct lq_served_adapter *adapter;
    int *prompt; /* token ids (BOS included as wanted); taken over */
    int prompt_tokens;
    struct lq_generate_options generate; /* max_tokens, sampler, stop strings (copied) */
    int logprobs;                        /* report log-probabilities */
    double timeout_seconds;              /* from submission; then finish reason "length" with
                                            LQ_ETIMEDOUT; 0 = none */
};

struct lq_scheduler_options {
    int max_running; /* sequences decoded together at most (default 16); up to 64 keeps a
                        request's text on the CPU independent of its batch-mates */
    int max_queued;  /* requests waiting at most; more get LQ_EBUSY (default 64) */
    int context;     /* positions per sequence (0, the default: the model's maximum) */
};

void lq_scheduler_options_default(struct lq_scheduler_options *options);

struct lq_scheduler;

int lq_scheduler_create(const struct lq_scheduler_options *options, struct lq_scheduler **out,
                        struct lq_error *err);
/* Stops accepting, cancels what is queued or running (on_finish is called for each), joins
 * the thread, frees. */
void lq_scheduler_free(struct lq_scheduler *scheduler);

/* Queues a request. On success the scheduler has taken over params->model, ->adapter and
 * ->prompt (set to NULL in params), copied the stop strings, and
 * *handle is the caller's reference to the request (two references exist: the scheduler's,
 * dropped after on_finish, and the caller's, dropped with lq_request_release). LQ_EBUSY when
 * the queue is full, LQ_EINVAL when the prompt plus max_tokens cannot fit the context; on
 * error params still belong to the caller. */
int lq_scheduler_submit(struct lq_scheduler *scheduler, struct lq_request_params *params,
                        const struct lq_request_callbacks *callbacks, struct lq_request **handle,
                        struct lq_error *err);
/* Asks the scheduler to stop the request at its next step (a client went away); on_finish
 * still comes (LQ_ECANCELED), unless the request had already finished. Any thread, any time
 * before the caller's release; it may be called from the request's own callbacks. */
void lq_request_cancel(struct lq_request *request);
/* Drops the caller's reference. */
void lq_request_release(struct lq_request *request);

/* Snapshot for /metrics: requests waiting and being decoded now; totals since creation
 * (prompt tokens counted when prefilled, completion tokens and requests when finished). */
struct lq_scheduler_stats {
    int queued, running;
    unsigned long long prompt_tokens, completion_tokens, requests_finished;
    unsigned long long decode_steps; /* lq_forward_batch calls */
    /* admissions put off because the request's session did not fit the device's memory while
     * others ran (the request waited at the head of the queue) */
    unsigned long long deferred;
};
void lq_scheduler_stats(struct lq_scheduler *scheduler, struct lq_scheduler_stats *out);

#endif
