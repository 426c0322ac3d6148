/* The text side of generating one sequence: sampled tokens in, final text out. Decodes each
 * token, holds back output while it may be the start of a stop string, cuts the output before
 * the first stop string, and ends at EOS (or BOS, which llama2.c models emit between
 * stories). lq_generate and the daemon's scheduler share it, so a request gives the same text
 * on either path. */
#ifndef LQ_TEXT_STREAM_H
#define LQ_TEXT_STREAM_H

#include <stddef.h>

#include "core/error.h"
#include "core/tokenizer.h"

enum lq_finish_reason { LQ_FINISH_LENGTH, LQ_FINISH_STOP, LQ_FINISH_EOS };
const char *lq_finish_reason_name(enum lq_finish_reason reason); /* "length", "stop", "stop" */

#define LQ_TEXT_STREAM_MAX_STOPS 8

/* Receives text as it becomes final (never text a stop string may still claim); returns
 * nonzero to cancel (finish reason then "stop"). */
typedef int (*lq_text_callback)(void *context, const char *text, size_t length);

struct lq_text_stream;

/* stop: up to LQ_TEXT_STREAM_MAX_STOPS stop strings, the list ending at the first NULL (copied;
 * empty strings never match). previous: the last prompt token (-1 for none), which decides
 * how the first piece decodes. tokenizer is borrowed. */
int lq_text_stream_create(const struct lq_tokenizer *tokenizer, const char *const *stop,
                          int previous, lq_text_callback on_text, void *context,
                          struct lq_text_stream **out, struct lq_error *err);
void lq_text_stream_free(struct lq_text_stream *stream);

/* Feeds the next sampled token. Returns 0 while generation goes on, 1 when it must end
 * (*reason is set: LQ_FINISH_EOS for EOS or BOS, which are not output; LQ_FINISH_STOP when
 * the output reached a stop string, where it now ends, or the callback cancelled), or a
 * negative LQ_E* code. Tokens after the end are refused (LQ_EINVAL). */
int lq_text_stream_push(struct lq_text_stream *stream, int token, enum lq_finish_reason *reason,
                        struct lq_error *err);
/* Hands the text still held back to the callback: call once generation has ended, whatever
 * the reason (its return value no longer matters). */
void lq_text_stream_flush(struct lq_text_stream *stream);

/* Tokens accepted as output so far (EOS/BOS not counted). */
int lq_text_stream_tokens(const struct lq_text_stream *stream);

#endif
