#include "server/api_request.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file_util.h"

int lq_api_error_set(struct lq_api_error *err, int status, const char *code, const char *param,
                     const char *format, ...) {
    if (!err) return -1;
    err->status = status;
    err->type = status == 429   ? "rate_limit_error"
                : status >= 500 ? "server_error"
                                : "invalid_request_error";
    err->code = code;
    snprintf(err->param, sizeof err->param, "%s", param ? param : "");
    va_list args;
    va_start(args, format);
    vsnprintf(err->message, sizeof err->message, format, args);
    va_end(args);
    return -1;
}

void lq_request_limits_default(struct lq_request_limits *limits) {
    limits->max_choices = 64;
    limits->max_messages = 1024;
    limits->max_depth = 16;
    limits->max_string = 1u << 20;
}

/* ---------- the document ---------- */

/* Nesting depth of the JSON text (brackets outside strings), checked before cJSON parses it:
 * cJSON recurses once per level, and nothing we accept is deeper than a few levels. */
static int json_depth_ok(const char *text, size_t length, int max_depth) {
    int depth = 0, in_string = 0;
    for (size_t i = 0; i < length; i++) {
        char c = text[i];
        if (in_string) {
            if (c == '\\')
                i++;
            else if (c == '"')
                in_string = 0;
        } else if (c == '"') {
            in_string = 1;
        } else if (c == '{' || c == '[') {
            if (++depth > max_depth) return 0;
        } else if (c == '}' || c == ']') {
            depth--;
        }
    }
    return 1;
}

/* The body as a JSON object, or NULL with err filled. */
static cJSON *parse_object(const char *body, size_t length, int max_depth,
                           struct lq_api_error *err) {
    if (length == 0) {
        lq_api_error_set(err, 400, "invalid_json", NULL,
                         "the request body is empty; expected a JSON object");
        return NULL;
    }
    if (!json_depth_ok(body, length, max_depth)) {
        lq_api_error_set(err, 400, "invalid_json", NULL,
                         "the request body nests JSON deeper than %d levels", max_depth);
        return NULL;
    }
    const char *end = NULL;
    cJSON *root = lq_json_parse_end(body, length, &end);
    if (!root) {
        lq_api_error_set(err, 400, "invalid_json", NULL,
                         "the request body is not valid JSON (near byte %ld)",
                         end && end >= body ? (long)(end - body) : 0L);
        return NULL;
    }
    for (const char *p = end; p && p < body + length; p++)
        if (*p != ' ' && *p != '\t' && *p != '\r' && *p != '\n') {
            cJSON_Delete(root);
            lq_api_error_set(err, 400, "invalid_json", NULL,
                             "the request body has text after its JSON value (byte %ld)",
                             (long)(p - body));
            return NULL;
        }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        lq_api_error_set(err, 400, "invalid_json", NULL, "the request body must be a JSON object");
        return NULL;
    }
    return root;
}

/* ---------- typed fields: absent and null read as "not given" (0 returned, *given 0) ---------- */

static const cJSON *field(const cJSON *object, const char *name) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, name);
    return item && !cJSON_IsNull(item) ? item : NULL;
}

static int get_string(const cJSON *object, const char *name, size_t max_length, int required,
                      char **out, struct lq_api_error *err) {
    const cJSON *item = field(object, name);
    if (!item) {
        if (required)
            return lq_api_error_set(err, 400, "missing_required_parameter", name,
                                    "'%s' is required", name);
        return 0;
    }
    if (!cJSON_IsString(item))
        return lq_api_error_set(err, 400, "invalid_type", name, "'%s' must be a string", name);
    if (strlen(item->valuestring) > max_length)
        return lq_api_error_set(err, 400, "string_above_max_length", name,
                                "'%s' is longer than %zu bytes", name, max_length);
    *out = strdup(item->valuestring);
    if (!*out) return lq_api_error_set(err, 500, NULL, NULL, "out of memory");
    return 0;
}

static int get_bool(const cJSON *object, const char *name, int *out, struct lq_api_error *err) {
    const cJSON *item = field(object, name);
    if (!item) return 0;
    if (!cJSON_IsBool(item))
        return lq_api_error_set(err, 400, "invalid_type", name, "'%s' must be true or false", name);
    *out = cJSON_IsTrue(item);
    return 0;
}

/* A finite number in [min, max]; *given set when present. */
static int get_number(const cJSON *object, const char *name, double min, double max, double *out,
                      int *given, struct lq_api_error *err) {
    const cJSON *item = field(object, name);
    if (given) *given = item != NULL;
    if (!item) return 0;
    if (!cJSON_IsNumber(item))
        return lq_api_error_set(err, 400, "invalid_type", name, "'%s' must be a number", name);
    double value = item->valuedouble;
    if (!isfinite(value) || value < min || value > max)
        return lq_api_error_set(err, 400, "invalid_value", name, "'%s' must be in [%g, %g]", name,
                                min, max);
    *out = value;
    return 0;
}

static int is_integer(const cJSON *item) {
    return cJSON_IsNumber(item) && isfinite(item->valuedouble) &&
           floor(item->valuedouble) == item->valuedouble;
}

static int get_integer(const cJSON *object, const char *name, long long min, long long max,
                       long long *out, int *given, struct lq_api_error *err) {
    const cJSON *item = field(object, name);
    if (given) *given = item != NULL;
    if (!item) return 0;
    if (!is_integer(item))
        return lq_api_error_set(err, 400, "invalid_type", name, "'%s' must be an integer", name);
    double value = item->valuedouble;
    if (value < (double)min || value > (double)max)
        return lq_api_error_set(err, 400, "invalid_value", name,
                                "'%s' must be an integer in [%lld, %lld]", name, min, max);
    *out = (long long)value;
    return 0;
}

/* ---------- completions and chat ---------- */

static int parse_token_ids(const cJSON *array, const char *param, struct lq_prompt *prompt,
                           struct lq_api_error *err) {
    int count = cJSON_GetArraySize(array);
    if (count == 0)
        return lq_api_error_set(err, 400, "empty_prompt", param, "'%s' is an empty list", param);
    prompt->ids = malloc((size_t)count * sizeof *prompt->ids);
    if (!prompt->ids) return lq_api_error_set(err, 500, NULL, NULL, "out of memory");
    const cJSON *item;
    cJSON_ArrayForEach(item, array) {
        if (!is_integer(item) || item->valuedouble < 0 || item->valuedouble > INT32_MAX)
            return lq_api_error_set(err, 400, "invalid_type", param,
                                    "'%s' must hold token ids (integers >= 0)", param);
        prompt->ids[prompt->n_ids++] = (int)item->valuedouble;
    }
    return 0;
}

/* prompt: a string, a list of strings, a list of token ids, or a list of such lists. */
static int parse_prompts(const cJSON *root, const struct lq_request_limits *limits,
                         struct lq_completion_request *out, struct lq_api_error *err) {
    const cJSON *prompt = field(root, "prompt");
    if (!prompt)
        return lq_api_error_set(err, 400, "missing_required_parameter", "prompt",
                                "'prompt' is required (a string, or a list of strings or token "
                                "ids); \"\" starts from BOS");
    int many = cJSON_IsArray(prompt) && cJSON_GetArraySize(prompt) > 0 &&
               !cJSON_IsNumber(cJSON_GetArrayItem(prompt, 0));
    size_t count = many ? (size_t)cJSON_GetArraySize(prompt) : 1;
    if (cJSON_IsArray(prompt) && cJSON_GetArraySize(prompt) == 0)
        return lq_api_error_set(err, 400, "empty_prompt", "prompt", "'prompt' is an empty list");
    if (count > (size_t)limits->max_choices)
        return lq_api_error_set(err, 400, "invalid_value", "prompt",
                                "'prompt' holds %zu prompts; at most %d", count,
                                limits->max_choices);
    out->prompts = calloc(count, sizeof *out->prompts);
    if (!out->prompts) return lq_api_error_set(err, 500, NULL, NULL, "out of memory");
    out->n_prompts = count;
    for (size_t i = 0; i < count; i++) {
        const cJSON *item = many ? cJSON_GetArrayItem(prompt, (int)i) : prompt;
        char param[32];
        snprintf(param, sizeof param, many ? "prompt[%zu]" : "prompt", i);
        if (cJSON_IsString(item)) {
            if (strlen(item->valuestring) > limits->max_string)
                return lq_api_error_set(err, 400, "string_above_max_length", param,
                                        "'%s' is longer than %zu bytes", param, limits->max_string);
            if (!(out->prompts[i].text = strdup(item->valuestring)))
                return lq_api_error_set(err, 500, NULL, NULL, "out of memory");
        } else if (cJSON_IsArray(item)) {
            if (parse_token_ids(item, param, &out->prompts[i], err)) return -1;
        } else {
            return lq_api_error_set(err, 400, "invalid_type", param,
                                    "'%s' must be a string or a list of token ids", param);
        }
    }
    return 0;
}

static int parse_role(const char *role, enum lq_chat_role *out) {
    if (strcmp(role, "system") == 0 || strcmp(role, "developer") == 0)
        *out = LQ_ROLE_SYSTEM;
    else if (strcmp(role, "user") == 0)
        *out = LQ_ROLE_USER;
    else if (strcmp(role, "assistant") == 0)
        *out = LQ_ROLE_ASSISTANT;
    else
        return -1;
    return 0;
}

/* content: a string, null (assistant), or a list of {"type": "text", "text": ...} parts. */
static int parse_content(const cJSON *content, const char *param, size_t max_string, char **out,
                         struct lq_api_error *err) {
    if (!content || cJSON_IsNull(content)) {
        *out = strdup("");
    } else if (cJSON_IsString(content)) {
        if (strlen(content->valuestring) > max_string)
            return lq_api_error_set(err, 400, "string_above_max_length", param,
                                    "'%s' is longer than %zu bytes", param, max_string);
        *out = strdup(content->valuestring);
    } else if (cJSON_IsArray(content)) {
        size_t total = 0;
        const cJSON *part;
        cJSON_ArrayForEach(part, content) {
            const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
            const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
            if (!cJSON_IsObject(part) || !cJSON_IsString(type) ||
                strcmp(type->valuestring, "text") != 0 || !cJSON_IsString(text))
                return lq_api_error_set(err, 400, "invalid_type", param,
                                        "'%s': only {\"type\": \"text\", \"text\": ...} parts are "
                                        "supported",
                                        param);
            total += strlen(text->valuestring);
            if (total > max_string)
                return lq_api_error_set(err, 400, "string_above_max_length", param,
                                        "'%s' is longer than %zu bytes", param, max_string);
        }
        if ((*out = malloc(total + 1))) {
            size_t at = 0;
            cJSON_ArrayForEach(part, content) {
                const char *text = cJSON_GetObjectItemCaseSensitive(part, "text")->valuestring;
                memcpy(*out + at, text, strlen(text));
                at += strlen(text);
            }
            (*out)[at] = '\0';
        }
    } else {
        return lq_api_error_set(err, 400, "invalid_type", param,
                                "'%s' must be a string or a list of text parts", param);
    }
    return *out ? 0 : lq_api_error_set(err, 500, NULL, NULL, "out of memory");
}

static int parse_messages(const cJSON *root, const struct lq_request_limits *limits,
                          struct lq_completion_request *out, struct lq_api_error *err) {
    const cJSON *messages = field(root, "messages");
    if (!messages)
        return lq_api_error_set(err, 400, "missing_required_parameter", "messages",
                                "'messages' is required");
    if (!cJSON_IsArray(messages))
        return lq_api_error_set(err, 400, "invalid_type", "messages",
                                "'messages' must be a list of messages");
    int count = cJSON_GetArraySize(messages);
    if (count == 0)
        return lq_api_error_set(err, 400, "empty_array", "messages", "'messages' is empty");
    if (count > limits->max_messages)
        return lq_api_error_set(err, 400, "array_above_max_length", "messages",
                                "'messages' holds %d messages; at most %d", count,
                                limits->max_messages);
    out->messages = calloc((size_t)count, sizeof *out->messages);
    if (!out->messages) return lq_api_error_set(err, 500, NULL, NULL, "out of memory");
    const cJSON *message;
    cJSON_ArrayForEach(message, messages) {
        char param[48];
        size_t i = out->n_messages;
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!cJSON_IsObject(message))
            return lq_api_error_set(err, 400, "invalid_type", param, "'%s' must be an object",
                                    param);
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(message, "role");
        if (!cJSON_IsString(role))
            return lq_api_error_set(err, 400, "invalid_type", param, "'%s.role' must be a string",
                                    param);
        if (parse_role(role->valuestring, &out->messages[i].role))
            return lq_api_error_set(err, 400, "invalid_value", param,
                                    "'%s.role' must be system, developer, user or assistant "
                                    "(tool messages are not supported)",
                                    param);
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(message, "content");
        if ((!content || cJSON_IsNull(content)) && out->messages[i].role != LQ_ROLE_ASSISTANT)
            return lq_api_error_set(err, 400, "missing_required_parameter", param,
                                    "'%s.content' is required", param);
        snprintf(param, sizeof param, "messages[%zu].content", i);
        if (parse_content(content, param, limits->max_string, &out->messages[i].content, err))
            return -1;
        out->n_messages++;
    }
    return 0;
}

static int parse_stop(const cJSON *root, struct lq_completion_request *out,
                      struct lq_api_error *err) {
    const cJSON *stop = field(root, "stop");
    if (!stop) return 0;
    int single = cJSON_IsString(stop);
    if (!single && !cJSON_IsArray(stop))
        return lq_api_error_set(err, 400, "invalid_type", "stop",
                                "'stop' must be a string or a list of strings");
    int count = single ? 1 : cJSON_GetArraySize(stop);
    if (count > LQ_GENERATE_MAX_STOPS)
        return lq_api_error_set(err, 400, "invalid_value", "stop",
                                "'stop' holds %d strings; at most %d", count,
                                LQ_GENERATE_MAX_STOPS);
    for (int i = 0; i < count; i++) {
        const cJSON *item = single ? stop : cJSON_GetArrayItem(stop, i);
        if (!cJSON_IsString(item) || item->valuestring[0] == '\0' ||
            strlen(item->valuestring) > 256)
            return lq_api_error_set(err, 400, "invalid_value", "stop",
                                    "'stop' strings must be non-empty strings of at most 256 "
                                    "bytes");
        if (!(out->stop[out->n_stop++] = strdup(item->valuestring)))
            return lq_api_error_set(err, 500, NULL, NULL, "out of memory");
    }
    return 0;
}

/* Fields lqd does not implement are refused when they would change the result, so a client
 * never silently gets something else than it asked for. */
static int check_unsupported(const cJSON *root, int chat, struct lq_api_error *err) {
    static const char *const penalties[] = {"frequency_penalty", "presence_penalty"};
    for (int i = 0; i < 2; i++) {
        double value = 0;
        if (get_number(root, penalties[i], -2, 2, &value, NULL, err)) return -1;
        if (value != 0)
            return lq_api_error_set(err, 400, "unsupported_parameter", penalties[i],
                                    "'%s' is not supported; use 'repetition_penalty'",
                                    penalties[i]);
    }
    const cJSON *bias = field(root, "logit_bias");
    if (bias && (!cJSON_IsObject(bias) || bias->child))
        return lq_api_error_set(err, 400, "unsupported_parameter", "logit_bias",
                                "'logit_bias' is not supported");
    const cJSON *tools = field(root, "tools");
    if (tools && (!cJSON_IsArray(tools) || cJSON_GetArraySize(tools) > 0))
        return lq_api_error_set(err, 400, "unsupported_parameter", "tools",
                                "'tools' is not supported");
    if (field(root, "functions"))
        return lq_api_error_set(err, 400, "unsupported_parameter", "functions",
                                "'functions' is not supported");
    const cJSON *format = field(root, "response_format");
    if (format) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(format, "type");
        if (!cJSON_IsObject(format) || !cJSON_IsString(type) ||
            strcmp(type->valuestring, "text") != 0)
            return lq_api_error_set(err, 400, "unsupported_parameter", "response_format",
                                    "only 'response_format' {\"type\": \"text\"} is supported");
    }
    if (!chat) {
        const cJSON *suffix = field(root, "suffix");
        if (suffix && (!cJSON_IsString(suffix) || suffix->valuestring[0]))
            return lq_api_error_set(err, 400, "unsupported_parameter", "suffix",
                                    "'suffix' is not supported");
    }
    return 0;
}

static int parse_sampling(const cJSON *root, int chat, const struct lq_request_limits *limits,
                          struct lq_completion_request *out, struct lq_api_error *err) {
    long long integer;
    double number;
    int given;
    const char *max_name = "max_tokens";
    if (chat && field(root, "max_completion_tokens")) max_name = "max_completion_tokens";
    if (get_integer(root, max_name, 1, 1 << 24, &integer, &given, err)) return -1;
    out->max_tokens = given ? (int)integer : -1;
    struct lq_sampler_params *s = &out->sampler;
    if (get_number(root, "temperature", 0, 2, &number, &given, err)) return -1;
    if (given) s->temperature = (float)number;
    if (get_number(root, "top_p", 0, 1, &number, &given, err)) return -1;
    if (given) s->top_p = number > 0 ? (float)number : 1e-9f; /* 0: only the likeliest token */
    if (get_integer(root, "top_k", -1, 1 << 24, &integer, &given, err)) return -1;
    if (given) s->top_k = integer < 0 ? 0 : (int)integer; /* -1: off, as vLLM reads it */
    if (get_number(root, "min_p", 0, 1, &number, &given, err)) return -1;
    if (given) s->min_p = (float)number;
    if (get_number(root, "repetition_penalty", 0.01, 100, &number, &given, err)) return -1;
    if (given) s->repetition_penalty = (float)number;
    /* Seeds are 64-bit; JSON numbers are doubles, exact to 2^53. */
    if (get_integer(root, "seed", -(1LL << 53), 1LL << 53, &integer, &out->seed_given, err))
        return -1;
    if (out->seed_given) s->seed = (uint64_t)integer;
    if (get_integer(root, "n", 1, limits->max_choices, &integer, &given, err)) return -1;
    if (given) out->n = (int)integer;
    if (!chat) {
        long long best_of = out->n;
        if (get_integer(root, "best_of", 1, limits->max_choices, &best_of, NULL, err)) return -1;
        if (best_of != out->n)
            return lq_api_error_set(err, 400, "unsupported_parameter", "best_of",
                                    "'best_of' other than n is not supported");
    }
    return 0;
}

static int parse_output_options(const cJSON *root, int chat, struct lq_completion_request *out,
                                struct lq_api_error *err) {
    if (get_bool(root, "stream", &out->stream, err)) return -1;
    const cJSON *options = field(root, "stream_options");
    if (options) {
        if (!cJSON_IsObject(options))
            return lq_api_error_set(err, 400, "invalid_type", "stream_options",
                                    "'stream_options' must be an object");
        if (get_bool(options, "include_usage", &out->include_usage, err)) return -1;
    }
    long long integer;
    int given;
    if (chat) {
        if (get_bool(root, "logprobs", &out->logprobs, err)) return -1;
        if (get_integer(root, "top_logprobs", 0, 20, &integer, &given, err)) return -1;
        if (given && !out->logprobs)
            return lq_api_error_set(err, 400, "invalid_value", "top_logprobs",
                                    "'top_logprobs' needs 'logprobs': true");
        out->top_logprobs = given ? (int)integer : 0;
    } else {
        const cJSON *logprobs = field(root, "logprobs");
        if (cJSON_IsBool(logprobs)) {
            out->logprobs = cJSON_IsTrue(logprobs) ? 1 : -1;
        } else {
            if (get_integer(root, "logprobs", 0, 5, &integer, &given, err)) return -1;
            out->logprobs = given ? (int)integer : -1;
        }
        if (get_bool(root, "echo", &out->echo, err)) return -1;
    }
    return 0;
}

int lq_completion_request_parse(const char *body, size_t length, int chat,
                                const struct lq_request_limits *limits,
                                struct lq_completion_request *out, struct lq_api_error *err) {
    memset(out, 0, sizeof *out);
    out->chat = chat;
    out->n = 1;
    out->max_tokens = -1;
    out->logprobs = chat ? 0 : -1;
    lq_sampler_params_default(&out->sampler);
    cJSON *root = parse_object(body, length, limits->max_depth, err);
    if (!root) return -1;
    int rc = -1;
    if (get_string(root, "model", 256, 1, &out->model, err)) goto done;
    if (out->model[0] == '\0') {
        lq_api_error_set(err, 400, "invalid_value", "model", "'model' is empty");
        goto done;
    }
    if (chat ? parse_messages(root, limits, out, err) : parse_prompts(root, limits, out, err))
        goto done;
    if (parse_sampling(root, chat, limits, out, err) || parse_stop(root, out, err) ||
        parse_output_options(root, chat, out, err) || check_unsupported(root, chat, err))
        goto done;
    size_t prompts = chat ? 1 : out->n_prompts;
    if (prompts * (size_t)out->n > (size_t)limits->max_choices) {
        lq_api_error_set(err, 400, "invalid_value", "n",
                         "%zu prompts x n = %d asks for more than %d completions", prompts, out->n,
                         limits->max_choices);
        goto done;
    }
    rc = 0;
done:
    cJSON_Delete(root);
    if (rc) lq_completion_request_free(out);
    return rc;
}

void lq_completion_request_free(struct lq_completion_request *r) {
    free(r->model);
    for (size_t i = 0; r->prompts && i < r->n_prompts; i++) {
        free(r->prompts[i].text);
        free(r->prompts[i].ids);
    }
    free(r->prompts);
    for (size_t i = 0; r->messages && i < r->n_messages; i++) free(r->messages[i].content);
    free(r->messages);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    memset(r, 0, sizeof *r);
}

/* ---------- models ---------- */

int lq_model_name_valid(const char *name) {
    size_t length = strlen(name);
    if (length == 0 || length > 64 || name[0] == '.') return 0;
    for (const char *p = name; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '.' || *p == '_' || *p == '-'))
            return 0;
    return 1;
}

int lq_model_request_parse(const char *body, size_t length, int unload,
                           struct lq_model_request *out, struct lq_api_error *err) {
    memset(out, 0, sizeof *out);
    cJSON *root = parse_object(body, length, 4, err);
    if (!root) return -1;
    int rc = -1;
    const char *name_field = field(root, "name") || !field(root, "model") ? "name" : "model";
    if (get_string(root, name_field, 64, unload, &out->name, err)) goto done;
    if (out->name && !lq_model_name_valid(out->name)) {
        lq_api_error_set(err, 400, "invalid_value", name_field,
                         "'%s' must be 1 to 64 characters of A-Z a-z 0-9 . _ - (not starting "
                         "with '.')",
                         name_field);
        goto done;
    }
    if (!unload && (get_string(root, "path", 4096, 1, &out->path, err) ||
                    get_string(root, "tokenizer", 4096, 0, &out->tokenizer, err)))
        goto done;
    if (out->path && out->path[0] == '\0') {
        lq_api_error_set(err, 400, "invalid_value", "path", "'path' is empty");
        goto done;
    }
    rc = 0;
done:
    cJSON_Delete(root);
    if (rc) lq_model_request_free(out);
    return rc;
}

void lq_model_request_free(struct lq_model_request *r) {
    free(r->name);
    free(r->path);
    free(r->tokenizer);
    memset(r, 0, sizeof *r);
}

/* ---------- adapters ---------- */

int lq_adapter_request_parse(const char *body, size_t length, int unload,
                             struct lq_adapter_request *out, struct lq_api_error *err) {
    memset(out, 0, sizeof *out);
    cJSON *root = parse_object(body, length, 4, err);
    if (!root) return -1;
    int rc = -1;
    static const char *const names[] = {"model", "name"};
    char **values[] = {&out->model, &out->name};
    for (int i = 0; i < 2; i++) {
        if (get_string(root, names[i], 64, 1, values[i], err)) goto done;
        if (!lq_model_name_valid(*values[i])) {
            lq_api_error_set(err, 400, "invalid_value", names[i],
                             "'%s' must be 1 to 64 characters of A-Z a-z 0-9 . _ - (not "
                             "starting with '.')",
                             names[i]);
            goto done;
        }
    }
    if (!unload && get_string(root, "path", 4096, 1, &out->path, err)) goto done;
    if (out->path && out->path[0] == '\0') {
        lq_api_error_set(err, 400, "invalid_value", "path", "'path' is empty");
        goto done;
    }
    rc = 0;
done:
    cJSON_Delete(root);
    if (rc) lq_adapter_request_free(out);
    return rc;
}

void lq_adapter_request_free(struct lq_adapter_request *r) {
    free(r->model);
    free(r->name);
    free(r->path);
    memset(r, 0, sizeof *r);
}

int lq_model_id_split(const char *id, char *model, size_t model_size, char *adapter,
                      size_t adapter_size) {
    const char *colon = strchr(id, ':');
    size_t base = colon ? (size_t)(colon - id) : strlen(id);
    size_t rest = colon ? strlen(colon + 1) : 0;
    if (base == 0 || base >= model_size || (colon && (rest == 0 || rest >= adapter_size)))
        return -1;
    memcpy(model, id, base);
    model[base] = '\0';
    adapter[0] = '\0';
    if (colon) memcpy(adapter, colon + 1, rest + 1);
    return 0;
}
