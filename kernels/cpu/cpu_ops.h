/* The CPU backend's heavier ops, each in its own file. */
#ifndef LQ_CPU_OPS_H
#define LQ_CPU_OPS_H

#include "kernels/backend.h"

/* linear_cpu.c: y[n, rows] (leading dimension ldy) = x[n, cols] · w[rows, cols]ᵀ + beta·y with
 * beta 0 or 1, split over the thread pool by output rows when large enough (OpenBLAS itself
 * runs single-threaded under this backend, so its threads never compete with the pool's). Up
 * to 64 tokens it is batch-invariant: row i of y has the same bits whatever the other rows. */
void lq_cpu_gemm_nt(int n, int rows, int cols, const float *x, const float *w, float *y, int ldy,
                    float beta);

/* linear_cpu.c: dense and LQ (dequantizing) linear layers. */
int lq_cpu_linear(struct lq_backend *backend, const struct lq_linear *w, const float *x, int n,
                  float *y);

/* attention_cpu.c: causal grouped-query attention against a KV cache. */
int lq_cpu_attention(struct lq_backend *backend, const float *q, const float *k_cache,
                     const float *v_cache, int n, int start, int heads, int kv_heads, int head_dim,
                     float *out);

#endif
