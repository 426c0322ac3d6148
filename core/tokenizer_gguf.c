/* The tokenizer embedded in a GGUF file's metadata, as llama.cpp writes it:
 *
 *   tokenizer.ggml.model  "llama": SentencePiece BPE by piece score (tokens, scores,
 *                         token_type), encoded as tokenizer.model is;
 *                         "gpt2": byte-level BPE (tokens, merges "a b" ranked by position,
 *                         token_type, pre naming the pre-tokenizer), encoded as tokenizer.json is;
 *   token_type            1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
 *                         (SentencePiece's numbering, which lq_token_type shares);
 *   bos/eos/unknown_token_id, add_bos_token, add_space_prefix, remove_extra_whitespaces.
 *
 * Nothing is trusted: counts must agree, ids lie in the vocabulary, every merge names pieces. */
#include "core/gguf.h"
#include "core/tokenizer_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct gguf_vocabulary {
    const char *const *tokens;
    const size_t *lengths;
    size_t count;
    float *scores;  /* NULL when absent */
    int64_t *types; /* NULL when absent */
};

/* An optional key: LQ_OK with *present false when absent, the getter's error otherwise. */
static int optional(int rc, bool *present, struct lq_error *err) {
    *present = rc == LQ_OK;
    if (rc == LQ_ENOTFOUND) {
        if (err) {
            err->code = LQ_OK;
            err->message[0] = '\0';
        }
        return LQ_OK;
    }
    return rc;
}

static int read_vocabulary(const struct lq_gguf *gguf, const char *label,
                           struct gguf_vocabulary *vocab, struct lq_error *err) {
    int rc = lq_gguf_get_string_array(gguf, "tokenizer.ggml.tokens", &vocab->tokens,
                                      &vocab->lengths, &vocab->count, err);
    if (rc == LQ_ENOTFOUND)
        return lq_error_set(err, LQ_EFORMAT, "%s: tokenizer.ggml.tokens is missing", label);
    if (rc != LQ_OK) return rc;
    if (vocab->count == 0 || vocab->count > LQ_TOKENIZER_MAX_VOCAB)
        return lq_error_set(err, LQ_EFORMAT, "%s: tokenizer.ggml.tokens has %zu pieces, not 1..%d",
                            label, vocab->count, LQ_TOKENIZER_MAX_VOCAB);
    bool present;
    size_t count = 0;
    rc = optional(lq_gguf_get_f32_array(gguf, "tokenizer.ggml.scores", &vocab->scores, &count, err),
                  &present, err);
    if (rc == LQ_OK && present && count != vocab->count)
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: tokenizer.ggml.scores has %zu values for %zu "
                            "pieces",
                            label, count, vocab->count);
    if (rc != LQ_OK) return rc;
    rc = optional(
        lq_gguf_get_i64_array(gguf, "tokenizer.ggml.token_type", &vocab->types, &count, err),
        &present, err);
    if (rc == LQ_OK && present && count != vocab->count)
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: tokenizer.ggml.token_type has %zu values for "
                            "%zu pieces",
                            label, count, vocab->count);
    for (size_t id = 0; rc == LQ_OK && vocab->types && id < count; id++)
        if (vocab->types[id] < LQ_TOKEN_NORMAL || vocab->types[id] > LQ_TOKEN_BYTE)
            return lq_error_set(err, LQ_EFORMAT,
                                "%s: tokenizer.ggml.token_type[%zu] is %lld, not 1..6", label, id,
                                (long long)vocab->types[id]);
    return rc;
}

/* tokenizer.ggml.<name>: an id inside the vocabulary, or -1 when the key is absent. */
static int read_id(const struct lq_gguf *gguf, const char *name, size_t vocab_size,
                   const char *label, int *id, struct lq_error *err) {
    char key[64];
    snprintf(key, sizeof key, "tokenizer.ggml.%s", name);
    int64_t value = -1;
    bool present;
    int rc = optional(lq_gguf_get_i64(gguf, key, &value, err), &present, err);
    if (rc != LQ_OK) return rc;
    if (present && (value < 0 || (uint64_t)value >= vocab_size))
        return lq_error_set(err, LQ_EFORMAT, "%s: %s is %lld, outside the %zu-piece vocabulary",
                            label, key, (long long)value, vocab_size);
    *id = present ? (int)value : -1;
    return LQ_OK;
}

static int read_flag(const struct lq_gguf *gguf, const char *key, bool fallback, bool *value,
                     struct lq_error *err) {
    bool present;
    int rc = optional(lq_gguf_get_bool(gguf, key, value, err), &present, err);
    if (rc == LQ_OK && !present) *value = fallback;
    return rc;
}

/* The merges, each "a b", resolved to (left, right, merged) and ranked by position. */
static int load_merges(struct lq_tokenizer *tokenizer, const struct lq_gguf *gguf,
                       const char *label, struct lq_error *err) {
    const char *const *merges;
    const size_t *lengths;
    size_t count;
    int rc =
        lq_gguf_get_string_array(gguf, "tokenizer.ggml.merges", &merges, &lengths, &count, err);
    if (rc == LQ_ENOTFOUND)
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: tokenizer.ggml.merges is missing (needed by "
                            "tokenizer.ggml.model \"gpt2\")",
                            label);
    if (rc != LQ_OK) return rc;
    int32_t *pairs = malloc((count ? count : 1) * 3 * sizeof *pairs);
    char *scratch = malloc(tokenizer->max_piece_length + 1);
    if (!pairs || !scratch)
        rc = lq_error_set(err, LQ_ENOMEM, "%s: out of memory for merges", label);
    for (size_t i = 0; rc == LQ_OK && i < count; i++) {
        const char *text = merges[i], *space = memchr(text, ' ', lengths[i]);
        if (!space || memchr(space + 1, ' ', lengths[i] - (size_t)(space + 1 - text))) {
            rc = lq_error_set(err, LQ_EFORMAT, "%s: tokenizer.ggml.merges[%zu] is not \"a b\"",
                              label, i);
            break;
        }
        size_t left = (size_t)(space - text), right = lengths[i] - left - 1;
        int32_t *out = pairs + 3 * i;
        out[0] = lq_tokenizer_find(tokenizer, text, left);
        out[1] = lq_tokenizer_find(tokenizer, space + 1, right);
        out[2] = -1;
        if (left + right <= tokenizer->max_piece_length) {
            memcpy(scratch, text, left);
            memcpy(scratch + left, space + 1, right);
            out[2] = lq_tokenizer_find(tokenizer, scratch, left + right);
        }
        if (out[0] < 0 || out[1] < 0 || out[2] < 0)
            rc = lq_error_set(err, LQ_EFORMAT,
                              "%s: tokenizer.ggml.merges[%zu] \"%.*s\": a part or their "
                              "concatenation is not in tokenizer.ggml.tokens",
                              label, i, (int)(lengths[i] > 128 ? 128 : lengths[i]), text);
    }
    if (rc == LQ_OK) rc = lq_tokenizer_set_merges(tokenizer, pairs, count, label, err);
    free(pairs);
    free(scratch);
    return rc;
}

static int build(struct lq_tokenizer *tokenizer, const struct lq_gguf *gguf, const char *label,
                 struct gguf_vocabulary *vocab, struct lq_error *err) {
    const char *model = NULL;
    int rc = lq_gguf_get_string(gguf, "tokenizer.ggml.model", &model, NULL, err);
    if (rc == LQ_ENOTFOUND)
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: no tokenizer.ggml.model: the file holds no "
                            "tokenizer",
                            label);
    if (rc != LQ_OK) return rc;
    bool byte_level = strcmp(model, "gpt2") == 0;
    if (!byte_level && strcmp(model, "llama") != 0)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: tokenizer.ggml.model \"%.80s\" is not "
                            "supported (\"llama\" or \"gpt2\")",
                            label, model);
    if (byte_level) {
        const char *pre = "default";
        bool present;
        rc = optional(lq_gguf_get_string(gguf, "tokenizer.ggml.pre", &pre, NULL, err), &present,
                      err);
        if (rc == LQ_OK) rc = lq_tokenizer_bpe_configure_named(tokenizer, pre, label, err);
    } else {
        bool prefix = true, extra = false;
        rc = read_flag(gguf, "tokenizer.ggml.add_space_prefix", true, &prefix, err);
        if (rc == LQ_OK)
            rc = read_flag(gguf, "tokenizer.ggml.remove_extra_whitespaces", false, &extra, err);
        tokenizer->add_dummy_prefix = prefix;
        tokenizer->remove_extra_whitespaces = extra;
    }
    if (rc == LQ_OK) rc = read_vocabulary(gguf, label, vocab, err);
    int unk = -1, bos = -1, eos = -1;
    if (rc == LQ_OK) rc = read_id(gguf, "unknown_token_id", vocab->count, label, &unk, err);
    if (rc == LQ_OK) rc = read_id(gguf, "bos_token_id", vocab->count, label, &bos, err);
    if (rc == LQ_OK) rc = read_id(gguf, "eos_token_id", vocab->count, label, &eos, err);
    bool add_bos = !byte_level;
    if (rc == LQ_OK)
        rc = read_flag(gguf, "tokenizer.ggml.add_bos_token", !byte_level, &add_bos, err);
    if (rc != LQ_OK) return rc;

    for (size_t id = 0; rc == LQ_OK && id < vocab->count; id++) {
        int type = vocab->types ? (int)vocab->types[id] : LQ_TOKEN_NORMAL;
        if ((int)id == unk) type = LQ_TOKEN_UNKNOWN;
        if (type == LQ_TOKEN_UNKNOWN && tokenizer->unk_id < 0) tokenizer->unk_id = (int)id;
        if (type == LQ_TOKEN_BYTE && byte_level)
            return lq_error_set(err, LQ_EFORMAT,
                                "%s: piece %zu is a byte piece (type 6), "
                                "which byte-level BPE does not use",
                                label, id);
        if (type == LQ_TOKEN_BYTE) tokenizer->byte_fallback = true;
        float score = vocab->scores ? vocab->scores[id] : 0.0f;
        rc = lq_tokenizer_add_piece(tokenizer, vocab->tokens[id], vocab->lengths[id], score, type,
                                    label, err);
    }
    if (rc == LQ_OK) rc = lq_tokenizer_finish(tokenizer, label, err);
    if (rc == LQ_OK && byte_level) rc = load_merges(tokenizer, gguf, label, err);
    if (rc != LQ_OK) return rc;
    if (bos < 0 && !byte_level) bos = lq_tokenizer_find(tokenizer, "<s>", 3);
    if (eos < 0 && !byte_level) eos = lq_tokenizer_find(tokenizer, "</s>", 4);
    tokenizer->bos_id = bos;
    tokenizer->eos_id = eos;
    tokenizer->bos_off = !add_bos;
    /* transformers' GGUF conversion gives the byte-level BPE no unk token */
    if (byte_level) rc = lq_tokenizer_bpe_finish(tokenizer, -1, label, err);
    return rc;
}

int lq_tokenizer_from_gguf(const struct lq_gguf *gguf, const char *label, struct lq_tokenizer **out,
                           struct lq_error *err) {
    *out = NULL;
    struct lq_tokenizer *tokenizer = lq_tokenizer_new();
    if (!tokenizer) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    struct gguf_vocabulary vocab = {0};
    int rc = build(tokenizer, gguf, label, &vocab, err);
    free(vocab.scores);
    free(vocab.types);
    if (rc != LQ_OK) {
        lq_tokenizer_free(tokenizer);
        return rc;
    }
    *out = tokenizer;
    return LQ_OK;
}

int lq_tokenizer_parse_gguf(const uint8_t *data, size_t size, const char *label,
                            struct lq_tokenizer **out, struct lq_error *err) {
    struct lq_gguf *gguf = NULL;
    int rc = lq_gguf_open_buffer(data, size, label, &gguf, err);
    if (rc == LQ_OK) rc = lq_tokenizer_from_gguf(gguf, label, out, err);
    lq_gguf_close(gguf);
    return rc;
}

int lq_tokenizer_gguf_present(const char *path) {
    FILE *file = fopen(path, "rb");
    char magic[4] = {0};
    int is_gguf = file && fread(magic, 1, 4, file) == 4 && memcmp(magic, "GGUF", 4) == 0;
    if (file) fclose(file);
    struct lq_gguf *gguf = NULL;
    if (!is_gguf || lq_gguf_open(path, &gguf, NULL) != LQ_OK) return 0;
    int present = lq_gguf_metadata_type(gguf, "tokenizer.ggml.model", NULL, NULL, NULL) == LQ_OK;
    lq_gguf_close(gguf);
    return present;
}
