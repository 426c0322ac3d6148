/* tokenizer.json and tokenizer_config.json from a GGUF file's tokenizer (see the header).
 * The vocabulary is read with lqd's own GGUF reader (lq_tokenizer_from_gguf), so what is
 * written is exactly what lqd encodes with: the same pieces, types, BOS/EOS and flags. */
#include "core/tokenizer_export.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/gguf.h"
#include "core/tokenizer_internal.h"

/* The split patterns as HF tokenizer.json files spell them; tokenizer_bpe.c recognises
 * exactly these strings (the import reads its output back, so a drift is caught there). */
static const char llama3_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char qwen2_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static cJSON *typed(const char *type) {
    cJSON *node = cJSON_CreateObject();
    cJSON_AddStringToObject(node, "type", type);
    return node;
}

static cJSON *byte_level(int add_prefix_space, int trim_offsets, int use_regex) {
    cJSON *node = typed("ByteLevel");
    cJSON_AddBoolToObject(node, "add_prefix_space", add_prefix_space);
    cJSON_AddBoolToObject(node, "trim_offsets", trim_offsets);
    cJSON_AddBoolToObject(node, "use_regex", use_regex);
    return node;
}

static cJSON *sequence(const char *member, cJSON *first, cJSON *second) {
    cJSON *node = typed("Sequence");
    cJSON *items = cJSON_AddArrayToObject(node, member);
    cJSON_AddItemToArray(items, first);
    cJSON_AddItemToArray(items, second);
    return node;
}

/* Split(Regex, Isolated) then ByteLevel without its own regex: Llama 3's and Qwen 2's files. */
static cJSON *split_then_byte_level(const char *pattern) {
    cJSON *split = typed("Split");
    cJSON *regex = cJSON_AddObjectToObject(split, "pattern");
    cJSON_AddStringToObject(regex, "Regex", pattern);
    cJSON_AddStringToObject(split, "behavior", "Isolated");
    cJSON_AddBoolToObject(split, "invert", 0);
    return sequence("pretokenizers", split, byte_level(0, 1, 0));
}

/* The pre-tokenizer llama.cpp's tokenizer.ggml.pre stands for, as lqd's GGUF reader takes
 * it (lq_tokenizer_bpe_configure_named); *ignore_merges as Llama 3's file sets it. */
static int byte_level_pre_tokenizer(const char *pre, cJSON **out, int *ignore_merges,
                                    const char *label, struct lq_error *err) {
    *ignore_merges = 0;
    if (strcmp(pre, "default") == 0 || strcmp(pre, "gpt-2") == 0 || strcmp(pre, "gpt2") == 0) {
        *out = byte_level(0, 1, 1);
    } else if (strcmp(pre, "llama-bpe") == 0 || strcmp(pre, "llama3") == 0) {
        *out = split_then_byte_level(llama3_pattern);
        *ignore_merges = 1;
    } else if (strcmp(pre, "qwen2") == 0) {
        *out = split_then_byte_level(qwen2_pattern);
    } else if (strcmp(pre, "smollm") == 0) {
        cJSON *digits = typed("Digits");
        cJSON_AddBoolToObject(digits, "individual_digits", 1);
        *out = sequence("pretokenizers", digits, byte_level(0, 1, 1));
    } else {
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: tokenizer.ggml.pre \"%.80s\" is unknown",
                            label, pre);
    }
    return LQ_OK;
}

static cJSON *replace(const char *pattern, const char *content) {
    cJSON *node = typed("Replace");
    cJSON *string = cJSON_AddObjectToObject(node, "pattern");
    cJSON_AddStringToObject(string, "String", pattern);
    cJSON_AddStringToObject(node, "content", content);
    return node;
}

/* LlamaConverter's (legacy) normalizer: Prepend "▁" (when the dummy prefix is on), then
 * spaces to "▁". */
static cJSON *llama_normalizer(int prefix) {
    cJSON *node = typed("Sequence");
    cJSON *items = cJSON_AddArrayToObject(node, "normalizers");
    if (prefix) {
        cJSON *prepend = typed("Prepend");
        cJSON_AddStringToObject(prepend, "prepend", LQ_TOKENIZER_SPACE);
        cJSON_AddItemToArray(items, prepend);
    }
    cJSON_AddItemToArray(items, replace(" ", LQ_TOKENIZER_SPACE));
    return node;
}

/* LlamaConverter's decoder: "▁" to space, <0xNN> to bytes, joined, the dummy prefix's space
 * stripped. */
static cJSON *llama_decoder(int prefix) {
    cJSON *node = typed("Sequence");
    cJSON *items = cJSON_AddArrayToObject(node, "decoders");
    cJSON_AddItemToArray(items, replace(LQ_TOKENIZER_SPACE, " "));
    cJSON_AddItemToArray(items, typed("ByteFallback"));
    cJSON_AddItemToArray(items, typed("Fuse"));
    if (prefix) {
        cJSON *strip = typed("Strip");
        cJSON_AddStringToObject(strip, "content", " ");
        cJSON_AddNumberToObject(strip, "start", 1);
        cJSON_AddNumberToObject(strip, "stop", 0);
        cJSON_AddItemToArray(items, strip);
    }
    return node;
}

static cJSON *template_piece(const char *kind, const char *id, int type_id) {
    cJSON *node = cJSON_CreateObject();
    cJSON *inner = cJSON_AddObjectToObject(node, kind);
    cJSON_AddStringToObject(inner, "id", id);
    cJSON_AddNumberToObject(inner, "type_id", type_id);
    return node;
}

/* BOS before each sequence: what lqd's reader takes BOS from, and what HF prepends. */
static cJSON *bos_template(const char *bos, int bos_id) {
    cJSON *node = typed("TemplateProcessing");
    cJSON *single = cJSON_AddArrayToObject(node, "single");
    cJSON_AddItemToArray(single, template_piece("SpecialToken", bos, 0));
    cJSON_AddItemToArray(single, template_piece("Sequence", "A", 0));
    cJSON *pair = cJSON_AddArrayToObject(node, "pair");
    cJSON_AddItemToArray(pair, template_piece("SpecialToken", bos, 0));
    cJSON_AddItemToArray(pair, template_piece("Sequence", "A", 0));
    cJSON_AddItemToArray(pair, template_piece("SpecialToken", bos, 1));
    cJSON_AddItemToArray(pair, template_piece("Sequence", "B", 1));
    cJSON *special = cJSON_AddObjectToObject(cJSON_AddObjectToObject(node, "special_tokens"), bos);
    cJSON_AddStringToObject(special, "id", bos);
    cJSON_AddItemToArray(cJSON_AddArrayToObject(special, "ids"), cJSON_CreateNumber(bos_id));
    cJSON_AddItemToArray(cJSON_AddArrayToObject(special, "tokens"), cJSON_CreateString(bos));
    return node;
}

static cJSON *merge_pair(const char *left, size_t left_length, const char *right,
                         size_t right_length) {
    char *a = strndup(left, left_length), *b = strndup(right, right_length);
    cJSON *pair = a && b ? cJSON_CreateArray() : NULL;
    if (pair) {
        cJSON_AddItemToArray(pair, cJSON_CreateString(a));
        cJSON_AddItemToArray(pair, cJSON_CreateString(b));
    }
    free(a), free(b);
    return pair;
}

/* ---------- merges ---------- */

/* Byte-level BPE: tokenizer.ggml.merges ("a b", ranked by position) as [a, b] pairs. */
static int gguf_merges(const struct lq_gguf *gguf, cJSON *merges, size_t *count, const char *label,
                       struct lq_error *err) {
    const char *const *texts;
    const size_t *lengths;
    int rc = lq_gguf_get_string_array(gguf, "tokenizer.ggml.merges", &texts, &lengths, count, err);
    for (size_t i = 0; rc == LQ_OK && i < *count; i++) {
        const char *space = memchr(texts[i], ' ', lengths[i]);
        size_t left = space ? (size_t)(space - texts[i]) : 0;
        cJSON *pair = space ? merge_pair(texts[i], left, space + 1, lengths[i] - left - 1) : NULL;
        if (!pair)
            return lq_error_set(err, LQ_EFORMAT, "%s: tokenizer.ggml.merges[%zu] is not \"a b\"",
                                label, i);
        cJSON_AddItemToArray(merges, pair);
    }
    return rc;
}

struct score_merge {
    float score; /* the merged piece's */
    int32_t merged, left, right;
};

/* transformers' SentencePieceExtractor orders merges by the merged piece's score (highest
 * first), a stable sort over pieces in id order, each piece's splits by (left id, right id). */
static int compare_score_merges(const void *a, const void *b) {
    const struct score_merge *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    if (x->merged != y->merged) return x->merged < y->merged ? -1 : 1;
    if (x->left != y->left) return x->left < y->left ? -1 : 1;
    return (x->right > y->right) - (x->right < y->right);
}

/* SentencePiece BPE: every split of every piece, at a character boundary, into two pieces. */
static int score_merges(const struct lq_tokenizer *t, cJSON *merges, size_t *count,
                        const char *label, struct lq_error *err) {
    size_t capacity = 1024, n = 0;
    struct score_merge *list = malloc(capacity * sizeof *list);
    if (!list) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for merges", label);
    for (int id = 0; id < t->vocab_size; id++) {
        const char *piece = lq_tokenizer_piece(t, id);
        size_t length = t->offsets[id + 1] - t->offsets[id] - 1;
        for (size_t k = 1; k < length; k++) {
            if (((unsigned char)piece[k] & 0xC0) == 0x80) continue; /* inside a character */
            int left = lq_tokenizer_find(t, piece, k);
            int right = left >= 0 ? lq_tokenizer_find(t, piece + k, length - k) : -1;
            if (right < 0) continue;
            if (n == capacity) {
                struct score_merge *grown = realloc(list, 2 * capacity * sizeof *list);
                if (!grown) {
                    free(list);
                    return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for merges", label);
                }
                list = grown, capacity *= 2;
            }
            list[n++] = (struct score_merge){t->scores[id], id, left, right};
        }
    }
    qsort(list, n, sizeof *list, compare_score_merges);
    int rc = LQ_OK;
    for (size_t i = 0; i < n && rc == LQ_OK; i++) {
        const char *left = lq_tokenizer_piece(t, list[i].left);
        const char *right = lq_tokenizer_piece(t, list[i].right);
        cJSON *pair = merge_pair(left, strlen(left), right, strlen(right));
        if (!pair) rc = lq_error_set(err, LQ_ENOMEM, "%s: out of memory for merges", label);
        cJSON_AddItemToArray(merges, pair);
    }
    *count = n;
    free(list);
    return rc;
}

/* ---------- the files ---------- */

static cJSON *added_token(int id, const char *content, int special) {
    cJSON *node = cJSON_CreateObject();
    cJSON_AddNumberToObject(node, "id", id);
    cJSON_AddStringToObject(node, "content", content);
    cJSON_AddBoolToObject(node, "single_word", 0);
    cJSON_AddBoolToObject(node, "lstrip", 0);
    cJSON_AddBoolToObject(node, "rstrip", 0);
    cJSON_AddBoolToObject(node, "normalized", 0);
    cJSON_AddBoolToObject(node, "special", special);
    return node;
}

/* The pieces matched whole in text: control ones (special: never produced from user text by
 * lqd, skipped in decoding) and user-defined ones; SentencePiece's <unk> too, as
 * LlamaConverter adds it. */
static cJSON *added_tokens(const struct lq_tokenizer *t, size_t *count) {
    cJSON *list = cJSON_CreateArray();
    *count = 0;
    for (int id = 0; id < t->vocab_size; id++) {
        int type = t->types[id];
        int special = type == LQ_TOKEN_CONTROL || (type == LQ_TOKEN_UNKNOWN && !t->bpe);
        if (!special && type != LQ_TOKEN_USER_DEFINED) continue;
        cJSON_AddItemToArray(list, added_token(id, lq_tokenizer_piece(t, id), special));
        (*count)++;
    }
    return list;
}

static cJSON *piece_or_null(const struct lq_tokenizer *t, int id) {
    return id >= 0 ? cJSON_CreateString(lq_tokenizer_piece(t, id)) : cJSON_CreateNull();
}

static cJSON *tokenizer_config(const struct lq_gguf *gguf, const struct lq_tokenizer *t,
                               int add_bos, int model_max_length, int *has_template) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddBoolToObject(root, "add_bos_token", add_bos);
    cJSON_AddBoolToObject(root, "add_eos_token", 0);
    cJSON_AddItemToObject(root, "bos_token", piece_or_null(t, t->bos_id));
    cJSON_AddItemToObject(root, "eos_token", piece_or_null(t, t->eos_id));
    cJSON_AddItemToObject(root, "unk_token", piece_or_null(t, t->bpe ? -1 : t->unk_id));
    int64_t pad = -1;
    if (lq_gguf_get_i64(gguf, "tokenizer.ggml.padding_token_id", &pad, NULL) == LQ_OK && pad >= 0 &&
        pad < t->vocab_size)
        cJSON_AddItemToObject(root, "pad_token", piece_or_null(t, (int)pad));
    cJSON_AddBoolToObject(root, "clean_up_tokenization_spaces", 0);
    if (model_max_length > 0) cJSON_AddNumberToObject(root, "model_max_length", model_max_length);
    /* LlamaTokenizerFast keeps the legacy normalizer written here; byte-level files need no
     * class of their own. */
    cJSON_AddStringToObject(root, "tokenizer_class",
                            t->bpe ? "PreTrainedTokenizerFast" : "LlamaTokenizer");
    if (!t->bpe) cJSON_AddBoolToObject(root, "legacy", 1);
    const char *chat_template = NULL;
    *has_template =
        lq_gguf_get_string(gguf, "tokenizer.chat_template", &chat_template, NULL, NULL) == LQ_OK;
    if (*has_template) cJSON_AddStringToObject(root, "chat_template", chat_template);
    return root;
}

/* Texts that exercise what differs between pipelines: spaces (leading, repeated, tabs,
 * newlines), digits, punctuation and contractions, characters outside the vocabulary. */
static const char *const check_texts[] = {
    "Hello world",
    " leading space and  two  spaces",
    "line one\nline two\n\n\tindented\r\n",
    "Numbers 12345, 3.14 and 1,000,000!",
    "I'm sure you're right; they'll see.",
    "\xc3\x9c"
    "n"
    "\xc3\xaf"
    "c"
    "\xc3\xb6"
    "d"
    "\xc3\xa9 "                                              /* Ünïcödé */
    "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x98\x80", /* 日本語 😀 */
    "",
};

/* What was written must be read back by lqd's tokenizer.json reader as the same tokenizer:
 * as many pieces, and the same ids for check_texts (BOS included, when the GGUF adds it). */
static int check_read_back(const struct lq_tokenizer *t, const char *json, const char *label,
                           struct lq_error *err) {
    struct lq_tokenizer *back = NULL;
    struct lq_error inner = {0};
    int rc = lq_tokenizer_load_buffer(json, strlen(json), "tokenizer.json", &back, &inner);
    if (rc != LQ_OK)
        return lq_error_set(err, rc, "%s: the tokenizer.json written does not load: %s", label,
                            inner.message);
    if (back->vocab_size != t->vocab_size)
        rc = lq_error_set(err, LQ_EUNSUPPORTED,
                          "%s: the tokenizer.json written reads back with %d pieces, not %d", label,
                          back->vocab_size, t->vocab_size);
    for (size_t i = 0; rc == LQ_OK && i < sizeof check_texts / sizeof check_texts[0]; i++) {
        const char *text = check_texts[i];
        int *want = NULL, *got = NULL;
        size_t want_count = 0, got_count = 0;
        rc = lq_tokenizer_encode(t, text, strlen(text), 1, &want, &want_count, err);
        if (rc == LQ_OK)
            rc = lq_tokenizer_encode(back, text, strlen(text), 1, &got, &got_count, err);
        if (rc == LQ_OK &&
            (want_count != got_count || memcmp(want, got, want_count * sizeof *want) != 0))
            rc = lq_error_set(err, LQ_EUNSUPPORTED,
                              "%s: the tokenizer.json written encodes \"%s\" differently from the "
                              "GGUF's tokenizer",
                              label, text);
        free(want), free(got);
    }
    lq_tokenizer_free(back);
    return rc;
}

static int build(const struct lq_gguf *gguf, const struct lq_tokenizer *t, const char *label,
                 int model_max_length, struct lq_tokenizer_export *out, struct lq_error *err) {
    for (int id = 0; id < t->vocab_size; id++)
        if (strlen(lq_tokenizer_piece(t, id)) != t->offsets[id + 1] - t->offsets[id] - 1)
            return lq_error_set(err, LQ_EUNSUPPORTED,
                                "%s: piece %d holds a NUL byte, which tokenizer.json cannot hold",
                                label, id);
    if (!t->bpe && t->remove_extra_whitespaces)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: tokenizer.ggml.remove_extra_whitespaces is true: SentencePiece's "
                            "whitespace folding has no tokenizer.json equivalent",
                            label);
    if (!t->bpe && t->unk_id < 0)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: a SentencePiece tokenizer without an unknown piece cannot be "
                            "written as LlamaConverter's tokenizer.json",
                            label);
    int add_bos = !t->bos_off && t->bos_id >= 0;
    int ignore_merges = 0, rc = LQ_OK;
    cJSON *root = cJSON_CreateObject(), *pre_tokenizer = NULL;
    if (t->bpe) {
        const char *pre = "default";
        lq_gguf_get_string(gguf, "tokenizer.ggml.pre", &pre, NULL, NULL);
        rc = byte_level_pre_tokenizer(pre, &pre_tokenizer, &ignore_merges, label, err);
    }
    cJSON_AddStringToObject(root, "version", "1.0");
    cJSON_AddNullToObject(root, "truncation");
    cJSON_AddNullToObject(root, "padding");
    cJSON_AddItemToObject(root, "added_tokens", added_tokens(t, &out->added));
    if (t->bpe) {
        cJSON_AddNullToObject(root, "normalizer");
        cJSON_AddItemToObject(root, "pre_tokenizer",
                              pre_tokenizer ? pre_tokenizer : cJSON_CreateNull());
        cJSON_AddItemToObject(root, "post_processor",
                              add_bos ? bos_template(lq_tokenizer_piece(t, t->bos_id), t->bos_id)
                                      : byte_level(1, 0, 1));
        cJSON_AddItemToObject(root, "decoder", byte_level(1, 1, 1));
    } else {
        cJSON_AddItemToObject(root, "normalizer", llama_normalizer(t->add_dummy_prefix));
        cJSON_AddNullToObject(root, "pre_tokenizer");
        cJSON_AddItemToObject(root, "post_processor",
                              add_bos ? bos_template(lq_tokenizer_piece(t, t->bos_id), t->bos_id)
                                      : cJSON_CreateNull());
        cJSON_AddItemToObject(root, "decoder", llama_decoder(t->add_dummy_prefix));
    }
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddNullToObject(model, "dropout");
    cJSON_AddItemToObject(model, "unk_token", piece_or_null(t, t->bpe ? -1 : t->unk_id));
    cJSON_AddNullToObject(model, "continuing_subword_prefix");
    cJSON_AddNullToObject(model, "end_of_word_suffix");
    cJSON_AddBoolToObject(model, "fuse_unk", !t->bpe);
    cJSON_AddBoolToObject(model, "byte_fallback", !t->bpe);
    cJSON_AddBoolToObject(model, "ignore_merges", ignore_merges);
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    for (int id = 0; id < t->vocab_size; id++)
        cJSON_AddItemToObject(vocab, lq_tokenizer_piece(t, id), cJSON_CreateNumber(id));
    cJSON *merges = cJSON_AddArrayToObject(model, "merges");
    if (rc == LQ_OK)
        rc = t->bpe ? gguf_merges(gguf, merges, &out->merges, label, err)
                    : score_merges(t, merges, &out->merges, label, err);
    int has_template = 0;
    cJSON *config = tokenizer_config(gguf, t, add_bos, model_max_length, &has_template);
    if (rc == LQ_OK) {
        out->tokenizer_json = cJSON_Print(root);
        out->tokenizer_config_json = cJSON_Print(config);
        if (!out->tokenizer_json || !out->tokenizer_config_json)
            rc = lq_error_set(err, LQ_ENOMEM, "%s: out of memory writing tokenizer.json", label);
    }
    cJSON_Delete(root);
    cJSON_Delete(config);
    if (rc == LQ_OK) rc = check_read_back(t, out->tokenizer_json, label, err);
    out->model = t->bpe ? "gpt2" : "llama";
    out->vocab_size = t->vocab_size;
    out->chat_template = has_template;
    return rc;
}

int lq_tokenizer_export_gguf(const struct lq_gguf *gguf, const char *label, int model_max_length,
                             struct lq_tokenizer_export *out, struct lq_error *err) {
    memset(out, 0, sizeof *out);
    const char *model = NULL;
    if (lq_gguf_get_string(gguf, "tokenizer.ggml.model", &model, NULL, NULL) != LQ_OK)
        return lq_error_set(err, LQ_ENOTFOUND, "%s: no tokenizer.ggml.model: no tokenizer to write",
                            label);
    struct lq_tokenizer *tokenizer = NULL;
    int rc = lq_tokenizer_from_gguf(gguf, label, &tokenizer, err);
    if (rc == LQ_OK) rc = build(gguf, tokenizer, label, model_max_length, out, err);
    lq_tokenizer_free(tokenizer);
    if (rc != LQ_OK) lq_tokenizer_export_free(out);
    return rc;
}

void lq_tokenizer_export_free(struct lq_tokenizer_export *exported) {
    if (!exported) return;
    cJSON_free(exported->tokenizer_json);
    cJSON_free(exported->tokenizer_config_json);
    exported->tokenizer_json = exported->tokenizer_config_json = NULL;
}
