/* Byte-level BPE, as GPT-2, Llama 3, SmolLM2 and Qwen use it, read from HF tokenizer.json
 * (model.type "BPE" with a "ByteLevel" pre-tokenizer and decoder) and encoded as HF
 * `tokenizers` does:
 *
 *   1. added tokens (special or not) are cut out of the text first, leftmost-longest, and
 *      become their own ids; the text between them goes through the next steps;
 *   2. pre-tokenization splits it into words: a "Split" with the GPT-2, Llama 3 or Qwen 2
 *      pattern, "Digits", and "ByteLevel" (its add_prefix_space, and its GPT-2 pattern when
 *      use_regex). The patterns are matched by hand (match_gpt2, match_llama3) over the
 *      Unicode classes they use: \p{L}, \p{N} (core/tokenizer_unicode.inc) and \s;
 *   3. each word's bytes become characters through GPT-2's bytes_to_unicode (printable
 *      Latin-1 bytes as themselves, the other 68 as U+0100...), one piece per byte;
 *   4. BPE merges the adjacent pair of lowest rank in "merges", leftmost first (tokenizers'
 *      Word::merge_all); with model.ignore_merges a word that is a piece is taken whole.
 *
 * Decoding maps each piece's characters back to bytes, so decode(encode(text)) == text
 * (without add_prefix_space). Special tokens decode to nothing (HF's skip_special_tokens);
 * other added tokens to their text. Anything else (normalizers such as Qwen's NFC, other
 * split patterns, lstrip/rstrip added tokens) is refused with LQ_EUNSUPPORTED. */
#include "core/tokenizer_internal.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#define MAX_STAGES 8
#define MAX_TEXT_BYTES ((size_t)1 << 28)

enum stage_kind {
    STAGE_GPT2,   /* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
    STAGE_LLAMA3, /* (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,digits}|
                     ?[^\s\p{L}\p{N}]+[\r\n]*|... */
    STAGE_DIGITS, /* Digits: runs of \p{N} isolated (one by one when individual) */
    STAGE_PREFIX_SPACE, /* ByteLevel add_prefix_space: " " before a word not starting with one */
};

struct stage {
    enum stage_kind kind;
    int digits;      /* STAGE_LLAMA3: most digits in one word (Llama 3: 3, Qwen 2: 1) */
    bool individual; /* STAGE_DIGITS */
};

struct lq_tokenizer_bpe {
    struct stage stages[MAX_STAGES];
    int stage_count;
    bool ignore_merges;
    int byte_ids[256];       /* id of the piece that is byte b's character; -1: none */
    int missing_byte_id;     /* what a byte without a piece becomes: unk, or -1 (dropped) */
    char byte_chars[256][2]; /* byte b's character in UTF-8 (U+0021..U+0143: 1 or 2 bytes) */
    uint8_t byte_char_length[256];
    int16_t char_bytes[0x144]; /* the inverse: code point -> byte, -1 when not a byte's */
    int *added_ids;            /* added tokens by first byte, longest first */
    uint32_t added_first[257];
};

/* --- Unicode classes -------------------------------------------------------------------- */

struct unicode_range {
    uint32_t first, last;
    uint8_t kind;
};
#include "core/tokenizer_unicode.inc"

enum char_class { CLASS_OTHER, CLASS_LETTER, CLASS_NUMBER, CLASS_SPACE };

/* \s as Oniguruma (HF's regex engine) reads it for Unicode: the White_Space property. */
static bool is_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

static enum char_class classify(uint32_t c) {
    if (c < 0x80) {
        if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return CLASS_LETTER;
        if (c >= '0' && c <= '9') return CLASS_NUMBER;
        return is_space(c) ? CLASS_SPACE : CLASS_OTHER;
    }
    if (is_space(c)) return CLASS_SPACE;
    size_t low = 0, high = LQ_UNICODE_RANGE_COUNT;
    while (low < high) {
        size_t middle = (low + high) / 2;
        if (c < unicode_ranges[middle].first)
            high = middle;
        else if (c > unicode_ranges[middle].last)
            low = middle + 1;
        else
            return unicode_ranges[middle].kind == 1 ? CLASS_LETTER : CLASS_NUMBER;
    }
    return CLASS_OTHER;
}

/* The character at s[at] (n bytes in all): its code point, *length its bytes. A byte that
 * does not start valid UTF-8 is one character of class "other" (HF never sees such text). */
static uint32_t char_at(const unsigned char *s, size_t n, size_t at, size_t *length) {
    size_t k = lq_tokenizer_utf8_length(s + at, n - at);
    *length = k;
    unsigned c = s[at];
    if (k == 1) return c < 0x80 ? c : 0xFFFFFFFFu;
    uint32_t value = c & (k == 2 ? 0x1F : k == 3 ? 0x0F : 0x07);
    for (size_t i = 1; i < k; i++) value = value << 6 | (s[at + i] & 0x3F);
    return value;
}

static enum char_class class_at(const unsigned char *s, size_t n, size_t at, size_t *length) {
    uint32_t c = char_at(s, n, at, length);
    return c == 0xFFFFFFFFu ? CLASS_OTHER : classify(c);
}

/* End of the run of characters of class kind from at, and their count in *chars. */
static size_t run_end(const unsigned char *s, size_t n, size_t at, enum char_class kind,
                      size_t *chars, size_t *last_length) {
    size_t count = 0, length = 0;
    while (at < n) {
        size_t k;
        if (class_at(s, n, at, &k) != kind) break;
        at += k;
        length = k;
        count++;
    }
    if (chars) *chars = count;
    if (last_length) *last_length = length;
    return at;
}

/* 's 't 're 've 'm 'll 'd after the apostrophe at s[at]: bytes matched, or 0. */
static size_t contraction(const unsigned char *s, size_t n, size_t at, bool fold) {
    static const char *const endings[] = {"s", "t", "re", "ve", "m", "ll", "d"};
    for (int e = 0; e < 7; e++) {
        size_t k = strlen(endings[e]);
        if (at + 1 + k > n) continue;
        size_t i = 0;
        for (; i < k; i++) {
            unsigned c = s[at + 1 + i];
            if (fold && c >= 'A' && c <= 'Z') c += 32;
            if (c != (unsigned char)endings[e][i]) break;
        }
        if (i == k) return 1 + k;
    }
    return 0;
}

/* \s+(?!\S)|\s+ at a whitespace character: the run, less its last character when the run
 * has two or more and text follows (that character goes with the next word). */
static size_t match_spaces(const unsigned char *s, size_t n, size_t at) {
    size_t chars, last;
    size_t end = run_end(s, n, at, CLASS_SPACE, &chars, &last);
    if (end < n && chars >= 2) end -= last;
    return end - at;
}

/* GPT-2's pattern (HF ByteLevel with use_regex): the length of the word starting at at. */
static size_t match_gpt2(const unsigned char *s, size_t n, size_t at) {
    size_t length;
    enum char_class kind = class_at(s, n, at, &length);
    if (s[at] == '\'') {
        size_t k = contraction(s, n, at, false);
        if (k) return k;
    }
    size_t start = at;
    if (s[at] == ' ' && at + 1 < n) { /* " ?" before letters, numbers or other */
        size_t next_length;
        enum char_class next = class_at(s, n, at + 1, &next_length);
        if (next != CLASS_SPACE) return run_end(s, n, at + 1, next, NULL, NULL) - start;
    }
    if (kind != CLASS_SPACE) return run_end(s, n, at, kind, NULL, NULL) - start;
    return match_spaces(s, n, at);
}

/* Llama 3's pattern (Qwen 2's with digits 1). */
static size_t match_llama3(const unsigned char *s, size_t n, size_t at, int digits) {
    size_t length;
    enum char_class kind = class_at(s, n, at, &length);
    if (s[at] == '\'') {
        size_t k = contraction(s, n, at, true);
        if (k) return k;
    }
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (kind == CLASS_LETTER) return run_end(s, n, at, CLASS_LETTER, NULL, NULL) - at;
    size_t next_length = 0;
    enum char_class next =
        at + length < n ? class_at(s, n, at + length, &next_length) : CLASS_OTHER;
    if (kind != CLASS_NUMBER && s[at] != '\r' && s[at] != '\n' && at + length < n &&
        next == CLASS_LETTER)
        return run_end(s, n, at + length, CLASS_LETTER, NULL, NULL) - at;
    /* \p{N}{1,digits} */
    if (kind == CLASS_NUMBER) {
        size_t end = at;
        for (int i = 0; i < digits && end < n; i++) {
            size_t k;
            if (class_at(s, n, end, &k) != CLASS_NUMBER) break;
            end += k;
        }
        return end - at;
    }
    /* " ?[^\s\p{L}\p{N}]+[\r\n]*" */
    size_t begin = at;
    if (s[at] == ' ' && at + 1 < n && next == CLASS_OTHER) begin = at + 1;
    size_t other_length;
    if (begin < n && class_at(s, n, begin, &other_length) == CLASS_OTHER) {
        size_t end = run_end(s, n, begin, CLASS_OTHER, NULL, NULL);
        while (end < n && (s[end] == '\r' || s[end] == '\n')) end++;
        return end - at;
    }
    /* \s*[\r\n]+: the whitespace run up to its last line break */
    size_t end = run_end(s, n, at, CLASS_SPACE, NULL, NULL);
    for (size_t i = end; i > at; i--)
        if (s[i - 1] == '\r' || s[i - 1] == '\n') return i - at;
    return match_spaces(s, n, at);
}

/* --- Encoding --------------------------------------------------------------------------- */

struct merge_candidate {
    int32_t rank, position, merged;
};

struct word_symbol {
    int32_t id, prev, next;
    bool alive;
};

struct bpe_encoder {
    const struct lq_tokenizer *tokenizer;
    const struct lq_tokenizer_bpe *bpe;
    int *ids;
    size_t count, capacity;
    struct word_symbol *symbols;
    size_t symbol_capacity;
    struct merge_candidate *heap;
    size_t heap_count, heap_capacity;
    char *mapped; /* a word as piece text, for ignore_merges */
    size_t mapped_capacity;
};

static bool push_id(struct bpe_encoder *encoder, int id) {
    if (encoder->count == encoder->capacity) {
        size_t capacity = encoder->capacity ? encoder->capacity * 2 : 64;
        int *bigger = realloc(encoder->ids, capacity * sizeof *bigger);
        if (!bigger) return false;
        encoder->ids = bigger;
        encoder->capacity = capacity;
    }
    encoder->ids[encoder->count++] = id;
    return true;
}

static bool heap_before(const struct merge_candidate *a, const struct merge_candidate *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->position < b->position);
}

static bool heap_push(struct bpe_encoder *encoder, struct merge_candidate candidate) {
    if (encoder->heap_count == encoder->heap_capacity) {
        size_t capacity = encoder->heap_capacity ? encoder->heap_capacity * 2 : 64;
        struct merge_candidate *bigger = realloc(encoder->heap, capacity * sizeof *bigger);
        if (!bigger) return false;
        encoder->heap = bigger;
        encoder->heap_capacity = capacity;
    }
    struct merge_candidate *heap = encoder->heap;
    size_t at = encoder->heap_count++;
    while (at > 0 && heap_before(&candidate, &heap[(at - 1) / 2])) {
        heap[at] = heap[(at - 1) / 2];
        at = (at - 1) / 2;
    }
    heap[at] = candidate;
    return true;
}

static struct merge_candidate heap_pop(struct bpe_encoder *encoder) {
    struct merge_candidate *heap = encoder->heap;
    struct merge_candidate top = heap[0], last = heap[--encoder->heap_count];
    size_t at = 0, count = encoder->heap_count;
    for (;;) {
        size_t child = 2 * at + 1;
        if (child >= count) break;
        if (child + 1 < count && heap_before(&heap[child + 1], &heap[child])) child++;
        if (!heap_before(&heap[child], &last)) break;
        heap[at] = heap[child];
        at = child;
    }
    if (count > 0) heap[at] = last;
    return top;
}

static bool consider(struct bpe_encoder *encoder, int32_t left) {
    if (left < 0) return true;
    const struct word_symbol *l = &encoder->symbols[left];
    if (l->next < 0) return true;
    int32_t rank, merged;
    if (!lq_tokenizer_merge_find(encoder->tokenizer, l->id, encoder->symbols[l->next].id, &rank,
                                 &merged))
        return true;
    return heap_push(encoder, (struct merge_candidate){rank, left, merged});
}

/* One word: its bytes' pieces, merged by rank (tokenizers' Word::merge_all: a queued merge
 * still applies when the pair at its position still merges into the same piece). */
static bool encode_word(struct bpe_encoder *encoder, const unsigned char *word, size_t n) {
    const struct lq_tokenizer_bpe *bpe = encoder->bpe;
    if (n == 0) return true;
    if (bpe->ignore_merges) {
        if (n * 2 > encoder->mapped_capacity) {
            char *bigger = realloc(encoder->mapped, n * 2);
            if (!bigger) return false;
            encoder->mapped = bigger;
            encoder->mapped_capacity = n * 2;
        }
        size_t length = 0;
        for (size_t i = 0; i < n; i++) {
            memcpy(encoder->mapped + length, bpe->byte_chars[word[i]],
                   bpe->byte_char_length[word[i]]);
            length += bpe->byte_char_length[word[i]];
        }
        int id = lq_tokenizer_find(encoder->tokenizer, encoder->mapped, length);
        if (id >= 0) return push_id(encoder, id);
    }
    if (n > encoder->symbol_capacity) {
        struct word_symbol *bigger = realloc(encoder->symbols, n * sizeof *bigger);
        if (!bigger) return false;
        encoder->symbols = bigger;
        encoder->symbol_capacity = n;
    }
    struct word_symbol *symbols = encoder->symbols;
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        int id = bpe->byte_ids[word[i]];
        if (id < 0) id = bpe->missing_byte_id;
        if (id < 0) continue; /* tokenizers drops a character with no piece and no unk */
        symbols[kept] = (struct word_symbol){id, (int32_t)kept - 1, (int32_t)kept + 1, true};
        kept++;
    }
    if (kept == 0) return true;
    symbols[kept - 1].next = -1;
    n = kept;
    encoder->heap_count = 0;
    for (size_t i = 0; i + 1 < n; i++)
        if (!consider(encoder, (int32_t)i)) return false;
    while (encoder->heap_count > 0) {
        struct merge_candidate top = heap_pop(encoder);
        struct word_symbol *l = &symbols[top.position];
        if (!l->alive || l->next < 0) continue;
        int32_t rank, merged;
        if (!lq_tokenizer_merge_find(encoder->tokenizer, l->id, symbols[l->next].id, &rank,
                                     &merged) ||
            merged != top.merged)
            continue;
        struct word_symbol *r = &symbols[l->next];
        l->id = merged;
        r->alive = false;
        l->next = r->next;
        if (r->next >= 0) symbols[r->next].prev = top.position;
        if (!consider(encoder, l->prev) || !consider(encoder, top.position)) return false;
    }
    for (int32_t i = 0; i >= 0; i = symbols[i].next)
        if (!push_id(encoder, symbols[i].id)) return false;
    return true;
}

/* Runs pre-tokenization stage `stage` on text[0..n) and encodes the words it gives. */
static bool pre_tokenize(struct bpe_encoder *encoder, int stage, const unsigned char *text,
                         size_t n) {
    const struct lq_tokenizer_bpe *bpe = encoder->bpe;
    if (n == 0) return true;
    if (stage == bpe->stage_count) return encode_word(encoder, text, n);
    const struct stage *step = &bpe->stages[stage];
    if (step->kind == STAGE_PREFIX_SPACE) {
        if (text[0] == ' ') return pre_tokenize(encoder, stage + 1, text, n);
        unsigned char *spaced = malloc(n + 1);
        if (!spaced) return false;
        spaced[0] = ' ';
        memcpy(spaced + 1, text, n);
        bool ok = pre_tokenize(encoder, stage + 1, spaced, n + 1);
        free(spaced);
        return ok;
    }
    for (size_t at = 0; at < n;) {
        size_t length;
        if (step->kind == STAGE_GPT2) {
            length = match_gpt2(text, n, at);
        } else if (step->kind == STAGE_LLAMA3) {
            length = match_llama3(text, n, at, step->digits);
        } else { /* STAGE_DIGITS: a number (or one digit), or the text up to the next */
            size_t k;
            bool number = class_at(text, n, at, &k) == CLASS_NUMBER;
            size_t end = at + k;
            while (end < n && !(number && step->individual)) {
                size_t next_length;
                if ((class_at(text, n, end, &next_length) == CLASS_NUMBER) != number) break;
                end += next_length;
            }
            length = end - at;
        }
        if (length == 0) length = 1; /* cannot happen: every character matches */
        if (!pre_tokenize(encoder, stage + 1, text + at, length)) return false;
        at += length;
    }
    return true;
}

/* Longest added token at text[at..], or 0. */
static size_t match_added(const struct lq_tokenizer *tokenizer, const char *text, size_t left,
                          int *id) {
    const struct lq_tokenizer_bpe *bpe = tokenizer->bpe;
    uint8_t first = (uint8_t)text[0];
    for (uint32_t k = bpe->added_first[first]; k < bpe->added_first[first + 1]; k++) {
        int candidate = bpe->added_ids[k];
        size_t length = tokenizer->offsets[candidate + 1] - tokenizer->offsets[candidate] - 1;
        if (length <= left &&
            memcmp(tokenizer->text + tokenizer->offsets[candidate], text, length) == 0) {
            *id = candidate;
            return length;
        }
    }
    return 0;
}

int lq_tokenizer_bpe_encode(const struct lq_tokenizer *tokenizer, const char *text, size_t length,
                            int add_bos, int **ids, size_t *count, struct lq_error *err) {
    *ids = NULL;
    *count = 0;
    if (length > MAX_TEXT_BYTES)
        return lq_error_set(err, LQ_EINVAL,
                            "tokenizer encode: text of %zu bytes exceeds the %zu-byte limit",
                            length, MAX_TEXT_BYTES);
    struct bpe_encoder encoder = {.tokenizer = tokenizer, .bpe = tokenizer->bpe};
    bool ok = true;
    if (add_bos && tokenizer->bos_id >= 0 && !tokenizer->bos_off)
        ok = push_id(&encoder, tokenizer->bos_id);
    size_t begin = 0;
    for (size_t at = 0; ok && at <= length;) {
        int id = -1;
        size_t matched = 0;
        if (at < length && tokenizer->bpe->added_ids)
            matched = match_added(tokenizer, text + at, length - at, &id);
        if (matched == 0 && at < length) {
            at++;
            continue;
        }
        ok = pre_tokenize(&encoder, 0, (const unsigned char *)text + begin, at - begin);
        if (ok && matched) ok = push_id(&encoder, id);
        if (matched == 0) break; /* at == length */
        at += matched;
        begin = at;
    }
    free(encoder.symbols);
    free(encoder.heap);
    free(encoder.mapped);
    if (!ok) {
        free(encoder.ids);
        return lq_error_set(err, LQ_ENOMEM, "tokenizer encode: out of memory for %zu bytes of text",
                            length);
    }
    if (!encoder.ids) encoder.ids = malloc(sizeof *encoder.ids);
    if (!encoder.ids) return lq_error_set(err, LQ_ENOMEM, "tokenizer encode: out of memory");
    *ids = encoder.ids;
    *count = encoder.count;
    return LQ_OK;
}

/* --- Decoding --------------------------------------------------------------------------- */

/* HF's ByteLevel decoder: a piece whose characters are all bytes' characters becomes those
 * bytes; any other piece (an added token such as "hello world") stays as its text. */
size_t lq_tokenizer_bpe_decode_one(const struct lq_tokenizer *tokenizer, int id, char *out) {
    if (tokenizer->types[id] == LQ_TOKEN_CONTROL) return 0;
    const struct lq_tokenizer_bpe *bpe = tokenizer->bpe;
    const unsigned char *piece = (const unsigned char *)tokenizer->text + tokenizer->offsets[id];
    size_t length = tokenizer->offsets[id + 1] - tokenizer->offsets[id] - 1, written = 0;
    for (size_t at = 0; at < length;) {
        size_t k;
        uint32_t c = char_at(piece, length, at, &k);
        if (c >= 0x144 || bpe->char_bytes[c] < 0) {
            if (out) memcpy(out, piece, length);
            return length;
        }
        if (out) out[written] = (char)bpe->char_bytes[c];
        written++;
        at += k;
    }
    return written;
}

/* --- Loading ---------------------------------------------------------------------------- */

static const char *json_type(const cJSON *node) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(node, "type");
    return cJSON_IsString(type) && type->valuestring ? type->valuestring : "";
}

/* Whether node is, or is a Sequence holding, a step of this type. */
static bool has_step(const cJSON *node, const char *list, const char *type) {
    if (strcmp(json_type(node), type) == 0) return true;
    if (strcmp(json_type(node), "Sequence") != 0) return false;
    const cJSON *item;
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(node, list)) {
        if (strcmp(json_type(item), type) == 0) return true;
    }
    return false;
}

/* The split patterns lqd matches by hand, as tokenizer.json files spell them. */
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char llama3_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char qwen2_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static int add_stage(struct lq_tokenizer_bpe *bpe, struct stage stage, const char *label,
                     struct lq_error *err) {
    if (bpe->stage_count == MAX_STAGES)
        return lq_error_set(err, LQ_EUNSUPPORTED, "%s: more than %d pre-tokenizer steps", label,
                            MAX_STAGES);
    bpe->stages[bpe->stage_count++] = stage;
    return LQ_OK;
}

static int parse_step(struct lq_tokenizer_bpe *bpe, const cJSON *step, bool last, const char *label,
                      struct lq_error *err) {
    const char *type = json_type(step);
    if (strcmp(type, "ByteLevel") == 0) {
        if (!last)
            return lq_error_set(err, LQ_EUNSUPPORTED,
                                "%s: a pre-tokenizer step after ByteLevel is not supported", label);
        const cJSON *regex = cJSON_GetObjectItemCaseSensitive(step, "use_regex");
        int rc = LQ_OK;
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(step, "add_prefix_space")))
            rc = add_stage(bpe, (struct stage){.kind = STAGE_PREFIX_SPACE}, label, err);
        if (rc == LQ_OK && !cJSON_IsFalse(regex)) /* use_regex defaults to true */
            rc = add_stage(bpe, (struct stage){.kind = STAGE_GPT2}, label, err);
        return rc;
    }
    if (strcmp(type, "Digits") == 0) {
        bool individual = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(step, "individual_digits"));
        return add_stage(bpe, (struct stage){.kind = STAGE_DIGITS, .individual = individual}, label,
                         err);
    }
    if (strcmp(type, "Split") == 0) {
        const cJSON *pattern = cJSON_GetObjectItemCaseSensitive(step, "pattern");
        const cJSON *regex = cJSON_GetObjectItemCaseSensitive(pattern, "Regex");
        const cJSON *behavior = cJSON_GetObjectItemCaseSensitive(step, "behavior");
        if (!cJSON_IsString(behavior) || strcmp(behavior->valuestring, "Isolated") != 0 ||
            cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(step, "invert")))
            return lq_error_set(err, LQ_EUNSUPPORTED,
                                "%s: Split pre-tokenizer must be behavior \"Isolated\", not "
                                "inverted",
                                label);
        const char *text = cJSON_IsString(regex) && regex->valuestring ? regex->valuestring : "";
        struct stage stage = {.kind = STAGE_LLAMA3, .digits = 3};
        if (strcmp(text, gpt2_pattern) == 0)
            stage.kind = STAGE_GPT2;
        else if (strcmp(text, qwen2_pattern) == 0)
            stage.digits = 1;
        else if (strcmp(text, llama3_pattern) != 0)
            return lq_error_set(err, LQ_EUNSUPPORTED,
                                "%s: Split pattern \"%.80s\" is not one lqd knows (GPT-2's, "
                                "Llama 3's or Qwen 2's)",
                                label, text);
        return add_stage(bpe, stage, label, err);
    }
    return lq_error_set(err, LQ_EUNSUPPORTED,
                        "%s: pre-tokenizer step \"%s\" is not supported with byte-level BPE", label,
                        type);
}

static void build_byte_map(struct lq_tokenizer_bpe *bpe) {
    /* GPT-2's bytes_to_unicode: bytes that print in Latin-1 ('!'..'~', U+00A1..U+00AC,
     * U+00AE..U+00FF) stand for themselves, the other 68 take U+0100 on, in byte order, so
     * that every piece is printable text without spaces. */
    int shifted = 0;
    for (int b = 0; b < 0x144; b++) bpe->char_bytes[b] = -1;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        uint32_t c = printable ? (uint32_t)b : 0x100u + (uint32_t)shifted++;
        bpe->char_bytes[c] = (int16_t)b;
        if (c < 0x80) {
            bpe->byte_chars[b][0] = (char)c;
            bpe->byte_char_length[b] = 1;
        } else {
            bpe->byte_chars[b][0] = (char)(0xC0 | (c >> 6));
            bpe->byte_chars[b][1] = (char)(0x80 | (c & 0x3F));
            bpe->byte_char_length[b] = 2;
        }
    }
}

int lq_tokenizer_bpe_configure(struct lq_tokenizer *tokenizer, const cJSON *root, const char *label,
                               struct lq_error *err) {
    const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    const cJSON *decoder = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (!has_step(pre, "pretokenizers", "ByteLevel") && !has_step(decoder, "decoders", "ByteLevel"))
        return LQ_OK;
    if (strcmp(json_type(decoder), "ByteLevel") != 0)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: byte-level BPE needs a ByteLevel decoder, not \"%s\"", label,
                            json_type(decoder));
    if (!has_step(pre, "pretokenizers", "ByteLevel"))
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: a ByteLevel decoder without a ByteLevel pre-tokenizer is not "
                            "supported",
                            label);
    const cJSON *normalizer = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    if (normalizer && !cJSON_IsNull(normalizer))
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: normalizer \"%s\" with byte-level BPE is not supported", label,
                            json_type(normalizer));
    const cJSON *added;
    cJSON_ArrayForEach(added, cJSON_GetObjectItemCaseSensitive(root, "added_tokens")) {
        static const char *const options[] = {"lstrip", "rstrip", "single_word"};
        for (int i = 0; i < 3; i++)
            if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(added, options[i])))
                return lq_error_set(err, LQ_EUNSUPPORTED,
                                    "%s: added token option %s is not "
                                    "supported",
                                    label, options[i]);
    }
    struct lq_tokenizer_bpe *bpe = calloc(1, sizeof *bpe);
    if (!bpe) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    tokenizer->bpe = bpe;
    build_byte_map(bpe);
    int rc = LQ_OK;
    if (strcmp(json_type(pre), "Sequence") == 0) {
        const cJSON *steps = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
        int count = cJSON_GetArraySize(steps), index = 0;
        const cJSON *step;
        cJSON_ArrayForEach(step, steps) {
            if (rc == LQ_OK) rc = parse_step(bpe, step, ++index == count, label, err);
        }
    } else {
        rc = parse_step(bpe, pre, true, label, err);
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    bpe->ignore_merges = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "ignore_merges"));
    if (rc == LQ_OK && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback")))
        rc = lq_error_set(err, LQ_EUNSUPPORTED,
                          "%s: byte_fallback with byte-level BPE is not supported", label);
    /* SentencePiece's normalization is off: the byte-level steps replace it. */
    tokenizer->add_dummy_prefix = tokenizer->escape_whitespaces = false;
    return rc;
}

int lq_tokenizer_bpe_configure_named(struct lq_tokenizer *tokenizer, const char *pre,
                                     const char *label, struct lq_error *err) {
    /* llama.cpp's names (tokenizer.ggml.pre) for the pipelines tokenizer.json spells out. */
    struct stage first = {.kind = STAGE_GPT2}, second = {.kind = STAGE_GPT2};
    int stages = 1;
    bool ignore_merges = false;
    if (strcmp(pre, "default") == 0 || strcmp(pre, "gpt-2") == 0 || strcmp(pre, "gpt2") == 0) {
        /* ByteLevel with its own GPT-2 regex */
    } else if (strcmp(pre, "llama-bpe") == 0 || strcmp(pre, "llama3") == 0) {
        first = (struct stage){.kind = STAGE_LLAMA3, .digits = 3};
        ignore_merges = true; /* Llama 3's tokenizer.json sets model.ignore_merges */
    } else if (strcmp(pre, "qwen2") == 0) {
        first = (struct stage){.kind = STAGE_LLAMA3, .digits = 1};
    } else if (strcmp(pre, "smollm") == 0) {
        first = (struct stage){.kind = STAGE_DIGITS, .individual = true};
        stages = 2; /* Digits(individual_digits) then ByteLevel with its regex */
    } else {
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: pre-tokenizer \"%.80s\" is not one lqd knows (default, "
                            "gpt-2, llama-bpe, llama3, qwen2, smollm)",
                            label, pre);
    }
    struct lq_tokenizer_bpe *bpe = calloc(1, sizeof *bpe);
    if (!bpe) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    tokenizer->bpe = bpe;
    build_byte_map(bpe);
    bpe->stages[0] = first;
    if (stages == 2) bpe->stages[1] = second;
    bpe->stage_count = stages;
    bpe->ignore_merges = ignore_merges;
    tokenizer->add_dummy_prefix = tokenizer->escape_whitespaces = false;
    return LQ_OK;
}

int lq_tokenizer_bpe_finish(struct lq_tokenizer *tokenizer, int missing_byte_id, const char *label,
                            struct lq_error *err) {
    struct lq_tokenizer_bpe *bpe = tokenizer->bpe;
    (void)label;
    /* Some vocabularies (SmolLM2's) lack the pieces of bytes that never occur in their
     * training text, such as most control characters. */
    for (int b = 0; b < 256; b++)
        bpe->byte_ids[b] =
            lq_tokenizer_find(tokenizer, bpe->byte_chars[b], bpe->byte_char_length[b]);
    bpe->missing_byte_id = missing_byte_id;
    /* Added tokens are matched in the text, longest first among those sharing a byte. */
    uint32_t counts[256] = {0};
    size_t total = 0;
    for (int id = 0; id < tokenizer->vocab_size; id++) {
        int type = tokenizer->types[id];
        if (type != LQ_TOKEN_CONTROL && type != LQ_TOKEN_USER_DEFINED) continue;
        counts[(uint8_t)tokenizer->text[tokenizer->offsets[id]]]++;
        total++;
    }
    bpe->added_first[0] = 0;
    for (int b = 0; b < 256; b++) bpe->added_first[b + 1] = bpe->added_first[b] + counts[b];
    if (total > 0) {
        bpe->added_ids = malloc(total * sizeof *bpe->added_ids);
        if (!bpe->added_ids) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
        uint32_t fill[256];
        memcpy(fill, bpe->added_first, sizeof fill);
        for (int id = 0; id < tokenizer->vocab_size; id++) {
            int type = tokenizer->types[id];
            if (type != LQ_TOKEN_CONTROL && type != LQ_TOKEN_USER_DEFINED) continue;
            uint8_t first = (uint8_t)tokenizer->text[tokenizer->offsets[id]];
            /* Insertion by length, longest first; ties keep id order. */
            uint32_t at = fill[first]++;
            size_t length = tokenizer->offsets[id + 1] - tokenizer->offsets[id];
            while (at > bpe->added_first[first]) {
                int before = bpe->added_ids[at - 1];
                if (tokenizer->offsets[before + 1] - tokenizer->offsets[before] >= length) break;
                bpe->added_ids[at] = before;
                at--;
            }
            bpe->added_ids[at] = id;
        }
    }
    /* tokenizer.json does not say which token ends text; these are the byte-level families'. */
    static const char *const eos_names[] = {"<|endoftext|>", "<|end_of_text|>", "<|im_end|>"};
    for (int i = 0; i < 3 && tokenizer->eos_id < 0; i++) {
        int id = lq_tokenizer_find(tokenizer, eos_names[i], strlen(eos_names[i]));
        if (id >= 0 && tokenizer->types[id] == LQ_TOKEN_CONTROL) tokenizer->eos_id = id;
    }
    return LQ_OK;
}

void lq_tokenizer_bpe_free(struct lq_tokenizer_bpe *bpe) {
    if (!bpe) return;
    free(bpe->added_ids);
    free(bpe);
}
