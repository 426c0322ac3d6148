#include "generate.h"

#include <stdlib.h>
#include <string.h>

const char *lq_finish_reason_name(enum lq_finish_reason reason) {
    return reason == LQ_FINISH_LENGTH ? "length" : "stop";
}

void lq_generate_options_default(struct lq_generate_options *options) {
    memset(options, 0, sizeof *options);
    options->max_tokens = 256;
    lq_sampler_params_default(&options->sampler);
    options->add_bos = 1;
}

/* Output not yet handed to the callback: held back while it may be the start of a stop
 * string. */
struct pending_text {
    char *data;
    size_t length, capacity;
};

static int pending_append(struct pending_text *p, const char *text, size_t length) {
    if (p->length + length + 1 > p->capacity) {
        size_t capacity = (p->length + length + 1) * 2;
        char *grown = realloc(p->data, capacity);
        if (!grown) return LQ_ENOMEM;
        p->data = grown, p->capacity = capacity;
    }
    memcpy(p->data + p->length, text, length);
    p->length += length;
    p->data[p->length] = '\0';
    return LQ_OK;
}

/* Longest suffix of text that is a proper prefix of a stop string. */
static size_t held_suffix(const char *text, size_t length, const char *const *stops) {
    size_t held = 0;
    for (int s = 0; s < LQ_GENERATE_MAX_STOPS && stops[s]; s++) {
        size_t n = strlen(stops[s]);
        for (size_t k = n > 1 ? n - 1 : 0; k > held; k--)
            if (k <= length && memcmp(text + length - k, stops[s], k) == 0) {
                held = k;
                break;
            }
    }
    return held;
}

/* Position of the earliest stop string in text, or -1. */
static long find_stop(const char *text, const char *const *stops) {
    long first = -1;
    for (int s = 0; s < LQ_GENERATE_MAX_STOPS && stops[s]; s++) {
        if (!stops[s][0]) continue;
        const char *at = strstr(text, stops[s]);
        if (at && (first < 0 || at - text < first)) first = at - text;
    }
    return first;
}

/* Hands everything but the held-back suffix to the callback; returns 1 when it cancels. */
static int flush(struct pending_text *p, size_t keep, lq_text_callback on_text, void *context) {
    size_t give = p->length - keep;
    if (give == 0) return 0;
    int cancel = on_text ? on_text(context, p->data, give) : 0;
    memmove(p->data, p->data + give, keep + 1);
    p->length = keep;
    return cancel;
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
    float *logits = NULL;
    int *history = NULL;
    struct pending_text pending = {0};
    int vocab = lq_tokenizer_vocab_size(tokenizer);
    lq_session_reset(session);
    if ((rc = lq_sampler_create(&options->sampler, vocab, &sampler, err))) goto done;
    logits = malloc((size_t)vocab * sizeof *logits);
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
    int bos = lq_tokenizer_bos_id(tokenizer), eos = lq_tokenizer_eos_id(tokenizer);
    int previous = ids[count - 1];
    size_t seen = count;
    result->finish = LQ_FINISH_LENGTH;
    for (int step = 0; step < options->max_tokens; step++) {
        int token = lq_sampler_sample(sampler, logits, history, seen, NULL);
        if (token == eos || (token == bos && bos >= 0)) {
            result->finish = LQ_FINISH_EOS;
            break;
        }
        history[seen++] = token;
        result->completion_tokens++;
        char piece[256];
        int length = lq_tokenizer_decode_piece(tokenizer, previous, token, piece, sizeof piece);
        previous = token;
        if (length < 0) {
            rc = lq_error_set(err, length, "cannot decode token %d", token);
            goto done;
        }
        if (pending_append(&pending, piece, (size_t)length)) {
            rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
            goto done;
        }
        long stop_at = find_stop(pending.data, options->stop);
        if (stop_at >= 0) {
            pending.length = (size_t)stop_at;
            pending.data[stop_at] = '\0';
            result->finish = LQ_FINISH_STOP;
            break;
        }
        if (flush(&pending, held_suffix(pending.data, pending.length, options->stop), on_text,
                  context)) {
            result->finish = LQ_FINISH_STOP;
            break;
        }
        if (step + 1 == options->max_tokens) break;
        if (lq_session_position(session) >= lq_session_context(session)) break; /* context full */
        if ((rc = lq_session_forward(session, &token, 1, 0, logits, err))) goto done;
    }
    flush(&pending, 0, on_text, context);
done:
    free(pending.data);
    free(history);
    free(logits);
    free(ids);
    lq_sampler_free(sampler);
    return rc;
}
