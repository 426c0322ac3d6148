/* Byte-level BPE (core/tokenizer_bpe.c) on a tokenizer.json built here: GPT-2's byte-to-unicode
 * mapping (the 256 byte pieces, "Ġ" for a space, U+0100 for byte 0), merges applied by rank,
 * added tokens matched in the text before pre-tokenization, the GPT-2 split rules, decoding
 * as the exact inverse (all 256 bytes), and malformed or unsupported files refused with a
 * message. HF `tokenizers` itself is compared in tests/peer/test_bpe_peer.py. */
#include "core/tokenizer.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>

#include "tests/unit/lq_test.h"

/* Byte b's character under GPT-2's bytes_to_unicode, written independently of the encoder:
 * printable Latin-1 as itself, the 68 others from U+0100 in byte order. */
static unsigned byte_char(unsigned b) {
    unsigned shifted = 0;
    for (unsigned k = 0; k < 256; k++) {
        bool printable = (k >= 0x21 && k <= 0x7E) || (k >= 0xA1 && k <= 0xAC) || k >= 0xAE;
        if (k == b) return printable ? k : 0x100 + shifted;
        if (!printable) shifted++;
    }
    return 0;
}

static void utf8(unsigned c, char out[4]) {
    if (c < 0x80) {
        out[0] = (char)c, out[1] = 0;
    } else {
        out[0] = (char)(0xC0 | (c >> 6)), out[1] = (char)(0x80 | (c & 0x3F)), out[2] = 0;
    }
}

/* Vocabulary: id b is byte b's character; 256 "Ġt", 257 "he", 258 "Ġthe", 259 "in";
 * added: 260 <|endoftext|> (special), 261 "hello world". */
static cJSON *base_config(void) {
    cJSON *root = cJSON_CreateObject();
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    for (unsigned b = 0; b < 256; b++) {
        char name[4];
        utf8(byte_char(b), name);
        cJSON_AddNumberToObject(vocab, name, b);
    }
    const char *pieces[] = {"\xc4\xa0t", "he", "\xc4\xa0the", "in"};
    for (int i = 0; i < 4; i++) cJSON_AddNumberToObject(vocab, pieces[i], 256 + i);
    cJSON *merges = cJSON_AddArrayToObject(model, "merges");
    const char *rules[] = {"\xc4\xa0 t", "h e", "\xc4\xa0t he", "i n"};
    for (int i = 0; i < 4; i++) cJSON_AddItemToArray(merges, cJSON_CreateString(rules[i]));
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    cJSON *eot = cJSON_CreateObject();
    cJSON_AddNumberToObject(eot, "id", 260);
    cJSON_AddStringToObject(eot, "content", "<|endoftext|>");
    cJSON_AddTrueToObject(eot, "special");
    cJSON_AddItemToArray(added, eot);
    cJSON *hello = cJSON_CreateObject();
    cJSON_AddNumberToObject(hello, "id", 261);
    cJSON_AddStringToObject(hello, "content", "hello world");
    cJSON_AddFalseToObject(hello, "special");
    cJSON_AddItemToArray(added, hello);
    cJSON_AddNullToObject(root, "normalizer");
    cJSON *pre = cJSON_AddObjectToObject(root, "pre_tokenizer");
    cJSON_AddStringToObject(pre, "type", "ByteLevel");
    cJSON_AddFalseToObject(pre, "add_prefix_space");
    cJSON_AddTrueToObject(pre, "use_regex");
    cJSON *decoder = cJSON_AddObjectToObject(root, "decoder");
    cJSON_AddStringToObject(decoder, "type", "ByteLevel");
    return root;
}

static struct lq_tokenizer *load_config(const cJSON *root, int *rc, struct lq_error *err) {
    char *text = cJSON_PrintUnformatted(root);
    struct lq_tokenizer *tokenizer = NULL;
    *rc = lq_tokenizer_load_buffer(text, strlen(text), "bpe.json", &tokenizer, err);
    free(text);
    return tokenizer;
}

static bool encodes_to(const struct lq_tokenizer *t, const char *text, size_t length,
                       const int *expected, size_t expected_count) {
    int *ids = NULL;
    size_t count = 0;
    struct lq_error err = {0};
    bool same = lq_tokenizer_encode(t, text, length, 0, &ids, &count, &err) == 0 &&
                count == expected_count &&
                (count == 0 || memcmp(ids, expected, count * sizeof *ids) == 0);
    free(ids);
    return same;
}

static bool round_trips(const struct lq_tokenizer *t, const char *text, size_t length) {
    int *ids = NULL;
    size_t count = 0, decoded_length = 0;
    char *decoded = NULL;
    struct lq_error err = {0};
    bool ok = lq_tokenizer_encode(t, text, length, 1, &ids, &count, &err) == 0 &&
              lq_tokenizer_decode_bytes(t, ids, count, &decoded, &decoded_length, &err) == 0 &&
              decoded_length == length && memcmp(decoded, text, length) == 0;
    free(ids);
    free(decoded);
    return ok;
}

static void test_byte_mapping(void) {
    cJSON *root = base_config();
    int rc;
    struct lq_error err = {0};
    struct lq_tokenizer *t = load_config(root, &rc, &err);
    CHECK_MSG(rc == 0 && t, "%s", err.message);
    if (t) {
        CHECK(lq_tokenizer_vocab_size(t) == 262);
        CHECK(strcmp(lq_tokenizer_piece(t, ' '), "\xc4\xa0") == 0);  /* Ġ, U+0120 */
        CHECK(strcmp(lq_tokenizer_piece(t, 0), "\xc4\x80") == 0);    /* U+0100 */
        CHECK(strcmp(lq_tokenizer_piece(t, 0xAD), "\xc5\x83") == 0); /* the last, U+0143 */
        CHECK(strcmp(lq_tokenizer_piece(t, 'A'), "A") == 0);
        /* Every byte alone is its own piece and decodes back to itself. */
        for (int b = 0; b < 256; b++) {
            char one = (char)b;
            int expected = b;
            CHECK_MSG(encodes_to(t, &one, 1, &expected, 1), "byte %d", b);
            char buffer[16];
            CHECK(lq_tokenizer_decode_piece(t, -1, b, buffer, sizeof buffer) == 1 &&
                  (unsigned char)buffer[0] == b);
        }
        char all[256];
        for (int b = 0; b < 256; b++) all[b] = (char)b;
        CHECK(round_trips(t, all, sizeof all));
        CHECK(lq_tokenizer_bos_id(t) == -1 && lq_tokenizer_eos_id(t) == 260);
        CHECK(lq_tokenizer_piece_type(t, 260) == LQ_TOKEN_CONTROL);
    }
    lq_tokenizer_free(t);
    cJSON_Delete(root);
}

static void test_merges_and_splits(void) {
    cJSON *root = base_config();
    int rc;
    struct lq_error err = {0};
    struct lq_tokenizer *t = load_config(root, &rc, &err);
    CHECK_MSG(rc == 0 && t, "%s", err.message);
    if (!t) {
        cJSON_Delete(root);
        return;
    }
    int the[] = {258};                    /* Ġ t -> Ġt, h e -> he, Ġt he -> Ġthe */
    int bare[] = {'t', 257};              /* no space: t, he */
    int then[] = {258, 'n'};              /* "Ġthen": merges stop at Ġthe */
    int words[] = {'a', 258, 258};        /* "a the the" */
    int spaces[] = {' ', 258};            /* "  the": the last space joins the word */
    int added[] = {'x', 260, 'y', 261};   /* added tokens cut out before splitting */
    int contraction[] = {'I', '\'', 'm'}; /* "I'm": 'm is one word, then split to bytes */
    int digits[] = {'1', '2', ' ', '3'};
    CHECK(encodes_to(t, " the", 4, the, 1));
    CHECK(encodes_to(t, "the", 3, bare, 2));
    CHECK(encodes_to(t, " then", 5, then, 2));
    CHECK(encodes_to(t, "a the the", 9, words, 3));
    CHECK(encodes_to(t, "  the", 5, spaces, 2));
    CHECK(encodes_to(t, "x<|endoftext|>yhello world", 26, added, 4));
    CHECK(encodes_to(t, "I'm", 3, contraction, 3));
    CHECK(encodes_to(t, "12 3", 4, digits, 4));
    CHECK(encodes_to(t, "", 0, the, 0));
    /* Special tokens decode to nothing, other added tokens to their text. */
    char *text = NULL;
    int ids[] = {'x', 260, 261, 258};
    CHECK(lq_tokenizer_decode(t, ids, 4, &text, &err) == 0 && text &&
          strcmp(text, "xhello world the") == 0);
    free(text);
    const char *samples[] = {"Hello, world!  \n\n  x", "caf\xc3\xa9 \xf0\x9f\x98\x80 \xe6\x97\xa5",
                             "it's 1234 \t\r\n", "a\xff\xfe b"};
    for (int i = 0; i < 4; i++) CHECK_MSG(round_trips(t, samples[i], strlen(samples[i])), "%d", i);
    lq_tokenizer_free(t);
    cJSON_Delete(root);
}

/* Each edit of the base file must be refused with this code and message. */
static void expect_refused(void (*edit)(cJSON *), int code, const char *message) {
    cJSON *root = base_config();
    edit(root);
    int rc;
    struct lq_error err = {0};
    struct lq_tokenizer *t = load_config(root, &rc, &err);
    CHECK_MSG(rc == code && !t && strstr(err.message, "bpe.json") && strstr(err.message, message),
              "rc %d \"%s\", wanted %d \"%s\"", rc, err.message, code, message);
    lq_tokenizer_free(t);
    cJSON_Delete(root);
}

static void drop_byte(cJSON *root) { /* byte 'q' becomes a piece that is not a byte */
    cJSON *vocab = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "model"), "vocab");
    cJSON_DeleteItemFromObjectCaseSensitive(vocab, "q");
    cJSON_AddNumberToObject(vocab, "qq", 'q');
}
static void nfc(cJSON *root) {
    cJSON_ReplaceItemInObject(root, "normalizer", cJSON_Parse("{\"type\":\"NFC\"}"));
}
static void unknown_pattern(cJSON *root) {
    cJSON_ReplaceItemInObject(
        root, "pre_tokenizer",
        cJSON_Parse("{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":"
                    "{\"Regex\":\"\\\\w+\"},\"behavior\":\"Isolated\",\"invert\":false},"
                    "{\"type\":\"ByteLevel\",\"use_regex\":false}]}"));
}
static void byte_level_first(cJSON *root) {
    cJSON_ReplaceItemInObject(
        root, "pre_tokenizer",
        cJSON_Parse("{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"ByteLevel\"},"
                    "{\"type\":\"Digits\"}]}"));
}
static void no_decoder(cJSON *root) {
    cJSON_DeleteItemFromObject(root, "decoder");
}
static void byte_fallback(cJSON *root) {
    cJSON_AddTrueToObject(cJSON_GetObjectItem(root, "model"), "byte_fallback");
}
static void lstrip(cJSON *root) {
    cJSON_AddTrueToObject(cJSON_GetArrayItem(cJSON_GetObjectItem(root, "added_tokens"), 0),
                          "lstrip");
}
static void bad_merge(cJSON *root) {
    cJSON *merges = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "model"), "merges");
    cJSON_AddItemToArray(merges, cJSON_CreateString("x yz"));
}

/* A byte whose character is not a piece (SmolLM2's vocabulary lacks most control bytes) is
 * dropped, as the tokenizers library does, or becomes the model's unk_token when it has one. */
static void test_missing_byte(void) {
    for (int with_unk = 0; with_unk < 2; with_unk++) {
        cJSON *root = base_config();
        drop_byte(root);
        if (with_unk)
            cJSON_AddStringToObject(cJSON_GetObjectItem(root, "model"), "unk_token",
                                    "<|endoftext|>");
        int rc;
        struct lq_error err = {0};
        struct lq_tokenizer *t = load_config(root, &rc, &err);
        CHECK_MSG(rc == 0 && t, "%s", err.message);
        if (t) {
            int dropped[] = {'a', 'b'}, unk[] = {'a', 260, 'b'};
            CHECK_MSG(with_unk ? encodes_to(t, "aqb", 3, unk, 3)
                               : encodes_to(t, "aqb", 3, dropped, 2),
                      "unk %d", with_unk);
            CHECK(with_unk ? encodes_to(t, "q", 1, unk + 1, 1) : encodes_to(t, "q", 1, dropped, 0));
        }
        lq_tokenizer_free(t);
        cJSON_Delete(root);
    }
}

static void test_refused(void) {
    expect_refused(nfc, LQ_EUNSUPPORTED, "NFC");
    expect_refused(unknown_pattern, LQ_EUNSUPPORTED, "Split pattern");
    expect_refused(byte_level_first, LQ_EUNSUPPORTED, "after ByteLevel");
    expect_refused(no_decoder, LQ_EUNSUPPORTED, "ByteLevel decoder");
    expect_refused(byte_fallback, LQ_EUNSUPPORTED, "byte_fallback");
    expect_refused(lstrip, LQ_EUNSUPPORTED, "lstrip");
    expect_refused(bad_merge, LQ_EFORMAT, "merges[4]");
}

LQ_TEST_MAIN(LQ_TEST(test_byte_mapping), LQ_TEST(test_merges_and_splits),
             LQ_TEST(test_missing_byte), LQ_TEST(test_refused))
