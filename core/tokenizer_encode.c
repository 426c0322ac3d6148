/* Encoding: SentencePiece's normalization (spaces to "▁", the dummy prefix), the split into
 * characters, then BPE: repeatedly merge the adjacent pair with the best priority, kept in a
 * binary heap so that a line of n characters takes O(n log n) (the naive rescan is O(n^2)),
 * one heap per stretch of text that no merge can cross (see crossable).
 * The priority is the merged piece's score for SentencePiece files (bpe_model.cc) and the
 * pair's rank in "merges" for tokenizer.json (HF tokenizers' Word::merge_all); ties go to the
 * leftmost pair in both. */
#include "core/tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

/* Offsets into the normalized text (up to 3 bytes per input byte) must fit 31 bits. */
#define MAX_TEXT_BYTES ((size_t)1 << 28)

struct symbol {
    uint32_t start, length; /* a span of the normalized text; length 0 once merged away */
    int32_t prev, next;     /* neighbours still alive, -1 at the ends */
    int32_t id;             /* piece id with HF merges; -1 when unknown */
    bool frozen;            /* a user-defined piece: never merged */
    bool unknown;           /* HF: a run of unknown characters fused into one <unk> */
};

struct candidate {
    double priority; /* higher merges first */
    int32_t left, right;
    uint32_t length; /* of the merged span: stale once either side has changed */
    int32_t merged;
};

struct encoder {
    const struct lq_tokenizer *tokenizer;
    const char *text; /* normalized */
    size_t length;
    struct symbol *symbols;
    size_t symbol_count;
    struct candidate *heap;
    size_t heap_count, heap_capacity;
    /* SentencePiece's rev_merge for UNUSED pieces: the last pair seen to form piece id was
     * text[rev_start[id] ..) split after rev_left[id] bytes (0: never formed). */
    uint32_t *rev_start, *rev_left;
    uint32_t *stack; /* spans waiting to be resegmented, as (start, length) */
    size_t stack_count, stack_capacity;
    int *ids;
    size_t count;
    bool previous_unknown;
};

/* SentencePiece's Normalizer::Normalize for the identity rule set. */
static char *normalize(const struct lq_tokenizer *tokenizer, const char *text, size_t length,
                       size_t *normalized_length) {
    char *out = malloc(length * 3 + 4);
    if (!out) return NULL;
    const char *space = tokenizer->escape_whitespaces ? LQ_TOKENIZER_SPACE : " ";
    size_t space_bytes = tokenizer->escape_whitespaces ? LQ_TOKENIZER_SPACE_BYTES : 1;
    size_t i = 0, n = 0;
    if (tokenizer->remove_extra_whitespaces)
        while (i < length && text[i] == ' ') i++;
    if (i == length) {
        *normalized_length = 0;
        return out;
    }
    if (tokenizer->add_dummy_prefix) {
        /* HF's Metaspace prepends only to text that does not already start with a space. */
        bool starts_with_space =
            text[i] == ' ' || (length - i >= LQ_TOKENIZER_SPACE_BYTES &&
                               memcmp(text + i, LQ_TOKENIZER_SPACE, LQ_TOKENIZER_SPACE_BYTES) == 0);
        if (!tokenizer->prefix_if_missing || !starts_with_space) {
            memcpy(out + n, space, space_bytes);
            n += space_bytes;
        }
    }
    bool previous_space = tokenizer->remove_extra_whitespaces;
    for (; i < length; i++) {
        if (text[i] == ' ') {
            if (tokenizer->remove_extra_whitespaces && previous_space) continue;
            memcpy(out + n, space, space_bytes);
            n += space_bytes;
            previous_space = true;
        } else {
            out[n++] = text[i];
            previous_space = false;
        }
    }
    if (tokenizer->remove_extra_whitespaces)
        while (n >= space_bytes && memcmp(out + n - space_bytes, space, space_bytes) == 0)
            n -= space_bytes;
    *normalized_length = n;
    return out;
}

static void push_symbol(struct encoder *encoder, size_t start, size_t length, int id, bool frozen,
                        bool unknown) {
    size_t index = encoder->symbol_count++;
    encoder->symbols[index] = (struct symbol){
        .start = (uint32_t)start,
        .length = (uint32_t)length,
        .prev = (int32_t)index - 1,
        .next = -1,
        .id = id,
        .frozen = frozen,
        .unknown = unknown,
    };
    if (index > 0) encoder->symbols[index - 1].next = (int32_t)index;
}

/* Longest user-defined piece at text[at..], or 0 (SentencePiece's PrefixMatcher). */
static size_t match_user_defined(const struct lq_tokenizer *tokenizer, const char *text,
                                 size_t left, int *id) {
    uint8_t first = (uint8_t)text[0];
    for (uint32_t k = tokenizer->user_first[first]; k < tokenizer->user_first[first + 1]; k++) {
        const char *piece = lq_tokenizer_piece(tokenizer, tokenizer->user_ids[k]);
        size_t length = tokenizer->offsets[tokenizer->user_ids[k] + 1] -
                        tokenizer->offsets[tokenizer->user_ids[k]] - 1;
        if (length <= left && memcmp(piece, text, length) == 0) {
            *id = tokenizer->user_ids[k];
            return length;
        }
    }
    return 0;
}

/* Splits the normalized text into characters (user-defined pieces whole). With HF merges each
 * symbol also gets its id now: unknown characters become byte pieces or <unk>, as in
 * tokenizers' BPE::merge_word, before any merge. */
static void split(struct encoder *encoder) {
    const struct lq_tokenizer *tokenizer = encoder->tokenizer;
    const char *text = encoder->text;
    for (size_t at = 0; at < encoder->length;) {
        int id = -1;
        size_t length = 0;
        if (tokenizer->user_ids)
            length = match_user_defined(tokenizer, text + at, encoder->length - at, &id);
        if (length > 0) {
            push_symbol(encoder, at, length, id, true, false);
            at += length;
            continue;
        }
        length = lq_tokenizer_utf8_length((const unsigned char *)text + at, encoder->length - at);
        if (tokenizer->merges) {
            id = lq_tokenizer_find(tokenizer, text + at, length);
            if (id < 0 && tokenizer->byte_fallback) {
                for (size_t k = 0; k < length; k++)
                    push_symbol(encoder, at + k, 1, tokenizer->byte_ids[(uint8_t)text[at + k]],
                                false, false);
                at += length;
                continue;
            }
            if (id < 0) {
                struct symbol *last =
                    encoder->symbol_count ? &encoder->symbols[encoder->symbol_count - 1] : NULL;
                if (tokenizer->fuse_unk && last && last->unknown) {
                    last->length += (uint32_t)length;
                    at += length;
                    continue;
                }
                push_symbol(encoder, at, length, tokenizer->unk_id, false, true);
                at += length;
                continue;
            }
        }
        push_symbol(encoder, at, length, id, false, false);
        at += length;
    }
}

static bool before(const struct candidate *a, const struct candidate *b) {
    return a->priority > b->priority || (a->priority == b->priority && a->left < b->left);
}

static int heap_push(struct encoder *encoder, struct candidate candidate) {
    if (encoder->heap_count == encoder->heap_capacity) {
        size_t capacity = encoder->heap_capacity ? encoder->heap_capacity * 2 : 64;
        struct candidate *bigger = realloc(encoder->heap, capacity * sizeof *bigger);
        if (!bigger) return LQ_ENOMEM;
        encoder->heap = bigger;
        encoder->heap_capacity = capacity;
    }
    struct candidate *heap = encoder->heap;
    size_t at = encoder->heap_count++;
    while (at > 0 && before(&candidate, &heap[(at - 1) / 2])) {
        heap[at] = heap[(at - 1) / 2];
        at = (at - 1) / 2;
    }
    heap[at] = candidate;
    return LQ_OK;
}

static struct candidate heap_pop(struct encoder *encoder) {
    struct candidate *heap = encoder->heap;
    struct candidate top = heap[0], last = heap[--encoder->heap_count];
    size_t at = 0, count = encoder->heap_count;
    for (;;) {
        size_t child = 2 * at + 1;
        if (child >= count) break;
        if (child + 1 < count && before(&heap[child + 1], &heap[child])) child++;
        if (!before(&heap[child], &last)) break;
        heap[at] = heap[child];
        at = child;
    }
    if (count > 0) heap[at] = last;
    return top;
}

/* Queues the merge of neighbours left and right if they form a piece (SentencePiece: any
 * NORMAL, USER_DEFINED or UNUSED piece, by its score) or a listed pair (HF: by its rank). */
static int consider(struct encoder *encoder, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return LQ_OK;
    const struct lq_tokenizer *tokenizer = encoder->tokenizer;
    const struct symbol *l = &encoder->symbols[left], *r = &encoder->symbols[right];
    if (l->frozen || r->frozen) return LQ_OK;
    uint32_t length = l->length + r->length;
    struct candidate candidate = {.left = left, .right = right, .length = length};
    if (tokenizer->merges) {
        int32_t rank;
        if (l->id < 0 || r->id < 0 ||
            !lq_tokenizer_merge_find(tokenizer, l->id, r->id, &rank, &candidate.merged))
            return LQ_OK;
        candidate.priority = -(double)rank;
        return heap_push(encoder, candidate);
    }
    int id = lq_tokenizer_find(tokenizer, encoder->text + l->start, length);
    if (id < 0) return LQ_OK;
    int type = tokenizer->types[id];
    if (type != LQ_TOKEN_NORMAL && type != LQ_TOKEN_USER_DEFINED && type != LQ_TOKEN_UNUSED)
        return LQ_OK;
    candidate.merged = id;
    candidate.priority = tokenizer->scores[id];
    if (type == LQ_TOKEN_UNUSED) {
        if (!encoder->rev_start) {
            size_t size = (size_t)tokenizer->vocab_size;
            encoder->rev_start = malloc(size * sizeof *encoder->rev_start);
            encoder->rev_left = calloc(size, sizeof *encoder->rev_left);
            if (!encoder->rev_start || !encoder->rev_left) return LQ_ENOMEM;
        }
        encoder->rev_start[id] = l->start;
        encoder->rev_left[id] = l->length;
    }
    return heap_push(encoder, candidate);
}

/* Runs BPE on symbols [begin, end), whose ends no merge can cross. */
static int merge_segment(struct encoder *encoder, size_t begin, size_t end) {
    int rc = LQ_OK;
    encoder->symbols[begin].prev = -1;
    encoder->symbols[end - 1].next = -1;
    encoder->heap_count = 0;
    for (size_t i = begin + 1; i < end && rc == LQ_OK; i++)
        rc = consider(encoder, (int32_t)i - 1, (int32_t)i);
    while (rc == LQ_OK && encoder->heap_count > 0) {
        struct candidate top = heap_pop(encoder);
        struct symbol *l = &encoder->symbols[top.left], *r = &encoder->symbols[top.right];
        /* Spans only grow, so an unchanged total length means both sides are as queued. */
        if (l->length == 0 || r->length == 0 || l->length + r->length != top.length) continue;
        l->length += r->length;
        l->id = top.merged;
        l->next = r->next;
        if (r->next >= 0) encoder->symbols[r->next].prev = top.left;
        r->length = 0;
        rc = consider(encoder, l->prev, top.left);
        if (rc == LQ_OK) rc = consider(encoder, top.left, l->next);
    }
    return rc;
}

/* Whether any merge could join symbols i - 1 and i: only if their characters meet inside
 * some piece (tokenizer->bigrams). Cutting elsewhere keeps each heap to about a word. */
static bool crossable(const struct encoder *encoder, size_t i) {
    const struct lq_tokenizer *tokenizer = encoder->tokenizer;
    /* UNUSED pieces are split back by the last pair seen to form them anywhere in the text
     * (SentencePiece's rev_merge), which depends on the global order of merges. */
    if (!tokenizer->bigrams || tokenizer->has_unused) return true;
    const struct symbol *l = &encoder->symbols[i - 1], *r = &encoder->symbols[i];
    if (l->frozen || r->frozen) return false;
    uint32_t a = lq_tokenizer_char_key(encoder->text + l->start, l->length);
    uint32_t b = lq_tokenizer_char_key(encoder->text + r->start, r->length);
    return a && b && lq_tokenizer_bigram_find(tokenizer, a, b);
}

static int merge_all(struct encoder *encoder) {
    int rc = LQ_OK;
    size_t begin = 0, count = encoder->symbol_count;
    for (size_t i = 1; i <= count && rc == LQ_OK; i++) {
        if (i < count && crossable(encoder, i)) continue;
        rc = merge_segment(encoder, begin, i);
        begin = i;
    }
    return rc;
}

/* One final piece: known ids as they are, unknown ones as byte pieces or one <unk> per run
 * (SentencePiece's PopulateSentencePieceText). An UNUSED piece left whole counts as unknown,
 * as sentencepiece 0.2 does. */
static void emit(struct encoder *encoder, size_t start, size_t length, int id) {
    const struct lq_tokenizer *tokenizer = encoder->tokenizer;
    if (id >= 0 && tokenizer->types[id] != LQ_TOKEN_UNKNOWN &&
        tokenizer->types[id] != LQ_TOKEN_UNUSED) {
        encoder->ids[encoder->count++] = id;
        encoder->previous_unknown = false;
    } else if (tokenizer->byte_fallback) {
        for (size_t k = 0; k < length; k++)
            encoder->ids[encoder->count++] = tokenizer->byte_ids[(uint8_t)encoder->text[start + k]];
    } else {
        if (!encoder->previous_unknown) encoder->ids[encoder->count++] = tokenizer->unk_id;
        encoder->previous_unknown = true;
    }
}

/* Emits a span, splitting UNUSED pieces back into the pair that formed them (bpe_model.cc's
 * resegment), depth first, left before right. */
static int emit_resegmented(struct encoder *encoder, uint32_t start, uint32_t length) {
    const struct lq_tokenizer *tokenizer = encoder->tokenizer;
    encoder->stack_count = 0;
    for (;;) {
        int id = lq_tokenizer_find(tokenizer, encoder->text + start, length);
        if (id >= 0 && tokenizer->types[id] == LQ_TOKEN_UNUSED && encoder->rev_left &&
            encoder->rev_left[id] > 0) {
            uint32_t left = encoder->rev_left[id];
            if (encoder->stack_count + 2 > encoder->stack_capacity) {
                size_t capacity = encoder->stack_capacity ? encoder->stack_capacity * 2 : 64;
                uint32_t *bigger = realloc(encoder->stack, capacity * sizeof *bigger);
                if (!bigger) return LQ_ENOMEM;
                encoder->stack = bigger;
                encoder->stack_capacity = capacity;
            }
            /* The pair's text equals this span's, so its halves can be read from here. */
            encoder->stack[encoder->stack_count++] = start + left;
            encoder->stack[encoder->stack_count++] = length - left;
            length = left;
            continue;
        }
        emit(encoder, start, length, id);
        if (encoder->stack_count == 0) return LQ_OK;
        length = encoder->stack[--encoder->stack_count];
        start = encoder->stack[--encoder->stack_count];
    }
}

static int encode_normalized(struct encoder *encoder) {
    const struct lq_tokenizer *tokenizer = encoder->tokenizer;
    encoder->symbols = malloc((encoder->length ? encoder->length : 1) * sizeof *encoder->symbols);
    if (!encoder->symbols) return LQ_ENOMEM;
    split(encoder);
    int rc = merge_all(encoder);
    /* Merged-away symbols have length 0; the rest are in text order. */
    for (size_t i = 0; rc == LQ_OK && i < encoder->symbol_count; i++) {
        const struct symbol *symbol = &encoder->symbols[i];
        if (symbol->length == 0) continue;
        if (tokenizer->merges)
            encoder->ids[encoder->count++] = symbol->id;
        else
            rc = emit_resegmented(encoder, symbol->start, symbol->length);
    }
    return rc;
}

int lq_tokenizer_encode(const struct lq_tokenizer *tokenizer, const char *text, size_t length,
                        int add_bos, int **ids, size_t *count, struct lq_error *err) {
    if (!tokenizer || !ids || !count || (length > 0 && !text))
        return lq_error_set(err, LQ_EINVAL, "tokenizer encode: missing argument");
    if (tokenizer->bpe)
        return lq_tokenizer_bpe_encode(tokenizer, text, length, add_bos, ids, count, err);
    *ids = NULL;
    *count = 0;
    if (length > MAX_TEXT_BYTES)
        return lq_error_set(err, LQ_EINVAL,
                            "tokenizer encode: text of %zu bytes exceeds the %zu-byte limit",
                            length, MAX_TEXT_BYTES);
    struct encoder encoder = {.tokenizer = tokenizer};
    char *normalized = normalize(tokenizer, text, length, &encoder.length);
    encoder.text = normalized;
    /* Every id covers at least one normalized byte, so this bounds the output. */
    encoder.ids = malloc((encoder.length + 1) * sizeof *encoder.ids);
    int rc = normalized && encoder.ids ? LQ_OK : LQ_ENOMEM;
    if (rc == LQ_OK && add_bos && tokenizer->bos_id >= 0 && !tokenizer->bos_off)
        encoder.ids[encoder.count++] = tokenizer->bos_id;
    if (rc == LQ_OK) rc = encode_normalized(&encoder);
    free(normalized);
    free(encoder.symbols);
    free(encoder.heap);
    free(encoder.rev_start);
    free(encoder.rev_left);
    free(encoder.stack);
    if (rc != LQ_OK) {
        free(encoder.ids);
        return lq_error_set(err, rc, "tokenizer encode: out of memory for %zu bytes of text",
                            length);
    }
    *ids = encoder.ids;
    *count = encoder.count;
    return LQ_OK;
}
