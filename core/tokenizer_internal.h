/* Internals shared by the tokenizer's vocabulary and decoder (tokenizer.c), its encoder
 * (tokenizer_encode.c) and its file readers (tokenizer_load.c, tokenizer_json.c). */
#ifndef LQ_TOKENIZER_INTERNAL_H
#define LQ_TOKENIZER_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include "core/tokenizer.h"

/* Far above any real vocabulary (Llama 2: 32000, Gemma: 256000), small enough that ids,
 * offsets and hash slots fit 32 bits. */
#define LQ_TOKENIZER_MAX_VOCAB (1 << 24)
#define LQ_TOKENIZER_MAX_PIECE_BYTES 65536

/* "▁" (U+2581), SentencePiece's visible space. */
#define LQ_TOKENIZER_SPACE "\xe2\x96\x81"
#define LQ_TOKENIZER_SPACE_BYTES 3

struct lq_tokenizer_merge { /* one slot of the HF merge table: (left, right) -> merged */
    int32_t left, right, merged, rank;
};

struct lq_tokenizer {
    int vocab_size;
    /* Piece id's text is text[offsets[id] .. offsets[id + 1] - 1), followed by a NUL. */
    char *text;
    size_t text_size, text_capacity;
    uint32_t *offsets;
    float *scores;
    uint8_t *types; /* enum lq_token_type */
    int capacity;

    int unk_id, bos_id, eos_id;
    bool bos_off;           /* GGUF add_bos_token false: encode never prepends BOS */
    int byte_ids[256];      /* byte value -> id of <0xNN>, -1 when absent */
    uint8_t *byte_values;   /* id -> byte value, for BYTE pieces */
    bool byte_fallback;     /* unknown symbols become byte pieces (else one <unk> per run) */
    bool add_dummy_prefix;  /* prepend "▁" to non-empty text */
    bool prefix_if_missing; /* HF Metaspace: only when the text does not start with "▁" */
    bool escape_whitespaces;
    bool remove_extra_whitespaces;
    bool fuse_unk; /* HF: a run of unknown characters is one <unk> */
    char *unk_surface;
    size_t max_piece_length, max_decoded_size;
    bool has_unused;

    /* Open-addressing piece index: slot holds id + 1, 0 when empty. */
    uint32_t *index;
    size_t index_mask;

    /* Adjacent character pairs found inside mergeable pieces, each packed as two characters'
     * bytes (lq_tokenizer_char_key); 0 marks an empty slot. No merge can cross a boundary
     * between characters that never meet inside a piece, so the encoder runs BPE on the text
     * between such boundaries separately: small heaps, the same result. NULL when merges
     * can join pieces whose text is not their span (HF merges of byte pieces). */
    uint64_t *bigrams;
    size_t bigrams_mask, bigram_count;

    /* HF tokenizer.json: merges ranked by position; NULL for SentencePiece scores. */
    struct lq_tokenizer_merge *merges;
    size_t merges_mask;

    /* USER_DEFINED ids grouped by first byte, longest first: ids user_ids[user_first[b] ..
     * user_first[b + 1]) start with byte b. */
    int *user_ids;
    uint32_t user_first[257];

    /* Byte-level BPE (GPT-2, Llama 3: tokenizer_bpe.c); NULL for SentencePiece-style BPE. */
    struct lq_tokenizer_bpe *bpe;
};

/* An empty vocabulary with SentencePiece's defaults (dummy prefix, spaces escaped). */
struct lq_tokenizer *lq_tokenizer_new(void);
/* Appends the next piece (id = current vocab size). */
int lq_tokenizer_add_piece(struct lq_tokenizer *tokenizer, const char *text, size_t length,
                           float score, int type, const char *label, struct lq_error *err);
/* Checks the vocabulary (unique pieces, 256 byte pieces with byte fallback, one <unk>) and
 * builds the lookup tables. unk_id, bos_id and eos_id are set before. */
int lq_tokenizer_finish(struct lq_tokenizer *tokenizer, const char *label, struct lq_error *err);
/* Id of the piece with exactly this text, -1 when none. Needs lq_tokenizer_finish. */
int lq_tokenizer_find(const struct lq_tokenizer *tokenizer, const char *text, size_t length);
/* Installs HF merges: pairs holds count triples (left, right, merged), the i-th of rank i; a
 * repeated pair keeps its last rank, as `tokenizers` does. */
int lq_tokenizer_set_merges(struct lq_tokenizer *tokenizer, const int32_t *pairs, size_t count,
                            const char *label, struct lq_error *err);
/* (rank, merged id) of the pair, false when the pair does not merge. */
bool lq_tokenizer_merge_find(const struct lq_tokenizer *tokenizer, int left, int right,
                             int32_t *rank, int32_t *merged);

/* Whether characters a and b (lq_tokenizer_char_key) occur next to each other in a piece. */
bool lq_tokenizer_bigram_find(const struct lq_tokenizer *tokenizer, uint32_t a, uint32_t b);
/* A character of 1 to 4 bytes as one number (its bytes big-endian); 0 for longer spans. */
uint32_t lq_tokenizer_char_key(const char *text, size_t length);

/* The file readers, each given the whole file. */
int lq_tokenizer_parse_bin(const uint8_t *data, size_t size, const char *label,
                           struct lq_tokenizer **out, struct lq_error *err);
int lq_tokenizer_parse_model(const uint8_t *data, size_t size, const char *label,
                             struct lq_tokenizer **out, struct lq_error *err);
/* GGUF: the tokenizer in the metadata (tokenizer_gguf.c); a whole file in memory, or an
 * opened one (borrowed). */
struct lq_gguf;
int lq_tokenizer_parse_gguf(const uint8_t *data, size_t size, const char *label,
                            struct lq_tokenizer **out, struct lq_error *err);
int lq_tokenizer_from_gguf(const struct lq_gguf *gguf, const char *label, struct lq_tokenizer **out,
                           struct lq_error *err);
int lq_tokenizer_parse_json(const uint8_t *data, size_t size, const char *label,
                            struct lq_tokenizer **out, struct lq_error *err);

/* Byte-level BPE (tokenizer_bpe.c). configure reads the tokenizer.json root before the
 * vocabulary: when the pre-tokenizer or decoder is ByteLevel it checks the pipeline (refusing
 * what it cannot reproduce) and sets tokenizer->bpe, else it does nothing. finish runs once
 * the pieces and merges are in: the 256 byte characters, added tokens, EOS. A byte whose
 * character is not a piece becomes missing_byte_id (the model's unk), or is dropped when it
 * is -1, as the tokenizers library does. */
struct cJSON;
int lq_tokenizer_bpe_configure(struct lq_tokenizer *tokenizer, const struct cJSON *root,
                               const char *label, struct lq_error *err);
int lq_tokenizer_bpe_finish(struct lq_tokenizer *tokenizer, int missing_byte_id, const char *label,
                            struct lq_error *err);
/* The same from a llama.cpp pre-tokenizer name (GGUF tokenizer.ggml.pre): "default"/"gpt-2",
 * "llama-bpe"/"llama3", "qwen2", "smollm"; LQ_EUNSUPPORTED naming any other. */
int lq_tokenizer_bpe_configure_named(struct lq_tokenizer *tokenizer, const char *pre,
                                     const char *label, struct lq_error *err);
void lq_tokenizer_bpe_free(struct lq_tokenizer_bpe *bpe);
int lq_tokenizer_bpe_encode(const struct lq_tokenizer *tokenizer, const char *text, size_t length,
                            int add_bos, int **ids, size_t *count, struct lq_error *err);
/* The bytes of id (written to out unless NULL); their count, never over the piece's length. */
size_t lq_tokenizer_bpe_decode_one(const struct lq_tokenizer *tokenizer, int id, char *out);

/* Length of the UTF-8 character at s (n bytes left): 1 to 4, or 1 for a byte that does not
 * start a valid character (overlong forms, surrogates and code points past U+10FFFF are
 * invalid, as in SentencePiece's IsValidDecodeUTF8). */
size_t lq_tokenizer_utf8_length(const unsigned char *s, size_t n);

/* Piece text of a byte value, "<0xNN>" as SentencePiece writes it; buffer holds 7 bytes. */
void lq_tokenizer_byte_piece(unsigned value, char buffer[7]);

#endif
