/* Llama-style SentencePiece BPE tokenizers, loaded from HF tokenizer.json, SentencePiece
 * tokenizer.model or llama2.c tokenizer.bin: BOS, the dummy-prefix space, byte fallback
 * (<0xNN> pieces), and decoding that is the exact inverse of encoding.
 *
 * Encoding follows the SentencePiece library (bpe_model.cc): spaces become "▁", a "▁" is
 * prepended, then the adjacent pair whose concatenation is the best-scoring piece is merged
 * until none is left (ties: leftmost); symbols that are not pieces become <0xNN> byte pieces.
 * A tokenizer.json is encoded as HF `tokenizers` does: pairs merge by the rank of their entry
 * in "merges". Control pieces (<s>, </s>) written in the text are never matched: they are
 * text like any other, so user input cannot inject them. */
#ifndef LQ_TOKENIZER_H
#define LQ_TOKENIZER_H

#include <stddef.h>

#include "core/error.h"

struct lq_tokenizer; /* immutable once loaded: safe to share between threads */

/* Piece types, numbered as SentencePiece's ModelProto.SentencePiece.Type. */
enum lq_token_type {
    LQ_TOKEN_NORMAL = 1,
    LQ_TOKEN_UNKNOWN = 2,      /* <unk> */
    LQ_TOKEN_CONTROL = 3,      /* <s>, </s>: never produced from text, decoded as nothing */
    LQ_TOKEN_USER_DEFINED = 4, /* matched whole in the text, never merged with neighbours */
    LQ_TOKEN_UNUSED = 5,       /* merged into, then split back (SentencePiece's resegment) */
    LQ_TOKEN_BYTE = 6,         /* <0xNN>: one raw byte, for byte fallback */
};

/* Loads a tokenizer from a file, recognised by content: tokenizer.json (HF; SentencePiece-style
 * or byte-level BPE), tokenizer.model (SentencePiece protobuf), a llama2.c tokenizer.bin, or
 * the tokenizer.ggml.* metadata of a GGUF file. A directory is searched for
 * tokenizer.json, then tokenizer.model, then tokenizer.bin. Errors name the file and what is
 * wrong. The caller frees the result with lq_tokenizer_free. */
int lq_tokenizer_load(const char *path, struct lq_tokenizer **out, struct lq_error *err);
/* The same from bytes in memory (borrowed; nothing refers to them afterwards); label names
 * the data in error messages. */
int lq_tokenizer_load_buffer(const void *data, size_t size, const char *label,
                             struct lq_tokenizer **out, struct lq_error *err);
void lq_tokenizer_free(struct lq_tokenizer *tokenizer);
/* 1 when path is a GGUF file whose metadata holds a tokenizer (tokenizer.ggml.model). */
int lq_tokenizer_gguf_present(const char *path);

int lq_tokenizer_vocab_size(const struct lq_tokenizer *tokenizer);
int lq_tokenizer_bos_id(const struct lq_tokenizer *tokenizer); /* -1 when none */
int lq_tokenizer_eos_id(const struct lq_tokenizer *tokenizer); /* -1 when none */
int lq_tokenizer_unk_id(const struct lq_tokenizer *tokenizer); /* -1 when none */
/* The piece text of id as stored ("▁the", "<0x0A>", "<s>"); NULL when out of range. A
 * llama2.c file's spaces are given as "▁" and its "\n<s>\n" as "<s>", as SentencePiece has
 * them. */
const char *lq_tokenizer_piece(const struct lq_tokenizer *tokenizer, int id);
/* The lq_token_type of id, or LQ_EINVAL when out of range. */
int lq_tokenizer_piece_type(const struct lq_tokenizer *tokenizer, int id);
/* A buffer size that lq_tokenizer_decode_piece never outgrows (the NUL included). */
size_t lq_tokenizer_max_piece_size(const struct lq_tokenizer *tokenizer);

/* Encodes UTF-8 text as SentencePiece does (Llama settings: dummy prefix "▁", spaces to "▁",
 * BPE by piece score, unknown characters as UTF-8 bytes <0xNN>), with BOS first when
 * add_bos (and the tokenizer has one). *ids is malloc'ed (the caller frees it), *count its
 * length. Text that is not valid UTF-8 is encoded byte by byte through byte fallback, never
 * rejected (SentencePiece would read each bad byte as U+FFFD). */
int lq_tokenizer_encode(const struct lq_tokenizer *tokenizer, const char *text, size_t length,
                        int add_bos, int **ids, size_t *count, struct lq_error *err);

/* Decodes ids to a malloc'ed NUL-terminated UTF-8 string (the caller frees it): pieces joined,
 * "▁" as space, <0xNN> as bytes, the dummy-prefix space removed from a piece at the start or
 * after a control token (BOS), control tokens (BOS, EOS, ...) dropped, <unk> as " ⁇ ". That
 * is SentencePiece's decode except after control tokens that follow text ([▁a, </s>, ▁b]:
 * "ab", SentencePiece "a b"), since a streamed piece knows only the token before it.
 * decode(encode(text)) == text for every text when the tokenizer has byte fallback and a "▁"
 * piece and does not remove extra whitespace (the Llama tokenizers), except that a "▁"
 * (U+2581) in the text comes back as a space, as in SentencePiece, and that a tokenizer.json
 * with a Metaspace pre-tokenizer loses a leading space, as HF tokenizers does (it adds no
 * dummy prefix to text that starts with one). Ids out of range are LQ_EINVAL. Unlike
 * SentencePiece, byte pieces that are not valid UTF-8 come back as those bytes, not U+FFFD. */
int lq_tokenizer_decode(const struct lq_tokenizer *tokenizer, const int *ids, size_t count,
                        char **text, struct lq_error *err);
/* As lq_tokenizer_decode, also giving the length, for text that holds NUL bytes. */
int lq_tokenizer_decode_bytes(const struct lq_tokenizer *tokenizer, const int *ids, size_t count,
                              char **text, size_t *length, struct lq_error *err);

/* Streaming decode: the bytes that token `id` adds after `previous` (the token before it, or
 * -1 at the start), written into buffer (NUL-terminated). Returns the number of bytes, or a
 * negative LQ_E* code (LQ_EINVAL when buffer is too small; buffer NULL with size 0 only
 * measures). Concatenating every piece of a sequence equals lq_tokenizer_decode. */
int lq_tokenizer_decode_piece(const struct lq_tokenizer *tokenizer, int previous, int id,
                              char *buffer, size_t size);

#endif
