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

double lq_token_nll(const float *logits, int vocab, int target) {
    float max = logits[0];
    for (int v = 1; v < vocab; v++) max = logits[v] > max ? logits[v] : max;
    double sum = 0.0;
    for (int v = 0; v < vocab; v++) sum += exp((double)logits[v] - max);
    return log(sum) + max - logits[target];
}

static void add_nll(struct lq_eval_result *result, double nll) {
    result->nll += nll;
    result->nll_squared += nll * nll;
}

/* Runs forward passes and scores their logits: on the device by the backend's token_nll when
 * it has one (only the per-position NLLs come back), else from logits copied to the host. */
struct scorer {
    struct lq_session *session;
    int vocab;
    float *logits; /* host [context, vocab]; NULL when token_nll scores on the device */
    double *nll;   /* [context]: one window's NLLs */
};

static int scorer_init(struct scorer *s, struct lq_session *session, int context,
                       struct lq_error *err) {
    int on_device = lq_session_backend(session)->ops->token_nll != NULL;
    s->session = session;
    s->vocab = lq_session_config(session)->vocab_size;
    s->nll = malloc((size_t)context * sizeof *s->nll);
    s->logits = on_device ? NULL : malloc((size_t)context * s->vocab * sizeof *s->logits);
    if (!s->nll || (!on_device && !s->logits)) {
        free(s->nll), free(s->logits);
        return lq_error_set(err, LQ_ENOMEM, "out of memory for logits");
    }
    return LQ_OK;
}

static void scorer_free(struct scorer *s) {
    free(s->nll), free(s->logits);
}

/* Runs tokens[0..n) from an empty cache and adds to result the NLL of each position i in
 * [first, n) predicting targets[i], in position order. */
static int score(struct scorer *s, const int *tokens, int n, int first, const int *targets,
                 struct lq_eval_result *result, struct lq_error *err) {
    lq_session_reset(s->session);
    int rc = lq_session_forward(s->session, tokens, n, 1, s->logits, err);
    if (rc) return rc;
    if (s->logits) {
        for (int i = first; i < n; i++)
            s->nll[i] = lq_token_nll(s->logits + (size_t)i * s->vocab, s->vocab, targets[i]);
    } else {
        struct lq_backend *b = lq_session_backend(s->session);
        const float *logits = lq_session_device_logits(s->session) + (size_t)first * s->vocab;
        if ((rc = b->ops->token_nll(b, logits, targets + first, n - first, s->vocab,
                                    s->nll + first)))
            return lq_error_set(err, rc, "scoring %d positions failed on the %s backend", n - first,
                                b->ops->name);
    }
    for (int i = first; i < n; i++) add_nll(result, s->nll[i]);
    return LQ_OK;
}

static bool budget_spent(const struct lq_eval_options *options,
                         const struct lq_eval_result *result) {
    return options->max_tokens != 0 && result->tokens >= options->max_tokens;
}

/* Evaluates ids[0..min(count, context)) from position 0: each position predicts the next
 * token, up to the max_tokens budget. */
static int eval_window(struct scorer *scorer, const int *ids, size_t count, int context,
                       const struct lq_eval_options *options, struct lq_eval_result *result,
                       struct lq_error *err) {
    size_t predicted = count < (size_t)context ? count - 1 : (size_t)context - 1;
    if (options->max_tokens && predicted > options->max_tokens - result->tokens)
        predicted = options->max_tokens - result->tokens;
    if (predicted == 0) return LQ_OK;
    /* position i predicts ids[i + 1] */
    int rc = score(scorer, ids, (int)predicted, 0, ids + 1, result, err);
    result->tokens += predicted;
    result->documents++;
    return rc;
}

/* 1 when encode(add_bos) puts BOS first (llama_vocab_get_add_bos), 0 when not. */
static int adds_bos(const struct lq_tokenizer *tokenizer, int *adds, struct lq_error *err) {
    int *ids;
    size_t count;
    int rc = lq_tokenizer_encode(tokenizer, "", 0, 1, &ids, &count, err);
    if (rc) return rc;
    *adds = count == 1 && ids[0] == lq_tokenizer_bos_id(tokenizer);
    free(ids);
    return LQ_OK;
}

/* llama-perplexity's perplexity() (llama.cpp tools/perplexity/perplexity.cpp, no stride):
 * whole chunks of `context` tokens from an empty cache, the first token of each replaced by
 * BOS when the tokenizer adds one, and the second half of each chunk scored: logits at
 * position j in [context/2, context - 1) against token j + 1. Its n_batch only splits a
 * chunk's decode (and packs several chunks into one batch), so the figure does not depend on
 * it. */
static int eval_llama_perplexity(struct scorer *scorer, const struct lq_tokenizer *tokenizer,
                                 const char *text, size_t length, int context,
                                 const struct lq_eval_options *options,
                                 struct lq_eval_result *result, struct lq_error *err) {
    int add_bos;
    int first = context / 2, scored = context - first - 1;
    if (scored < 1)
        return lq_error_set(err, LQ_EINVAL,
                            "context %d: the llama-perplexity protocol needs a context >= 3",
                            context);
    int rc = adds_bos(tokenizer, &add_bos, err);
    if (rc) return rc;
    /* common_params reads -f FILE and drops one trailing newline */
    if (length > 0 && text[length - 1] == '\n') length--;
    int *ids, *chunk = malloc((size_t)context * sizeof *chunk);
    size_t count;
    if (!chunk) return lq_error_set(err, LQ_ENOMEM, "out of memory for a chunk");
    if ((rc = lq_tokenizer_encode(tokenizer, text, length, 1, &ids, &count, err))) {
        free(chunk);
        return rc;
    }
    size_t chunks = count / (size_t)context;
    if (count < 2 * (size_t)context)
        rc = lq_error_set(err, LQ_EINVAL,
                          "the text tokenizes to %zu tokens: the llama-perplexity protocol needs "
                          "at least 2 * context = %zu",
                          count, 2 * (size_t)context);
    if (options->max_chunks && chunks > options->max_chunks) chunks = options->max_chunks;
    for (size_t c = 0; !rc && c < chunks; c++) {
        const int *tokens = ids + c * (size_t)context;
        memcpy(chunk, tokens, (size_t)context * sizeof *chunk);
        if (add_bos) chunk[0] = lq_tokenizer_bos_id(tokenizer);
        /* position j predicts tokens[j + 1] (the original first token, not BOS, is never a
         * target); the last position's logits are never scored */
        if ((rc = score(scorer, chunk, context - 1, first, tokens + 1, result, err))) break;
        result->tokens += (size_t)scored;
        result->documents++;
    }
    free(ids);
    free(chunk);
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
    struct scorer scorer;
    if ((rc = scorer_init(&scorer, session, context, err))) {
        lq_session_free(session);
        return rc;
    }
    double started = now();
    if (options->split == LQ_SPLIT_STREAM) {
        int *ids;
        size_t count;
        rc = lq_tokenizer_encode(tokenizer, text, length, 1, &ids, &count, err);
        for (size_t at = 0; !rc && at + 1 < count && !budget_spent(options, result);
             at += (size_t)context)
            rc = eval_window(&scorer, ids + at, count - at, context, options, result, err);
        free(ids);
    } else if (options->split == LQ_SPLIT_LLAMA_PERPLEXITY) {
        rc = eval_llama_perplexity(&scorer, tokenizer, text, length, context, options, result, err);
    }
    bool whole_text =
        options->split == LQ_SPLIT_STREAM || options->split == LQ_SPLIT_LLAMA_PERPLEXITY;
    size_t offset = whole_text ? length : 0;
    while (!rc && offset < length && !budget_spent(options, result)) {
        size_t begin, end;
        offset = next_document(text, length, offset, options->split, &begin, &end);
        if (begin == end) continue;
        int *ids;
        size_t count;
        if ((rc = lq_tokenizer_encode(tokenizer, text + begin, end - begin, 1, &ids, &count, err)))
            break;
        rc = eval_window(&scorer, ids, count, context, options, result, err);
        free(ids);
    }
    result->seconds = now() - started;
    result->context = context;
    result->ppl = result->tokens ? exp(result->nll / (double)result->tokens) : NAN;
    /* llama-perplexity's estimate: ppl * sqrt((mean(nll^2) - mean(nll)^2) / (tokens - 1)) */
    result->ppl_error = NAN;
    if (result->tokens > 1) {
        double mean = result->nll / (double)result->tokens;
        double variance = result->nll_squared / (double)result->tokens - mean * mean;
        if (variance > 0)
            result->ppl_error = result->ppl * sqrt(variance / (double)(result->tokens - 1));
    }
    scorer_free(&scorer);
    lq_session_free(session);
    if (!rc && result->tokens == 0)
        rc = lq_error_set(err, LQ_EINVAL, "the text has no tokens to predict");
    return rc;
}
