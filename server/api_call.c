#include "server/api_call.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "server/http_server.h"

#ifndef LQD_VERSION
#define LQD_VERSION "dev"
#endif

/* ---------- life cycle ---------- */

static void random_id(char *out, const char *prefix) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    unsigned char bytes[24];
    if (getrandom(bytes, sizeof bytes, 0) != (ssize_t)sizeof bytes) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        unsigned long long x = (unsigned long long)t.tv_nsec ^ ((unsigned long long)t.tv_sec << 20);
        for (size_t i = 0; i < sizeof bytes; i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            bytes[i] = (unsigned char)(x >> 56);
        }
    }
    size_t length = strlen(prefix);
    memcpy(out, prefix, length);
    for (size_t i = 0; i < sizeof bytes; i++) out[length + i] = alphabet[bytes[i] % 62];
    out[length + sizeof bytes] = '\0';
}

struct lq_call *lq_call_create(struct lq_api *api, const struct lq_completion_request *req,
                               const struct lq_served_model *served, double arrival) {
    struct lq_call *call = calloc(1, sizeof *call);
    if (!call) return NULL;
    size_t n_choices = (req->chat ? 1 : req->n_prompts) * (size_t)req->n;
    call->choices = calloc(n_choices, sizeof *call->choices);
    if (!call->choices) {
        free(call);
        return NULL;
    }
    pthread_mutex_init(&call->lock, NULL);
    pthread_condattr_t attributes;
    pthread_condattr_init(&attributes);
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC);
    pthread_cond_init(&call->cond, &attributes);
    pthread_condattr_destroy(&attributes);
    call->api = api;
    call->references = 1;
    call->chat = req->chat;
    call->stream = req->stream;
    call->include_usage = req->include_usage;
    call->want_logprobs = req->chat ? req->logprobs : req->logprobs >= 0;
    call->top_logprobs = req->chat ? req->top_logprobs : (req->logprobs > 0 ? req->logprobs : 0);
    random_id(call->id, req->chat ? "chatcmpl-" : "cmpl-");
    call->created = (long long)time(NULL);
    snprintf(call->model, sizeof call->model, "%s", served->name);
    call->arrival = arrival;
    int maximum = served->model->config.max_seq_len;
    call->context =
        api->config.context > 0 && api->config.context < maximum ? api->config.context : maximum;
    call->n_choices = n_choices;
    for (size_t i = 0; i < n_choices; i++) {
        call->choices[i].call = call;
        call->choices[i].index = i;
        call->choices[i].prompt_index = i / (size_t)req->n;
    }
    return call;
}

void lq_call_release(struct lq_call *call) {
    if (!call) return;
    pthread_mutex_lock(&call->lock);
    int left = --call->references;
    pthread_mutex_unlock(&call->lock);
    if (left > 0) return;
    for (size_t i = 0; i < call->n_choices; i++) {
        struct lq_choice *choice = &call->choices[i];
        if (choice->handle) lq_request_release(choice->handle);
        free(choice->text);
        free(choice->tokens);
    }
    for (size_t i = 0; i < call->n_prompts; i++) free(call->prompt_ids[i]);
    free(call->prompt_ids);
    free(call->prompt_counts);
    free(call->choices);
    free(call->out);
    pthread_cond_destroy(&call->cond);
    pthread_mutex_destroy(&call->lock);
    free(call);
}

void lq_call_cancel(struct lq_call *call) {
    /* Handles are set before anyone cancels and stay valid until the call is freed; the
     * scheduler's cancel may take its own lock, so never call it holding ours (its callbacks
     * take ours while holding theirs). */
    for (size_t i = 0; i < call->n_choices; i++) {
        pthread_mutex_lock(&call->lock);
        int running = call->choices[i].handle && !call->choices[i].finished;
        pthread_mutex_unlock(&call->lock);
        if (running) lq_request_cancel(call->choices[i].handle);
    }
}

int lq_call_prepare_echo(struct lq_call *call, const struct lq_completion_request *req,
                         const struct lq_served_model *served, struct lq_api_error *e) {
    if (req->chat || !req->echo) return 0;
    for (size_t i = 0; i < call->n_choices; i++) {
        struct lq_choice *choice = &call->choices[i];
        const struct lq_prompt *prompt = &req->prompts[choice->prompt_index];
        struct lq_error err = {0};
        if (prompt->text) {
            choice->text = strdup(prompt->text);
        } else if (lq_tokenizer_decode(served->tokenizer, prompt->ids, prompt->n_ids, &choice->text,
                                       &err)) {
            return lq_api_error_set(e, 400, "invalid_value", "prompt", "%s", err.message);
        }
        if (!choice->text) return lq_api_error_set(e, 500, NULL, NULL, "out of memory");
        choice->length = choice->capacity = strlen(choice->text);
        choice->capacity++;
    }
    return 0;
}

/* ---------- JSON pieces ---------- */

/* OpenAI's stand-in for a log-probability that is -inf (JSON has no infinities). */
static double finite_logprob(float logprob) {
    return isfinite(logprob) ? (double)logprob : -9999.0;
}

static cJSON *byte_array(const char *text, size_t length) {
    cJSON *bytes = cJSON_CreateArray();
    for (size_t i = 0; bytes && i < length; i++)
        cJSON_AddItemToArray(bytes, cJSON_CreateNumber((unsigned char)text[i]));
    return bytes;
}

/* Log-probabilities of tokens [from, to) of a choice. Each entry is the text one scheduler
 * callback delivered (normally one token) with the log-probability of the token that
 * completed it; the top alternatives hold that token alone (lqd reports the top-1). */
static cJSON *logprobs_json(const struct lq_call *call, const struct lq_choice *choice, size_t from,
                            size_t to) {
    if (!call->want_logprobs) return cJSON_CreateNull();
    cJSON *object = cJSON_CreateObject();
    if (call->chat) {
        cJSON *content = cJSON_AddArrayToObject(object, "content");
        for (size_t i = from; i < to; i++) {
            const struct lq_choice_token *t = &choice->tokens[i];
            cJSON *entry = cJSON_CreateObject(), *top = cJSON_CreateArray();
            char *text = strndup(choice->text + t->offset, t->length);
            cJSON_AddStringToObject(entry, "token", text ? text : "");
            cJSON_AddNumberToObject(entry, "logprob", finite_logprob(t->logprob));
            cJSON_AddItemToObject(entry, "bytes", byte_array(choice->text + t->offset, t->length));
            if (call->top_logprobs > 0) {
                cJSON *alternative = cJSON_CreateObject();
                cJSON_AddStringToObject(alternative, "token", text ? text : "");
                cJSON_AddNumberToObject(alternative, "logprob", finite_logprob(t->logprob));
                cJSON_AddItemToObject(alternative, "bytes",
                                      byte_array(choice->text + t->offset, t->length));
                cJSON_AddItemToArray(top, alternative);
            }
            cJSON_AddItemToObject(entry, "top_logprobs", top);
            cJSON_AddItemToArray(content, entry);
            free(text);
        }
        return object;
    }
    cJSON *tokens = cJSON_AddArrayToObject(object, "tokens");
    cJSON *logprobs = cJSON_AddArrayToObject(object, "token_logprobs");
    cJSON *top = call->top_logprobs > 0 ? cJSON_AddArrayToObject(object, "top_logprobs")
                                        : cJSON_AddNullToObject(object, "top_logprobs");
    cJSON *offsets = cJSON_AddArrayToObject(object, "text_offset");
    for (size_t i = from; i < to; i++) {
        const struct lq_choice_token *t = &choice->tokens[i];
        char *text = strndup(choice->text + t->offset, t->length);
        cJSON_AddItemToArray(tokens, cJSON_CreateString(text ? text : ""));
        cJSON_AddItemToArray(logprobs, cJSON_CreateNumber(finite_logprob(t->logprob)));
        if (call->top_logprobs > 0) {
            cJSON *alternatives = cJSON_CreateObject();
            cJSON_AddNumberToObject(alternatives, text ? text : "", finite_logprob(t->logprob));
            cJSON_AddItemToArray(top, alternatives);
        }
        cJSON_AddItemToArray(offsets, cJSON_CreateNumber((double)t->offset));
        free(text);
    }
    return object;
}

/* The scheduler's reason, also after an error (a timeout ends with "length"). */
static const char *finish_reason(const struct lq_choice *choice) {
    return lq_finish_reason_name(choice->reason);
}

/* HTTP status and error code for a choice that failed before producing anything. */
static int failure_status(int code, const char **name) {
    *name = code == LQ_ETIMEDOUT   ? "request_timeout"
            : code == LQ_ECANCELED ? "cancelled"
            : code == LQ_EBUSY     ? "rate_limit_exceeded"
                                   : "generation_failed";
    return code == LQ_ETIMEDOUT ? 504 : code == LQ_ECANCELED ? 503 : code == LQ_EBUSY ? 429 : 500;
}

static cJSON *usage_json(const struct lq_call *call) {
    long long prompt = 0, completion = 0;
    for (size_t i = 0; i < call->n_prompts; i++) prompt += (long long)call->prompt_counts[i];
    for (size_t i = 0; i < call->n_choices; i++) completion += call->choices[i].completion_tokens;
    cJSON *usage = cJSON_CreateObject();
    cJSON_AddNumberToObject(usage, "prompt_tokens", (double)prompt);
    cJSON_AddNumberToObject(usage, "completion_tokens", (double)completion);
    cJSON_AddNumberToObject(usage, "total_tokens", (double)(prompt + completion));
    return usage;
}

static cJSON *envelope(const struct lq_call *call, const char *object) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "id", call->id);
    cJSON_AddStringToObject(root, "object", object);
    cJSON_AddNumberToObject(root, "created", (double)call->created);
    cJSON_AddStringToObject(root, "model", call->model);
    cJSON_AddStringToObject(root, "system_fingerprint", "lqd-" LQD_VERSION);
    return root;
}

cJSON *lq_call_response_json(struct lq_call *call) {
    pthread_mutex_lock(&call->lock);
    cJSON *root = envelope(call, call->chat ? "chat.completion" : "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(root, "choices");
    for (size_t i = 0; i < call->n_choices; i++) {
        const struct lq_choice *c = &call->choices[i];
        cJSON *choice = cJSON_CreateObject();
        cJSON_AddNumberToObject(choice, "index", (double)c->index);
        if (call->chat) {
            cJSON *message = cJSON_AddObjectToObject(choice, "message");
            cJSON_AddStringToObject(message, "role", "assistant");
            cJSON_AddStringToObject(message, "content", c->text ? c->text : "");
        } else {
            cJSON_AddStringToObject(choice, "text", c->text ? c->text : "");
        }
        cJSON_AddItemToObject(choice, "logprobs", logprobs_json(call, c, 0, c->n_tokens));
        cJSON_AddStringToObject(choice, "finish_reason", finish_reason(c));
        cJSON_AddItemToArray(choices, choice);
    }
    cJSON_AddItemToObject(root, "usage", usage_json(call));
    pthread_mutex_unlock(&call->lock);
    /* cJSON reports allocation failures only by missing items: check by printing. */
    char *probe = cJSON_PrintUnformatted(root);
    if (!probe) {
        cJSON_Delete(root);
        return NULL;
    }
    cJSON_free(probe);
    return root;
}

int lq_call_all_failed(struct lq_call *call, struct lq_api_error *e) {
    pthread_mutex_lock(&call->lock);
    int all = call->n_submitted > 0;
    const struct lq_error *first = NULL;
    for (size_t i = 0; i < call->n_choices && all; i++) {
        const struct lq_choice *c = &call->choices[i];
        all = c->failed && c->completion_tokens == 0;
        if (all && !first) first = &c->error;
    }
    if (all) {
        const char *code;
        int status = failure_status(first->code, &code);
        lq_api_error_set(e, status, code, NULL, "generation failed: %s", first->message);
    }
    pthread_mutex_unlock(&call->lock);
    return all;
}

/* ---------- Server-Sent Events ---------- */

/* Appends "data: <json>\n\n" to the stream's output and frees chunk. */
static int emit(struct lq_call *call, cJSON *chunk) {
    char *text = chunk ? cJSON_PrintUnformatted(chunk) : NULL;
    cJSON_Delete(chunk);
    if (!text) return -1;
    size_t length = strlen(text), needed = call->out_length + length + 9;
    if (needed > call->out_capacity) {
        size_t capacity = call->out_capacity ? call->out_capacity : 4096;
        while (capacity < needed) capacity *= 2;
        char *grown = realloc(call->out, capacity);
        if (!grown) {
            cJSON_free(text);
            return -1;
        }
        call->out = grown, call->out_capacity = capacity;
    }
    memcpy(call->out + call->out_length, "data: ", 6);
    memcpy(call->out + call->out_length + 6, text, length);
    memcpy(call->out + call->out_length + 6 + length, "\n\n", 2);
    call->out_length += length + 8;
    cJSON_free(text);
    return 0;
}

/* A chunk holding one choice's delta; text may be NULL (no content key). */
static cJSON *choice_chunk(const struct lq_call *call, const struct lq_choice *c, const char *role,
                           const char *text, cJSON *logprobs, const char *finish) {
    cJSON *root = envelope(call, call->chat ? "chat.completion.chunk" : "text_completion");
    cJSON *choice = cJSON_CreateObject();
    cJSON_AddNumberToObject(choice, "index", (double)c->index);
    if (call->chat) {
        cJSON *delta = cJSON_AddObjectToObject(choice, "delta");
        if (role) cJSON_AddStringToObject(delta, "role", role);
        if (text) cJSON_AddStringToObject(delta, "content", text);
    } else {
        cJSON_AddStringToObject(choice, "text", text ? text : "");
    }
    cJSON_AddItemToObject(choice, "logprobs", logprobs ? logprobs : cJSON_CreateNull());
    if (finish)
        cJSON_AddStringToObject(choice, "finish_reason", finish);
    else
        cJSON_AddNullToObject(choice, "finish_reason");
    cJSON_AddItemToArray(cJSON_AddArrayToObject(root, "choices"), choice);
    if (call->include_usage) cJSON_AddNullToObject(root, "usage");
    return root;
}

/* Formats whatever is new into call->out (under call->lock). 1 when something was added. */
static int format_pending(struct lq_call *call) {
    size_t before = call->out_length;
    int all_done = call->n_finished == call->n_submitted;
    for (size_t i = 0; i < call->n_choices; i++) {
        struct lq_choice *c = &call->choices[i];
        if (call->chat && !c->role_sent) {
            emit(call, choice_chunk(call, c, "assistant", "", NULL, NULL));
            c->role_sent = 1;
        }
        if (c->length > c->sent_length) {
            char *text = strndup(c->text + c->sent_length, c->length - c->sent_length);
            cJSON *logprobs =
                call->want_logprobs ? logprobs_json(call, c, c->sent_tokens, c->n_tokens) : NULL;
            emit(call, choice_chunk(call, c, NULL, text ? text : "", logprobs, NULL));
            free(text);
            c->sent_length = c->length, c->sent_tokens = c->n_tokens;
        }
        if (c->finished && !c->finish_sent) {
            if (c->failed && c->completion_tokens == 0) { /* else a timeout: "length" says it */
                cJSON *root = cJSON_CreateObject(), *error = cJSON_AddObjectToObject(root, "error");
                cJSON_AddStringToObject(error, "message", c->error.message);
                const char *code;
                int status = failure_status(c->error.code, &code);
                cJSON_AddStringToObject(error, "type",
                                        status == 429 ? "rate_limit_error" : "server_error");
                cJSON_AddNullToObject(error, "param");
                cJSON_AddStringToObject(error, "code", code);
                emit(call, root);
            }
            emit(call, choice_chunk(call, c, NULL, NULL, NULL, finish_reason(c)));
            c->finish_sent = 1;
        }
    }
    if (all_done && !call->done_sent) {
        if (call->include_usage) {
            cJSON *root = envelope(call, call->chat ? "chat.completion.chunk" : "text_completion");
            cJSON_AddArrayToObject(root, "choices");
            cJSON_AddItemToObject(root, "usage", usage_json(call));
            emit(call, root);
        }
        static const char done[] = "data: [DONE]\n\n";
        size_t needed = call->out_length + sizeof done;
        char *grown = needed > call->out_capacity ? realloc(call->out, needed) : call->out;
        if (grown) {
            if (needed > call->out_capacity) call->out = grown, call->out_capacity = needed;
            memcpy(call->out + call->out_length, done, sizeof done - 1);
            call->out_length += sizeof done - 1;
        }
        call->done_sent = 1;
    }
    return call->out_length > before;
}

ssize_t lq_call_stream_read(void *context, struct lq_http_request *request, char *buffer,
                            size_t size) {
    struct lq_call *call = context;
    pthread_mutex_lock(&call->lock);
    for (;;) {
        if (call->out_sent < call->out_length) {
            size_t n = call->out_length - call->out_sent;
            if (n > size) n = size;
            memcpy(buffer, call->out + call->out_sent, n);
            call->out_sent += n;
            if (call->out_sent == call->out_length) call->out_sent = call->out_length = 0;
            pthread_mutex_unlock(&call->lock);
            return (ssize_t)n;
        }
        if (call->done_sent) break;
        if (format_pending(call)) continue;
        /* Nothing new: wait for the scheduler, looking at the client now and then so that a
         * client that left between tokens (a long prefill, a queue) is noticed. */
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_nsec += 100 * 1000000L;
        if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
        if (pthread_cond_timedwait(&call->cond, &call->lock, &until) == ETIMEDOUT) {
            pthread_mutex_unlock(&call->lock);
            int gone = lq_http_request_client_gone(request);
            pthread_mutex_lock(&call->lock);
            if (gone) {
                pthread_mutex_unlock(&call->lock);
                lq_call_cancel(call);
                return LQ_HTTP_STREAM_ABORT;
            }
        }
    }
    pthread_mutex_unlock(&call->lock);
    return LQ_HTTP_STREAM_END;
}

void lq_call_stream_done(void *context) {
    struct lq_call *call = context;
    lq_call_cancel(call); /* a client gone mid-stream frees its sequences now */
    lq_call_release(call);
}
