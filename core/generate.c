#include "generate.h"

#include <stdlib.h>
#include <string.h>

void lq_generate_options_default(struct lq_generate_options *options) {
    memset(options, 0, sizeof *options);
    options->max_tokens = 256;
    lq_sampler_params_default(&options->sampler);
    options->add_bos = 1;
}

int lq_generate(struct lq_session *session, const struct lq_tokenizer *tokenizer,
                const char *prompt, const struct lq_generate_options *options,
                lq_text_callback on_text, void *context, struct lq_generate_result *result,
                struct lq_error *err) {
    memset(result, 0, sizeof *result);
    if (options->max_tokens < 0) return lq_error_set(err, LQ_EINVAL, "max_tokens must be >= 0");
    int *ids = NULL;
    size_t count = 0;
    int rc =
        lq_tokenizer_encode(tokenizer, prompt, strlen(prompt), options->add_bos, &ids, &count, err);
    if (rc) return rc;
    if (count == 0) {
        free(ids);
        return lq_error_set(err, LQ_EINVAL, "the prompt is empty and no BOS is added");
    }
    struct lq_sampler *sampler = NULL;
    struct lq_text_stream *stream = NULL;
    struct lq_batch *batch = NULL;
    float *logits = NULL;
    int *history = NULL;
    int vocab = lq_tokenizer_vocab_size(tokenizer);
    lq_session_reset(session);
    if ((rc = lq_sampler_create(&options->sampler, vocab, &sampler, err))) goto done;
    if ((rc = lq_text_stream_create(tokenizer, options->stop, ids[count - 1], on_text, context,
                                    &stream, err)))
        goto done;
    /* the sampler sees the tokenizer's pieces; the model's rows may be longer (padded) */
    int rows = lq_session_config(session)->vocab_size;
    logits = malloc((size_t)(rows > vocab ? rows : vocab) * sizeof *logits);
    history = malloc((count + (size_t)options->max_tokens + 1) * sizeof *history);
    if (!logits || !history) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
        goto done;
    }
    memcpy(history, ids, count * sizeof *ids);
    result->prompt_tokens = (int)count;
    if (count > (size_t)lq_session_context(session)) {
        rc = lq_error_set(err, LQ_EINVAL, "the prompt has %zu tokens; the context holds %d", count,
                          lq_session_context(session));
        goto done;
    }
    /* Prefill in the largest chunks the session accepts. */
    for (size_t i = 0; i < count;) {
        int n = (int)(count - i) < lq_session_max_batch(session) ? (int)(count - i)
                                                                 : lq_session_max_batch(session);
        if ((rc = lq_session_forward(session, ids + i, n, 0, logits, err))) goto done;
        i += (size_t)n;
    }
    /* Decode steps go through a batch of one: the same logits as lq_session_forward (every op
     * is applied to the row as it applies it to a lone token), and on a backend with decode-step
     * graphs (CUDA) each step is replayed as one graph with the step's fused ops. */
    if ((rc = lq_batch_create(lq_session_runtime(session), 1, &batch, err))) goto done;
    size_t seen = count;
    result->finish = LQ_FINISH_LENGTH;
    for (int step = 0; step < options->max_tokens; step++) {
        int token = lq_sampler_sample(sampler, logits, history, seen, NULL);
        int ended = lq_text_stream_push(stream, token, &result->finish, err);
        if (ended < 0) {
            rc = ended;
            goto done;
        }
        result->completion_tokens = lq_text_stream_tokens(stream);
        if (ended) break;
        history[seen++] = token;
        if (step + 1 == options->max_tokens) break;
        if (lq_session_position(session) >= lq_session_context(session)) break; /* context full */
        if ((rc = lq_forward_batch(batch, &session, &token, 1, logits, err))) goto done;
    }
    lq_text_stream_flush(stream);
done:
    lq_batch_free(batch);
    lq_text_stream_free(stream);
    free(history);
    free(logits);
    free(ids);
    lq_sampler_free(sampler);
    return rc;
}
