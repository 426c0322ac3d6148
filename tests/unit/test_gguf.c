/* GGUF reader: a hand-built valid file read back (every metadata type, every readable tensor
 * type against values worked out by hand), and malformed files, each refused with the right
 * code and a message that names the file and the point. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/gguf.h"
#include "core/half.h"
#include "tests/unit/lq_test.h"

/* ---- a little GGUF writer ---- */

struct buffer {
    uint8_t *data;
    size_t length, capacity;
};

static void put_bytes(struct buffer *b, const void *bytes, size_t n) {
    if (b->length + n > b->capacity) {
        b->capacity = (b->length + n) * 2 + 64;
        b->data = realloc(b->data, b->capacity);
        if (!b->data) abort();
    }
    if (n) memcpy(b->data + b->length, bytes, n);
    b->length += n;
}

static void put_u8(struct buffer *b, uint8_t v) {
    put_bytes(b, &v, 1);
}
static void put_u16(struct buffer *b, uint16_t v) {
    put_bytes(b, &v, 2); /* host order is little-endian (core/gguf.c checks) */
}
static void put_u32(struct buffer *b, uint32_t v) {
    put_bytes(b, &v, 4);
}
static void put_u64(struct buffer *b, uint64_t v) {
    put_bytes(b, &v, 8);
}
static void put_string(struct buffer *b, const char *s) {
    put_u64(b, strlen(s));
    put_bytes(b, s, strlen(s));
}
static void pad_to(struct buffer *b, size_t alignment) {
    while (b->length % alignment) put_u8(b, 0);
}

static void header(struct buffer *b, uint32_t version, uint64_t tensors, uint64_t kvs) {
    put_bytes(b, "GGUF", 4);
    put_u32(b, version);
    put_u64(b, tensors);
    put_u64(b, kvs);
}

static void key(struct buffer *b, const char *name, uint32_t type) {
    put_string(b, name);
    put_u32(b, type);
}

static void tensor_info(struct buffer *b, const char *name, uint32_t n_dims, const uint64_t *dims,
                        uint32_t type, uint64_t offset) {
    put_string(b, name);
    put_u32(b, n_dims);
    for (uint32_t i = 0; i < n_dims; i++) put_u64(b, dims[i]);
    put_u32(b, type);
    put_u64(b, offset);
}

static char temp_path[64];

/* Writes b to a temporary file and opens it; frees b. */
static int open_built(struct buffer *b, struct lq_gguf **out, struct lq_error *err) {
    snprintf(temp_path, sizeof temp_path, "/tmp/lq_test_gguf_XXXXXX");
    int fd = mkstemp(temp_path);
    if (fd < 0) abort();
    if (b->length && write(fd, b->data, b->length) != (ssize_t)b->length) abort();
    close(fd);
    int rc = lq_gguf_open(temp_path, out, err);
    /* The buffer form must agree with the file form. */
    struct lq_gguf *again = NULL;
    struct lq_error err2 = {0};
    int rc2 = lq_gguf_open_buffer(b->data, b->length, temp_path, &again, &err2);
    CHECK_MSG(rc2 == rc && strcmp(err2.message, err->message) == 0, "buffer: %d %s", rc2,
              err2.message);
    lq_gguf_close(again);
    unlink(temp_path);
    free(b->data);
    *b = (struct buffer){0};
    return rc;
}

/* ---- the valid file ---- */

#define N_TENSORS 10

static void build_valid(struct buffer *b) {
    header(b, 3, N_TENSORS, 20);
    key(b, "general.alignment", LQ_GGUF_UINT32), put_u32(b, 64);
    key(b, "general.name", LQ_GGUF_STRING), put_string(b, "tiny llama");
    key(b, "v.u8", LQ_GGUF_UINT8), put_u8(b, 200);
    key(b, "v.i8", LQ_GGUF_INT8), put_u8(b, (uint8_t)-5);
    key(b, "v.u16", LQ_GGUF_UINT16), put_u16(b, 60000);
    key(b, "v.i16", LQ_GGUF_INT16), put_u16(b, (uint16_t)-30000);
    key(b, "v.u32", LQ_GGUF_UINT32), put_u32(b, 4000000000u);
    key(b, "v.i32", LQ_GGUF_INT32), put_u32(b, (uint32_t)-2000000000);
    float f = 0.1f;
    uint32_t fbits;
    memcpy(&fbits, &f, 4);
    key(b, "v.f32", LQ_GGUF_FLOAT32), put_u32(b, fbits);
    key(b, "v.bool", LQ_GGUF_BOOL), put_u8(b, 1);
    key(b, "v.u64", LQ_GGUF_UINT64), put_u64(b, UINT64_MAX);
    key(b, "v.i64", LQ_GGUF_INT64), put_u64(b, (uint64_t)INT64_MIN);
    double g = -1e300;
    uint64_t gbits;
    memcpy(&gbits, &g, 8);
    key(b, "v.f64", LQ_GGUF_FLOAT64), put_u64(b, gbits);
    key(b, "a.i32", LQ_GGUF_ARRAY), put_u32(b, LQ_GGUF_INT32), put_u64(b, 3);
    put_u32(b, 1), put_u32(b, (uint32_t)-2), put_u32(b, 3);
    key(b, "a.f32", LQ_GGUF_ARRAY), put_u32(b, LQ_GGUF_FLOAT32), put_u64(b, 2);
    put_u32(b, fbits), put_u32(b, 0xbf800000u);
    key(b, "a.str", LQ_GGUF_ARRAY), put_u32(b, LQ_GGUF_STRING), put_u64(b, 3);
    put_string(b, "<s>"), put_string(b, ""), put_u64(b, 3), put_bytes(b, "a\0b", 3);
    key(b, "a.empty", LQ_GGUF_ARRAY), put_u32(b, LQ_GGUF_UINT8), put_u64(b, 0);
    key(b, "a.bool", LQ_GGUF_ARRAY), put_u32(b, LQ_GGUF_BOOL), put_u64(b, 2);
    put_u8(b, 0), put_u8(b, 1);
    key(b, "a.u64", LQ_GGUF_ARRAY), put_u32(b, LQ_GGUF_UINT64), put_u64(b, 1);
    put_u64(b, UINT64_MAX);
    key(b, "v.s", LQ_GGUF_STRING), put_string(b, "");

    /* Tensors, each offset a multiple of 64 (the alignment). */
    uint64_t d_f32[2] = {4, 2}, d_16[1] = {8}, d_q32[2] = {32, 1}, d_k[1] = {256};
    tensor_info(b, "f32", 2, d_f32, LQ_GGML_F32, 0);                   /* 32 bytes */
    tensor_info(b, "f16", 1, d_16, LQ_GGML_F16, 64);                   /* 16 */
    tensor_info(b, "bf16", 1, d_16, LQ_GGML_BF16, 128);                /* 16 */
    tensor_info(b, "q8_0", 2, d_q32, LQ_GGML_Q8_0, 192);               /* 34 */
    tensor_info(b, "q4_0", 2, d_q32, LQ_GGML_Q4_0, 256);               /* 18 */
    tensor_info(b, "q4_1", 2, d_q32, LQ_GGML_Q4_1, 320);               /* 20 */
    tensor_info(b, "q4_k", 1, d_k, LQ_GGML_Q4_K, 384);                 /* 144 */
    tensor_info(b, "q5_k", 1, d_k, LQ_GGML_Q5_K, 576);                 /* 176 */
    tensor_info(b, "q6_k", 1, d_k, LQ_GGML_Q6_K, 768);                 /* 210 */
    tensor_info(b, "blk.0.attn_q.weight", 1, d_k, LQ_GGML_Q2_K, 1024); /* 84 */
    pad_to(b, 64);
    size_t data = b->length;
    /* f32 */
    for (int i = 0; i < 8; i++) {
        float v = (float)i * 1.5f - 2.0f;
        put_bytes(b, &v, 4);
    }
    pad_to(b, 64);
    static const uint16_t f16[8] = {0x3c00, 0xc000, 0x3555, 0x0001, 0x7bff, 0x8000, 0x3800, 0};
    for (int i = 0; i < 8; i++) put_u16(b, f16[i]);
    pad_to(b, 64);
    static const uint16_t bf16[8] = {0x3f80, 0xc040, 0x3dcd, 0, 0x4120, 0xbf00, 0x0001, 0x7f7f};
    for (int i = 0; i < 8; i++) put_u16(b, bf16[i]);
    pad_to(b, 64);
    put_u16(b, 0x3800); /* q8_0: d = 0.5, codes j - 16 */
    for (int j = 0; j < 32; j++) put_u8(b, (uint8_t)(int8_t)(j - 16));
    pad_to(b, 64);
    put_u16(b, 0x4000); /* q4_0: d = 2, byte j = j | (15 - j) << 4 */
    for (int j = 0; j < 16; j++) put_u8(b, (uint8_t)(j | (15 - j) << 4));
    pad_to(b, 64);
    put_u16(b, 0x3400), put_u16(b, 0xbc00); /* q4_1: d = 0.25, m = -1 */
    for (int j = 0; j < 16; j++) put_u8(b, (uint8_t)(j | (15 - j) << 4));
    pad_to(b, 64);
    /* q4_k: d = 1, dmin = 0.5; sub-block s has scale s + 1 and min s (6-bit packing: bytes
     * 0-3 scales 0-3, bytes 4-7 mins 0-3, bytes 8-11 low nibble scale / high nibble min of
     * sub-blocks 4-7); nibbles: byte i = i % 16 | ((i + 3) % 16) << 4. */
    static const uint8_t k_scales[12] = {1, 2, 3,          4,          0,          1,
                                         2, 3, 5 | 4 << 4, 6 | 5 << 4, 7 | 6 << 4, 8 | 7 << 4};
    put_u16(b, 0x3c00), put_u16(b, 0x3800), put_bytes(b, k_scales, 12);
    for (int i = 0; i < 128; i++) put_u8(b, (uint8_t)(i % 16 | ((i + 3) % 16) << 4));
    pad_to(b, 64);
    /* q5_k: d = 1, dmin = 0 (same scales), every fifth bit set, nibbles 1 (low) and 2 (high). */
    put_u16(b, 0x3c00), put_u16(b, 0), put_bytes(b, k_scales, 12);
    for (int i = 0; i < 32; i++) put_u8(b, 0xff);
    for (int i = 0; i < 128; i++) put_u8(b, 0x21);
    pad_to(b, 64);
    /* q6_k: ql, qh zero except ql[0] = 0x0f, qh[0] = 0x03; scales 1..16; d = 0.5 */
    put_u8(b, 0x0f);
    for (int i = 1; i < 128; i++) put_u8(b, 0);
    put_u8(b, 0x03);
    for (int i = 1; i < 64; i++) put_u8(b, 0);
    for (int i = 0; i < 16; i++) put_u8(b, (uint8_t)(i + 1));
    put_u16(b, 0x3800);
    pad_to(b, 64);
    for (int i = 0; i < 84; i++) put_u8(b, (uint8_t)i); /* q2_k */
    CHECK(b->length - data == 1024 + 84);
}

static void test_valid_file(void) {
    struct buffer b = {0};
    build_valid(&b);
    struct lq_gguf *gguf = NULL;
    struct lq_error err = {0};
    int rc = open_built(&b, &gguf, &err);
    CHECK_MSG(rc == LQ_OK, "%s", err.message);
    if (rc != LQ_OK) return;
    CHECK(lq_gguf_version(gguf) == 3);
    CHECK(lq_gguf_alignment(gguf) == 64);
    CHECK(lq_gguf_data_offset(gguf) % 64 == 0);
    CHECK(lq_gguf_metadata_count(gguf) == 20);
    CHECK(strcmp(lq_gguf_metadata_key_at(gguf, 1), "general.name") == 0);

    const char *s = NULL;
    size_t length = 0;
    CHECK_OK(lq_gguf_get_string(gguf, "general.name", &s, &length, &err));
    CHECK(s && strcmp(s, "tiny llama") == 0 && length == 10);
    CHECK_OK(lq_gguf_get_string(gguf, "v.s", &s, &length, &err));
    CHECK(s && s[0] == '\0' && length == 0);
    uint32_t u32 = 0;
    int32_t i32 = 0;
    uint64_t u64 = 0;
    int64_t i64 = 0;
    float f = 0;
    double g = 0;
    bool flag = false;
    CHECK_OK(lq_gguf_get_u32(gguf, "v.u8", &u32, &err));
    CHECK(u32 == 200);
    CHECK_OK(lq_gguf_get_i32(gguf, "v.i8", &i32, &err));
    CHECK(i32 == -5);
    CHECK_OK(lq_gguf_get_u32(gguf, "v.u16", &u32, &err));
    CHECK(u32 == 60000);
    CHECK_OK(lq_gguf_get_i32(gguf, "v.i16", &i32, &err));
    CHECK(i32 == -30000);
    CHECK_OK(lq_gguf_get_u32(gguf, "v.u32", &u32, &err));
    CHECK(u32 == 4000000000u);
    CHECK_OK(lq_gguf_get_i32(gguf, "v.i32", &i32, &err));
    CHECK(i32 == -2000000000);
    CHECK_OK(lq_gguf_get_u64(gguf, "v.u64", &u64, &err));
    CHECK(u64 == UINT64_MAX);
    CHECK_OK(lq_gguf_get_i64(gguf, "v.i64", &i64, &err));
    CHECK(i64 == INT64_MIN);
    CHECK_OK(lq_gguf_get_f32(gguf, "v.f32", &f, &err));
    CHECK(f == 0.1f);
    CHECK_OK(lq_gguf_get_f64(gguf, "v.f64", &g, &err));
    CHECK(g == -1e300);
    CHECK_OK(lq_gguf_get_bool(gguf, "v.bool", &flag, &err));
    CHECK(flag);

    /* Getter refusals: absent, wrong kind, out of range. */
    CHECK(lq_gguf_get_u32(gguf, "nope", &u32, &err) == LQ_ENOTFOUND);
    CHECK(strstr(err.message, "no key nope") != NULL);
    CHECK(lq_gguf_get_u32(gguf, "general.name", &u32, &err) == LQ_EFORMAT);
    CHECK_MSG(strstr(err.message, "key general.name is string, expected an integer"), "%s",
              err.message);
    CHECK(lq_gguf_get_i32(gguf, "v.u32", &i32, &err) == LQ_EFORMAT);
    CHECK_MSG(strstr(err.message, "key v.u32 value 4000000000 does not fit in int32"), "%s",
              err.message);
    CHECK(lq_gguf_get_u64(gguf, "v.i8", &u64, &err) == LQ_EFORMAT);
    CHECK(lq_gguf_get_i64(gguf, "v.u64", &i64, &err) == LQ_EFORMAT);
    CHECK(lq_gguf_get_bool(gguf, "v.u8", &flag, &err) == LQ_EFORMAT);
    CHECK(lq_gguf_get_f32(gguf, "a.f32", &f, &err) == LQ_EFORMAT);
    CHECK_MSG(strstr(err.message, "key a.f32 is an array of float32, expected a float"), "%s",
              err.message);

    enum lq_gguf_value_type type, element;
    uint64_t count = 0;
    CHECK(lq_gguf_metadata_type(gguf, "a.str", &type, &element, &count) == LQ_OK);
    CHECK(type == LQ_GGUF_ARRAY && element == LQ_GGUF_STRING && count == 3);
    const char *const *strings = NULL;
    const size_t *lengths = NULL;
    size_t n = 0;
    CHECK_OK(lq_gguf_get_string_array(gguf, "a.str", &strings, &lengths, &n, &err));
    CHECK(n == 3 && strcmp(strings[0], "<s>") == 0 && strings[1][0] == '\0');
    CHECK(n == 3 && lengths[2] == 3 && memcmp(strings[2], "a\0b", 4) == 0);
    int64_t *ints = NULL;
    CHECK_OK(lq_gguf_get_i64_array(gguf, "a.i32", &ints, &n, &err));
    CHECK(ints && n == 3 && ints[0] == 1 && ints[1] == -2 && ints[2] == 3);
    free(ints);
    ints = NULL;
    CHECK(lq_gguf_get_i64_array(gguf, "a.u64", &ints, &n, &err) == LQ_EFORMAT && !ints);
    CHECK(lq_gguf_get_i64_array(gguf, "a.f32", &ints, &n, &err) == LQ_EFORMAT);
    double *doubles = NULL;
    CHECK_OK(lq_gguf_get_f64_array(gguf, "a.bool", &doubles, &n, &err));
    CHECK(doubles && n == 2 && doubles[0] == 0 && doubles[1] == 1);
    free(doubles);
    CHECK_OK(lq_gguf_get_f64_array(gguf, "a.empty", &doubles, &n, &err));
    CHECK(doubles && n == 0);
    free(doubles);
    float *floats = NULL;
    CHECK_OK(lq_gguf_get_f32_array(gguf, "a.f32", &floats, &n, &err));
    CHECK(floats && n == 2 && floats[0] == 0.1f && floats[1] == -1.0f);
    free(floats);
    CHECK(lq_gguf_get_f32_array(gguf, "a.i32", &floats, &n, &err) == LQ_EFORMAT);
    CHECK(lq_gguf_get_string_array(gguf, "a.i32", &strings, NULL, &n, &err) == LQ_EFORMAT);

    /* Tensors */
    CHECK(lq_gguf_tensor_count(gguf) == N_TENSORS);
    CHECK(lq_gguf_find_tensor(gguf, "missing") == NULL);
    float out[256];
    const struct lq_gguf_tensor *t = lq_gguf_find_tensor(gguf, "f32");
    CHECK(t && t->n_dims == 2 && t->dims[0] == 4 && t->dims[1] == 2 && t->dims[2] == 1 &&
          t->numel == 8 && t->nbytes == 32 && t == lq_gguf_tensor_at(gguf, 0));
    CHECK_OK(lq_gguf_tensor_to_f32(gguf, t, out, &err));
    for (int i = 0; i < 8; i++) CHECK(out[i] == (float)i * 1.5f - 2.0f);
    t = lq_gguf_find_tensor(gguf, "f16");
    CHECK_OK(lq_gguf_tensor_to_f32(gguf, t, out, &err));
    CHECK(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0.333251953125f);
    CHECK(out[3] == 5.9604644775390625e-8f && out[4] == 65504.0f && out[6] == 0.5f);
    t = lq_gguf_find_tensor(gguf, "bf16");
    CHECK_OK(lq_gguf_tensor_to_f32(gguf, t, out, &err));
    CHECK(out[0] == 1.0f && out[1] == -3.0f && out[4] == 10.0f && out[5] == -0.5f);
    t = lq_gguf_find_tensor(gguf, "q8_0");
    CHECK(t && t->nbytes == 34);
    CHECK_OK(lq_gguf_tensor_to_f32(gguf, t, out, &err));
    for (int j = 0; j < 32; j++) CHECK(out[j] == (float)(j - 16) * 0.5f);
    t = lq_gguf_find_tensor(gguf, "q4_0");
    CHECK_OK(lq_gguf_tensor_to_f32(gguf, t, out, &err));
    for (int j = 0; j < 16; j++)
        CHECK(out[j] == (float)(j - 8) * 2 && out[16 + j] == (float)(7 - j) * 2);
    t = lq_gguf_find_tensor(gguf, "q4_1");
    CHECK_OK(lq_gguf_tensor_to_f32(gguf, t, out, &err));
    for (int j = 0; j < 16; j++)
        CHECK(out[j] == (float)j * 0.25f - 1 && out[16 + j] == (float)(15 - j) * 0.25f - 1);
    t = lq_gguf_find_tensor(gguf, "q4_k");
    CHECK(t && t->nbytes == 144);
    CHECK_OK(lq_gguf_tensor_to_f32(gguf, t, out, &err));
    for (int i = 0; i < 256; i++) {
        int sub = i / 32, byte = (i / 64) * 32 + i % 32;
        int nibble = sub % 2 ? ((byte + 3) % 16) : byte % 16;
        CHECK_MSG(out[i] == (float)((sub + 1) * nibble) - 0.5f * (float)sub, "q4_k %d: %g", i,
                  out[i]);
    }
    t = lq_gguf_find_tensor(gguf, "q5_k");
    CHECK_OK(lq_gguf_tensor_to_f32(gguf, t, out, &err));
    for (int i = 0; i < 256; i++) {
        int sub = i / 32;
        CHECK_MSG(out[i] == (float)((sub + 1) * (sub % 2 ? 18 : 17)), "q5_k %d: %g", i, out[i]);
    }
    t = lq_gguf_find_tensor(gguf, "q6_k");
    CHECK_OK(lq_gguf_tensor_to_f32(gguf, t, out, &err));
    /* value i: half h = i / 128, k = (i % 128) / 32, l = i % 32, scale index 8h + 2k + l / 16 */
    for (int i = 0; i < 256; i++) {
        int h = i / 128, k = (i % 128) / 32, l = i % 32;
        float scale = (float)(8 * h + 2 * k + l / 16 + 1);
        float expected = i == 0 ? 0.5f * scale * 31 : 0.5f * scale * -32;
        CHECK_MSG(out[i] == expected, "q6_k %d: %g, expected %g", i, out[i], expected);
    }
    t = lq_gguf_find_tensor(gguf, "blk.0.attn_q.weight");
    CHECK(t && t->type == LQ_GGML_Q2_K && t->nbytes == 84 && !lq_ggml_type_is_readable(t->type));
    CHECK(lq_gguf_tensor_to_f32(gguf, t, out, &err) == LQ_EUNSUPPORTED);
    CHECK_MSG(strstr(err.message, "tensor blk.0.attn_q.weight: ggml type Q2_K is not supported"),
              "%s", err.message);
    const uint8_t *raw = lq_gguf_tensor_data(gguf, t);
    CHECK(raw && raw[0] == 0 && raw[83] == 83);
    lq_gguf_close(gguf);
}

static void test_version_2_and_default_alignment(void) {
    struct buffer b = {0};
    header(&b, 2, 1, 0);
    uint64_t dims[1] = {3};
    tensor_info(&b, "x", 1, dims, LQ_GGML_F32, 0);
    pad_to(&b, 32);
    float v[3] = {1, 2, 3};
    put_bytes(&b, v, sizeof v);
    struct lq_gguf *gguf = NULL;
    struct lq_error err = {0};
    CHECK(open_built(&b, &gguf, &err) == LQ_OK);
    CHECK(lq_gguf_version(gguf) == 2 && lq_gguf_alignment(gguf) == 32);
    CHECK(lq_gguf_data_offset(gguf) == 64);
    lq_gguf_close(gguf);
}

/* ---- malformed files ---- */

/* Opens b and checks the refusal: code and a message that starts with the path and holds
 * `expected`. */
static void check_refused(struct buffer *b, int code, const char *expected, int line) {
    struct lq_gguf *gguf = NULL;
    struct lq_error err = {0};
    int rc = open_built(b, &gguf, &err);
    bool ok = rc == code && gguf == NULL &&
              strncmp(err.message, temp_path, strlen(temp_path)) == 0 &&
              strstr(err.message, expected) != NULL;
    if (!ok) {
        fprintf(stderr, "line %d: rc %d (expected %d), message \"%s\", expected \"%s\"\n", line, rc,
                code, err.message, expected);
        lq_test_failures++;
    }
    lq_gguf_close(gguf);
}
#define REFUSED(b, code, expected) check_refused(b, code, expected, __LINE__)

static void test_bad_header(void) {
    struct buffer b = {0};
    REFUSED(&b, LQ_EFORMAT, "file is 0 bytes, too short for the GGUF magic");
    put_bytes(&b, "GGU", 3);
    REFUSED(&b, LQ_EFORMAT, "too short");
    put_bytes(&b, "GGML", 4), put_u32(&b, 3), put_u64(&b, 0), put_u64(&b, 0);
    REFUSED(&b, LQ_EFORMAT, "not a GGUF file: magic is \"GGML\"");
    header(&b, 1, 0, 0);
    REFUSED(&b, LQ_EUNSUPPORTED, "GGUF version 1 is not supported");
    header(&b, 4, 0, 0);
    REFUSED(&b, LQ_EUNSUPPORTED, "GGUF version 4 is not supported");
    header(&b, 0x03000000u, 0, 0);
    REFUSED(&b, LQ_EUNSUPPORTED, "big-endian");
    put_bytes(&b, "GGUF", 4), put_u32(&b, 3), put_u32(&b, 0);
    REFUSED(&b, LQ_EFORMAT, "header: tensor count is truncated");
    header(&b, 3, 0, 1000);
    REFUSED(&b, LQ_EFORMAT, "metadata count 1000 cannot fit in the 0 bytes left");
    header(&b, 3, 1u << 30, 0);
    REFUSED(&b, LQ_EFORMAT, "tensor count 1073741824 cannot fit");
}

static void test_bad_metadata(void) {
    struct buffer b = {0};
    /* truncated: the entry stops inside its value */
    header(&b, 3, 0, 1), key(&b, "general.architecture", LQ_GGUF_UINT32), put_u16(&b, 1);
    REFUSED(&b, LQ_EFORMAT, "key general.architecture: uint32 value is truncated");
    header(&b, 3, 0, 2), key(&b, "a", LQ_GGUF_UINT8), put_u8(&b, 1);
    REFUSED(&b, LQ_EFORMAT, "metadata count 2 cannot fit");
    header(&b, 3, 0, 1), put_u64(&b, 1000), put_bytes(&b, "general.name.........", 21);
    REFUSED(&b, LQ_EFORMAT, "metadata entry 0: key: string length 1000 runs past the end");
    header(&b, 3, 0, 1), key(&b, "general.name", LQ_GGUF_STRING), put_u64(&b, 1u << 20);
    put_bytes(&b, "abc", 3);
    REFUSED(&b, LQ_EFORMAT, "key general.name: string length 1048576 runs past the end");
    header(&b, 3, 0, 1), key(&b, "general.name", LQ_GGUF_STRING), put_u64(&b, UINT64_MAX);
    REFUSED(&b, LQ_EFORMAT, "string length 18446744073709551615 runs past the end");
    header(&b, 3, 0, 1), key(&b, "x", 13), put_u32(&b, 0);
    REFUSED(&b, LQ_EFORMAT, "key x: unknown value type 13");
    /* array counts whose byte size overflows or exceeds the file */
    header(&b, 3, 0, 1), key(&b, "tokenizer.ggml.scores", LQ_GGUF_ARRAY);
    put_u32(&b, LQ_GGUF_FLOAT32), put_u64(&b, (1ull << 62) + 1), put_u32(&b, 0);
    REFUSED(&b, LQ_EFORMAT,
            "key tokenizer.ggml.scores: array of 4611686018427387905 float32 elements cannot fit");
    header(&b, 3, 0, 1), key(&b, "tokenizer.ggml.tokens", LQ_GGUF_ARRAY);
    put_u32(&b, LQ_GGUF_STRING), put_u64(&b, UINT64_MAX), put_string(&b, "a");
    REFUSED(&b, LQ_EFORMAT, "array of 18446744073709551615 string elements cannot fit");
    header(&b, 3, 0, 1), key(&b, "tokenizer.ggml.tokens", LQ_GGUF_ARRAY);
    put_u32(&b, LQ_GGUF_STRING), put_u64(&b, 2), put_string(&b, "a"), put_u64(&b, 99);
    put_bytes(&b, "bbbbbbbb", 8);
    REFUSED(&b, LQ_EFORMAT, "key tokenizer.ggml.tokens: element 1: string length 99 runs past");
    header(&b, 3, 0, 1), key(&b, "nested", LQ_GGUF_ARRAY), put_u32(&b, LQ_GGUF_ARRAY);
    put_u64(&b, 1), put_u32(&b, LQ_GGUF_UINT8), put_u64(&b, 0);
    REFUSED(&b, LQ_EUNSUPPORTED, "key nested: arrays of arrays are not supported");
    header(&b, 3, 0, 1), key(&b, "a", LQ_GGUF_ARRAY), put_u32(&b, 77), put_u64(&b, 0);
    REFUSED(&b, LQ_EFORMAT, "key a: unknown array element type 77");
    header(&b, 3, 0, 1), key(&b, "flag", LQ_GGUF_BOOL), put_u8(&b, 2);
    REFUSED(&b, LQ_EFORMAT, "key flag: bool value 2 is neither 0 nor 1");
    header(&b, 3, 0, 2), key(&b, "k", LQ_GGUF_UINT8), put_u8(&b, 1);
    key(&b, "k", LQ_GGUF_UINT8), put_u8(&b, 2);
    REFUSED(&b, LQ_EFORMAT, "key k appears twice");
    header(&b, 3, 0, 1), put_u64(&b, 3), put_bytes(&b, "a\0b", 3), put_u32(&b, 0), put_u8(&b, 0);
    REFUSED(&b, LQ_EFORMAT, "metadata entry 0: key is empty or holds a NUL byte");
    header(&b, 3, 0, 1), key(&b, "general.alignment", LQ_GGUF_UINT32), put_u32(&b, 48);
    REFUSED(&b, LQ_EFORMAT, "key general.alignment is 48, not a power of two");
    header(&b, 3, 0, 1), key(&b, "general.alignment", LQ_GGUF_UINT64), put_u64(&b, 32);
    REFUSED(&b, LQ_EFORMAT, "key general.alignment is uint64, expected uint32");
}

/* A file with one metadata-free tensor info list and `data_bytes` zero bytes of data. */
static void tensors_file(struct buffer *b, int count, const char *const *names,
                         const uint32_t *n_dims, uint64_t (*dims)[5], const uint32_t *types,
                         const uint64_t *offsets, size_t data_bytes) {
    header(b, 3, (uint64_t)count, 0);
    for (int i = 0; i < count; i++)
        tensor_info(b, names[i], n_dims[i], dims[i], types[i], offsets[i]);
    pad_to(b, 32);
    for (size_t i = 0; i < data_bytes; i++) put_u8(b, 0);
}

static void test_bad_tensors(void) {
    struct buffer b = {0};
    const char *names[2] = {"blk.0.attn_q.weight", "blk.0.attn_k.weight"};
    const char *same[2] = {"w", "w"};
    uint32_t one[2] = {1, 1}, two[2] = {2, 2}, five[2] = {5, 1};
    uint64_t dims[2][5] = {{32, 1, 1, 1, 1}, {32, 1, 1, 1, 1}};
    uint32_t f32[2] = {LQ_GGML_F32, LQ_GGML_F32};
    uint64_t offsets[2] = {0, 128};

    tensors_file(&b, 2, names, one, dims, f32, offsets, 256);
    struct lq_gguf *gguf = NULL;
    struct lq_error err = {0};
    CHECK_MSG(open_built(&b, &gguf, &err) == LQ_OK, "%s", err.message); /* the baseline */
    lq_gguf_close(gguf);

    tensors_file(&b, 2, names, five, dims, f32, offsets, 256);
    REFUSED(&b, LQ_EFORMAT, "tensor blk.0.attn_q.weight: n_dims 5 exceeds 4");
    uint64_t huge[2][5] = {{1ull << 32, 1ull << 32, 1, 1, 1}, {32, 1, 1, 1, 1}};
    tensors_file(&b, 2, names, two, huge, f32, offsets, 256);
    REFUSED(&b, LQ_EFORMAT, "tensor blk.0.attn_q.weight: dims [4294967296, 4294967296] overflow");
    uint64_t negative[2][5] = {{1ull << 63, 1, 1, 1, 1}, {32, 1, 1, 1, 1}};
    tensors_file(&b, 2, names, one, negative, f32, offsets, 256);
    REFUSED(&b, LQ_EFORMAT, "overflow");
    uint32_t unknown[2] = {4, LQ_GGML_F32};
    tensors_file(&b, 2, names, one, dims, unknown, offsets, 256);
    REFUSED(&b, LQ_EFORMAT, "tensor blk.0.attn_q.weight: unknown ggml type 4");
    uint32_t beyond[2] = {LQ_GGML_F32, 1000};
    tensors_file(&b, 2, names, one, dims, beyond, offsets, 256);
    REFUSED(&b, LQ_EFORMAT, "tensor blk.0.attn_k.weight: unknown ggml type 1000");
    uint64_t odd[2][5] = {{48, 1, 1, 1, 1}, {32, 1, 1, 1, 1}};
    uint32_t q4[2] = {LQ_GGML_Q4_0, LQ_GGML_F32};
    tensors_file(&b, 2, names, one, odd, q4, offsets, 256);
    REFUSED(&b, LQ_EFORMAT, "row length 48 is not a multiple of the Q4_0 block size 32");
    uint64_t past[2] = {0, 160};
    tensors_file(&b, 2, names, one, dims, f32, past, 256);
    REFUSED(&b, LQ_EFORMAT,
            "tensor blk.0.attn_k.weight: data (offset 160, 128 bytes) runs past the end of the "
            "file (the data section holds 256 bytes)");
    uint64_t far[2] = {0, UINT64_MAX - 31};
    tensors_file(&b, 2, names, one, dims, f32, far, 256);
    REFUSED(&b, LQ_EFORMAT, "runs past the end of the file");
    tensors_file(&b, 2, names, one, dims, f32, offsets, 200); /* file cut short */
    REFUSED(&b, LQ_EFORMAT, "tensor blk.0.attn_k.weight: data (offset 128, 128 bytes) runs past");
    uint64_t misaligned[2] = {0, 130};
    tensors_file(&b, 2, names, one, dims, f32, misaligned, 512);
    REFUSED(&b, LQ_EFORMAT,
            "tensor blk.0.attn_k.weight: offset 130 is not a multiple of the "
            "alignment 32");
    uint64_t overlapping[2] = {64, 0};
    tensors_file(&b, 2, names, one, dims, f32, overlapping, 256);
    REFUSED(&b, LQ_EFORMAT,
            "tensors blk.0.attn_k.weight (bytes 0..128) and blk.0.attn_q.weight (bytes 64..192) "
            "overlap");
    tensors_file(&b, 2, same, one, dims, f32, offsets, 256);
    REFUSED(&b, LQ_EFORMAT, "tensor w appears twice");
    const char *empty[2] = {"", "b"};
    tensors_file(&b, 2, empty, one, dims, f32, offsets, 256);
    REFUSED(&b, LQ_EFORMAT, "tensor info 0: name is empty");
    header(&b, 3, 1, 0), put_string(&b, "w"), put_u32(&b, 4), put_u64(&b, 4), put_u64(&b, 4);
    REFUSED(&b, LQ_EFORMAT, "tensor w is truncated");
    /* zero-size tensors may share offsets; a whole-file scan never trips on them */
    uint64_t empty_dims[2][5] = {{0, 1, 1, 1, 1}, {32, 1, 1, 1, 1}};
    uint64_t shared[2] = {0, 0};
    tensors_file(&b, 2, names, one, empty_dims, f32, shared, 128);
    gguf = NULL;
    CHECK_MSG(open_built(&b, &gguf, &err) == LQ_OK, "%s", err.message);
    const struct lq_gguf_tensor *t = lq_gguf_tensor_at(gguf, 0);
    CHECK(t && t->numel == 0 && t->nbytes == 0);
    CHECK(t && lq_gguf_tensor_to_f32(gguf, t, NULL, &err) == LQ_OK);
    lq_gguf_close(gguf);
}

static void test_io_errors(void) {
    struct lq_gguf *gguf = NULL;
    struct lq_error err = {0};
    CHECK(lq_gguf_open("/nonexistent/model.gguf", &gguf, &err) == LQ_EIO && gguf == NULL);
    CHECK(strstr(err.message, "/nonexistent/model.gguf: cannot open") != NULL);
    CHECK(lq_gguf_open("/tmp", &gguf, &err) == LQ_EIO);
    CHECK(strcmp(lq_ggml_type_name(LQ_GGML_Q6_K), "Q6_K") == 0);
    CHECK(strcmp(lq_ggml_type_name(4), "?") == 0 && lq_ggml_type_block_size(4) == 0);
    CHECK(lq_ggml_type_block_bytes(LQ_GGML_Q5_K) == 176);
    CHECK(strcmp(lq_gguf_value_type_name(LQ_GGUF_FLOAT64), "float64") == 0);
}

LQ_TEST_MAIN(LQ_TEST(test_valid_file), LQ_TEST(test_version_2_and_default_alignment),
             LQ_TEST(test_bad_header), LQ_TEST(test_bad_metadata), LQ_TEST(test_bad_tensors),
             LQ_TEST(test_io_errors))
