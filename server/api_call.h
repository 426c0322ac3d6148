/* One generation request in flight (a "call"): its choices, the text and log-probabilities
 * the scheduler has produced for each, and how they are written back to the client: one JSON
 * object, or OpenAI's Server-Sent Events chunks ending with "data: [DONE]".
 *
 * The call is reference counted: one reference for the HTTP side (the handler, then the
 * stream), one per submitted choice for the scheduler (dropped in its on_finish). Everything
 * the scheduler's callbacks touch is guarded by lock; they only append and signal. */
#ifndef LQ_API_CALL_H
#define LQ_API_CALL_H

#include <pthread.h>
#include <stddef.h>
#include <sys/types.h>

#include "server/api.h"
#include "server/api_request.h"

struct cJSON;

struct lq_choice_token {
    size_t offset, length; /* the text this token completed, within the choice's text */
    int token;
    float logprob;
};

struct lq_choice {
    struct lq_call *call;
    size_t index, prompt_index;
    struct lq_request *handle; /* the caller's reference; NULL when not submitted */
    /* Under call->lock: */
    char *text; /* echo (if asked) then generated text, NUL-terminated */
    size_t length, capacity;
    struct lq_choice_token *tokens;
    size_t n_tokens, tokens_capacity;
    size_t sent_length, sent_tokens; /* what the stream has written */
    int role_sent, finish_sent;
    int finished, failed;
    enum lq_finish_reason reason;
    int prompt_tokens, completion_tokens;
    struct lq_error error;
    double first_text_time, last_text_time;
};

struct lq_call {
    struct lq_api *api;
    pthread_mutex_t lock;
    pthread_cond_t cond; /* signalled on every change (CLOCK_MONOTONIC) */
    int references;
    int chat, stream, include_usage;
    int want_logprobs; /* report log-probabilities */
    int top_logprobs;  /* chat: top_logprobs; completions: the logprobs number */
    char id[48];
    long long created;
    char model[160]; /* what the response names: "model" or "model:adapter" */
    double arrival;
    int context, max_tokens;
    int **prompt_ids;
    size_t *prompt_counts, n_prompts;
    const char *implied_stop; /* from the chat format (static), or NULL */
    struct lq_choice *choices;
    size_t n_choices, n_submitted, n_finished;
    /* The stream's pending output. */
    char *out;
    size_t out_length, out_sent, out_capacity;
    int done_sent;
};

/* A call for req on served (borrowed), with prompts x n choices; NULL when out of memory. */
struct lq_call *lq_call_create(struct lq_api *api, const struct lq_completion_request *req,
                               const struct lq_served_model *served, double arrival);
/* Drops a reference (NULL is ignored); the last frees the call and releases its requests. */
void lq_call_release(struct lq_call *call);
/* Asks the scheduler to stop every submitted choice. Never under call->lock. */
void lq_call_cancel(struct lq_call *call);
/* With echo, starts each choice's text with its prompt. 0, or -1 with e filled. */
int lq_call_prepare_echo(struct lq_call *call, const struct lq_completion_request *req,
                         const struct lq_served_model *served, struct lq_api_error *e);

/* The whole response object (text_completion or chat.completion); NULL when out of memory. */
struct cJSON *lq_call_response_json(struct lq_call *call);
/* 1 when no choice produced anything and every one failed: e then says why. */
int lq_call_all_failed(struct lq_call *call, struct lq_api_error *e);

/* lq_http_stream_reader and its free callback for a streaming call. */
struct lq_http_request;
ssize_t lq_call_stream_read(void *context, struct lq_http_request *request, char *buffer,
                            size_t size);
void lq_call_stream_done(void *context);

#endif
