/* libFuzzer target for the GGUF reader: any input either fails to open with an error code and
 * a message naming the input, or opens into metadata and tensors whose every promised byte
 * can be read, and every readable tensor dequantizes. Broken invariants trap. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/gguf.h"

#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct lq_gguf *gguf = NULL;
    struct lq_error err = {0};
    int rc = lq_gguf_open_buffer(data, size, "fuzz", &gguf, &err);
    if (rc != LQ_OK) {
        FUZZ_ASSERT(rc < 0 && err.code == rc && gguf == NULL);
        FUZZ_ASSERT(strncmp(err.message, "fuzz: ", 6) == 0);
        return 0;
    }
    FUZZ_ASSERT(lq_gguf_data_offset(gguf) % lq_gguf_alignment(gguf) == 0);
    for (size_t i = 0; i < lq_gguf_metadata_count(gguf); i++) {
        const char *key = lq_gguf_metadata_key_at(gguf, i);
        enum lq_gguf_value_type type, element;
        uint64_t count;
        FUZZ_ASSERT(key && lq_gguf_metadata_type(gguf, key, &type, &element, &count) == LQ_OK);
        if (type == LQ_GGUF_STRING) {
            const char *text = NULL;
            size_t length = 0;
            FUZZ_ASSERT(lq_gguf_get_string(gguf, key, &text, &length, &err) == LQ_OK);
            FUZZ_ASSERT(text[length] == '\0' && length <= size);
        } else if (type == LQ_GGUF_ARRAY && element == LQ_GGUF_STRING) {
            const char *const *strings;
            const size_t *lengths;
            size_t n;
            FUZZ_ASSERT(lq_gguf_get_string_array(gguf, key, &strings, &lengths, &n, &err) == LQ_OK);
            for (size_t k = 0; k < n; k++) FUZZ_ASSERT(strings[k][lengths[k]] == '\0');
        } else if (type == LQ_GGUF_ARRAY) {
            double *values = NULL;
            size_t n = 0;
            FUZZ_ASSERT(lq_gguf_get_f64_array(gguf, key, &values, &n, &err) == LQ_OK);
            FUZZ_ASSERT(n == count && values != NULL);
            free(values);
        } else {
            double value;
            int64_t integer;
            (void)lq_gguf_get_f64(gguf, key, &value, &err);
            (void)lq_gguf_get_i64(gguf, key, &integer, &err);
        }
    }
    const uint8_t *end = data + size;
    for (size_t i = 0; i < lq_gguf_tensor_count(gguf); i++) {
        const struct lq_gguf_tensor *t = lq_gguf_tensor_at(gguf, i);
        FUZZ_ASSERT(t && t->n_dims >= 0 && t->n_dims <= LQ_GGUF_MAX_DIMS);
        FUZZ_ASSERT(lq_gguf_find_tensor(gguf, t->name) == t);
        FUZZ_ASSERT(t->offset % lq_gguf_alignment(gguf) == 0);
        if (t->nbytes == 0) continue;
        const uint8_t *bytes = lq_gguf_tensor_data(gguf, t);
        FUZZ_ASSERT(bytes >= data && t->nbytes <= (uint64_t)(end - bytes));
        uint8_t sum = 0;
        for (uint64_t k = 0; k < t->nbytes; k++) sum ^= bytes[k];
        (void)sum;
        if (lq_ggml_type_is_readable(t->type) && t->numel <= (1u << 22)) {
            float *values = malloc((size_t)t->numel * sizeof(float));
            FUZZ_ASSERT(values != NULL);
            FUZZ_ASSERT(lq_gguf_tensor_to_f32(gguf, t, values, &err) == LQ_OK);
            free(values);
        } else if (!lq_ggml_type_is_readable(t->type)) {
            FUZZ_ASSERT(lq_gguf_tensor_to_f32(gguf, t, NULL, &err) == LQ_EUNSUPPORTED);
        }
    }
    lq_gguf_close(gguf);
    return 0;
}
