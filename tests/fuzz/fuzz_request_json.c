/* libFuzzer target for the API's request parsers (server/api_request.c): the input is read as
 * a completions body, a chat completions body, a model load/unload body and an adapter
 * load/unload body. Each either is refused with a 4xx/5xx, an error type and a message, or
 * yields a request every later step may trust: a model name, 1..max choices, prompts that
 * are text or non-empty token ids, at most 8 non-empty stop strings, sampler parameters
 * lq_sampler_params_validate accepts. An accepted chat is rendered in each chat format and
 * tokenized with a small vocabulary, giving ids in range. Broken invariants trap, so the fuzzer
 * reports them like crashes.
 *
 * Seeds (corpus/request_json/): valid_* are bodies the OpenAI clients send (string, list and
 * token-id prompts, streams, logprobs, text parts, load/unload); bad_* are one refusal each
 * (broken JSON, deep nesting, wrong types, out-of-range numbers, empty lists). */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/chat_template.h"
#include "core/sampler.h"
#include "core/tokenizer.h"
#include "server/api_request.h"

#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A tiny llama2.c vocabulary: <unk> <s> </s>, the 256 byte pieces, a few words, and the ChatML
 * markers (so that special pieces are found by lq_chat_tokenize). */
static struct lq_tokenizer *builtin_tokenizer(void) {
    static const char *const normal[] = {
        " ", "e", "t", " the", "User", ":", "<|im_start|>", "<|im_end|>", "[INST]"};
    return fuzz_builtin_tokenizer(normal, (int)(sizeof normal / sizeof normal[0]), 12);
}

static void check_refusal(const struct lq_api_error *err) {
    FUZZ_ASSERT(err->status >= 400 && err->status < 600);
    FUZZ_ASSERT(err->type != NULL && err->message[0] != '\0');
    FUZZ_ASSERT(memchr(err->message, '\0', sizeof err->message) != NULL);
}

static void check_chat(const struct lq_completion_request *r,
                       const struct lq_tokenizer *tokenizer) {
    /* Each format, and ChatML with a template's default system message. */
    char default_system[] = "You are a helpful assistant.";
    const struct lq_chat_style styles[] = {{LQ_CHAT_PLAIN, NULL},
                                           {LQ_CHAT_CHATML, NULL},
                                           {LQ_CHAT_LLAMA2, NULL},
                                           {LQ_CHAT_LLAMA3, NULL},
                                           {LQ_CHAT_CHATML, default_system}};
    for (size_t f = 0; f < sizeof styles / sizeof styles[0]; f++) {
        struct lq_chat_prompt prompt;
        FUZZ_ASSERT(lq_chat_render(&styles[f], r->messages, r->n_messages, &prompt) == LQ_OK);
        FUZZ_ASSERT(prompt.n_segments > 0);
        for (size_t i = 0; i < prompt.n_segments; i++)
            FUZZ_ASSERT((prompt.segments[i].text != NULL) ==
                        (prompt.segments[i].kind == LQ_SEGMENT_TEXT ||
                         prompt.segments[i].kind == LQ_SEGMENT_SPECIAL));
        int *ids = NULL;
        size_t count = 0;
        FUZZ_ASSERT(lq_chat_tokenize(tokenizer, &prompt, &ids, &count, NULL) == LQ_OK);
        FUZZ_ASSERT(count > 0 && ids[0] == lq_tokenizer_bos_id(tokenizer));
        for (size_t i = 0; i < count; i++)
            FUZZ_ASSERT(ids[i] >= 0 && ids[i] < lq_tokenizer_vocab_size(tokenizer));
        free(ids);
        lq_chat_prompt_free(&prompt);
    }
}

static void check_request(const struct lq_completion_request *r,
                          const struct lq_request_limits *limits) {
    FUZZ_ASSERT(r->model && r->model[0] && strlen(r->model) <= 256);
    FUZZ_ASSERT(r->n >= 1 && r->n <= limits->max_choices);
    FUZZ_ASSERT(r->max_tokens == -1 || (r->max_tokens >= 1 && r->max_tokens <= 1 << 24));
    FUZZ_ASSERT(lq_sampler_params_validate(&r->sampler, NULL) == LQ_OK);
    FUZZ_ASSERT(r->n_stop >= 0 && r->n_stop <= LQ_GENERATE_MAX_STOPS);
    for (int i = 0; i < r->n_stop; i++)
        FUZZ_ASSERT(r->stop[i] && r->stop[i][0] && strlen(r->stop[i]) <= 256);
    FUZZ_ASSERT(r->stream == 0 || r->stream == 1);
    if (r->chat) {
        FUZZ_ASSERT(r->n_messages >= 1 && r->n_messages <= (size_t)limits->max_messages);
        FUZZ_ASSERT(r->n <= limits->max_choices && r->logprobs >= 0 && r->logprobs <= 1);
        FUZZ_ASSERT(r->top_logprobs >= 0 && r->top_logprobs <= 20);
        FUZZ_ASSERT(r->logprobs || r->top_logprobs == 0);
        for (size_t i = 0; i < r->n_messages; i++) {
            FUZZ_ASSERT(r->messages[i].content != NULL);
            FUZZ_ASSERT(strlen(r->messages[i].content) <= limits->max_string);
            FUZZ_ASSERT(r->messages[i].role <= LQ_ROLE_ASSISTANT);
        }
    } else {
        FUZZ_ASSERT(r->n_prompts >= 1 &&
                    r->n_prompts * (size_t)r->n <= (size_t)limits->max_choices);
        FUZZ_ASSERT(r->logprobs >= -1 && r->logprobs <= 5);
        for (size_t i = 0; i < r->n_prompts; i++) {
            const struct lq_prompt *p = &r->prompts[i];
            FUZZ_ASSERT((p->text != NULL) != (p->ids != NULL));
            if (p->ids) {
                FUZZ_ASSERT(p->n_ids > 0);
                for (size_t k = 0; k < p->n_ids; k++) FUZZ_ASSERT(p->ids[k] >= 0);
            }
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static struct lq_tokenizer *tokenizer;
    if (!tokenizer) tokenizer = builtin_tokenizer();
    struct lq_request_limits limits;
    lq_request_limits_default(&limits);
    limits.max_messages = 64; /* small limits reach the limit checks */
    limits.max_string = 4096;
    for (int chat = 0; chat <= 1; chat++) {
        struct lq_completion_request request;
        struct lq_api_error err = {0};
        if (lq_completion_request_parse((const char *)data, size, chat, &limits, &request, &err)) {
            check_refusal(&err);
            continue;
        }
        FUZZ_ASSERT(request.chat == chat);
        check_request(&request, &limits);
        if (chat) check_chat(&request, tokenizer);
        lq_completion_request_free(&request);
    }
    for (int unload = 0; unload <= 1; unload++) {
        struct lq_model_request request;
        struct lq_api_error err = {0};
        if (lq_model_request_parse((const char *)data, size, unload, &request, &err)) {
            check_refusal(&err);
            continue;
        }
        FUZZ_ASSERT(!request.name || lq_model_name_valid(request.name));
        FUZZ_ASSERT(unload ? request.name != NULL : request.path != NULL && request.path[0]);
        lq_model_request_free(&request);
    }
    for (int unload = 0; unload <= 1; unload++) {
        struct lq_adapter_request request;
        struct lq_api_error err = {0};
        if (lq_adapter_request_parse((const char *)data, size, unload, &request, &err)) {
            check_refusal(&err);
            continue;
        }
        FUZZ_ASSERT(lq_model_name_valid(request.model) && lq_model_name_valid(request.name));
        FUZZ_ASSERT(unload ? request.path == NULL : request.path != NULL && request.path[0]);
        lq_adapter_request_free(&request);
    }
    return 0;
}
