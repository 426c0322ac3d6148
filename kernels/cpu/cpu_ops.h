/* The CPU backend's heavier ops, each in its own file. */
#ifndef LQ_CPU_OPS_H
#define LQ_CPU_OPS_H

#include "kernels/backend.h"
#include "kernels/cpu/nf_gemv.h"

/* LQ_VECTOR_CLONES on a function: an AVX2 clone beside the default one, picked at load time
 * (GCC vector extensions then run 8 lanes at once). */
/* target_clones needs the loader's ifunc support (glibc); ThreadSanitizer dislikes resolvers
 * that run before it is set up. */
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define LQ_NO_VECTOR_CLONES 1
#endif
#endif
#if defined(__x86_64__) && defined(__GLIBC__) && !defined(__SANITIZE_THREAD__) &&                  \
    !defined(LQ_NO_VECTOR_CLONES)
#define LQ_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LQ_VECTOR_CLONES
#endif

/* linear_cpu.c: y[n, rows] (leading dimension ldy) = x[n, cols] · w[rows, cols]ᵀ + beta·y with
 * beta 0 or 1, split over the thread pool by output rows when large enough (OpenBLAS itself
 * runs single-threaded under this backend, so its threads never compete with the pool's). Up
 * to 64 tokens it is batch-invariant: row i of y has the same bits whatever the other rows. */
void lq_cpu_gemm_nt(int n, int rows, int cols, const float *x, const float *w, float *y, int ldy,
                    float beta);

/* linear_cpu.c: y[n, q->rows] = x[n, q->cols] · Qᵀ for 1 <= n <= 64 tokens by the given decode
 * kernel (nf_gemv.h; all give the same bits), split over the thread pool by rows. */
int lq_cpu_quantized_gemv(const struct lq_nf_matrix *q, const float *x, int n, float *y,
                          enum lq_nf_gemv_kernel kernel);

/* linear_cpu.c: dense and LQ (dequantizing) linear layers; up to 64 tokens the decode kernel
 * lq_nf_gemv_default_kernel() names. */
int lq_cpu_linear(struct lq_backend *backend, const struct lq_linear *w, const float *x, int n,
                  float *y);

/* lowrank_cpu.c: the adapter ops (kernels/backend.h): linear without the layer's own low-rank
 * part, and y += (x · L2ᵀ) · L1ᵀ, which lq_cpu_linear also uses for its own pair. Up to 64
 * tokens by the fixed recipe of lowrank_kernels.h (AVX-512, AVX2 or portable C: the same bits;
 * batch-invariant); above that through OpenBLAS. */
int lq_cpu_linear_base(struct lq_backend *backend, const struct lq_linear *w, const float *x, int n,
                       float *y);
int lq_cpu_lowrank_add(struct lq_backend *backend, const float *L1, const float *L2, int rows,
                       int cols, int rank, const float *x, int n, float *y);

/* head_cpu.c: the output head in bf16 (LQ_CPU_HEAD=bf16) or int8 (LQ_CPU_HEAD=int8), the
 * backend's own copy of a head w[rows, cols] whose fp32 original stays the caller's. */
enum lq_cpu_head_precision {
    LQ_CPU_HEAD_AUTO, /* int8 for LQ models where the integer kernels run (AVX-512), else fp32 */
    LQ_CPU_HEAD_FP32,
    LQ_CPU_HEAD_BF16,
    LQ_CPU_HEAD_INT8,
};
struct lq_cpu_head;
/* LQ_CPU_HEAD=auto|fp32|bf16|int8 from the environment (unset: auto; anything else is reported
 * on stderr and taken as auto). int8 needs rows whose length is a multiple of 32. */
enum lq_cpu_head_precision lq_cpu_head_precision_from_env(void);
int lq_cpu_head_create(const float *w, int rows, int cols, enum lq_cpu_head_precision precision,
                       struct lq_cpu_head **out, struct lq_error *err);
void lq_cpu_head_free(struct lq_cpu_head *head);
size_t lq_cpu_head_bytes(const struct lq_cpu_head *head);
/* y[n, rows] = x[n, cols] · head(w)ᵀ: the AVX2 (or portable) bf16 kernel or the int kernel up
 * to 64 tokens, fp32 tiles and OpenBLAS beyond. */
int lq_cpu_head_matmul(const struct lq_cpu_head *head, const float *x, int n, float *y);
/* out[i][cols] = row ids[i] of the head (widened or dequantized), for embedding lookups. */
void lq_cpu_head_embed(const struct lq_cpu_head *head, const int *ids, int n, float *out);

/* attention_cpu.c: causal grouped-query attention against a KV cache. */
int lq_cpu_attention(struct lq_backend *backend, const float *q, const float *k_cache,
                     const float *v_cache, int n, int start, int heads, int kv_heads, int head_dim,
                     float *out);
/* Decode-style attention of n tokens of different sequences in one parallel loop: token i
 * (query row i of q) attends to positions 0..positions[i] of its caches k_caches[i],
 * v_caches[i] (its new row already written). Row i has the bits of lq_cpu_attention(q_i,
 * caches_i, 1, positions[i], ...). */
int lq_cpu_attention_decode(const float *q, const float *const *k_caches,
                            const float *const *v_caches, const int *positions, int n, int heads,
                            int kv_heads, int head_dim, float *out);

/* train_cpu.c: the training ops (kernels/backend.h, "training ops"). */
int lq_cpu_zero(struct lq_backend *backend, float *x, size_t count);
int lq_cpu_linear_lora(struct lq_backend *backend, const struct lq_linear *w, const float *L1,
                       const float *L2, int rank, const float *x, int n, float *y);
int lq_cpu_linear_backward(struct lq_backend *backend, const struct lq_linear *w, const float *L1,
                           const float *L2, int rank, const float *x, const float *dy, int n,
                           float *dx, int accumulate_dx, float *dL1, float *dL2, float *dW);
int lq_cpu_matmul_backward(struct lq_backend *backend, const float *w, int rows, int cols,
                           const float *dy, int n, float *dx, int accumulate);
int lq_cpu_rmsnorm_backward(struct lq_backend *backend, const float *x, const float *weight,
                            const float *dy, int n, int dim, float eps, float *dx);
int lq_cpu_rope_backward(struct lq_backend *backend, float *dx, int n, int heads, int head_dim,
                         const int *positions, float theta);
int lq_cpu_attention_backward(struct lq_backend *backend, const float *q, const float *k,
                              const float *v, const float *dout, int batch, int n, int heads,
                              int kv_heads, int head_dim, float *dq, float *dk, float *dv);
int lq_cpu_swiglu_backward(struct lq_backend *backend, const float *gate, const float *up,
                           const float *dout, size_t count, float *dgate, float *dup);
int lq_cpu_cross_entropy(struct lq_backend *backend, const float *logits, const int *targets,
                         const unsigned char *mask, int n, int vocab, float grad_scale,
                         double *loss_sum, float *dlogits);
int lq_cpu_sum_squares(struct lq_backend *backend, const float *x, size_t count, double *out);
int lq_cpu_accumulate_squares(struct lq_backend *backend, float *acc, const float *x, size_t count,
                              float scale);
int lq_cpu_adamw(struct lq_backend *backend, float *params, const float *grads, float *m, float *v,
                 size_t count, const struct lq_adamw_params *hyper);

/* nll_cpu.c: token_nll (kernels/backend.h, "evaluation"), bit for bit core/eval.c's formula. */
int lq_cpu_token_nll(struct lq_backend *backend, const float *logits, const int *targets, int n,
                     int vocab, double *nll);
/* sample_cpu.c: the sample op (kernels/backend.h) by core/sampler.c. */
int lq_cpu_sample(struct lq_backend *backend, const float *logits, int n, int vocab, int stride,
                  const struct lq_sample_row *rows, int *tokens, float *logprobs);

#endif
