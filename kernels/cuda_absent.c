/* The device probe of a build without the CUDA backend (-Dcuda=disabled, or no nvcc). */
#include "kernels/backend.h"
#include "kernels/cuda_cholqr.h"
#include "kernels/device_probe.h"

int lq_cuda_compiled(void) {
    return 0;
}

int lq_cuda_device_count(int *count, struct lq_error *err) {
    *count = 0;
    return lq_error_set(err, LQ_EUNSUPPORTED, "this lqd was built without the CUDA backend");
}

int lq_cuda_device_describe(int index, char *buffer, int buffer_size, struct lq_error *err) {
    (void)index;
    if (buffer_size > 0) buffer[0] = '\0';
    return lq_error_set(err, LQ_EUNSUPPORTED, "this lqd was built without the CUDA backend");
}

int lq_backend_cuda_create(int device, size_t memory_limit, struct lq_backend **out,
                           struct lq_error *err) {
    (void)device, (void)memory_limit;
    *out = NULL;
    return lq_error_set(err, LQ_EUNSUPPORTED, "this lqd was built without the CUDA backend");
}

int lq_cuda_cholqr_factor(struct lq_backend *gpu, const char *kernel, int n, int first, int invert,
                          double *matrix, int *failed, double *median_us, struct lq_error *err) {
    (void)gpu, (void)kernel, (void)n, (void)first, (void)invert, (void)matrix, (void)failed;
    (void)median_us;
    return lq_error_set(err, LQ_EUNSUPPORTED, "this lqd was built without the CUDA backend");
}
