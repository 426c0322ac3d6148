/* A test helper for tests/peer/test_gguf_peer.py until lqd loads GGUF models: prints what the
 * GGUF reader sees, in forms the Python side compares exactly.
 *
 *   gguf_tool meta FILE            one line per key, in file order: KEY \t TYPE \t VALUE
 *   gguf_tool tensors FILE         NAME \t TYPE \t DIMS (ggml order, comma-separated) \t
 *                                  OFFSET \t NBYTES
 *   gguf_tool dump FILE NAME OUT   the tensor dequantized, as raw float32 to OUT
 *
 * Values: integers in decimal, bools 0/1, floats as the hex of their bits (float32 8 digits,
 * float64 16), strings as the hex of their bytes; arrays as "array:ELEMENT_TYPE" then the
 * elements comma-separated. Errors go to stderr (the reader's message) with exit status 1. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/gguf.h"

static void print_hex(const char *text, size_t length) {
    for (size_t i = 0; i < length; i++) printf("%02x", (unsigned char)text[i]);
}

/* One numeric element of type `type` at p (little-endian). */
static void print_number(enum lq_gguf_value_type type, const unsigned char *p) {
    uint64_t bits = 0;
    static const int sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    int size = sizes[type];
    for (int i = 0; i < size; i++) bits |= (uint64_t)p[i] << (8 * i);
    switch (type) {
    case LQ_GGUF_INT8:
        printf("%d", (int8_t)bits);
        break;
    case LQ_GGUF_INT16:
        printf("%d", (int16_t)bits);
        break;
    case LQ_GGUF_INT32:
        printf("%" PRId32, (int32_t)bits);
        break;
    case LQ_GGUF_INT64:
        printf("%" PRId64, (int64_t)bits);
        break;
    case LQ_GGUF_FLOAT32:
        printf("%08" PRIx64, bits);
        break;
    case LQ_GGUF_FLOAT64:
        printf("%016" PRIx64, bits);
        break;
    default:
        printf("%" PRIu64, bits);
        break;
    }
}

static int print_metadata(const struct lq_gguf *gguf) {
    struct lq_error err = {0};
    for (size_t i = 0; i < lq_gguf_metadata_count(gguf); i++) {
        const char *key = lq_gguf_metadata_key_at(gguf, i);
        enum lq_gguf_value_type type, element;
        uint64_t count;
        lq_gguf_metadata_type(gguf, key, &type, &element, &count);
        printf("%s\t%s\t", key, lq_gguf_value_type_name(type));
        if (type == LQ_GGUF_STRING) {
            const char *text;
            size_t length;
            if (lq_gguf_get_string(gguf, key, &text, &length, &err) != LQ_OK) goto fail;
            print_hex(text, length);
        } else if (type == LQ_GGUF_ARRAY && element == LQ_GGUF_STRING) {
            const char *const *strings;
            const size_t *lengths;
            size_t n;
            if (lq_gguf_get_string_array(gguf, key, &strings, &lengths, &n, &err) != LQ_OK)
                goto fail;
            printf("array:string");
            for (size_t k = 0; k < n; k++) {
                putchar(k ? ',' : ' ');
                print_hex(strings[k], lengths[k]);
            }
        } else if (type == LQ_GGUF_ARRAY) {
            const void *raw;
            size_t n;
            if (lq_gguf_get_array_raw(gguf, key, &element, &raw, &n, &err) != LQ_OK) goto fail;
            printf("array:%s", lq_gguf_value_type_name(element));
            static const int sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
            for (size_t k = 0; k < n; k++) {
                putchar(k ? ',' : ' ');
                print_number(element, (const unsigned char *)raw + k * (size_t)sizes[element]);
            }
        } else {
            /* Scalars through the typed getters, so that they are what this test checks. */
            if (type == LQ_GGUF_FLOAT32 || type == LQ_GGUF_FLOAT64) {
                double value;
                if (lq_gguf_get_f64(gguf, key, &value, &err) != LQ_OK) goto fail;
                if (type == LQ_GGUF_FLOAT32) {
                    float single = (float)value;
                    uint32_t bits;
                    memcpy(&bits, &single, 4);
                    printf("%08" PRIx32, bits);
                } else {
                    uint64_t bits;
                    memcpy(&bits, &value, 8);
                    printf("%016" PRIx64, bits);
                }
            } else if (type == LQ_GGUF_BOOL) {
                bool value;
                if (lq_gguf_get_bool(gguf, key, &value, &err) != LQ_OK) goto fail;
                printf("%d", value ? 1 : 0);
            } else if (type == LQ_GGUF_UINT64 || type == LQ_GGUF_UINT32 || type == LQ_GGUF_UINT16 ||
                       type == LQ_GGUF_UINT8) {
                uint64_t value;
                if (lq_gguf_get_u64(gguf, key, &value, &err) != LQ_OK) goto fail;
                printf("%" PRIu64, value);
            } else {
                int64_t value;
                if (lq_gguf_get_i64(gguf, key, &value, &err) != LQ_OK) goto fail;
                printf("%" PRId64, value);
            }
        }
        putchar('\n');
    }
    return 0;
fail:
    fprintf(stderr, "gguf_tool: %s\n", err.message);
    return 1;
}

static void print_tensors(const struct lq_gguf *gguf) {
    for (size_t i = 0; i < lq_gguf_tensor_count(gguf); i++) {
        const struct lq_gguf_tensor *t = lq_gguf_tensor_at(gguf, i);
        printf("%s\t%s\t", t->name, lq_ggml_type_name(t->type));
        for (int d = 0; d < t->n_dims; d++) printf("%s%" PRIu64, d ? "," : "", t->dims[d]);
        printf("\t%" PRIu64 "\t%" PRIu64 "\n", t->offset, t->nbytes);
    }
}

static int dump(const struct lq_gguf *gguf, const char *name, const char *path) {
    struct lq_error err = {0};
    const struct lq_gguf_tensor *t = lq_gguf_find_tensor(gguf, name);
    if (!t) {
        fprintf(stderr, "gguf_tool: no tensor %s\n", name);
        return 1;
    }
    float *values = malloc(t->numel ? (size_t)t->numel * sizeof(float) : 1);
    if (!values || lq_gguf_tensor_to_f32(gguf, t, values, &err) != LQ_OK) {
        fprintf(stderr, "gguf_tool: %s\n", values ? err.message : "out of memory");
        free(values);
        return 1;
    }
    FILE *out = fopen(path, "wb");
    size_t written = out ? fwrite(values, sizeof(float), (size_t)t->numel, out) : 0;
    int ok = out && written == (size_t)t->numel && fclose(out) == 0;
    free(values);
    if (!ok) fprintf(stderr, "gguf_tool: cannot write %s\n", path);
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "dump") == 0 && argc != 5)) {
        fprintf(stderr, "usage: gguf_tool meta|tensors FILE | gguf_tool dump FILE NAME OUT\n");
        return 2;
    }
    struct lq_gguf *gguf = NULL;
    struct lq_error err = {0};
    if (lq_gguf_open(argv[2], &gguf, &err) != LQ_OK) {
        fprintf(stderr, "gguf_tool: %s\n", err.message);
        return 1;
    }
    int rc = 0;
    if (strcmp(argv[1], "meta") == 0)
        rc = print_metadata(gguf);
    else if (strcmp(argv[1], "tensors") == 0)
        print_tensors(gguf);
    else if (strcmp(argv[1], "dump") == 0)
        rc = dump(gguf, argv[3], argv[4]);
    else
        rc = 2;
    lq_gguf_close(gguf);
    return rc;
}
