/* POST /v1/completions and /v1/chat/completions: a validated request becomes one scheduler
 * request per choice (prompts x n, seeds seed, seed+1, ...); the scheduler's callbacks append
 * to each choice under the call's lock and never wait on the client. A non-streaming handler
 * waits for every choice, then answers with one JSON object; a streaming one hands the call to
 * a reader that formats OpenAI chunks as Server-Sent Events while text arrives. A client that
 * goes away cancels its sequences. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "core/chat_template.h"
#include "server/api.h"
#include "server/api_call.h"
#include "server/api_request.h"
#include "server/log.h"

/* ---------- scheduler callbacks (scheduler thread: append, signal, never block) ---------- */

static int grow(void **data, size_t *capacity, size_t needed, size_t item) {
    if (needed <= *capacity) return 0;
    size_t capacity_new = *capacity ? *capacity : 64;
    while (capacity_new < needed) capacity_new *= 2;
    void *grown = realloc(*data, capacity_new * item);
    if (!grown) return -1;
    *data = grown, *capacity = capacity_new;
    return 0;
}

static void on_text(void *context, const char *text, size_t length, int token, float logprob) {
    struct lq_choice *choice = context;
    struct lq_call *call = choice->call;
    double now = lq_http_now();
    pthread_mutex_lock(&call->lock);
    /* Chat replies start after "Assistant:" or a newline: drop the space the model puts first. */
    if (call->chat && choice->length == 0)
        while (length && *text == ' ') text++, length--;
    size_t offset = choice->length;
    if (grow((void **)&choice->text, &choice->capacity, choice->length + length + 1, 1) == 0) {
        memcpy(choice->text + choice->length, text, length);
        choice->length += length;
        choice->text[choice->length] = '\0';
    }
    if (call->want_logprobs && grow((void **)&choice->tokens, &choice->tokens_capacity,
                                    choice->n_tokens + 1, sizeof *choice->tokens) == 0)
        choice->tokens[choice->n_tokens++] =
            (struct lq_choice_token){offset, choice->length - offset, token, logprob};
    if (choice->first_text_time == 0)
        lq_metrics_observe_first_token(call->api->metrics, now - call->arrival);
    else
        lq_metrics_observe_token_interval(call->api->metrics, now - choice->last_text_time);
    if (choice->first_text_time == 0) choice->first_text_time = now;
    choice->last_text_time = now;
    pthread_cond_broadcast(&call->cond);
    pthread_mutex_unlock(&call->lock);
}

static void on_finish(void *context, enum lq_finish_reason reason, int prompt_tokens,
                      int completion_tokens, const struct lq_error *error) {
    struct lq_choice *choice = context;
    struct lq_call *call = choice->call;
    lq_metrics_count_tokens(call->api->metrics, prompt_tokens, completion_tokens);
    pthread_mutex_lock(&call->lock);
    choice->finished = 1;
    choice->reason = reason;
    choice->prompt_tokens = prompt_tokens;
    choice->completion_tokens = completion_tokens;
    if (error) {
        choice->failed = 1;
        choice->error = *error;
    }
    call->n_finished++;
    pthread_cond_broadcast(&call->cond);
    pthread_mutex_unlock(&call->lock);
    lq_call_release(call);
}

/* ---------- preparing a request ---------- */

static int refuse(struct lq_http_request *request, const struct lq_api_error *e) {
    return lq_http_respond_error(request, e->status, e->type, e->code,
                                 e->param[0] ? e->param : NULL, "%s", e->message);
}

static uint64_t random_seed(void) {
    uint64_t seed;
    if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        seed = (uint64_t)t.tv_nsec * 0x9E3779B97F4A7C15ull ^ (uint64_t)t.tv_sec;
    }
    return seed >> 11; /* what a JSON number holds exactly, so a client can repeat it */
}

/* Token ids of each prompt: text encoded with BOS, or ids as given; checked against the
 * vocabulary and the context. */
static int tokenize_prompts(const struct lq_completion_request *req,
                            const struct lq_served_model *served, struct lq_call *call,
                            struct lq_api_error *e) {
    size_t n_prompts = req->chat ? 1 : req->n_prompts;
    call->prompt_ids = calloc(n_prompts, sizeof *call->prompt_ids);
    call->prompt_counts = calloc(n_prompts, sizeof *call->prompt_counts);
    if (!call->prompt_ids || !call->prompt_counts)
        return lq_api_error_set(e, 500, NULL, NULL, "out of memory");
    call->n_prompts = n_prompts;
    struct lq_error err = {0};
    int vocab = lq_tokenizer_vocab_size(served->tokenizer);
    if (req->chat) {
        struct lq_chat_prompt prompt;
        if (lq_chat_render(&served->chat_style, req->messages, req->n_messages, &prompt))
            return lq_api_error_set(e, 500, NULL, NULL, "out of memory");
        int rc = lq_chat_tokenize(served->tokenizer, &prompt, &call->prompt_ids[0],
                                  &call->prompt_counts[0], &err);
        call->implied_stop = prompt.stop;
        lq_chat_prompt_free(&prompt);
        if (rc) return lq_api_error_set(e, 500, NULL, NULL, "%s", err.message);
    }
    for (size_t i = 0; !req->chat && i < n_prompts; i++) {
        const struct lq_prompt *p = &req->prompts[i];
        if (p->text) {
            if (lq_tokenizer_encode(served->tokenizer, p->text, strlen(p->text), 1,
                                    &call->prompt_ids[i], &call->prompt_counts[i], &err))
                return lq_api_error_set(e, 500, NULL, NULL, "%s", err.message);
        } else {
            for (size_t k = 0; k < p->n_ids; k++)
                if (p->ids[k] >= vocab)
                    return lq_api_error_set(e, 400, "invalid_value", "prompt",
                                            "token id %d is outside the vocabulary (%d)", p->ids[k],
                                            vocab);
            if (!(call->prompt_ids[i] = malloc(p->n_ids * sizeof(int))))
                return lq_api_error_set(e, 500, NULL, NULL, "out of memory");
            memcpy(call->prompt_ids[i], p->ids, p->n_ids * sizeof(int));
            call->prompt_counts[i] = p->n_ids;
        }
    }
    for (size_t i = 0; i < n_prompts; i++) {
        size_t count = call->prompt_counts[i];
        const char *param = req->chat ? "messages" : "prompt";
        if (count == 0)
            return lq_api_error_set(e, 400, "empty_prompt", param,
                                    "the prompt is empty (and the tokenizer has no BOS)");
        if (count >= (size_t)call->context)
            return lq_api_error_set(e, 400, "context_length_exceeded", param,
                                    "the prompt has %zu tokens; this model's context holds %d, "
                                    "with room for at least one generated token",
                                    count, call->context);
        int max_tokens = req->max_tokens;
        if (max_tokens < 0) max_tokens = req->chat ? call->context - (int)count : 16;
        if ((size_t)max_tokens + count > (size_t)call->context)
            return lq_api_error_set(e, 400, "context_length_exceeded", "max_tokens",
                                    "the prompt (%zu tokens) plus max_tokens (%d) exceed this "
                                    "model's context of %d tokens",
                                    count, max_tokens, call->context);
        if (i == 0 || max_tokens < call->max_tokens) call->max_tokens = max_tokens;
    }
    return 0;
}

/* Submits every choice; on a refusal cancels those already queued. */
static int submit_all(struct lq_api *api, const struct lq_completion_request *req,
                      struct lq_served_model *served, struct lq_served_adapter *adapter,
                      struct lq_call *call, struct lq_api_error *e) {
    uint64_t seed = req->seed_given ? req->sampler.seed : random_seed();
    pthread_rwlock_rdlock(&api->scheduler_lock);
    int rc = 0;
    if (api->scheduler_closed || atomic_load(&api->draining)) {
        lq_metrics_count_rejected(api->metrics, "draining");
        rc = lq_api_error_set(e, 503, "draining", NULL, "the server is shutting down");
    }
    for (size_t i = 0; !rc && i < call->n_choices; i++) {
        struct lq_choice *choice = &call->choices[i];
        size_t p = choice->prompt_index;
        struct lq_request_params params = {0};
        params.model = served;
        params.prompt_tokens = (int)call->prompt_counts[p];
        params.prompt = malloc(call->prompt_counts[p] * sizeof(int));
        if (!params.prompt) {
            rc = lq_api_error_set(e, 500, NULL, NULL, "out of memory");
            break;
        }
        memcpy(params.prompt, call->prompt_ids[p], call->prompt_counts[p] * sizeof(int));
        lq_generate_options_default(&params.generate);
        params.generate.max_tokens = call->max_tokens;
        params.generate.sampler = req->sampler;
        params.generate.sampler.seed = seed + (uint64_t)(i % (size_t)req->n);
        int n_stop = 0;
        for (int s = 0; s < req->n_stop; s++) params.generate.stop[n_stop++] = req->stop[s];
        if (call->implied_stop && n_stop < LQ_GENERATE_MAX_STOPS)
            params.generate.stop[n_stop++] = call->implied_stop;
        params.logprobs = call->want_logprobs;
        params.timeout_seconds = api->config.request_timeout;
        struct lq_request_callbacks callbacks = {on_text, on_finish, choice};
        struct lq_error err = {0};
        lq_served_model_retain(served);
        params.adapter = adapter ? lq_served_adapter_retain(adapter) : NULL;
        pthread_mutex_lock(&call->lock);
        call->references++; /* the scheduler's, dropped in on_finish */
        pthread_mutex_unlock(&call->lock);
        int status =
            lq_scheduler_submit(api->scheduler, &params, &callbacks, &choice->handle, &err);
        if (status == 0) {
            call->n_submitted++;
            continue;
        }
        free(params.prompt);
        lq_served_adapter_release(params.adapter);
        lq_served_model_release(served);
        pthread_mutex_lock(&call->lock);
        call->references--;
        pthread_mutex_unlock(&call->lock);
        if (status == LQ_EBUSY) {
            lq_metrics_count_rejected(api->metrics, "queue_full");
            rc = lq_api_error_set(e, 429, "rate_limit_exceeded", NULL,
                                  "the request queue is full; retry shortly");
        } else if (status == LQ_EINVAL) {
            rc = lq_api_error_set(e, 400, "context_length_exceeded", NULL, "%s", err.message);
        } else {
            rc = lq_api_error_set(e, 500, NULL, NULL, "%s", err.message);
        }
    }
    pthread_rwlock_unlock(&api->scheduler_lock);
    if (rc) lq_call_cancel(call);
    return rc;
}

/* ---------- answering ---------- */

/* Waits for every choice; cancels them if the client goes away or the deadline passes. 0 when
 * all finished, -1 when the client is gone. */
static int wait_all(struct lq_call *call, struct lq_http_request *request) {
    double deadline = call->api->config.request_timeout > 0
                          ? call->arrival + call->api->config.request_timeout + 5
                          : 0;
    int gone = 0;
    pthread_mutex_lock(&call->lock);
    while (call->n_finished < call->n_submitted) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_nsec += 100 * 1000000L;
        if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
        if (pthread_cond_timedwait(&call->cond, &call->lock, &until) != ETIMEDOUT) continue;
        pthread_mutex_unlock(&call->lock);
        int give_up = lq_http_request_client_gone(request);
        if (give_up || (deadline > 0 && lq_http_now() > deadline)) {
            lq_call_cancel(call); /* on_finish still comes, quickly */
            gone |= give_up;
            deadline = 0;
        }
        pthread_mutex_lock(&call->lock);
        if (gone) break;
    }
    pthread_mutex_unlock(&call->lock);
    return gone ? -1 : 0;
}

static void handle(struct lq_api *api, struct lq_http_request *request, int chat) {
    size_t length;
    const char *body = lq_http_request_body(request, &length);
    struct lq_request_limits limits;
    lq_request_limits_default(&limits);
    limits.max_choices = api->config.max_choices;
    struct lq_completion_request req;
    struct lq_api_error e = {0};
    if (lq_completion_request_parse(body, length, chat, &limits, &req, &e)) {
        refuse(request, &e);
        return;
    }
    struct lq_served_model *served = NULL;
    struct lq_served_adapter *adapter = NULL;
    struct lq_call *call = NULL;
    if (req.echo && req.logprobs >= 0) {
        lq_api_error_set(&e, 400, "unsupported_parameter", "echo",
                         "'echo' together with 'logprobs' is not supported");
        goto refused;
    }
    if (atomic_load(&api->draining)) {
        lq_api_error_set(&e, 503, "draining", NULL, "the server is shutting down");
        goto refused;
    }
    /* "model" or "model:adapter": the request runs on what is published now, to its end */
    char base[72] = "", adapter_name[72] = "";
    int split = lq_model_id_split(req.model, base, sizeof base, adapter_name, sizeof adapter_name);
    if (split == 0 && adapter_name[0]) {
        if ((adapter = lq_registry_adapter_get(api->registry, base, adapter_name)))
            served = lq_served_model_retain(adapter->model);
    } else if (!strchr(req.model, ':')) {
        served = lq_registry_get(api->registry, req.model);
    }
    if (!served) {
        struct lq_served_model *exists =
            adapter_name[0] ? lq_registry_get(api->registry, base) : NULL;
        if (exists)
            lq_api_error_set(&e, 404, "model_not_found", "model",
                             "the model '%s' has no adapter '%s' (GET /v1/adapters lists them)",
                             base, adapter_name);
        else
            lq_api_error_set(&e, 404, "model_not_found", "model",
                             "the model '%s' does not exist (GET /v1/models lists them)",
                             req.model);
        lq_served_model_release(exists);
        goto refused;
    }
    if (!(call = lq_call_create(api, &req, served, lq_http_request_arrival(request)))) {
        lq_api_error_set(&e, 500, NULL, NULL, "out of memory");
        goto refused;
    }
    if (adapter) snprintf(call->model, sizeof call->model, "%s:%s", base, adapter->name);
    if (tokenize_prompts(&req, served, call, &e) || lq_call_prepare_echo(call, &req, served, &e) ||
        submit_all(api, &req, served, adapter, call, &e))
        goto refused;
    if (req.stream) {
        lq_http_respond_stream(request, 200, "text/event-stream", lq_call_stream_read,
                               lq_call_stream_done, call); /* the stream owns call now */
        call = NULL;
    } else if (wait_all(call, request) == 0) {
        cJSON *json = lq_call_response_json(call);
        int status = json ? 200 : 500;
        if (json && lq_call_all_failed(call, &e)) {
            cJSON_Delete(json);
            json = NULL;
            status = e.status;
        }
        if (json)
            lq_http_respond_json(request, status, json);
        else if (status == 500 && !e.message[0])
            lq_http_respond_error(request, 500, "server_error", NULL, NULL, "out of memory");
        else
            refuse(request, &e);
        cJSON_Delete(json);
    } else {
        lq_http_respond_error(request, 499, "invalid_request_error", "client_closed_request", NULL,
                              "the client closed the connection");
    }
    lq_call_release(call);
    lq_served_adapter_release(adapter);
    lq_served_model_release(served);
    lq_completion_request_free(&req);
    return;
refused:
    if (e.status == 429) lq_http_set_header(request, "Retry-After", "1");
    if (e.status == 503) lq_http_set_header(request, "Retry-After", "5");
    refuse(request, &e);
    lq_call_release(call);
    lq_served_adapter_release(adapter);
    lq_served_model_release(served);
    lq_completion_request_free(&req);
}

void lq_api_completions(void *app, struct lq_http_request *request) {
    handle(app, request, 0);
}

void lq_api_chat_completions(void *app, struct lq_http_request *request) {
    handle(app, request, 1);
}
