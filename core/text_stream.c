#include "text_stream.h"

#include <stdlib.h>
#include <string.h>

const char *lq_finish_reason_name(enum lq_finish_reason reason) {
    return reason == LQ_FINISH_LENGTH ? "length" : "stop";
}

struct lq_text_stream {
    const struct lq_tokenizer *tokenizer;
    char *stop[LQ_TEXT_STREAM_MAX_STOPS + 1]; /* owned copies; NULL-terminated */
    lq_text_callback on_text;
    void *context;
    int previous; /* the token before the next one, for streaming decode */
    int bos, eos;
    int tokens;
    int ended;
    /* Output not yet handed to the callback: held back while it may be the start of a stop
     * string. */
    char *pending;
    size_t length, capacity;
    char *piece; /* scratch for one decoded token */
    size_t piece_size;
};

int lq_text_stream_create(const struct lq_tokenizer *tokenizer, const char *const *stop,
                          int previous, lq_text_callback on_text, void *context,
                          struct lq_text_stream **out, struct lq_error *err) {
    *out = NULL;
    struct lq_text_stream *s = calloc(1, sizeof *s);
    if (!s) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    s->tokenizer = tokenizer, s->on_text = on_text, s->context = context;
    s->previous = previous;
    s->bos = lq_tokenizer_bos_id(tokenizer), s->eos = lq_tokenizer_eos_id(tokenizer);
    s->piece_size = lq_tokenizer_max_piece_size(tokenizer);
    if (s->piece_size < 256) s->piece_size = 256;
    s->piece = malloc(s->piece_size);
    s->capacity = 256;
    s->pending = malloc(s->capacity);
    int failed = !s->piece || !s->pending;
    for (int i = 0; stop && i < LQ_TEXT_STREAM_MAX_STOPS && stop[i] && !failed; i++)
        failed = !(s->stop[i] = strdup(stop[i]));
    if (failed) {
        lq_text_stream_free(s);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    s->pending[0] = '\0';
    *out = s;
    return LQ_OK;
}

void lq_text_stream_free(struct lq_text_stream *s) {
    if (!s) return;
    for (int i = 0; i < LQ_TEXT_STREAM_MAX_STOPS; i++) free(s->stop[i]);
    free(s->pending);
    free(s->piece);
    free(s);
}

int lq_text_stream_tokens(const struct lq_text_stream *s) {
    return s->tokens;
}

static int pending_append(struct lq_text_stream *s, const char *text, size_t length) {
    if (s->length + length + 1 > s->capacity) {
        size_t capacity = (s->length + length + 1) * 2;
        char *grown = realloc(s->pending, capacity);
        if (!grown) return LQ_ENOMEM;
        s->pending = grown, s->capacity = capacity;
    }
    memcpy(s->pending + s->length, text, length);
    s->length += length;
    s->pending[s->length] = '\0';
    return LQ_OK;
}

/* Longest suffix of the pending text that is a proper prefix of a stop string. */
static size_t held_suffix(const struct lq_text_stream *s) {
    size_t held = 0;
    for (int i = 0; i < LQ_TEXT_STREAM_MAX_STOPS && s->stop[i]; i++) {
        size_t n = strlen(s->stop[i]);
        for (size_t k = n > 1 ? n - 1 : 0; k > held; k--)
            if (k <= s->length && memcmp(s->pending + s->length - k, s->stop[i], k) == 0) {
                held = k;
                break;
            }
    }
    return held;
}

/* Position of the earliest stop string in the pending text, or -1. */
static long find_stop(const struct lq_text_stream *s) {
    long first = -1;
    for (int i = 0; i < LQ_TEXT_STREAM_MAX_STOPS && s->stop[i]; i++) {
        if (!s->stop[i][0]) continue;
        const char *at = strstr(s->pending, s->stop[i]);
        if (at && (first < 0 || at - s->pending < first)) first = at - s->pending;
    }
    return first;
}

/* Hands everything but the last keep bytes to the callback; returns 1 when it cancels. */
static int hand_over(struct lq_text_stream *s, size_t keep) {
    size_t give = s->length - keep;
    if (give == 0) return 0;
    int cancel = s->on_text ? s->on_text(s->context, s->pending, give) : 0;
    memmove(s->pending, s->pending + give, keep + 1);
    s->length = keep;
    return cancel;
}

int lq_text_stream_push(struct lq_text_stream *s, int token, enum lq_finish_reason *reason,
                        struct lq_error *err) {
    if (s->ended) return lq_error_set(err, LQ_EINVAL, "token %d after the end of the text", token);
    if (token == s->eos || (token == s->bos && s->bos >= 0)) {
        s->ended = 1;
        *reason = LQ_FINISH_EOS;
        return 1;
    }
    int length =
        lq_tokenizer_decode_piece(s->tokenizer, s->previous, token, s->piece, s->piece_size);
    if (length < 0) return lq_error_set(err, length, "cannot decode token %d", token);
    s->previous = token;
    s->tokens++;
    if (pending_append(s, s->piece, (size_t)length))
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    long stop_at = find_stop(s);
    if (stop_at >= 0) {
        s->length = (size_t)stop_at;
        s->pending[stop_at] = '\0';
        s->ended = 1;
        *reason = LQ_FINISH_STOP;
        return 1;
    }
    if (hand_over(s, held_suffix(s))) {
        s->ended = 1;
        *reason = LQ_FINISH_STOP;
        return 1;
    }
    return 0;
}

void lq_text_stream_flush(struct lq_text_stream *s) {
    s->ended = 1;
    hand_over(s, 0);
}
