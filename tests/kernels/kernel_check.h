/* What the CUDA-against-CPU tests share (tests/kernels/test_cuda_*.c): the two backends, the
 * random inputs, device buffers poisoned with NaN, and the relative-error check. Include once,
 * after tests/unit/lq_test.h, in a test program's single source file. */
#ifndef LQ_KERNEL_CHECK_H
#define LQ_KERNEL_CHECK_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/rng.h"
#include "kernels/backend.h"

static struct lq_backend *cpu, *gpu;
static struct lq_rng rng;

static inline float *random_floats(size_t count, float scale) {
    float *x = malloc((count ? count : 1) * sizeof *x);
    lq_rng_fill_normal(&rng, x, count);
    for (size_t i = 0; i < count; i++) x[i] *= scale;
    return x;
}

/* A device buffer of count floats (plus `pad` in front) holding host data, or NaN poison when
 * host is NULL, so that an element a kernel never writes fails the check. */
static inline float *device_floats_padded(const float *host, size_t count, size_t pad) {
    void *buffer = NULL;
    struct lq_error err = {0};
    size_t total = count + pad;
    if (gpu->ops->buffer_alloc(gpu, (total ? total : 1) * sizeof(float), &buffer, &err)) {
        fprintf(stderr, "buffer_alloc: %s\n", err.message);
        exit(1);
    }
    float *staging = malloc((total ? total : 1) * sizeof *staging);
    for (size_t i = 0; i < total; i++) staging[i] = host && i >= pad ? host[i - pad] : NAN;
    CHECK_OK(gpu->ops->copy_to_device(gpu, buffer, staging, total * sizeof(float)));
    free(staging);
    return buffer;
}

/* A device buffer holding a copy of host's bytes (ids, positions, pointer tables). */
static inline void *device_bytes(const void *host, size_t bytes) {
    void *buffer = NULL;
    struct lq_error err = {0};
    if (gpu->ops->buffer_alloc(gpu, bytes ? bytes : 1, &buffer, &err)) {
        fprintf(stderr, "buffer_alloc: %s\n", err.message);
        exit(1);
    }
    CHECK_OK(gpu->ops->copy_to_device(gpu, buffer, host, bytes));
    return buffer;
}

static inline float *device_floats(const float *host, size_t count) {
    return device_floats_padded(host, count, 0);
}

static inline float *to_host(const float *device, size_t count) {
    float *host = malloc((count ? count : 1) * sizeof *host);
    CHECK_OK(gpu->ops->copy_to_host(gpu, host, device, count * sizeof(float)));
    return host;
}

/* ‖a − b‖ / ‖b‖ in double; NaN anywhere (an unwritten output) gives +inf. */
static inline double relative_error(const float *a, const float *b, size_t count) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < count; i++) {
        if (!isfinite(a[i]) || !isfinite(b[i])) return INFINITY;
        double d = (double)a[i] - b[i];
        diff += d * d, norm += (double)b[i] * b[i];
    }
    return norm > 0 ? sqrt(diff / norm) : sqrt(diff);
}

#define CHECK_CLOSE(gpu_out, cpu_out, count, tolerance, ...)                                       \
    do {                                                                                           \
        double lq_rel_ = relative_error((gpu_out), (cpu_out), (count));                            \
        if (!(lq_rel_ <= (tolerance))) {                                                           \
            fprintf(stderr, "%s:%d: relative error %.3g > %.1g: ", __FILE__, __LINE__, lq_rel_,    \
                    (double)(tolerance));                                                          \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            lq_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

static inline double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

#endif
