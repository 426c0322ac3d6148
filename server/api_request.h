/* Parsing and validation of the JSON bodies the API accepts: OpenAI completions and chat
 * completions, model and adapter load and unload. Everything a client can get wrong is caught
 * here, with the HTTP status and OpenAI-style error it deserves, before any model or queue is
 * touched. Pure functions of the body (no daemon state), so the fuzzer drives them directly. */
#ifndef LQ_API_REQUEST_H
#define LQ_API_REQUEST_H

#include <stddef.h>

#include "core/chat_template.h" /* struct lq_chat_message */
#include "core/generate.h"
#include "core/sampler.h"

/* What a refused request is told: HTTP status, OpenAI error type/code/param, message. */
struct lq_api_error {
    int status;
    const char *type; /* "invalid_request_error", "rate_limit_error", "server_error" */
    const char *code; /* static, or NULL */
    char param[64];   /* the offending field ("messages[2].content"), or empty */
    char message[512];
};

/* Fills err (status 400 unless given otherwise) and returns -1. */
int lq_api_error_set(struct lq_api_error *err, int status, const char *code, const char *param,
                     const char *format, ...) __attribute__((format(printf, 5, 6)));

struct lq_request_limits {
    int max_choices;   /* prompts x n at most */
    int max_messages;  /* chat messages at most */
    int max_depth;     /* JSON nesting at most */
    size_t max_string; /* bytes of one string (a prompt, a message) at most */
};
/* 64 choices, 1024 messages, depth 16, 1 MiB strings. */
void lq_request_limits_default(struct lq_request_limits *limits);

/* One prompt of a completions request: text, or token ids given as such. */
struct lq_prompt {
    char *text; /* NULL when ids are given */
    int *ids;
    size_t n_ids;
};

struct lq_completion_request {
    int chat;
    char *model;
    struct lq_prompt *prompts; /* completions */
    size_t n_prompts;
    struct lq_chat_message *messages; /* chat */
    size_t n_messages;
    int max_tokens; /* -1: not given (completions default 16; chat: what the context leaves) */
    struct lq_sampler_params sampler;
    int seed_given;
    char *stop[LQ_GENERATE_MAX_STOPS];
    int n_stop;
    int n;
    int stream, include_usage, echo;
    int logprobs;     /* completions: -1 none, else 0..5; chat: 0 or 1 */
    int top_logprobs; /* chat: 0..20 */
};

/* Parses body as a completions (chat = 0) or chat completions (chat = 1) request. 0, or -1
 * with err filled (out then needs no freeing). Token ids are checked against no vocabulary
 * here (the caller knows the model). */
int lq_completion_request_parse(const char *body, size_t length, int chat,
                                const struct lq_request_limits *limits,
                                struct lq_completion_request *out, struct lq_api_error *err);
void lq_completion_request_free(struct lq_completion_request *request);

/* POST /v1/models/load {"name", "path", "tokenizer"} and /v1/models/unload {"name"}. */
struct lq_model_request {
    char *name;      /* load: may be NULL (derived from the path) */
    char *path;      /* load */
    char *tokenizer; /* load: optional */
};
int lq_model_request_parse(const char *body, size_t length, int unload,
                           struct lq_model_request *out, struct lq_api_error *err);
void lq_model_request_free(struct lq_model_request *request);

/* 1 when name is a usable model id: 1..64 bytes of [A-Za-z0-9._-], not starting with '.'. */
int lq_model_name_valid(const char *name);

/* POST /v1/adapters/load {"model", "name", "path"} and /v1/adapters/unload {"model", "name"}:
 * model and name are valid model names (lq_model_name_valid), path non-empty. */
struct lq_adapter_request {
    char *model; /* the base model's name */
    char *name;  /* the adapter's */
    char *path;  /* load */
};
int lq_adapter_request_parse(const char *body, size_t length, int unload,
                             struct lq_adapter_request *out, struct lq_api_error *err);
void lq_adapter_request_free(struct lq_adapter_request *request);

/* Splits a model id a client names: "base:adapter" (an adapter served on base) or "base".
 * model and adapter receive the parts (adapter empty when there is none); 0, or -1 when a part
 * is empty or does not fit its buffer. */
int lq_model_id_split(const char *id, char *model, size_t model_size, char *adapter,
                      size_t adapter_size);

#endif
