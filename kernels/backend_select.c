#include "kernels/backend_select.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/device_probe.h"

/* "cuda" → 0, "cuda:N" → N; -1 when text names no GPU. */
static int cuda_index(const char *text) {
    if (strcmp(text, "cuda") == 0) return 0;
    if (strncmp(text, "cuda:", 5) != 0 || !text[5]) return -1;
    char *end;
    errno = 0;
    long index = strtol(text + 5, &end, 10);
    if (errno || *end || index < 0 || index > 1024) return -1;
    return (int)index;
}

int lq_backend_open(const char *device, size_t memory_limit, struct lq_backend **out, char *notice,
                    struct lq_error *err) {
    *out = NULL;
    notice[0] = '\0';
    if (!device) device = "cpu";
    int want_gpu = strcmp(device, "auto") == 0, index = 0;
    if (!want_gpu && strcmp(device, "cpu") != 0) {
        if ((index = cuda_index(device)) < 0)
            return lq_error_set(err, LQ_EINVAL, "device '%s': expected cpu, cuda, cuda:N or auto",
                                device);
        want_gpu = 1;
    }
    if (want_gpu) {
        struct lq_error gpu_err = {0};
        int rc = lq_backend_cuda_create(index, memory_limit, out, &gpu_err);
        if (rc == LQ_OK) {
            char description[256] = "";
            struct lq_error ignored = {0};
            if (lq_cuda_device_describe(index, description, sizeof description, &ignored))
                snprintf(description, sizeof description, "CUDA device %d", index);
            snprintf(notice, LQ_BACKEND_NOTICE_SIZE, "running on cuda:%d (%.300s)", index,
                     description);
            return LQ_OK;
        }
        if (rc != LQ_EUNSUPPORTED) { /* the GPU is there but failed: say so, do not hide it */
            *err = gpu_err;
            return rc;
        }
        /* a reason of at most 300 bytes keeps the line within the notice */
        if (strcmp(device, "auto") == 0)
            snprintf(notice, LQ_BACKEND_NOTICE_SIZE, "running on the CPU (%.300s)",
                     gpu_err.message);
        else
            snprintf(notice, LQ_BACKEND_NOTICE_SIZE,
                     "--device %.40s: %.300s; falling back to the CPU", device, gpu_err.message);
    } else {
        snprintf(notice, LQ_BACKEND_NOTICE_SIZE, "running on the CPU");
    }
    return lq_backend_cpu_create(out, err);
}

int lq_parse_memory_size(const char *text, size_t *out) {
    char *end;
    errno = 0;
    double value = strtod(text, &end);
    if (errno || end == text || !(value >= 0)) return -1;
    double unit = 1.0;
    switch (*end) {
    case 'K':
    case 'k':
        unit = 1024.0, end++;
        break;
    case 'M':
    case 'm':
        unit = 1024.0 * 1024.0, end++;
        break;
    case 'G':
    case 'g':
        unit = 1024.0 * 1024.0 * 1024.0, end++;
        break;
    case 'T':
    case 't':
        unit = 1024.0 * 1024.0 * 1024.0 * 1024.0, end++;
        break;
    default:
        break;
    }
    if (unit > 1.0 && (strcmp(end, "iB") == 0 || strcmp(end, "B") == 0)) end += strlen(end);
    if (*end) return -1;
    double bytes = value * unit;
    if (bytes > 1e18) return -1;
    *out = (size_t)bytes;
    return 0;
}
