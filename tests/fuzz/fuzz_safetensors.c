/* libFuzzer target for the safetensors reader: any input either fails to open with an error
 * code and message, or opens into tensors whose every promised byte can be read. Checked
 * invariants trap, so the fuzzer reports them like crashes. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/safetensors.h"

#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct lq_safetensors *file = NULL;
    struct lq_error err = {0};
    int rc = lq_safetensors_open_buffer(data, size, "fuzz", &file, &err);
    if (rc != LQ_OK) {
        /* Failure: a negative code, a message naming the input, nothing returned. */
        FUZZ_ASSERT(rc < 0 && err.code == rc && file == NULL);
        FUZZ_ASSERT(strncmp(err.message, "fuzz: ", 6) == 0);
        return 0;
    }
    const uint8_t *end = data + size;
    for (size_t i = 0; i < lq_safetensors_count(file); i++) {
        const struct lq_safetensors_tensor *tensor = lq_safetensors_tensor_at(file, i);
        FUZZ_ASSERT(tensor && tensor->ndim >= 0 && tensor->ndim <= LQ_SAFETENSORS_MAX_DIMS);
        FUZZ_ASSERT(lq_safetensors_find(file, tensor->name) == tensor);
        FUZZ_ASSERT(tensor->numel * lq_dtype_size(tensor->dtype) == tensor->nbytes);
        const uint8_t *bytes = lq_safetensors_data(file, tensor);
        FUZZ_ASSERT(bytes >= data && tensor->nbytes <= (uint64_t)(end - bytes));
        /* Touch every byte: ASan flags any range the reader let past the buffer. */
        uint8_t sum = 0;
        for (uint64_t k = 0; k < tensor->nbytes; k++) sum ^= bytes[k];
        (void)sum;
        if (tensor->dtype == LQ_DTYPE_F32 || tensor->dtype == LQ_DTYPE_F16 ||
            tensor->dtype == LQ_DTYPE_BF16) {
            float *values = NULL;
            const struct lq_safetensors_tensor *described = NULL;
            rc = lq_safetensors_read_f32(file, tensor->name, &values, &described, &err);
            FUZZ_ASSERT(rc == LQ_OK && values != NULL && described == tensor);
            if (tensor->dtype == LQ_DTYPE_F32 && tensor->numel > 0)
                FUZZ_ASSERT(memcmp(values, bytes, (size_t)tensor->nbytes) == 0);
            free(values);
        }
    }
    (void)lq_safetensors_metadata(file, "format");
    lq_safetensors_close(file);
    return 0;
}
