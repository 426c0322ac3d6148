/* libFuzzer target for the tokenizer: the input is read as a tokenizer file (tokenizer.json,
 * tokenizer.model or tokenizer.bin, told apart by content) and, separately, as text for a
 * small built-in tokenizer. A file either fails with a code and a message, or loads into a
 * vocabulary that encodes probe strings and the input itself to ids in range, whose decoding
 * equals the concatenated streaming pieces and, for tokenizers that promise it, the text.
 * Checked invariants trap, so the fuzzer reports them like crashes.
 *
 * Seeds (corpus/tokenizer/): valid_tok512.{bin,model,json} are stories260K's tok512.bin and
 * its conversions by tests/peer/tokenizer_fixtures.py (as in tests/unit/data);
 * valid_metaspace.json the same with a Metaspace pre-tokenizer; valid_minimal.json a
 * hand-written legacy file (no byte fallback, "a b" merges, a non-special added token);
 * valid_no_bytes.bin a llama2.c file without byte pieces; valid_options.model a
 * SentencePiece model (written with sentencepiece_model_pb2) with remove_extra_whitespaces,
 * UNUSED and USER_DEFINED pieces; unsupported_* and bad_* one refusal each (UNIGRAM,
 * ByteLevel, truncations, a merge outside the vocabulary); text_wiki_lines plain text. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/tokenizer_internal.h"

#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Whether decode(encode(text)) must give text back (tokenizer.h): byte fallback, a "▁"
 * piece, SentencePiece's normalization without whitespace removal. */
static int promises_round_trip(const struct lq_tokenizer *tokenizer) {
    int space = lq_tokenizer_find(tokenizer, LQ_TOKENIZER_SPACE, LQ_TOKENIZER_SPACE_BYTES);
    return tokenizer->byte_fallback && !tokenizer->remove_extra_whitespaces &&
           tokenizer->escape_whitespaces && !tokenizer->prefix_if_missing && space >= 0 &&
           (tokenizer->types[space] == LQ_TOKEN_NORMAL ||
            tokenizer->types[space] == LQ_TOKEN_USER_DEFINED);
}

static int has_visible_space(const uint8_t *text, size_t length) {
    for (size_t i = 0; i + LQ_TOKENIZER_SPACE_BYTES <= length; i++)
        if (memcmp(text + i, LQ_TOKENIZER_SPACE, LQ_TOKENIZER_SPACE_BYTES) == 0) return 1;
    return 0;
}

static void check_text(const struct lq_tokenizer *tokenizer, const uint8_t *text, size_t length,
                       int add_bos) {
    int *ids = NULL;
    size_t count = 0;
    struct lq_error err = {0};
    int rc =
        lq_tokenizer_encode(tokenizer, (const char *)text, length, add_bos, &ids, &count, &err);
    FUZZ_ASSERT(rc == LQ_OK && ids != NULL);
    /* Every id covers at least one byte of the normalized text (3 per input byte at most). */
    FUZZ_ASSERT(count <= 3 * length + 4);
    int vocab = lq_tokenizer_vocab_size(tokenizer), plain = 1;
    for (size_t i = 0; i < count; i++) {
        FUZZ_ASSERT(ids[i] >= 0 && ids[i] < vocab);
        int type = lq_tokenizer_piece_type(tokenizer, ids[i]);
        /* Control pieces (other than BOS) and <unk> come only from odd vocabularies. */
        if ((type == LQ_TOKEN_CONTROL && !(add_bos && i == 0)) || type == LQ_TOKEN_UNKNOWN)
            plain = 0;
    }
    char *decoded = NULL;
    size_t decoded_length = 0;
    rc = lq_tokenizer_decode_bytes(tokenizer, ids, count, &decoded, &decoded_length, &err);
    FUZZ_ASSERT(rc == LQ_OK && decoded != NULL && decoded[decoded_length] == '\0');
    size_t piece_size = lq_tokenizer_max_piece_size(tokenizer), at = 0;
    char *piece = malloc(piece_size);
    FUZZ_ASSERT(piece != NULL);
    for (size_t i = 0; i < count; i++) {
        int n =
            lq_tokenizer_decode_piece(tokenizer, i ? ids[i - 1] : -1, ids[i], piece, piece_size);
        FUZZ_ASSERT(n >= 0 && (size_t)n < piece_size && at + (size_t)n <= decoded_length);
        FUZZ_ASSERT(memcmp(decoded + at, piece, (size_t)n) == 0);
        at += (size_t)n;
    }
    FUZZ_ASSERT(at == decoded_length);
    if (plain && promises_round_trip(tokenizer) && !has_visible_space(text, length))
        FUZZ_ASSERT(decoded_length == length && memcmp(decoded, text, length) == 0);
    free(piece);
    free(decoded);
    free(ids);
}

static const char *const probes[] = {
    "",
    " ",
    "Once upon a time, there was a little girl named Lily.",
    "  two  spaces\tand\ttabs\nand lines\r\n",
    "\xf0\x9f\x98\x80 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e caf\xc3\xa9",
    "\xff\xfe\x80 \xe2\x82 \xc0\xaf \xed\xa0\x80",
    "<s></s><unk><0x41>",
    "a\xe2\x96\x81 b",
};

/* A tiny llama2.c vocabulary: <unk> <s> </s>, the 256 byte pieces, and a few merges. */
static struct lq_tokenizer *builtin_tokenizer(void) {
    static const char *const normal[] = {" ",  "t",    "h",  "e",  "a",  "n",    "d",  " t",
                                         "he", " the", " a", "an", "nd", " and", "  ", "\xc3\xa9"};
    return fuzz_builtin_tokenizer(normal, (int)(sizeof normal / sizeof normal[0]), 7);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static struct lq_tokenizer *builtin;
    if (!builtin) builtin = builtin_tokenizer();
    /* The input as text. */
    check_text(builtin, data, size, size % 2);

    /* The input as a tokenizer file. */
    struct lq_tokenizer *tokenizer = NULL;
    struct lq_error err = {0};
    int rc = lq_tokenizer_load_buffer(data, size, "fuzz", &tokenizer, &err);
    if (rc != LQ_OK) {
        FUZZ_ASSERT(rc < 0 && tokenizer == NULL && strncmp(err.message, "fuzz", 4) == 0);
        return 0;
    }
    int vocab = lq_tokenizer_vocab_size(tokenizer);
    FUZZ_ASSERT(vocab > 0 && vocab <= LQ_TOKENIZER_MAX_VOCAB);
    int specials[] = {lq_tokenizer_bos_id(tokenizer), lq_tokenizer_eos_id(tokenizer),
                      lq_tokenizer_unk_id(tokenizer)};
    for (int i = 0; i < 3; i++) FUZZ_ASSERT(specials[i] >= -1 && specials[i] < vocab);
    for (int id = 0; id < vocab; id++) {
        const char *piece = lq_tokenizer_piece(tokenizer, id);
        FUZZ_ASSERT(piece && piece[0] != '\0');
        int type = lq_tokenizer_piece_type(tokenizer, id);
        FUZZ_ASSERT(type >= LQ_TOKEN_NORMAL && type <= LQ_TOKEN_BYTE);
        FUZZ_ASSERT(lq_tokenizer_find(tokenizer, piece, strlen(piece)) == id);
    }
    for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++)
        check_text(tokenizer, (const uint8_t *)probes[i], strlen(probes[i]), (int)(i % 2));
    check_text(tokenizer, data, size < 4096 ? size : 4096, 1);
    lq_tokenizer_free(tokenizer);
    return 0;
}
