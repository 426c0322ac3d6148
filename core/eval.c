#include "eval.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* Next document: [*begin, *end) trimmed, starting the search at offset; returns the offset
 * after it, or length when there is none (then *begin == *end). */
static size_t next_document(const char *text, size_t length, size_t offset,
                            enum lq_eval_split split, size_t *begin, size_t *end) {
    while (offset < length && is_space(text[offset])) offset++;
    size_t start = offset;
    /* a document ends at a newline (lines) or at a blank line: "\n", optional spaces, "\n" */
    while (offset < length) {
        if (text[offset] == '\n' && split == LQ_SPLIT_LINES) break;
        if (text[offset] == '\n') {
            size_t probe = offset + 1;
            while (probe < length &&
                   (text[probe] == ' ' || text[probe] == '\t' || text[probe] == '\r'))
                probe++;
            if (probe >= length || text[probe] == '\n') break;
        }
        offset++;
    }
    size_t stop = offset;
    while (stop > start && is_space(text[stop - 1])) stop--;
    *begin = start, *end = stop;
    return offset;
}

/* -log softmax(logits)[target], in double. */
static double token_nll(const float *logits, int vocab, int target) {
    float max = logits[0];
    for (int v = 1; v < vocab; v++) max = logits[v] > max ? logits[v] : max;
    double sum = 0.0;
    for (int v = 0; v < vocab; v++) sum += exp((double)logits[v] - max);
    return log(sum) + max - logits[target];
}

static bool budget_spent(const struct lq_eval_options *options,
                         const struct lq_eval_result *result) {
    return options->max_tokens != 0 && result->tokens >= options->max_tokens;
}

/* Evaluates ids[0..min(count, context)) from position 0: each position predicts the next
 * token, up to the max_tokens budget. */
static int eval_window(struct lq_session *session, int vocab, const int *ids, size_t count,
                       int context, const struct lq_eval_options *options, float *logits,
                       struct lq_eval_result *result, struct lq_error *err) {
    size_t predicted = count < (size_t)context ? count - 1 : (size_t)context - 1;
    if (options->max_tokens && predicted > options->max_tokens - result->tokens)
        predicted = options->max_tokens - result->tokens;
    if (predicted == 0) return LQ_OK;
    lq_session_reset(session);
    int rc = lq_session_forward(session, ids, (int)predicted, 1, logits, err);
    for (size_t i = 0; i < predicted && !rc; i++)
        result->nll += token_nll(logits + i * (size_t)vocab, vocab, ids[i + 1]);
    result->tokens += predicted;
    result->documents++;
    return rc;
}

int lq_eval_perplexity(struct lq_runtime *runtime, const struct lq_tokenizer *tokenizer,
                       const char *text, size_t length, const struct lq_eval_options *options,
                       struct lq_eval_result *result, struct lq_error *err) {
    memset(result, 0, sizeof *result);
    const struct lq_model_config *c = lq_runtime_config(runtime);
    int context = options->context > 0 ? options->context : c->max_seq_len;
    if (context < 2 || context > c->max_seq_len)
        return lq_error_set(err, LQ_EINVAL, "context %d: must be 2..%d", context, c->max_seq_len);
    if (lq_tokenizer_vocab_size(tokenizer) > c->vocab_size)
        return lq_error_set(err, LQ_EINVAL, "the tokenizer has %d pieces, the model only %d",
                            lq_tokenizer_vocab_size(tokenizer), c->vocab_size);
    struct lq_session *session;
    int rc = lq_session_create(runtime, context, context, &session, err);
    if (rc) return rc;
    if (options->adapter && (rc = lq_session_set_adapter(session, options->adapter, err))) {
        lq_session_free(session);
        return rc;
    }
    float *logits = malloc((size_t)context * c->vocab_size * sizeof *logits);
    if (!logits) {
        lq_session_free(session);
        return lq_error_set(err, LQ_ENOMEM, "out of memory for logits");
    }
    double started = now();
    if (options->split == LQ_SPLIT_STREAM) {
        int *ids;
        size_t count;
        rc = lq_tokenizer_encode(tokenizer, text, length, 1, &ids, &count, err);
        for (size_t at = 0; !rc && at + 1 < count && !budget_spent(options, result);
             at += (size_t)context)
            rc = eval_window(session, c->vocab_size, ids + at, count - at, context, options, logits,
                             result, err);
        free(ids);
    }
    size_t offset = options->split == LQ_SPLIT_STREAM ? length : 0;
    while (!rc && offset < length && !budget_spent(options, result)) {
        size_t begin, end;
        offset = next_document(text, length, offset, options->split, &begin, &end);
        if (begin == end) continue;
        int *ids;
        size_t count;
        if ((rc = lq_tokenizer_encode(tokenizer, text + begin, end - begin, 1, &ids, &count, err)))
            break;
        rc = eval_window(session, c->vocab_size, ids, count, context, options, logits, result, err);
        free(ids);
    }
    result->seconds = now() - started;
    result->ppl = result->tokens ? exp(result->nll / (double)result->tokens) : NAN;
    free(logits);
    lq_session_free(session);
    if (!rc && result->tokens == 0)
        rc = lq_error_set(err, LQ_EINVAL, "the text has no tokens to predict");
    return rc;
}
