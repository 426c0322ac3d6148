/* GGUF reader.
 *
 * Layout (ggml's docs/gguf.md): magic "GGUF", uint32 version, uint64 tensor count, uint64
 * metadata count; the metadata entries (string key, uint32 value type, value); the tensor
 * infos (string name, uint32 n_dims, uint64 dims[n_dims], uint32 ggml type, uint64 offset);
 * padding to general.alignment; the data section, in which each tensor's offset is counted.
 * Strings are a uint64 byte count and the bytes, without a terminator.
 *
 * Every byte is hostile: each count or length is compared with the bytes left in the file
 * before anything is allocated for it (an array of N elements needs N times the smallest
 * element size), so allocations stay within a small multiple of the file size. The whole
 * file is validated before any tensor is handed out. */
#include "core/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/gguf_internal.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "GGUF data is little-endian and is read here as host-order numbers"
#endif

/* Longest name quoted in a message, so that the file label and the point both fit. */
#define MAX_NAME_IN_MESSAGE 160
/* Smallest encodings: a metadata entry (empty key, type, one-byte value), a tensor info
 * (empty name, n_dims, type, offset), a string (its length). */
#define MIN_ENTRY_BYTES 13u
#define MIN_TENSOR_INFO_BYTES 24u
#define STRING_LENGTH_BYTES 8u
/* Buffers for "key <name>" phrases, and for phrases built on those. */
#define WHAT_SIZE (MAX_NAME_IN_MESSAGE + 64)
#define PHRASE_SIZE (WHAT_SIZE + 64)

struct gguf_kv {
    char *key;
    uint32_t type;
    uint32_t element_type; /* arrays */
    uint64_t count;        /* arrays: elements; 1 otherwise */
    const uint8_t *value;  /* scalars and numeric arrays: the bytes in the file */
    char *string;          /* strings: a NUL-terminated copy */
    size_t string_length;
    char **strings; /* string arrays: one allocation holding pointers, lengths and text */
    size_t *lengths;
};

struct lq_gguf {
    char *label;
    void *mapping; /* only when lq_gguf_open mapped the file */
    size_t mapping_size;
    const uint8_t *bytes;
    size_t size;
    uint32_t version, alignment;
    uint64_t data_offset, data_size;
    struct gguf_kv *kvs; /* file order */
    size_t kv_count;
    const struct gguf_kv **kv_by_key;
    struct lq_gguf_tensor *tensors; /* file order */
    size_t tensor_count;
    const struct lq_gguf_tensor **by_name;
};

static const struct {
    const char *name;
    uint32_t size; /* bytes of a scalar; 0 for string and array */
} value_types[] = {
    [LQ_GGUF_UINT8] = {"uint8", 1},     [LQ_GGUF_INT8] = {"int8", 1},
    [LQ_GGUF_UINT16] = {"uint16", 2},   [LQ_GGUF_INT16] = {"int16", 2},
    [LQ_GGUF_UINT32] = {"uint32", 4},   [LQ_GGUF_INT32] = {"int32", 4},
    [LQ_GGUF_FLOAT32] = {"float32", 4}, [LQ_GGUF_BOOL] = {"bool", 1},
    [LQ_GGUF_STRING] = {"string", 0},   [LQ_GGUF_ARRAY] = {"array", 0},
    [LQ_GGUF_UINT64] = {"uint64", 8},   [LQ_GGUF_INT64] = {"int64", 8},
    [LQ_GGUF_FLOAT64] = {"float64", 8},
};
#define VALUE_TYPE_COUNT (sizeof value_types / sizeof value_types[0])

const char *lq_gguf_value_type_name(uint32_t type) {
    return type < VALUE_TYPE_COUNT ? value_types[type].name : "?";
}

/* ---- helpers ---- */

static uint32_t load_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t load_u64(const uint8_t *p) {
    return (uint64_t)load_u32(p) | (uint64_t)load_u32(p + 4) << 32;
}

/* A name from the file as messages show it: cut, control bytes replaced by '?'. */
static const char *shown(const char *name, char buffer[MAX_NAME_IN_MESSAGE + 4]) {
    size_t i = 0;
    for (; name[i] && i < MAX_NAME_IN_MESSAGE; i++) {
        unsigned char c = (unsigned char)name[i];
        buffer[i] = c < 0x20 || c == 0x7f ? '?' : (char)c;
    }
    if (name[i]) buffer[i++] = '.', buffer[i++] = '.', buffer[i++] = '.';
    buffer[i] = '\0';
    return buffer;
}

static bool multiply(uint64_t a, uint64_t b, uint64_t *out) {
    if (a != 0 && b > UINT64_MAX / a) return false;
    *out = a * b;
    return true;
}

/* ---- parser ---- */

struct parser {
    struct lq_gguf *gguf;
    size_t at;
    struct lq_error *err;
};

static size_t left(const struct parser *p) {
    return p->gguf->size - p->at;
}

static int fail(struct parser *p, int code, const char *format, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(struct parser *p, int code, const char *format, ...) {
    char details[LQ_ERROR_MESSAGE_SIZE];
    va_list args;
    va_start(args, format);
    vsnprintf(details, sizeof details, format, args);
    va_end(args);
    return lq_error_set(p->err, code, "%s: %s", p->gguf->label, details);
}

/* Takes n bytes, or reports what (a phrase like "key x: value") as truncated. */
static int take(struct parser *p, size_t n, const uint8_t **out, const char *what) {
    if (n > left(p))
        return fail(p, LQ_EFORMAT,
                    "%s is truncated: needs %zu bytes at offset %zu, the file has %zu left", what,
                    n, p->at, left(p));
    *out = p->gguf->bytes + p->at;
    p->at += n;
    return LQ_OK;
}

static int take_u32(struct parser *p, uint32_t *out, const char *what) {
    const uint8_t *bytes = NULL;
    int rc = take(p, 4, &bytes, what);
    if (rc == LQ_OK) *out = load_u32(bytes);
    return rc;
}

static int take_u64(struct parser *p, uint64_t *out, const char *what) {
    const uint8_t *bytes = NULL;
    int rc = take(p, 8, &bytes, what);
    if (rc == LQ_OK) *out = load_u64(bytes);
    return rc;
}

/* A string's length and bytes, the length checked against the file before use. */
static int take_string(struct parser *p, const uint8_t **text, size_t *length, const char *what) {
    uint64_t declared;
    char phrase[PHRASE_SIZE];
    snprintf(phrase, sizeof phrase, "%s length", what);
    int rc = take_u64(p, &declared, phrase);
    if (rc != LQ_OK) return rc;
    if (declared > left(p))
        return fail(p, LQ_EFORMAT,
                    "%s: string length %llu runs past the end of the file (%zu bytes left at "
                    "offset %zu)",
                    what, (unsigned long long)declared, left(p), p->at);
    *length = (size_t)declared;
    return take(p, *length, text, what);
}

static char *copy_text(const uint8_t *text, size_t length) {
    char *copy = malloc(length + 1);
    if (copy) {
        if (length) memcpy(copy, text, length);
        copy[length] = '\0';
    }
    return copy;
}

/* An array of strings: one pass validating lengths and summing them, then one allocation. */
static int parse_string_array(struct parser *p, struct gguf_kv *kv, const char *what) {
    size_t count = (size_t)kv->count, start = p->at, text_bytes = 0;
    for (size_t i = 0; i < count; i++) {
        const uint8_t *text;
        size_t length;
        char phrase[PHRASE_SIZE];
        snprintf(phrase, sizeof phrase, "%s: element %zu", what, i);
        int rc = take_string(p, &text, &length, phrase);
        if (rc != LQ_OK) return rc;
        text_bytes += length + 1; /* bounded by the file size plus count */
    }
    size_t header = count * (sizeof(char *) + sizeof(size_t));
    char *block = malloc(header + text_bytes + 1);
    if (!block) return fail(p, LQ_ENOMEM, "%s: out of memory for %zu strings", what, count);
    kv->strings = (char **)(void *)block;
    kv->lengths = (size_t *)(void *)(block + count * sizeof(char *));
    char *text_out = block + header;
    p->at = start;
    for (size_t i = 0; i < count; i++) {
        size_t length = (size_t)load_u64(p->gguf->bytes + p->at);
        p->at += STRING_LENGTH_BYTES;
        if (length) memcpy(text_out, p->gguf->bytes + p->at, length);
        text_out[length] = '\0';
        kv->strings[i] = text_out;
        kv->lengths[i] = length;
        text_out += length + 1;
        p->at += length;
    }
    return LQ_OK;
}

static int parse_value(struct parser *p, struct gguf_kv *kv, const char *what) {
    char phrase[PHRASE_SIZE];
    kv->count = 1;
    if (kv->type == LQ_GGUF_STRING) {
        const uint8_t *text;
        int rc = take_string(p, &text, &kv->string_length, what);
        if (rc != LQ_OK) return rc;
        kv->string = copy_text(text, kv->string_length);
        if (!kv->string) return fail(p, LQ_ENOMEM, "%s: out of memory for the string", what);
        return LQ_OK;
    }
    if (kv->type != LQ_GGUF_ARRAY) {
        snprintf(phrase, sizeof phrase, "%s: %s value", what, value_types[kv->type].name);
        int rc = take(p, value_types[kv->type].size, &kv->value, phrase);
        if (rc == LQ_OK && kv->type == LQ_GGUF_BOOL && kv->value[0] > 1)
            return fail(p, LQ_EFORMAT, "%s: bool value %u is neither 0 nor 1", what, kv->value[0]);
        return rc;
    }
    snprintf(phrase, sizeof phrase, "%s: array element type", what);
    int rc = take_u32(p, &kv->element_type, phrase);
    if (rc != LQ_OK) return rc;
    if (kv->element_type >= VALUE_TYPE_COUNT)
        return fail(p, LQ_EFORMAT, "%s: unknown array element type %u", what, kv->element_type);
    if (kv->element_type == LQ_GGUF_ARRAY)
        return fail(p, LQ_EUNSUPPORTED, "%s: arrays of arrays are not supported", what);
    snprintf(phrase, sizeof phrase, "%s: array count", what);
    rc = take_u64(p, &kv->count, phrase);
    if (rc != LQ_OK) return rc;
    uint32_t element_size = kv->element_type == LQ_GGUF_STRING ? STRING_LENGTH_BYTES
                                                               : value_types[kv->element_type].size;
    if (kv->count > left(p) / element_size)
        return fail(p, LQ_EFORMAT,
                    "%s: array of %llu %s elements cannot fit in the %zu bytes left in the file",
                    what, (unsigned long long)kv->count, value_types[kv->element_type].name,
                    left(p));
    if (kv->element_type == LQ_GGUF_STRING) return parse_string_array(p, kv, what);
    snprintf(phrase, sizeof phrase, "%s: array", what);
    rc = take(p, (size_t)kv->count * element_size, &kv->value, phrase);
    for (size_t i = 0; rc == LQ_OK && kv->element_type == LQ_GGUF_BOOL && i < kv->count; i++) {
        if (kv->value[i] > 1)
            return fail(p, LQ_EFORMAT, "%s: bool element %zu is %u, neither 0 nor 1", what, i,
                        kv->value[i]);
    }
    return rc;
}

static int compare_kv_keys(const void *a, const void *b) {
    return strcmp((*(const struct gguf_kv *const *)a)->key,
                  (*(const struct gguf_kv *const *)b)->key);
}

static int compare_tensor_names(const void *a, const void *b) {
    return strcmp((*(const struct lq_gguf_tensor *const *)a)->name,
                  (*(const struct lq_gguf_tensor *const *)b)->name);
}

static int compare_tensor_offsets(const void *a, const void *b) {
    const struct lq_gguf_tensor *x = *(const struct lq_gguf_tensor *const *)a;
    const struct lq_gguf_tensor *y = *(const struct lq_gguf_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int parse_metadata(struct parser *p, uint64_t count) {
    struct lq_gguf *gguf = p->gguf;
    if (count > left(p) / MIN_ENTRY_BYTES)
        return fail(p, LQ_EFORMAT,
                    "metadata count %llu cannot fit in the %zu bytes left in the file",
                    (unsigned long long)count, left(p));
    gguf->kvs = calloc(count ? (size_t)count : 1, sizeof *gguf->kvs);
    gguf->kv_by_key = calloc(count ? (size_t)count : 1, sizeof *gguf->kv_by_key);
    if (!gguf->kvs || !gguf->kv_by_key)
        return fail(p, LQ_ENOMEM, "out of memory for %llu metadata entries",
                    (unsigned long long)count);
    for (size_t i = 0; i < (size_t)count; i++) {
        struct gguf_kv *kv = &gguf->kvs[i];
        char what[WHAT_SIZE], name[MAX_NAME_IN_MESSAGE + 4];
        const uint8_t *text;
        size_t length;
        snprintf(what, sizeof what, "metadata entry %zu: key", i);
        int rc = take_string(p, &text, &length, what);
        if (rc != LQ_OK) return rc;
        if (length == 0 || memchr(text, 0, length))
            return fail(p, LQ_EFORMAT, "metadata entry %zu: key is empty or holds a NUL byte", i);
        kv->key = copy_text(text, length);
        if (!kv->key) return fail(p, LQ_ENOMEM, "out of memory for metadata keys");
        gguf->kv_count++; /* counted from here on so that close frees what it owns */
        snprintf(what, sizeof what, "key %s", shown(kv->key, name));
        rc = take_u32(p, &kv->type, what);
        if (rc != LQ_OK) return rc;
        if (kv->type >= VALUE_TYPE_COUNT)
            return fail(p, LQ_EFORMAT, "%s: unknown value type %u", what, kv->type);
        rc = parse_value(p, kv, what);
        if (rc != LQ_OK) return rc;
        gguf->kv_by_key[i] = kv;
    }
    qsort(gguf->kv_by_key, gguf->kv_count, sizeof *gguf->kv_by_key, compare_kv_keys);
    for (size_t i = 1; i < gguf->kv_count; i++) {
        char name[MAX_NAME_IN_MESSAGE + 4];
        if (strcmp(gguf->kv_by_key[i - 1]->key, gguf->kv_by_key[i]->key) == 0)
            return fail(p, LQ_EFORMAT, "key %s appears twice",
                        shown(gguf->kv_by_key[i]->key, name));
    }
    return LQ_OK;
}

static const struct gguf_kv *find_kv(const struct lq_gguf *gguf, const char *key) {
    if (!gguf || !key || gguf->kv_count == 0) return NULL; /* bsearch wants a base */
    struct gguf_kv probe = {.key = (char *)key};
    const struct gguf_kv *probe_pointer = &probe;
    const struct gguf_kv **found = bsearch(&probe_pointer, gguf->kv_by_key, gguf->kv_count,
                                           sizeof *gguf->kv_by_key, compare_kv_keys);
    return found ? *found : NULL;
}

static int parse_alignment(struct parser *p) {
    const struct gguf_kv *kv = find_kv(p->gguf, "general.alignment");
    p->gguf->alignment = LQ_GGUF_DEFAULT_ALIGNMENT;
    if (!kv) return LQ_OK;
    if (kv->type != LQ_GGUF_UINT32)
        return fail(p, LQ_EFORMAT, "key general.alignment is %s, expected uint32",
                    value_types[kv->type].name);
    uint32_t alignment = load_u32(kv->value);
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
        return fail(p, LQ_EFORMAT, "key general.alignment is %u, not a power of two", alignment);
    p->gguf->alignment = alignment;
    return LQ_OK;
}

/* One tensor info: name, dims, type, offset; sizes checked, data range checked later. */
static int parse_tensor_info(struct parser *p, size_t index, struct lq_gguf_tensor *tensor) {
    char what[WHAT_SIZE], name[MAX_NAME_IN_MESSAGE + 4];
    const uint8_t *text;
    size_t length;
    snprintf(what, sizeof what, "tensor info %zu: name", index);
    int rc = take_string(p, &text, &length, what);
    if (rc != LQ_OK) return rc;
    if (length == 0 || memchr(text, 0, length))
        return fail(p, LQ_EFORMAT, "tensor info %zu: name is empty or holds a NUL byte", index);
    tensor->name = copy_text(text, length);
    if (!tensor->name) return fail(p, LQ_ENOMEM, "out of memory for tensor names");
    p->gguf->tensor_count++; /* counted from here on so that close frees the name */
    snprintf(what, sizeof what, "tensor %s", shown(tensor->name, name));
    uint32_t n_dims;
    rc = take_u32(p, &n_dims, what);
    if (rc != LQ_OK) return rc;
    if (n_dims > LQ_GGUF_MAX_DIMS)
        return fail(p, LQ_EFORMAT, "%s: n_dims %u exceeds %d", what, n_dims, LQ_GGUF_MAX_DIMS);
    tensor->n_dims = (int)n_dims;
    uint64_t numel = 1;
    bool overflow = false;
    for (int d = 0; d < LQ_GGUF_MAX_DIMS; d++) {
        tensor->dims[d] = 1;
        if (d >= tensor->n_dims) continue;
        rc = take_u64(p, &tensor->dims[d], what);
        if (rc != LQ_OK) return rc;
        /* ggml holds dims and their product as int64 */
        if (tensor->dims[d] > INT64_MAX || !multiply(numel, tensor->dims[d], &numel) ||
            numel > INT64_MAX)
            overflow = true;
    }
    if (overflow) {
        char dims[160];
        size_t used = 0;
        for (int d = 0; d < tensor->n_dims; d++)
            used += (size_t)snprintf(dims + used, sizeof dims - used, "%s%llu", d ? ", " : "",
                                     (unsigned long long)tensor->dims[d]);
        return fail(p, LQ_EFORMAT, "%s: dims [%s] overflow: their product exceeds 2^63 - 1", what,
                    dims);
    }
    for (int d = 0; d < LQ_GGUF_MAX_DIMS; d++)
        if (tensor->dims[d] == 0) numel = 0;
    tensor->numel = numel;
    rc = take_u32(p, &tensor->type, what);
    if (rc != LQ_OK) return rc;
    uint32_t block_size = lq_ggml_type_block_size(tensor->type);
    if (block_size == 0) return fail(p, LQ_EFORMAT, "%s: unknown ggml type %u", what, tensor->type);
    if (tensor->dims[0] % block_size != 0)
        return fail(p, LQ_EFORMAT, "%s: row length %llu is not a multiple of the %s block size %u",
                    what, (unsigned long long)tensor->dims[0], lq_ggml_type_name(tensor->type),
                    block_size);
    /* numel / block_size blocks; cannot overflow beyond what the data check then refuses */
    if (!multiply(numel / block_size, lq_ggml_type_block_bytes(tensor->type), &tensor->nbytes))
        return fail(p, LQ_EFORMAT, "%s: byte size overflows", what);
    return take_u64(p, &tensor->offset, what);
}

static int parse_tensors(struct parser *p, uint64_t count) {
    struct lq_gguf *gguf = p->gguf;
    if (count > left(p) / MIN_TENSOR_INFO_BYTES)
        return fail(p, LQ_EFORMAT, "tensor count %llu cannot fit in the %zu bytes left in the file",
                    (unsigned long long)count, left(p));
    gguf->tensors = calloc(count ? (size_t)count : 1, sizeof *gguf->tensors);
    gguf->by_name = calloc(count ? (size_t)count : 1, sizeof *gguf->by_name);
    if (!gguf->tensors || !gguf->by_name)
        return fail(p, LQ_ENOMEM, "out of memory for %llu tensors", (unsigned long long)count);
    for (size_t i = 0; i < (size_t)count; i++) {
        int rc = parse_tensor_info(p, i, &gguf->tensors[i]);
        if (rc != LQ_OK) return rc;
        gguf->by_name[i] = &gguf->tensors[i];
    }
    /* The data section starts at the next multiple of the alignment (it may be empty). */
    uint64_t end = p->at;
    gguf->data_offset = (end + gguf->alignment - 1) / gguf->alignment * gguf->alignment;
    gguf->data_size = gguf->data_offset < gguf->size ? gguf->size - gguf->data_offset : 0;
    for (size_t i = 0; i < gguf->tensor_count; i++) {
        const struct lq_gguf_tensor *t = &gguf->tensors[i];
        char name[MAX_NAME_IN_MESSAGE + 4];
        if (t->offset % gguf->alignment != 0)
            return fail(p, LQ_EFORMAT,
                        "tensor %s: offset %llu is not a multiple of the alignment %u",
                        shown(t->name, name), (unsigned long long)t->offset, gguf->alignment);
        if (t->offset > gguf->data_size || t->nbytes > gguf->data_size - t->offset)
            return fail(p, LQ_EFORMAT,
                        "tensor %s: data (offset %llu, %llu bytes) runs past the end of the file "
                        "(the data section holds %llu bytes)",
                        shown(t->name, name), (unsigned long long)t->offset,
                        (unsigned long long)t->nbytes, (unsigned long long)gguf->data_size);
    }
    qsort(gguf->by_name, gguf->tensor_count, sizeof *gguf->by_name, compare_tensor_names);
    for (size_t i = 1; i < gguf->tensor_count; i++) {
        char name[MAX_NAME_IN_MESSAGE + 4];
        if (strcmp(gguf->by_name[i - 1]->name, gguf->by_name[i]->name) == 0)
            return fail(p, LQ_EFORMAT, "tensor %s appears twice",
                        shown(gguf->by_name[i]->name, name));
    }
    /* Overlaps: in offset order, each non-empty range starts at or after the furthest end. */
    const struct lq_gguf_tensor **order =
        malloc((gguf->tensor_count ? gguf->tensor_count : 1) * sizeof *order);
    if (!order) return fail(p, LQ_ENOMEM, "out of memory for %zu tensors", gguf->tensor_count);
    memcpy(order, gguf->by_name, gguf->tensor_count * sizeof *order);
    qsort(order, gguf->tensor_count, sizeof *order, compare_tensor_offsets);
    const struct lq_gguf_tensor *furthest = NULL;
    int rc = LQ_OK;
    for (size_t i = 0; i < gguf->tensor_count && rc == LQ_OK; i++) {
        const struct lq_gguf_tensor *t = order[i];
        if (t->nbytes == 0) continue;
        if (furthest && t->offset < furthest->offset + furthest->nbytes) {
            char a[MAX_NAME_IN_MESSAGE + 4], b[MAX_NAME_IN_MESSAGE + 4];
            rc = fail(p, LQ_EFORMAT,
                      "tensors %s (bytes %llu..%llu) and %s (bytes %llu..%llu) overlap",
                      shown(furthest->name, a), (unsigned long long)furthest->offset,
                      (unsigned long long)(furthest->offset + furthest->nbytes), shown(t->name, b),
                      (unsigned long long)t->offset, (unsigned long long)(t->offset + t->nbytes));
        }
        if (!furthest || t->offset + t->nbytes > furthest->offset + furthest->nbytes) furthest = t;
    }
    free(order);
    return rc;
}

static int parse_file(struct lq_gguf *gguf, struct lq_error *err) {
    struct parser parser = {.gguf = gguf, .err = err}, *p = &parser;
    if (gguf->size < 4)
        return fail(p, LQ_EFORMAT, "file is %zu bytes, too short for the GGUF magic", gguf->size);
    if (memcmp(gguf->bytes, "GGUF", 4) != 0) {
        char magic[5];
        for (int i = 0; i < 4; i++)
            magic[i] = gguf->bytes[i] >= 0x20 && gguf->bytes[i] < 0x7f ? (char)gguf->bytes[i] : '?';
        magic[4] = '\0';
        return fail(p, LQ_EFORMAT, "not a GGUF file: magic is \"%s\", expected \"GGUF\"", magic);
    }
    p->at = 4;
    uint64_t tensor_count, kv_count;
    int rc = take_u32(p, &gguf->version, "header: version");
    if (rc != LQ_OK) return rc;
    if (gguf->version != 2 && gguf->version != 3) {
        if ((gguf->version & 0xffffu) == 0 && (gguf->version >> 16) != 0)
            return fail(p, LQ_EUNSUPPORTED,
                        "version field reads 0x%08x: a big-endian GGUF file, which lqd does not "
                        "read",
                        gguf->version);
        return fail(p, LQ_EUNSUPPORTED, "GGUF version %u is not supported (lqd reads 2 and 3)",
                    gguf->version);
    }
    if ((rc = take_u64(p, &tensor_count, "header: tensor count")) != LQ_OK) return rc;
    if ((rc = take_u64(p, &kv_count, "header: metadata count")) != LQ_OK) return rc;
    if ((rc = parse_metadata(p, kv_count)) != LQ_OK) return rc;
    if ((rc = parse_alignment(p)) != LQ_OK) return rc;
    return parse_tensors(p, tensor_count);
}

void lq_gguf_close(struct lq_gguf *gguf) {
    if (!gguf) return;
    for (size_t i = 0; i < gguf->kv_count; i++) {
        free(gguf->kvs[i].key);
        free(gguf->kvs[i].string);
        free(gguf->kvs[i].strings);
    }
    for (size_t i = 0; i < gguf->tensor_count; i++) free((char *)gguf->tensors[i].name);
    free(gguf->kvs);
    free(gguf->kv_by_key);
    free(gguf->tensors);
    free(gguf->by_name);
    if (gguf->mapping) munmap(gguf->mapping, gguf->mapping_size);
    free(gguf->label);
    free(gguf);
}

static struct lq_gguf *gguf_create(const char *label) {
    struct lq_gguf *gguf = calloc(1, sizeof *gguf);
    if (!gguf) return NULL;
    gguf->label = strdup(label ? label : "<buffer>");
    if (!gguf->label) {
        free(gguf);
        return NULL;
    }
    return gguf;
}

static int finish_open(struct lq_gguf *gguf, struct lq_gguf **out, struct lq_error *err) {
    int rc = parse_file(gguf, err);
    if (rc != LQ_OK) {
        lq_gguf_close(gguf);
        return rc;
    }
    *out = gguf;
    return LQ_OK;
}

int lq_gguf_open_buffer(const void *data, size_t size, const char *label, struct lq_gguf **out,
                        struct lq_error *err) {
    if (!out || (!data && size))
        return lq_error_set(err, LQ_EINVAL, "lq_gguf_open_buffer: NULL argument");
    *out = NULL;
    struct lq_gguf *gguf = gguf_create(label);
    if (!gguf) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", label ? label : "<buffer>");
    static const uint8_t empty[1];
    gguf->bytes = data ? data : empty;
    gguf->size = size;
    return finish_open(gguf, out, err);
}

int lq_gguf_open(const char *path, struct lq_gguf **out, struct lq_error *err) {
    if (!path || !out) return lq_error_set(err, LQ_EINVAL, "lq_gguf_open: NULL argument");
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return lq_error_set(err, LQ_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat info;
    if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode) || (uint64_t)info.st_size > SIZE_MAX) {
        int saved = errno;
        close(fd);
        return lq_error_set(err, LQ_EIO, "%s: not a readable regular file%s%s", path,
                            saved ? ": " : "", saved ? strerror(saved) : "");
    }
    struct lq_gguf *gguf = gguf_create(path);
    if (!gguf) {
        close(fd);
        return lq_error_set(err, LQ_ENOMEM, "%s: out of memory", path);
    }
    static const uint8_t empty[1];
    gguf->bytes = empty;
    gguf->size = (size_t)info.st_size;
    if (gguf->size > 0) { /* mmap refuses length 0; an empty file fails validation */
        /* Private read-only mapping; replace model files by rename, never truncate in place
         * (reads of a truncated mapping fault). */
        void *mapping = mmap(NULL, gguf->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (mapping == MAP_FAILED) {
            int saved = errno;
            close(fd);
            lq_gguf_close(gguf);
            return lq_error_set(err, LQ_EIO, "%s: cannot mmap %zu bytes: %s", path,
                                (size_t)info.st_size, strerror(saved));
        }
        gguf->mapping = mapping;
        gguf->mapping_size = gguf->size;
        gguf->bytes = mapping;
    }
    close(fd);
    return finish_open(gguf, out, err);
}

uint32_t lq_gguf_version(const struct lq_gguf *gguf) {
    return gguf ? gguf->version : 0;
}

uint32_t lq_gguf_alignment(const struct lq_gguf *gguf) {
    return gguf ? gguf->alignment : 0;
}

uint64_t lq_gguf_data_offset(const struct lq_gguf *gguf) {
    return gguf ? gguf->data_offset : 0;
}

/* ---- metadata getters ---- */

size_t lq_gguf_metadata_count(const struct lq_gguf *gguf) {
    return gguf ? gguf->kv_count : 0;
}

const char *lq_gguf_metadata_key_at(const struct lq_gguf *gguf, size_t index) {
    return gguf && index < gguf->kv_count ? gguf->kvs[index].key : NULL;
}

int lq_gguf_metadata_type(const struct lq_gguf *gguf, const char *key,
                          enum lq_gguf_value_type *type, enum lq_gguf_value_type *element_type,
                          uint64_t *count) {
    const struct gguf_kv *kv = find_kv(gguf, key);
    if (!kv) return LQ_ENOTFOUND;
    if (type) *type = (enum lq_gguf_value_type)kv->type;
    if (element_type) *element_type = (enum lq_gguf_value_type)kv->element_type;
    if (count) *count = kv->count;
    return LQ_OK;
}

/* The entry for key, or LQ_ENOTFOUND with a message. */
static int lookup(const struct lq_gguf *gguf, const char *key, const struct gguf_kv **kv,
                  struct lq_error *err) {
    if (!gguf || !key) return lq_error_set(err, LQ_EINVAL, "lq_gguf_get: NULL argument");
    *kv = find_kv(gguf, key);
    if (!*kv) {
        char name[MAX_NAME_IN_MESSAGE + 4];
        return lq_error_set(err, LQ_ENOTFOUND, "%s: no key %s", gguf->label, shown(key, name));
    }
    return LQ_OK;
}

static int wrong_type(const struct lq_gguf *gguf, const struct gguf_kv *kv, const char *expected,
                      struct lq_error *err) {
    char name[MAX_NAME_IN_MESSAGE + 4];
    if (kv->type == LQ_GGUF_ARRAY)
        return lq_error_set(err, LQ_EFORMAT, "%s: key %s is an array of %s, expected %s",
                            gguf->label, shown(kv->key, name), value_types[kv->element_type].name,
                            expected);
    return lq_error_set(err, LQ_EFORMAT, "%s: key %s is %s, expected %s", gguf->label,
                        shown(kv->key, name), value_types[kv->type].name, expected);
}

static bool is_integer_type(uint32_t type) {
    return type <= LQ_GGUF_INT32 || type == LQ_GGUF_UINT64 || type == LQ_GGUF_INT64;
}

/* An integer element as sign and magnitude, so every type compares with every range. */
struct integer {
    bool negative;
    uint64_t magnitude;
};

static struct integer integer_at(uint32_t type, const uint8_t *p) {
    int64_t value;
    switch (type) {
    case LQ_GGUF_UINT8:
    case LQ_GGUF_BOOL:
        return (struct integer){false, p[0]};
    case LQ_GGUF_UINT16:
        return (struct integer){false, (uint64_t)(p[0] | p[1] << 8)};
    case LQ_GGUF_UINT32:
        return (struct integer){false, load_u32(p)};
    case LQ_GGUF_UINT64:
        return (struct integer){false, load_u64(p)};
    case LQ_GGUF_INT8:
        value = (int8_t)p[0];
        break;
    case LQ_GGUF_INT16:
        value = (int16_t)(uint16_t)(p[0] | p[1] << 8);
        break;
    case LQ_GGUF_INT32:
        value = (int32_t)load_u32(p);
        break;
    case LQ_GGUF_INT64:
        value = (int64_t)load_u64(p);
        break;
    default:
        return (struct integer){false, 0}; /* callers pass numeric types only */
    }
    if (value >= 0) return (struct integer){false, (uint64_t)value};
    return (struct integer){true, (uint64_t)(-(value + 1)) + 1};
}

/* The integer value of key within [-min_magnitude, max]. */
static int get_integer(const struct lq_gguf *gguf, const char *key, uint64_t min_magnitude,
                       uint64_t max, const char *type_name, struct integer *out,
                       struct lq_error *err) {
    const struct gguf_kv *kv;
    int rc = lookup(gguf, key, &kv, err);
    if (rc != LQ_OK) return rc;
    if (!is_integer_type(kv->type)) return wrong_type(gguf, kv, "an integer", err);
    *out = integer_at(kv->type, kv->value);
    if (out->negative ? out->magnitude > min_magnitude : out->magnitude > max) {
        char name[MAX_NAME_IN_MESSAGE + 4];
        return lq_error_set(err, LQ_EFORMAT, "%s: key %s value %s%llu does not fit in %s",
                            gguf->label, shown(kv->key, name), out->negative ? "-" : "",
                            (unsigned long long)out->magnitude, type_name);
    }
    return LQ_OK;
}

static int64_t integer_to_i64(struct integer value) {
    return value.negative ? -(int64_t)(value.magnitude - 1) - 1 : (int64_t)value.magnitude;
}

int lq_gguf_get_u32(const struct lq_gguf *gguf, const char *key, uint32_t *out,
                    struct lq_error *err) {
    struct integer value;
    int rc = get_integer(gguf, key, 0, UINT32_MAX, "uint32", &value, err);
    if (rc == LQ_OK && out) *out = (uint32_t)value.magnitude;
    return rc;
}

int lq_gguf_get_i32(const struct lq_gguf *gguf, const char *key, int32_t *out,
                    struct lq_error *err) {
    struct integer value;
    int rc = get_integer(gguf, key, (uint64_t)INT32_MAX + 1, INT32_MAX, "int32", &value, err);
    if (rc == LQ_OK && out) *out = (int32_t)integer_to_i64(value);
    return rc;
}

int lq_gguf_get_u64(const struct lq_gguf *gguf, const char *key, uint64_t *out,
                    struct lq_error *err) {
    struct integer value;
    int rc = get_integer(gguf, key, 0, UINT64_MAX, "uint64", &value, err);
    if (rc == LQ_OK && out) *out = value.magnitude;
    return rc;
}

int lq_gguf_get_i64(const struct lq_gguf *gguf, const char *key, int64_t *out,
                    struct lq_error *err) {
    struct integer value;
    int rc = get_integer(gguf, key, (uint64_t)INT64_MAX + 1, INT64_MAX, "int64", &value, err);
    if (rc == LQ_OK && out) *out = integer_to_i64(value);
    return rc;
}

static double float_at(uint32_t type, const uint8_t *p) {
    if (type == LQ_GGUF_FLOAT32) {
        uint32_t bits = load_u32(p);
        float value;
        memcpy(&value, &bits, sizeof value);
        return value;
    }
    uint64_t bits = load_u64(p);
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

int lq_gguf_get_f64(const struct lq_gguf *gguf, const char *key, double *out,
                    struct lq_error *err) {
    const struct gguf_kv *kv;
    int rc = lookup(gguf, key, &kv, err);
    if (rc != LQ_OK) return rc;
    if (kv->type != LQ_GGUF_FLOAT32 && kv->type != LQ_GGUF_FLOAT64)
        return wrong_type(gguf, kv, "a float", err);
    if (out) *out = float_at(kv->type, kv->value);
    return LQ_OK;
}

int lq_gguf_get_f32(const struct lq_gguf *gguf, const char *key, float *out, struct lq_error *err) {
    double value;
    int rc = lq_gguf_get_f64(gguf, key, &value, err);
    if (rc == LQ_OK && out) *out = (float)value;
    return rc;
}

int lq_gguf_get_bool(const struct lq_gguf *gguf, const char *key, bool *out, struct lq_error *err) {
    const struct gguf_kv *kv;
    int rc = lookup(gguf, key, &kv, err);
    if (rc != LQ_OK) return rc;
    if (kv->type != LQ_GGUF_BOOL) return wrong_type(gguf, kv, "bool", err);
    if (out) *out = kv->value[0] != 0;
    return LQ_OK;
}

int lq_gguf_get_string(const struct lq_gguf *gguf, const char *key, const char **out,
                       size_t *length, struct lq_error *err) {
    const struct gguf_kv *kv;
    int rc = lookup(gguf, key, &kv, err);
    if (rc != LQ_OK) return rc;
    if (kv->type != LQ_GGUF_STRING) return wrong_type(gguf, kv, "string", err);
    if (out) *out = kv->string;
    if (length) *length = kv->string_length;
    return LQ_OK;
}

int lq_gguf_get_string_array(const struct lq_gguf *gguf, const char *key,
                             const char *const **strings, const size_t **lengths, size_t *count,
                             struct lq_error *err) {
    const struct gguf_kv *kv;
    int rc = lookup(gguf, key, &kv, err);
    if (rc != LQ_OK) return rc;
    if (kv->type != LQ_GGUF_ARRAY || kv->element_type != LQ_GGUF_STRING)
        return wrong_type(gguf, kv, "an array of strings", err);
    if (strings) *strings = (const char *const *)kv->strings;
    if (lengths) *lengths = kv->lengths;
    if (count) *count = (size_t)kv->count;
    return LQ_OK;
}

int lq_gguf_get_array_raw(const struct lq_gguf *gguf, const char *key,
                          enum lq_gguf_value_type *element_type, const void **elements,
                          size_t *count, struct lq_error *err) {
    const struct gguf_kv *kv;
    int rc = lookup(gguf, key, &kv, err);
    if (rc != LQ_OK) return rc;
    if (kv->type != LQ_GGUF_ARRAY || kv->element_type == LQ_GGUF_STRING)
        return wrong_type(gguf, kv, "an array of numbers", err);
    if (element_type) *element_type = (enum lq_gguf_value_type)kv->element_type;
    if (elements) *elements = kv->value;
    if (count) *count = (size_t)kv->count;
    return LQ_OK;
}

/* A numeric array's entry and a malloc'ed output of count * element_size bytes. */
static int number_array(const struct lq_gguf *gguf, const char *key, size_t element_size,
                        const struct gguf_kv **kv, void **out, struct lq_error *err) {
    int rc = lookup(gguf, key, kv, err);
    if (rc != LQ_OK) return rc;
    if ((*kv)->type != LQ_GGUF_ARRAY || (*kv)->element_type == LQ_GGUF_STRING)
        return wrong_type(gguf, *kv, "an array of numbers", err);
    size_t count = (size_t)(*kv)->count; /* each element takes >= 1 byte of the file */
    *out = count <= SIZE_MAX / element_size ? malloc(count ? count * element_size : 1) : NULL;
    if (!*out) return lq_error_set(err, LQ_ENOMEM, "%s: out of memory for an array", gguf->label);
    return LQ_OK;
}

int lq_gguf_get_f64_array(const struct lq_gguf *gguf, const char *key, double **out, size_t *count,
                          struct lq_error *err) {
    const struct gguf_kv *kv;
    void *values = NULL;
    int rc = number_array(gguf, key, sizeof(double), &kv, &values, err);
    if (rc != LQ_OK) return rc;
    double *result = values;
    uint32_t size = value_types[kv->element_type].size;
    for (size_t i = 0; i < kv->count; i++) {
        const uint8_t *p = kv->value + i * size;
        if (kv->element_type == LQ_GGUF_FLOAT32 || kv->element_type == LQ_GGUF_FLOAT64) {
            result[i] = float_at(kv->element_type, p);
        } else {
            struct integer value = integer_at(kv->element_type, p);
            result[i] = value.negative ? -(double)value.magnitude : (double)value.magnitude;
        }
    }
    *out = result;
    if (count) *count = (size_t)kv->count;
    return LQ_OK;
}

int lq_gguf_get_i64_array(const struct lq_gguf *gguf, const char *key, int64_t **out, size_t *count,
                          struct lq_error *err) {
    const struct gguf_kv *kv;
    int rc = lookup(gguf, key, &kv, err);
    if (rc != LQ_OK) return rc;
    if (kv->type == LQ_GGUF_ARRAY &&
        (kv->element_type == LQ_GGUF_FLOAT32 || kv->element_type == LQ_GGUF_FLOAT64))
        return wrong_type(gguf, kv, "an array of integers", err);
    void *values = NULL;
    rc = number_array(gguf, key, sizeof(int64_t), &kv, &values, err);
    if (rc != LQ_OK) return rc;
    int64_t *result = values;
    uint32_t size = value_types[kv->element_type].size;
    for (size_t i = 0; i < kv->count; i++) {
        struct integer value = integer_at(kv->element_type, kv->value + i * size);
        if (!value.negative && value.magnitude > INT64_MAX) {
            char name[MAX_NAME_IN_MESSAGE + 4];
            free(result);
            return lq_error_set(err, LQ_EFORMAT, "%s: key %s element %zu (%llu) exceeds int64",
                                gguf->label, shown(kv->key, name), i,
                                (unsigned long long)value.magnitude);
        }
        result[i] = integer_to_i64(value);
    }
    *out = result;
    if (count) *count = (size_t)kv->count;
    return LQ_OK;
}

int lq_gguf_get_f32_array(const struct lq_gguf *gguf, const char *key, float **out, size_t *count,
                          struct lq_error *err) {
    const struct gguf_kv *kv;
    int rc = lookup(gguf, key, &kv, err);
    if (rc != LQ_OK) return rc;
    if (kv->type != LQ_GGUF_ARRAY || kv->element_type != LQ_GGUF_FLOAT32)
        return wrong_type(gguf, kv, "an array of float32", err);
    void *values = NULL;
    rc = number_array(gguf, key, sizeof(float), &kv, &values, err);
    if (rc != LQ_OK) return rc;
    if (kv->count) memcpy(values, kv->value, (size_t)kv->count * sizeof(float));
    *out = values;
    if (count) *count = (size_t)kv->count;
    return LQ_OK;
}

/* ---- tensors ---- */

size_t lq_gguf_tensor_count(const struct lq_gguf *gguf) {
    return gguf ? gguf->tensor_count : 0;
}

const struct lq_gguf_tensor *lq_gguf_tensor_at(const struct lq_gguf *gguf, size_t index) {
    return gguf && index < gguf->tensor_count ? &gguf->tensors[index] : NULL;
}

const struct lq_gguf_tensor *lq_gguf_find_tensor(const struct lq_gguf *gguf, const char *name) {
    if (!gguf || !name || gguf->tensor_count == 0) return NULL;
    struct lq_gguf_tensor probe = {.name = name};
    const struct lq_gguf_tensor *probe_pointer = &probe;
    const struct lq_gguf_tensor **found = bsearch(&probe_pointer, gguf->by_name, gguf->tensor_count,
                                                  sizeof *gguf->by_name, compare_tensor_names);
    return found ? *found : NULL;
}

const void *lq_gguf_tensor_data(const struct lq_gguf *gguf, const struct lq_gguf_tensor *tensor) {
    return gguf && tensor ? gguf->bytes + gguf->data_offset + tensor->offset : NULL;
}

int lq_gguf_tensor_to_f32(const struct lq_gguf *gguf, const struct lq_gguf_tensor *tensor,
                          float *out, struct lq_error *err) {
    if (!gguf || !tensor)
        return lq_error_set(err, LQ_EINVAL, "lq_gguf_tensor_to_f32: NULL argument");
    char name[MAX_NAME_IN_MESSAGE + 4];
    if (!lq_ggml_type_is_readable(tensor->type))
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "%s: tensor %s: ggml type %s is not supported (lqd reads F32, F16, "
                            "BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K)",
                            gguf->label, shown(tensor->name, name),
                            lq_ggml_type_name(tensor->type));
    if (!out && tensor->numel)
        return lq_error_set(err, LQ_EINVAL, "lq_gguf_tensor_to_f32: NULL output");
    if (tensor->numel > SIZE_MAX / sizeof(float))
        return lq_error_set(err, LQ_ENOMEM, "%s: tensor %s: %llu values do not fit in memory",
                            gguf->label, shown(tensor->name, name),
                            (unsigned long long)tensor->numel);
    if (tensor->numel)
        lq_gguf_dequantize(tensor->type, lq_gguf_tensor_data(gguf, tensor), tensor->numel, out);
    return LQ_OK;
}
