/* Text generation on a session: prompt prefill, sampling, streaming of decoded text, stop
 * strings, EOS and the max-tokens limit. The daemon and `lqd generate` share it. */
#ifndef LQ_GENERATE_H
#define LQ_GENERATE_H

#include "core/forward.h"
#include "core/sampler.h"
#include "core/text_stream.h" /* enum lq_finish_reason, lq_text_callback */
#include "core/tokenizer.h"

#define LQ_GENERATE_MAX_STOPS LQ_TEXT_STREAM_MAX_STOPS

struct lq_generate_options {
    int max_tokens; /* generated tokens at most (>= 0) */
    struct lq_sampler_params sampler;
    const char *stop[LQ_GENERATE_MAX_STOPS]; /* stop strings (borrowed), none is NULL */
    int add_bos;                             /* start the prompt with BOS (default 1) */
};

void lq_generate_options_default(struct lq_generate_options *options);

struct lq_generate_result {
    int prompt_tokens;
    int completion_tokens;
    enum lq_finish_reason finish;
};

/* Resets session and generates from prompt. Generation ends at EOS (or BOS, which llama2.c
 * models emit between stories), when the output contains a stop string (the output ends
 * before it), after max_tokens, or when the context is full (reason "length"). */
int lq_generate(struct lq_session *session, const struct lq_tokenizer *tokenizer,
                const char *prompt, const struct lq_generate_options *options,
                lq_text_callback on_text, void *context, struct lq_generate_result *result,
                struct lq_error *err);

#endif
