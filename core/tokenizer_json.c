/* HF tokenizer.json for Llama-style SentencePiece BPE: model.type "BPE" with vocab, merges
 * (ranked by position) and byte_fallback; added_tokens (special ones become control pieces,
 * the others user-defined); the dummy prefix and space escaping from the normalizer
 * (Prepend "▁" + Replace " " -> "▁", legacy Llama) or the pre-tokenizer (Metaspace, split
 * false). Byte-level BPE (a ByteLevel pre-tokenizer or decoder) takes its steps from
 * tokenizer_bpe.c instead. Anything that would tokenize differently (NFKC, word splitting)
 * is refused with LQ_EUNSUPPORTED rather than approximated. */
#include "core/file_util.h"
#include "core/tokenizer_internal.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct json_flags {
    bool prepend, escape;           /* normalizer: Prepend "▁", Replace " " -> "▁" */
    bool meta_prepend, meta_escape; /* pre-tokenizer: Metaspace */
};

static const char *json_type(const cJSON *node) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(node, "type");
    return cJSON_IsString(type) && type->valuestring ? type->valuestring : "";
}

static bool json_string_is(const cJSON *node, const char *value) {
    return cJSON_IsString(node) && node->valuestring && strcmp(node->valuestring, value) == 0;
}

/* An optional boolean member: absent or null gives fallback. */
static int json_flag(const cJSON *object, const char *name, bool fallback, bool *value,
                     const char *label, struct lq_error *err) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, name);
    if (!item || cJSON_IsNull(item)) {
        *value = fallback;
        return LQ_OK;
    }
    if (!cJSON_IsBool(item))
        return lq_error_set(err, LQ_EFORMAT, "%s: model.%s is not true or false", label, name);
    *value = cJSON_IsTrue(item);
    return LQ_OK;
}

/* A JSON number that is an integer in [0, LQ_TOKENIZER_MAX_VOCAB). */
static int json_id(const cJSON *item) {
    if (!cJSON_IsNumber(item)) return -1;
    double value = item->valuedouble;
    if (!(value >= 0 && value < LQ_TOKENIZER_MAX_VOCAB) || value != floor(value)) return -1;
    return (int)value;
}

static int parse_normalizer(const cJSON *node, struct json_flags *flags, int depth,
                            const char *label, struct lq_error *err) {
    if (!node || cJSON_IsNull(node)) return LQ_OK;
    const char *type = json_type(node);
    if (depth > 8)
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: normalizers nested too deep", label);
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *items = cJSON_GetObjectItemCaseSensitive(node, "normalizers");
        if (!cJSON_IsArray(items))
            return lq_error_set(err, LQ_EFORMAT, "%s: Sequence normalizer has no array", label);
        const cJSON *item;
        cJSON_ArrayForEach(item, items) {
            int rc = parse_normalizer(item, flags, depth + 1, label, err);
            if (rc != LQ_OK) return rc;
        }
        return LQ_OK;
    }
    if (strcmp(type, "Prepend") == 0 &&
        json_string_is(cJSON_GetObjectItemCaseSensitive(node, "prepend"), LQ_TOKENIZER_SPACE)) {
        flags->prepend = true;
        return LQ_OK;
    }
    const cJSON *pattern = cJSON_GetObjectItemCaseSensitive(node, "pattern");
    if (strcmp(type, "Replace") == 0 &&
        json_string_is(cJSON_GetObjectItemCaseSensitive(pattern, "String"), " ") &&
        json_string_is(cJSON_GetObjectItemCaseSensitive(node, "content"), LQ_TOKENIZER_SPACE)) {
        flags->escape = true;
        return LQ_OK;
    }
    return lq_error_set(err, LQ_EUNSUPPORTED,
                        "%s: normalizer \"%s\" is not supported (only "
                        "Prepend \"\xe2\x96\x81\" and Replace \" \" -> \"\xe2\x96\x81\")",
                        label, type);
}

static int parse_pre_tokenizer(const cJSON *node, struct json_flags *flags, const char *label,
                               struct lq_error *err) {
    if (!node || cJSON_IsNull(node)) return LQ_OK;
    const char *type = json_type(node);
    if (strcmp(type, "Metaspace") != 0)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: pre_tokenizer \"%s\" is not supported "
                            "(byte-level BPE and word splitting tokenize differently)",
                            label, type);
    const cJSON *replacement = cJSON_GetObjectItemCaseSensitive(node, "replacement");
    if (!json_string_is(replacement, LQ_TOKENIZER_SPACE))
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: Metaspace replacement is not \"\xe2\x96\x81\"", label);
    /* Old files have no "split" and always split into words: a different tokenization. */
    if (!cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(node, "split")))
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: Metaspace splits words apart (split is "
                            "not false); not supported",
                            label);
    const cJSON *scheme = cJSON_GetObjectItemCaseSensitive(node, "prepend_scheme");
    const cJSON *add_prefix = cJSON_GetObjectItemCaseSensitive(node, "add_prefix_space");
    if (cJSON_IsString(scheme))
        flags->meta_prepend = !json_string_is(scheme, "never");
    else
        flags->meta_prepend = cJSON_IsTrue(add_prefix);
    flags->meta_escape = true;
    return LQ_OK;
}

/* Refuses model options that change how text is split into pieces. */
static int check_model_options(const cJSON *model, struct lq_tokenizer *tokenizer,
                               const char *label, struct lq_error *err) {
    const char *type = json_type(model);
    if (cJSON_GetObjectItemCaseSensitive(model, "type") && strcmp(type, "BPE") != 0)
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: model type \"%s\"; lqd reads BPE only",
                            label, type);
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (cJSON_IsNumber(dropout) && dropout->valuedouble != 0)
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: BPE dropout is not supported", label);
    static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        const cJSON *affix = cJSON_GetObjectItemCaseSensitive(model, affixes[i]);
        if (affix && !cJSON_IsNull(affix) && !json_string_is(affix, ""))
            return lq_error_set(err, LQ_EUNSUPPORTED, "%s: model.%s is not supported", label,
                                affixes[i]);
    }
    bool ignore_merges = false, byte_fallback = false, fuse_unk = false;
    int rc = json_flag(model, "ignore_merges", false, &ignore_merges, label, err);
    if (rc == LQ_OK && ignore_merges && !tokenizer->bpe)
        rc = lq_error_set(err, LQ_EUNSUPPORTED, "%s: model.ignore_merges is not supported", label);
    if (rc == LQ_OK) rc = json_flag(model, "byte_fallback", false, &byte_fallback, label, err);
    if (rc == LQ_OK) rc = json_flag(model, "fuse_unk", false, &fuse_unk, label, err);
    tokenizer->byte_fallback = byte_fallback;
    tokenizer->fuse_unk = fuse_unk;
    return rc;
}

/* Fills pieces[id] (borrowed from the JSON) and types[id] from vocab and added_tokens. */
static int collect_pieces(const cJSON *vocab, const cJSON *added, const char **pieces,
                          uint8_t *types, int size, const char *label, struct lq_error *err) {
    const cJSON *item;
    cJSON_ArrayForEach(item, vocab) {
        int id = json_id(item);
        if (pieces[id])
            return lq_error_set(err, LQ_EFORMAT, "%s: id %d is both \"%s\" and \"%s\"", label, id,
                                pieces[id], item->string);
        pieces[id] = item->string;
        types[id] = LQ_TOKEN_NORMAL;
    }
    cJSON_ArrayForEach(item, added) {
        int id = json_id(cJSON_GetObjectItemCaseSensitive(item, "id"));
        const char *content = cJSON_GetObjectItemCaseSensitive(item, "content")->valuestring;
        if (pieces[id] && strcmp(pieces[id], content) != 0)
            return lq_error_set(err, LQ_EFORMAT,
                                "%s: added token %d \"%s\" conflicts with "
                                "vocabulary piece \"%s\"",
                                label, id, content, pieces[id]);
        pieces[id] = content;
        /* Special tokens are never matched in user text (as in SentencePiece); the others
         * are, whole, as user-defined pieces. */
        types[id] = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(item, "special"))
                        ? LQ_TOKEN_CONTROL
                        : LQ_TOKEN_USER_DEFINED;
    }
    for (int id = 0; id < size; id++)
        if (!pieces[id])
            return lq_error_set(err, LQ_EFORMAT,
                                "%s: id %d has no piece (ids must run from 0 "
                                "to %d without gaps)",
                                label, id, size - 1);
    return LQ_OK;
}

/* The vocabulary size implied by vocab and added_tokens, checking every entry's shape. */
static int vocabulary_size(const cJSON *vocab, const cJSON *added, int *size, const char *label,
                           struct lq_error *err) {
    int max_id = -1;
    const cJSON *item;
    cJSON_ArrayForEach(item, vocab) {
        int id = json_id(item);
        if (id < 0 || !item->string)
            return lq_error_set(err, LQ_EFORMAT, "%s: vocab entry \"%s\" is not an id in 0..%d",
                                label, item->string ? item->string : "",
                                LQ_TOKENIZER_MAX_VOCAB - 1);
        if (id > max_id) max_id = id;
    }
    size_t index = 0;
    cJSON_ArrayForEach(item, added) {
        int id = json_id(cJSON_GetObjectItemCaseSensitive(item, "id"));
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(item, "content");
        if (id < 0 || !cJSON_IsString(content) || !content->valuestring)
            return lq_error_set(err, LQ_EFORMAT,
                                "%s: added_tokens[%zu] needs an integer \"id\" "
                                "and a string \"content\"",
                                label, index);
        if (id > max_id) max_id = id;
        index++;
    }
    if (max_id < 0) return lq_error_set(err, LQ_EFORMAT, "%s: the vocabulary is empty", label);
    *size = max_id + 1;
    return LQ_OK;
}

/* Resolves one merge, "a b" (older files) or ["a", "b"], to (left, right, merged) ids. */
static int resolve_merge(const struct lq_tokenizer *tokenizer, const cJSON *merge, size_t index,
                         char *scratch, int32_t out[3], const char *label, struct lq_error *err) {
    const char *left = NULL, *right = NULL;
    size_t left_length = 0, right_length = 0;
    if (cJSON_IsString(merge) && merge->valuestring) {
        const char *space = strchr(merge->valuestring, ' ');
        if (space && !strchr(space + 1, ' ')) {
            left = merge->valuestring;
            left_length = (size_t)(space - left);
            right = space + 1;
            right_length = strlen(right);
        }
    } else if (cJSON_IsArray(merge) && cJSON_GetArraySize(merge) == 2) {
        const cJSON *a = cJSON_GetArrayItem(merge, 0), *b = cJSON_GetArrayItem(merge, 1);
        if (cJSON_IsString(a) && a->valuestring && cJSON_IsString(b) && b->valuestring) {
            left = a->valuestring, right = b->valuestring;
            left_length = strlen(left), right_length = strlen(right);
        }
    }
    if (!left)
        return lq_error_set(err, LQ_EFORMAT, "%s: merges[%zu] is not \"a b\" or [\"a\", \"b\"]",
                            label, index);
    out[0] = lq_tokenizer_find(tokenizer, left, left_length);
    out[1] = lq_tokenizer_find(tokenizer, right, right_length);
    if (left_length + right_length <= tokenizer->max_piece_length) {
        memcpy(scratch, left, left_length);
        memcpy(scratch + left_length, right, right_length);
        out[2] = lq_tokenizer_find(tokenizer, scratch, left_length + right_length);
    } else {
        out[2] = -1;
    }
    if (out[0] < 0 || out[1] < 0 || out[2] < 0)
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: merges[%zu] (\"%.*s\", \"%.*s\"): a part or "
                            "their concatenation is not in the vocabulary",
                            label, index, (int)(left_length > 64 ? 64 : left_length), left,
                            (int)(right_length > 64 ? 64 : right_length), right);
    return LQ_OK;
}

static int load_merges(struct lq_tokenizer *tokenizer, const cJSON *merges, const char *label,
                       struct lq_error *err) {
    size_t count = (size_t)cJSON_GetArraySize(merges);
    int32_t *pairs = malloc((count ? count : 1) * 3 * sizeof *pairs);
    char *scratch = malloc(tokenizer->max_piece_length + 1);
    int rc = pairs && scratch ? LQ_OK
                              : lq_error_set(err, LQ_ENOMEM, "%s: out of memory for merges", label);
    size_t index = 0;
    const cJSON *merge;
    cJSON_ArrayForEach(merge, merges) {
        if (rc != LQ_OK) break;
        rc = resolve_merge(tokenizer, merge, index, scratch, pairs + 3 * index, label, err);
        index++;
    }
    if (rc == LQ_OK) rc = lq_tokenizer_set_merges(tokenizer, pairs, count, label, err);
    free(pairs);
    free(scratch);
    return rc;
}

static int control_named(const struct lq_tokenizer *tokenizer, const char *name) {
    int id = name ? lq_tokenizer_find(tokenizer, name, strlen(name)) : -1;
    return id >= 0 && tokenizer->types[id] == LQ_TOKEN_CONTROL ? id : -1;
}

/* BOS: the special token a TemplateProcessing post-processor puts first, else "<s>". */
static void find_bos_eos(struct lq_tokenizer *tokenizer, const cJSON *root) {
    const cJSON *processor = cJSON_GetObjectItemCaseSensitive(root, "post_processor");
    if (strcmp(json_type(processor), "Sequence") == 0) { /* Llama 3: ByteLevel, Template */
        const cJSON *item;
        cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(processor, "processors")) {
            if (strcmp(json_type(item), "TemplateProcessing") == 0) processor = item;
        }
    }
    if (strcmp(json_type(processor), "TemplateProcessing") == 0) {
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(processor, "single");
        const cJSON *first = cJSON_IsArray(single) ? cJSON_GetArrayItem(single, 0) : NULL;
        const cJSON *special = cJSON_GetObjectItemCaseSensitive(first, "SpecialToken");
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(special, "id");
        if (cJSON_IsString(name)) tokenizer->bos_id = control_named(tokenizer, name->valuestring);
    }
    if (tokenizer->bos_id < 0) tokenizer->bos_id = control_named(tokenizer, "<s>");
    tokenizer->eos_id = control_named(tokenizer, "</s>");
}

static int build(struct lq_tokenizer *tokenizer, const cJSON *root, const char *label,
                 struct lq_error *err) {
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(model))
        return lq_error_set(err, LQ_EFORMAT, "%s: no \"model\" object", label);
    int rc = lq_tokenizer_bpe_configure(tokenizer, root, label, err);
    if (rc == LQ_OK) rc = check_model_options(model, tokenizer, label, err);
    if (rc != LQ_OK) return rc;
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges))
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: model needs a \"vocab\" object and a "
                            "\"merges\" array",
                            label);
    if (added && !cJSON_IsNull(added) && !cJSON_IsArray(added))
        return lq_error_set(err, LQ_EFORMAT, "%s: added_tokens is not an array", label);
    struct json_flags flags = {0};
    if (!tokenizer->bpe) /* byte-level BPE: its own steps, read by lq_tokenizer_bpe_configure */
        rc = parse_normalizer(cJSON_GetObjectItemCaseSensitive(root, "normalizer"), &flags, 0,
                              label, err);
    if (rc == LQ_OK && !tokenizer->bpe)
        rc = parse_pre_tokenizer(cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), &flags,
                                 label, err);
    int size = 0;
    if (rc == LQ_OK)
        rc = vocabulary_size(vocab, cJSON_IsArray(added) ? added : NULL, &size, label, err);
    if (rc != LQ_OK) return rc;
    tokenizer->add_dummy_prefix = flags.prepend || flags.meta_prepend;
    tokenizer->prefix_if_missing = !flags.prepend && flags.meta_prepend;
    tokenizer->escape_whitespaces = flags.escape || flags.meta_escape;
    tokenizer->remove_extra_whitespaces = false;

    const char **pieces = calloc((size_t)size, sizeof *pieces);
    uint8_t *types = calloc((size_t)size, 1);
    rc = pieces && types ? LQ_OK : lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    if (rc == LQ_OK)
        rc = collect_pieces(vocab, cJSON_IsArray(added) ? added : NULL, pieces, types, size, label,
                            err);
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
    if (rc == LQ_OK && cJSON_IsString(unk) && unk->valuestring) {
        for (int id = 0; id < size && tokenizer->unk_id < 0; id++)
            if (strcmp(pieces[id], unk->valuestring) == 0) tokenizer->unk_id = id;
        if (tokenizer->unk_id < 0)
            rc = lq_error_set(err, LQ_EFORMAT, "%s: unk_token \"%s\" is not in the vocabulary",
                              label, unk->valuestring);
        else
            types[tokenizer->unk_id] = LQ_TOKEN_UNKNOWN;
    }
    for (int id = 0; rc == LQ_OK && id < size; id++) {
        const char *piece = pieces[id];
        size_t length = strlen(piece);
        int type = types[id];
        if (tokenizer->byte_fallback && type == LQ_TOKEN_NORMAL && length == 6 &&
            memcmp(piece, "<0x", 3) == 0 && piece[5] == '>')
            type = LQ_TOKEN_BYTE;
        rc = lq_tokenizer_add_piece(tokenizer, piece, length, 0.0f, type, label, err);
    }
    free(pieces);
    free(types);
    if (rc == LQ_OK) rc = lq_tokenizer_finish(tokenizer, label, err);
    if (rc == LQ_OK) rc = load_merges(tokenizer, merges, label, err);
    if (rc == LQ_OK) find_bos_eos(tokenizer, root);
    if (rc == LQ_OK && tokenizer->bpe)
        rc = lq_tokenizer_bpe_finish(tokenizer, tokenizer->unk_id, label, err);
    return rc;
}

int lq_tokenizer_parse_json(const uint8_t *data, size_t size, const char *label,
                            struct lq_tokenizer **out, struct lq_error *err) {
    /* JSON forbids raw control characters; cJSON would stop at a NUL or take it as text. */
    for (size_t i = 0; i < size; i++)
        if (data[i] < 0x20 && data[i] != '\t' && data[i] != '\n' && data[i] != '\r')
            return lq_error_set(err, LQ_EFORMAT,
                                "%s: control character 0x%02x at byte %zu is "
                                "not valid JSON",
                                label, data[i], i);
    char *text = malloc(size + 1);
    if (!text) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for %zu bytes", label, size);
    memcpy(text, data, size);
    text[size] = '\0';
    const char *end = NULL;

    cJSON *root = lq_json_parse_end(text, size, &end);
    size_t end_at = end ? (size_t)(end - text) : 0;
    free(text);
    if (!root)
        return lq_error_set(err, LQ_EFORMAT, "%s: not valid JSON (near byte %zu)", label, end_at);
    int rc = LQ_OK;
    for (size_t i = end_at; i < size && rc == LQ_OK; i++)
        if (data[i] != ' ' && data[i] != '\t' && data[i] != '\n' && data[i] != '\r')
            rc = lq_error_set(err, LQ_EFORMAT, "%s: bytes after the JSON value (byte %zu)", label,
                              i);
    if (rc == LQ_OK && !cJSON_IsObject(root))
        rc = lq_error_set(err, LQ_EFORMAT, "%s: not a JSON object", label);
    struct lq_tokenizer *tokenizer = rc == LQ_OK ? lq_tokenizer_new() : NULL;
    if (rc == LQ_OK && !tokenizer) rc = lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    if (rc == LQ_OK) rc = build(tokenizer, root, label, err);
    cJSON_Delete(root);
    if (rc != LQ_OK) {
        lq_tokenizer_free(tokenizer);
        return rc;
    }
    *out = tokenizer;
    return LQ_OK;
}
