/* The tokenizer's vocabulary (pieces, types, the piece index and HF merge table) and its
 * decoder. Encoding is in tokenizer_encode.c, the file formats in tokenizer_load.c and
 * tokenizer_json.c. */
#include "core/tokenizer_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* SentencePiece's default unk_surface: " ⁇ " (U+2047 between spaces). */
static const char default_unk_surface[] = " \xe2\x81\x87 ";

struct lq_tokenizer *lq_tokenizer_new(void) {
    struct lq_tokenizer *tokenizer = calloc(1, sizeof *tokenizer);
    if (!tokenizer) return NULL;
    tokenizer->unk_id = tokenizer->bos_id = tokenizer->eos_id = -1;
    for (int b = 0; b < 256; b++) tokenizer->byte_ids[b] = -1;
    tokenizer->add_dummy_prefix = true;
    tokenizer->escape_whitespaces = true;
    return tokenizer;
}

void lq_tokenizer_free(struct lq_tokenizer *tokenizer) {
    if (!tokenizer) return;
    free(tokenizer->text);
    free(tokenizer->offsets);
    free(tokenizer->scores);
    free(tokenizer->types);
    free(tokenizer->byte_values);
    free(tokenizer->unk_surface);
    free(tokenizer->index);
    free(tokenizer->merges);
    free(tokenizer->user_ids);
    free(tokenizer->bigrams);
    lq_tokenizer_bpe_free(tokenizer->bpe);
    free(tokenizer);
}

int lq_tokenizer_add_piece(struct lq_tokenizer *tokenizer, const char *text, size_t length,
                           float score, int type, const char *label, struct lq_error *err) {
    if (tokenizer->vocab_size >= LQ_TOKENIZER_MAX_VOCAB)
        return lq_error_set(err, LQ_EFORMAT, "%s: more than %d pieces", label,
                            LQ_TOKENIZER_MAX_VOCAB);
    int id = tokenizer->vocab_size;
    if (length == 0) return lq_error_set(err, LQ_EFORMAT, "%s: piece %d is empty", label, id);
    if (length > LQ_TOKENIZER_MAX_PIECE_BYTES)
        return lq_error_set(err, LQ_EFORMAT, "%s: piece %d is %zu bytes, over the %d-byte limit",
                            label, id, length, LQ_TOKENIZER_MAX_PIECE_BYTES);
    /* Piece texts are C strings to callers (lq_tokenizer_piece); SentencePiece refuses NUL. */
    if (memchr(text, '\0', length))
        return lq_error_set(err, LQ_EFORMAT, "%s: piece %d contains a NUL byte", label, id);
    /* NaN would make the merge order depend on where it sits in the heap. */
    if (!isfinite(score))
        return lq_error_set(err, LQ_EFORMAT, "%s: piece %d has a non-finite score", label, id);
    if (type < LQ_TOKEN_NORMAL || type > LQ_TOKEN_BYTE)
        return lq_error_set(err, LQ_EFORMAT, "%s: piece %d has unknown type %d", label, id, type);
    if (id + 1 >= tokenizer->capacity) {
        int capacity = tokenizer->capacity ? tokenizer->capacity * 2 : 1024;
        uint32_t *offsets = realloc(tokenizer->offsets, (size_t)(capacity + 1) * sizeof *offsets);
        if (offsets) tokenizer->offsets = offsets;
        float *scores = realloc(tokenizer->scores, (size_t)capacity * sizeof *scores);
        if (scores) tokenizer->scores = scores;
        uint8_t *types = realloc(tokenizer->types, (size_t)capacity);
        if (types) tokenizer->types = types;
        if (!offsets || !scores || !types)
            return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for %d pieces", label, capacity);
        tokenizer->capacity = capacity;
        if (id == 0) tokenizer->offsets[0] = 0;
    }
    if (tokenizer->text_size + length + 1 > tokenizer->text_capacity) {
        size_t capacity = tokenizer->text_capacity ? tokenizer->text_capacity : 65536;
        while (capacity < tokenizer->text_size + length + 1) capacity *= 2;
        if (capacity > UINT32_MAX)
            return lq_error_set(err, LQ_EFORMAT, "%s: pieces exceed 4 GiB of text", label);
        char *bigger = realloc(tokenizer->text, capacity);
        if (!bigger) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for piece text", label);
        tokenizer->text = bigger;
        tokenizer->text_capacity = capacity;
    }
    memcpy(tokenizer->text + tokenizer->text_size, text, length);
    tokenizer->text_size += length;
    tokenizer->text[tokenizer->text_size++] = '\0';
    tokenizer->offsets[id + 1] = (uint32_t)tokenizer->text_size;
    tokenizer->scores[id] = score;
    tokenizer->types[id] = (uint8_t)type;
    tokenizer->vocab_size = id + 1;
    return LQ_OK;
}

static const char *piece_text(const struct lq_tokenizer *tokenizer, int id, size_t *length) {
    uint32_t begin = tokenizer->offsets[id];
    *length = tokenizer->offsets[id + 1] - begin - 1;
    return tokenizer->text + begin;
}

static uint64_t hash_bytes(const char *text, size_t length) { /* FNV-1a */
    uint64_t hash = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < length; i++) hash = (hash ^ (uint8_t)text[i]) * 0x100000001b3ull;
    return hash ^ (hash >> 29);
}

int lq_tokenizer_find(const struct lq_tokenizer *tokenizer, const char *text, size_t length) {
    if (length == 0 || length > tokenizer->max_piece_length) return -1;
    for (size_t slot = hash_bytes(text, length) & tokenizer->index_mask;;
         slot = (slot + 1) & tokenizer->index_mask) {
        uint32_t entry = tokenizer->index[slot];
        if (entry == 0) return -1;
        size_t piece_length;
        const char *piece = piece_text(tokenizer, (int)entry - 1, &piece_length);
        if (piece_length == length && memcmp(piece, text, length) == 0) return (int)entry - 1;
    }
}

void lq_tokenizer_byte_piece(unsigned value, char buffer[7]) {
    static const char hex[] = "0123456789ABCDEF";
    memcpy(buffer, "<0x", 3);
    buffer[3] = hex[(value >> 4) & 15];
    buffer[4] = hex[value & 15];
    buffer[5] = '>';
    buffer[6] = '\0';
}

/* Byte value of "<0xNN>" (uppercase hex, as SentencePiece's ByteToPiece writes it), or -1. */
static int parse_byte_piece(const char *piece, size_t length) {
    if (length != 6 || memcmp(piece, "<0x", 3) != 0 || piece[5] != '>') return -1;
    int value = 0;
    for (int i = 3; i < 5; i++) {
        char c = piece[i];
        int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (digit < 0) return -1;
        value = value * 16 + digit;
    }
    return value;
}

static int build_index(struct lq_tokenizer *tokenizer, const char *label, struct lq_error *err) {
    size_t slots = 16;
    while (slots < (size_t)tokenizer->vocab_size * 2) slots *= 2;
    tokenizer->index = calloc(slots, sizeof *tokenizer->index);
    if (!tokenizer->index)
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for the piece index", label);
    tokenizer->index_mask = slots - 1;
    for (int id = 0; id < tokenizer->vocab_size; id++) {
        size_t length;
        const char *piece = piece_text(tokenizer, id, &length);
        int existing = lq_tokenizer_find(tokenizer, piece, length);
        /* SentencePiece refuses duplicates too: one text must map to one id. */
        if (existing >= 0)
            return lq_error_set(err, LQ_EFORMAT, "%s: pieces %d and %d are both \"%.*s\"", label,
                                existing, id, (int)(length > 64 ? 64 : length), piece);
        size_t slot = hash_bytes(piece, length) & tokenizer->index_mask;
        while (tokenizer->index[slot]) slot = (slot + 1) & tokenizer->index_mask;
        tokenizer->index[slot] = (uint32_t)id + 1;
    }
    return LQ_OK;
}

static int build_bytes(struct lq_tokenizer *tokenizer, const char *label, struct lq_error *err) {
    int count = 0;
    tokenizer->byte_values = calloc((size_t)(unsigned)tokenizer->vocab_size, 1);
    if (!tokenizer->byte_values)
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for byte pieces", label);
    for (int id = 0; id < tokenizer->vocab_size; id++) {
        if (tokenizer->types[id] != LQ_TOKEN_BYTE) continue;
        size_t length;
        const char *piece = piece_text(tokenizer, id, &length);
        int value = parse_byte_piece(piece, length);
        if (value < 0)
            return lq_error_set(err, LQ_EFORMAT, "%s: byte piece %d is \"%.*s\", not <0xNN>", label,
                                id, (int)(length > 64 ? 64 : length), piece);
        tokenizer->byte_ids[value] = id;
        tokenizer->byte_values[id] = (uint8_t)value;
        count++;
    }
    if (count > 0 && !tokenizer->byte_fallback)
        return lq_error_set(err, LQ_EFORMAT, "%s: has byte pieces but byte fallback is off", label);
    if (tokenizer->byte_fallback && count != 256)
        return lq_error_set(err, LQ_EFORMAT,
                            "%s: byte fallback needs the 256 pieces <0x00>..<0xFF>, found %d",
                            label, count);
    return LQ_OK;
}

static int build_user_defined(struct lq_tokenizer *tokenizer, const char *label,
                              struct lq_error *err) {
    uint32_t counts[256] = {0};
    size_t total = 0;
    for (int id = 0; id < tokenizer->vocab_size; id++) {
        if (tokenizer->types[id] != LQ_TOKEN_USER_DEFINED) continue;
        counts[(uint8_t)tokenizer->text[tokenizer->offsets[id]]]++;
        total++;
    }
    tokenizer->user_first[0] = 0;
    for (int b = 0; b < 256; b++)
        tokenizer->user_first[b + 1] = tokenizer->user_first[b] + counts[b];
    if (total == 0) return LQ_OK;
    tokenizer->user_ids = malloc(total * sizeof *tokenizer->user_ids);
    if (!tokenizer->user_ids)
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for user-defined pieces", label);
    uint32_t fill[256];
    memcpy(fill, tokenizer->user_first, sizeof fill);
    for (int id = 0; id < tokenizer->vocab_size; id++) {
        if (tokenizer->types[id] != LQ_TOKEN_USER_DEFINED) continue;
        uint8_t first = (uint8_t)tokenizer->text[tokenizer->offsets[id]];
        /* Insertion keeps each bucket longest first, so the first match is the longest. */
        uint32_t at = fill[first]++;
        size_t length, other;
        piece_text(tokenizer, id, &length);
        while (at > tokenizer->user_first[first] &&
               (piece_text(tokenizer, tokenizer->user_ids[at - 1], &other), other < length)) {
            tokenizer->user_ids[at] = tokenizer->user_ids[at - 1];
            at--;
        }
        tokenizer->user_ids[at] = id;
    }
    return LQ_OK;
}

uint32_t lq_tokenizer_char_key(const char *text, size_t length) {
    if (length == 0 || length > 4) return 0;
    uint32_t key = 0;
    for (size_t i = 0; i < length; i++) key = key << 8 | (uint8_t)text[i];
    return key;
}

static uint64_t hash_key(uint64_t key) {
    key *= 0x9e3779b97f4a7c15ull;
    return key ^ (key >> 29);
}

bool lq_tokenizer_bigram_find(const struct lq_tokenizer *tokenizer, uint32_t a, uint32_t b) {
    uint64_t key = (uint64_t)a << 32 | b;
    for (size_t slot = hash_key(key) & tokenizer->bigrams_mask;;
         slot = (slot + 1) & tokenizer->bigrams_mask) {
        if (tokenizer->bigrams[slot] == key) return true;
        if (tokenizer->bigrams[slot] == 0) return false;
    }
}

static bool bigram_insert(struct lq_tokenizer *tokenizer, uint64_t key) {
    size_t slot = hash_key(key) & tokenizer->bigrams_mask;
    while (tokenizer->bigrams[slot] != 0 && tokenizer->bigrams[slot] != key)
        slot = (slot + 1) & tokenizer->bigrams_mask;
    if (tokenizer->bigrams[slot] == 0) {
        tokenizer->bigrams[slot] = key;
        tokenizer->bigram_count++;
    }
    /* Grow at half full, so that probes stay short and an empty slot always exists. */
    if (tokenizer->bigram_count * 2 <= tokenizer->bigrams_mask + 1) return true;
    size_t old_slots = tokenizer->bigrams_mask + 1;
    uint64_t *old = tokenizer->bigrams;
    tokenizer->bigrams = calloc(old_slots * 2, sizeof *old);
    if (!tokenizer->bigrams) {
        tokenizer->bigrams = old;
        return false;
    }
    tokenizer->bigrams_mask = old_slots * 2 - 1;
    tokenizer->bigram_count = 0;
    for (size_t i = 0; i < old_slots; i++)
        if (old[i]) bigram_insert(tokenizer, old[i]);
    free(old);
    return true;
}

static bool add_piece_bigrams(struct lq_tokenizer *tokenizer, int id) {
    size_t length;
    const char *piece = piece_text(tokenizer, id, &length);
    uint32_t previous = 0;
    for (size_t at = 0; at < length;) {
        size_t n = lq_tokenizer_utf8_length((const unsigned char *)piece + at, length - at);
        uint32_t key = lq_tokenizer_char_key(piece + at, n);
        if (at > 0 && !bigram_insert(tokenizer, (uint64_t)previous << 32 | key)) return false;
        previous = key;
        at += n;
    }
    return true;
}

static bool mergeable(int type) {
    return type == LQ_TOKEN_NORMAL || type == LQ_TOKEN_USER_DEFINED || type == LQ_TOKEN_UNUSED;
}

/* Character pairs of the pieces merges can produce: SentencePiece merges into NORMAL,
 * USER_DEFINED and UNUSED pieces (HF merges into others are added by set_merges). */
static int build_bigrams(struct lq_tokenizer *tokenizer, const char *label, struct lq_error *err) {
    tokenizer->bigrams = calloc(1024, sizeof *tokenizer->bigrams);
    if (!tokenizer->bigrams) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    tokenizer->bigrams_mask = 1023;
    for (int id = 0; id < tokenizer->vocab_size; id++)
        if (mergeable(tokenizer->types[id]) && !add_piece_bigrams(tokenizer, id))
            return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    return LQ_OK;
}

int lq_tokenizer_finish(struct lq_tokenizer *tokenizer, const char *label, struct lq_error *err) {
    if (tokenizer->vocab_size == 0)
        return lq_error_set(err, LQ_EFORMAT, "%s: the vocabulary is empty", label);
    tokenizer->max_piece_length = 0;
    for (int id = 0; id < tokenizer->vocab_size; id++) {
        size_t length;
        piece_text(tokenizer, id, &length);
        if (length > tokenizer->max_piece_length) tokenizer->max_piece_length = length;
        if (tokenizer->types[id] == LQ_TOKEN_UNUSED) tokenizer->has_unused = true;
        if (tokenizer->types[id] == LQ_TOKEN_UNKNOWN && id != tokenizer->unk_id)
            return lq_error_set(err, LQ_EFORMAT, "%s: piece %d is a second <unk> (first: %d)",
                                label, id, tokenizer->unk_id);
    }
    int rc = build_index(tokenizer, label, err);
    if (rc == LQ_OK) rc = build_bytes(tokenizer, label, err);
    if (rc == LQ_OK) rc = build_user_defined(tokenizer, label, err);
    if (rc == LQ_OK) rc = build_bigrams(tokenizer, label, err);
    if (rc != LQ_OK) return rc;
    if (!tokenizer->byte_fallback && tokenizer->unk_id < 0 && !tokenizer->bpe)
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: has neither byte fallback nor an <unk> piece, so unknown "
                            "characters could not be encoded",
                            label);
    if (!tokenizer->unk_surface) {
        tokenizer->unk_surface = strdup(default_unk_surface);
        if (!tokenizer->unk_surface)
            return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
    }
    /* Decoding never lengthens a piece ("▁" -> " " shrinks it); <unk> has its own surface. */
    size_t surface = strlen(tokenizer->unk_surface);
    tokenizer->max_decoded_size =
        (tokenizer->max_piece_length > surface ? tokenizer->max_piece_length : surface) + 1;
    return LQ_OK;
}

static uint64_t hash_pair(int32_t left, int32_t right) {
    uint64_t z = ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) * 0x9e3779b97f4a7c15ull;
    return z ^ (z >> 31);
}

int lq_tokenizer_set_merges(struct lq_tokenizer *tokenizer, const int32_t *pairs, size_t count,
                            const char *label, struct lq_error *err) {
    size_t slots = 16;
    while (slots < count * 2 + 2) slots *= 2;
    free(tokenizer->merges);
    tokenizer->merges = malloc(slots * sizeof *tokenizer->merges);
    if (!tokenizer->merges)
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for %zu merges", label, count);
    for (size_t i = 0; i < slots; i++) tokenizer->merges[i].left = -1;
    tokenizer->merges_mask = slots - 1;
    for (size_t i = 0; i < count; i++) {
        int32_t left = pairs[3 * i], right = pairs[3 * i + 1];
        size_t slot = hash_pair(left, right) & tokenizer->merges_mask;
        while (tokenizer->merges[slot].left >= 0 &&
               (tokenizer->merges[slot].left != left || tokenizer->merges[slot].right != right))
            slot = (slot + 1) & tokenizer->merges_mask;
        tokenizer->merges[slot] =
            (struct lq_tokenizer_merge){left, right, pairs[3 * i + 2], (int32_t)i};
        if (!tokenizer->bigrams) continue;
        /* A merge of byte or <unk> pieces joins spans whose text is not the pieces' text, so
         * character pairs no longer tell where merges can happen: no segmenting then. */
        int left_type = tokenizer->types[left], right_type = tokenizer->types[right];
        if (left_type == LQ_TOKEN_BYTE || left_type == LQ_TOKEN_UNKNOWN ||
            right_type == LQ_TOKEN_BYTE || right_type == LQ_TOKEN_UNKNOWN) {
            free(tokenizer->bigrams);
            tokenizer->bigrams = NULL;
        } else if (!mergeable(tokenizer->types[pairs[3 * i + 2]]) &&
                   !add_piece_bigrams(tokenizer, pairs[3 * i + 2])) {
            return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label);
        }
    }
    return LQ_OK;
}

bool lq_tokenizer_merge_find(const struct lq_tokenizer *tokenizer, int left, int right,
                             int32_t *rank, int32_t *merged) {
    for (size_t slot = hash_pair(left, right) & tokenizer->merges_mask;;
         slot = (slot + 1) & tokenizer->merges_mask) {
        const struct lq_tokenizer_merge *entry = &tokenizer->merges[slot];
        if (entry->left < 0) return false;
        if (entry->left == left && entry->right == right) {
            *rank = entry->rank;
            *merged = entry->merged;
            return true;
        }
    }
}

size_t lq_tokenizer_utf8_length(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t length;
    unsigned low = 0x80, high = 0xBF; /* allowed range of the second byte */
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        length = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        length = 3;
        if (c == 0xE0) low = 0xA0;  /* overlong */
        if (c == 0xED) high = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        length = 4;
        if (c == 0xF0) low = 0x90;  /* overlong */
        if (c == 0xF4) high = 0x8F; /* past U+10FFFF */
    } else {
        return 1;
    }
    if (n < length || s[1] < low || s[1] > high) return 1;
    for (size_t i = 2; i < length; i++)
        if ((s[i] & 0xC0) != 0x80) return 1;
    return length;
}

int lq_tokenizer_vocab_size(const struct lq_tokenizer *tokenizer) {
    return tokenizer->vocab_size;
}

int lq_tokenizer_bos_id(const struct lq_tokenizer *tokenizer) {
    return tokenizer->bos_id;
}

int lq_tokenizer_eos_id(const struct lq_tokenizer *tokenizer) {
    return tokenizer->eos_id;
}

int lq_tokenizer_unk_id(const struct lq_tokenizer *tokenizer) {
    return tokenizer->unk_id;
}

const char *lq_tokenizer_piece(const struct lq_tokenizer *tokenizer, int id) {
    if (!tokenizer || id < 0 || id >= tokenizer->vocab_size) return NULL;
    return tokenizer->text + tokenizer->offsets[id];
}

int lq_tokenizer_piece_type(const struct lq_tokenizer *tokenizer, int id) {
    if (!tokenizer || id < 0 || id >= tokenizer->vocab_size) return LQ_EINVAL;
    return tokenizer->types[id];
}

size_t lq_tokenizer_max_piece_size(const struct lq_tokenizer *tokenizer) {
    return tokenizer->max_decoded_size;
}

/* The bytes piece `id` decodes to after `previous`, written to out unless NULL; returns the
 * count. The dummy prefix goes where SentencePiece's decoder drops it: from the first piece
 * of the text, i.e. at the start or after control tokens such as BOS. */
static size_t decode_one(const struct lq_tokenizer *tokenizer, int previous, int id, char *out) {
    if (tokenizer->bpe) return lq_tokenizer_bpe_decode_one(tokenizer, id, out);
    switch (tokenizer->types[id]) {
    case LQ_TOKEN_CONTROL:
        return 0;
    case LQ_TOKEN_UNKNOWN: {
        size_t length = strlen(tokenizer->unk_surface);
        if (out) memcpy(out, tokenizer->unk_surface, length);
        return length;
    }
    case LQ_TOKEN_BYTE:
        if (out) out[0] = (char)tokenizer->byte_values[id];
        return 1;
    default:
        break;
    }
    size_t length;
    const char *piece = piece_text(tokenizer, id, &length);
    const size_t space = LQ_TOKENIZER_SPACE_BYTES;
    bool first = previous < 0 || tokenizer->types[previous] == LQ_TOKEN_CONTROL;
    if (first && (tokenizer->add_dummy_prefix || tokenizer->remove_extra_whitespaces) &&
        length >= space && memcmp(piece, LQ_TOKENIZER_SPACE, space) == 0) {
        piece += space;
        length -= space;
    }
    size_t written = 0;
    for (size_t i = 0; i < length;) {
        if (length - i >= space && memcmp(piece + i, LQ_TOKENIZER_SPACE, space) == 0) {
            if (out) out[written] = ' ';
            i += space;
        } else {
            if (out) out[written] = piece[i];
            i++;
        }
        written++;
    }
    return written;
}

int lq_tokenizer_decode_piece(const struct lq_tokenizer *tokenizer, int previous, int id,
                              char *buffer, size_t size) {
    if (!tokenizer || id < 0 || id >= tokenizer->vocab_size || previous < -1 ||
        previous >= tokenizer->vocab_size)
        return LQ_EINVAL;
    size_t length = decode_one(tokenizer, previous, id, NULL);
    if (!buffer && size == 0) return (int)length;
    if (!buffer || size < length + 1) return LQ_EINVAL;
    decode_one(tokenizer, previous, id, buffer);
    buffer[length] = '\0';
    return (int)length;
}

int lq_tokenizer_decode_bytes(const struct lq_tokenizer *tokenizer, const int *ids, size_t count,
                              char **text, size_t *length, struct lq_error *err) {
    if (!tokenizer || !text || (count > 0 && !ids))
        return lq_error_set(err, LQ_EINVAL, "tokenizer decode: missing argument");
    *text = NULL;
    size_t total = 0;
    for (size_t i = 0; i < count; i++) {
        if (ids[i] < 0 || ids[i] >= tokenizer->vocab_size)
            return lq_error_set(err, LQ_EINVAL,
                                "tokenizer decode: id %d at position %zu is "
                                "outside the vocabulary of %d",
                                ids[i], i, tokenizer->vocab_size);
        total += decode_one(tokenizer, i ? ids[i - 1] : -1, ids[i], NULL);
    }
    char *result = malloc(total + 1);
    if (!result)
        return lq_error_set(err, LQ_ENOMEM, "tokenizer decode: out of memory for %zu bytes", total);
    size_t at = 0;
    for (size_t i = 0; i < count; i++)
        at += decode_one(tokenizer, i ? ids[i - 1] : -1, ids[i], result + at);
    result[at] = '\0';
    *text = result;
    if (length) *length = at;
    return LQ_OK;
}

int lq_tokenizer_decode(const struct lq_tokenizer *tokenizer, const int *ids, size_t count,
                        char **text, struct lq_error *err) {
    return lq_tokenizer_decode_bytes(tokenizer, ids, count, text, NULL, err);
}
