/* The ops table every compute device implements (CPU now, CUDA next). core/ calls only these
 * functions, never a device API, so a new backend slots in without touching core/.
 *
 * Buffers are device memory owned by the caller (buffer_alloc/buffer_free); "host" arguments
 * are ordinary memory. Matrices are row-major; a linear layer computes y[n, rows] =
 * x[n, cols] · Wᵀ for W[rows, cols] (HuggingFace orientation). Every op returns 0 or a
 * negative LQ_E* code. */
#ifndef LQ_BACKEND_H
#define LQ_BACKEND_H

#include <stddef.h>

#include "core/error.h"
#include "core/model.h"

struct lq_backend;

struct lq_backend_ops {
    const char *name;
    void (*destroy)(struct lq_backend *backend);

    int (*buffer_alloc)(struct lq_backend *backend, size_t bytes, void **out, struct lq_error *err);
    void (*buffer_free)(struct lq_backend *backend, void *buffer);
    int (*copy_to_device)(struct lq_backend *backend, void *device, const void *host, size_t bytes);
    int (*copy_to_host)(struct lq_backend *backend, void *host, const void *device, size_t bytes);

    /* A read-only weight array on the device: the CPU returns host itself; others copy it.
     * Released with weights_release. */
    int (*weights_upload)(struct lq_backend *backend, const float *host, size_t count,
                          const float **device, struct lq_error *err);
    void (*weights_release)(struct lq_backend *backend, const float *device);
    /* Prepares a linear layer (dense or LQ) for linear(): sets linear->backend_data. */
    int (*linear_prepare)(struct lq_backend *backend, struct lq_linear *linear,
                          struct lq_error *err);
    void (*linear_release)(struct lq_backend *backend, struct lq_linear *linear);

    /* out[i, :] = table[ids[i], :] for i < n (ids on the host). */
    int (*embed)(struct lq_backend *backend, const float *table, int dim, const int *ids, int n,
                 float *out);
    /* out[i] = x[i] / sqrt(mean(x[i]²) + eps) ⊙ weight, for n rows of dim. */
    int (*rmsnorm)(struct lq_backend *backend, const float *x, const float *weight, int n, int dim,
                   float eps, float *out);
    /* y = x · Wᵀ (+ x · L2ᵀ · L1ᵀ for LQ), dequantizing Q on the fly. */
    int (*linear)(struct lq_backend *backend, const struct lq_linear *w, const float *x, int n,
                  float *y);
    /* y[n, rows] = x[n, cols] · wᵀ for a dense device weight (the output head). */
    int (*matmul)(struct lq_backend *backend, const float *w, int rows, int cols, const float *x,
                  int n, float *y);
    /* Rotary embedding, HF rotate-half layout, in place on x[n, heads * head_dim], token i at
     * positions[i] (host). */
    int (*rope)(struct lq_backend *backend, float *x, int n, int heads, int head_dim,
                const int *positions, float theta);
    /* Causal grouped-query attention of n new tokens at positions start..start+n-1 against a
     * cache holding positions 0..start+n-1: q[n, heads*hd], caches [*, kv_heads*hd], out like q. */
    int (*attention)(struct lq_backend *backend, const float *q, const float *k_cache,
                     const float *v_cache, int n, int start, int heads, int kv_heads, int head_dim,
                     float *out);
    /* gate = silu(gate) ⊙ up. */
    int (*swiglu)(struct lq_backend *backend, float *gate, const float *up, size_t count);
    /* x += y. */
    int (*add)(struct lq_backend *backend, float *x, const float *y, size_t count);
};

struct lq_backend {
    const struct lq_backend_ops *ops;
    void *impl;
};

/* The CPU backend (OpenBLAS + threads). Free with backend->ops->destroy(backend). */
int lq_backend_cpu_create(struct lq_backend **out, struct lq_error *err);

#endif
