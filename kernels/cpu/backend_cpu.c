/* The CPU backend: host memory, OpenBLAS for matrix products, lq_parallel_for for the rest.
 * It is the reference every other backend is tested against. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/parallel.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"

static void cpu_destroy(struct lq_backend *backend) {
    free(backend);
}

static int cpu_buffer_alloc(struct lq_backend *backend, size_t bytes, void **out,
                            struct lq_error *err) {
    (void)backend;
    *out = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!*out) return lq_error_set(err, LQ_ENOMEM, "out of memory for a %zu-byte buffer", bytes);
    return LQ_OK;
}

static void cpu_buffer_free(struct lq_backend *backend, void *buffer) {
    (void)backend;
    free(buffer);
}

static int cpu_copy(struct lq_backend *backend, void *to, const void *from, size_t bytes) {
    (void)backend;
    memmove(to, from, bytes);
    return LQ_OK;
}

static int cpu_weights_upload(struct lq_backend *backend, const float *host, size_t count,
                              const float **device, struct lq_error *err) {
    (void)backend, (void)count, (void)err;
    *device = host; /* host memory is device memory here */
    return LQ_OK;
}

static void cpu_weights_release(struct lq_backend *backend, const float *device) {
    (void)backend, (void)device;
}

static int cpu_linear_prepare(struct lq_backend *backend, struct lq_linear *linear,
                              struct lq_error *err) {
    (void)backend;
    if (!linear->is_lq && !linear->dense)
        return lq_error_set(err, LQ_EINVAL, "linear layer %d x %d has no weights", linear->rows,
                            linear->cols);
    linear->backend_data = NULL;
    return LQ_OK;
}

static void cpu_linear_release(struct lq_backend *backend, struct lq_linear *linear) {
    (void)backend;
    linear->backend_data = NULL;
}

static int cpu_embed(struct lq_backend *backend, const float *table, int dim, const int *ids, int n,
                     float *out) {
    (void)backend;
    for (int i = 0; i < n; i++)
        memcpy(out + (size_t)i * dim, table + (size_t)ids[i] * dim, (size_t)dim * sizeof(float));
    return LQ_OK;
}

static int cpu_rmsnorm(struct lq_backend *backend, const float *x, const float *weight, int n,
                       int dim, float eps, float *out) {
    (void)backend;
    for (int i = 0; i < n; i++) {
        const float *row = x + (size_t)i * dim;
        float *y = out + (size_t)i * dim;
        double sum = 0.0;
        for (int j = 0; j < dim; j++) sum += (double)row[j] * row[j];
        float scale = (float)(1.0 / sqrt(sum / dim + eps));
        for (int j = 0; j < dim; j++) y[j] = row[j] * scale * weight[j];
    }
    return LQ_OK;
}

static int cpu_matmul(struct lq_backend *backend, const float *w, int rows, int cols,
                      const float *x, int n, float *y) {
    (void)backend;
    lq_cpu_gemm_nt(n, rows, cols, x, w, y, rows, 0.0f);
    return LQ_OK;
}

static int cpu_rope(struct lq_backend *backend, float *x, int n, int heads, int head_dim,
                    const int *positions, float theta) {
    (void)backend;
    int half = head_dim / 2;
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < half; k++) {
            /* HF: inv_freq = theta^(-2k/hd); the angle in double keeps long contexts exact */
            double angle = positions[i] * pow((double)theta, -2.0 * k / head_dim);
            float c = (float)cos(angle), s = (float)sin(angle);
            for (int h = 0; h < heads; h++) {
                float *v = x + ((size_t)i * heads + h) * head_dim;
                float x0 = v[k], x1 = v[k + half];
                v[k] = x0 * c - x1 * s;
                v[k + half] = x0 * s + x1 * c;
            }
        }
    }
    return LQ_OK;
}

static int cpu_swiglu(struct lq_backend *backend, float *gate, const float *up, size_t count) {
    (void)backend;
    for (size_t i = 0; i < count; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    return LQ_OK;
}

static int cpu_add(struct lq_backend *backend, float *x, const float *y, size_t count) {
    (void)backend;
    for (size_t i = 0; i < count; i++) x[i] += y[i];
    return LQ_OK;
}

static const struct lq_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .buffer_alloc = cpu_buffer_alloc,
    .buffer_free = cpu_buffer_free,
    .copy_to_device = cpu_copy,
    .copy_to_host = cpu_copy,
    .weights_upload = cpu_weights_upload,
    .weights_release = cpu_weights_release,
    .linear_prepare = cpu_linear_prepare,
    .linear_release = cpu_linear_release,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .linear = lq_cpu_linear,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .attention = lq_cpu_attention,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
};

int lq_backend_cpu_create(struct lq_backend **out, struct lq_error *err) {
    *out = calloc(1, sizeof **out);
    if (!*out) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    /* The backend parallelises over its own pool (core/parallel.h); OpenBLAS's threads would
     * spin against it, so OpenBLAS runs one thread per call from here on. */
    openblas_set_num_threads(1);
    (*out)->ops = &cpu_ops;
    return LQ_OK;
}
