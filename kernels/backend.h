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
#include <stdint.h>

#include "core/error.h"
#include "core/lq.h"
#include "core/model.h"

struct lq_backend;
struct lq_backend_memory;
struct lq_adamw_params; /* the training ops' AdamW settings, below */
struct lq_sample_row;   /* one row of the sample op, below */

/* What linear_fused multiplies: x itself, or rmsnorm(x, weight, eps) (each token's row of dim
 * = the layers' cols). */
enum lq_linear_input_kind { LQ_INPUT_PLAIN = 0, LQ_INPUT_RMSNORM = 1 };
struct lq_linear_input {
    enum lq_linear_input_kind kind;
    const float *x;      /* [n][cols] */
    const float *weight; /* LQ_INPUT_RMSNORM: [cols] */
    float eps;           /* LQ_INPUT_RMSNORM */
};

/* What linear_fused does with W·f(in): writes it to y, adds it to y (the residual add, as add()
 * does it), or, for a group of two (gate and up), writes silu(W_0·f(in))·(W_1·f(in)) to y[0]
 * (as swiglu leaves its gate; y[1] is scratch, its contents undefined). */
enum lq_linear_output { LQ_OUTPUT_WRITE = 0, LQ_OUTPUT_ADD = 1, LQ_OUTPUT_SWIGLU = 2 };

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
    /* One decode step of n sequences, one new token each: sequence i's k_new[i] and v_new[i]
     * rows ([n, kv_heads*hd]) are stored into its caches at positions[i], then q[i] attends
     * to positions 0..positions[i] of them. k_caches, v_caches (device pointers) and
     * positions live on the host. Row i of out equals what attention(q[i], ..., 1,
     * positions[i], ...) gives after the rows were stored. */
    int (*attention_batch)(struct lq_backend *backend, const float *q, const float *k_new,
                           const float *v_new, float *const *k_caches, float *const *v_caches,
                           const int *positions, int n, int heads, int kv_heads, int head_dim,
                           float *out);
    /* gate = silu(gate) ⊙ up. */
    int (*swiglu)(struct lq_backend *backend, float *gate, const float *up, size_t count);
    /* x += y. */
    int (*add)(struct lq_backend *backend, float *x, const float *y, size_t count);
    /* Waits until every queued op has finished (timing, error checks). */
    int (*synchronize)(struct lq_backend *backend, struct lq_error *err);
    /* What the device holds (see struct lq_backend_memory). */
    void (*memory)(struct lq_backend *backend, struct lq_backend_memory *out);

    /* LQ decomposition on the device (NULL where the backend has none: callers then use
     * core's lq_decompose). Same contract as lq_decompose for the host matrix w; results come
     * back in host memory. Equal to the CPU's within rounding for the same seed. */
    int (*decompose)(struct lq_backend *backend, const float *w, size_t rows, size_t cols,
                     const struct lq_nf_config *config, const struct lq_decompose_options *options,
                     struct lq_decomposition *out, struct lq_error *err);
    /* One error-table row: errors[i] = (decompose(w, configs[i]) with options and the SVD
     * seed seeds[i]).error², for i < n_configs; w is uploaded once. NULL like decompose. */
    int (*decompose_errors)(struct lq_backend *backend, const float *w, size_t rows, size_t cols,
                            const struct lq_nf_config *configs, const uint64_t *seeds,
                            size_t n_configs, const struct lq_decompose_options *options,
                            double *errors, struct lq_error *err);

    /* ---- training ops: LoRA finetuning (core/train.h) and the Fisher estimate (core/fisher.h).
     * NULL on a backend that has none yet: the trainer then refuses it by name. Same
     * conventions as above (device buffers, row-major, host arrays named "host"); an output
     * "+=" accumulates into what the caller's buffer holds, "=" overwrites it. ---- */

    /* x[0..count) = 0. */
    int (*zero)(struct lq_backend *backend, float *x, size_t count);
    /* Device-to-device copy of bytes. */
    int (*copy)(struct lq_backend *backend, void *to, const void *from, size_t bytes);
    /* y[n, rows] = x · (W + L1·L2)ᵀ: W is the frozen layer w (dense, or Q plus its own low-rank
     * part when w->rank > 0) and L1 [rows, rank], L2 [rank, cols] a trainable pair in device
     * buffers (rank 0: none, and it is linear). */
    int (*linear_lora)(struct lq_backend *backend, const struct lq_linear *w, const float *L1,
                       const float *L2, int rank, const float *x, int n, float *y);
    /* Backward of linear_lora at input x[n, cols], output gradient dy[n, rows]:
     *   dx = dy · (W + L1·L2)        (+= when accumulate_dx; skipped when dx is NULL)
     *   dL1 += dyᵀ · (x · L2ᵀ)        [rows, rank]   } when rank > 0; either may be NULL
     *   dL2 += (dy · L1)ᵀ · x          [rank, cols]   }
     *   dW += dyᵀ · x                 [rows, cols]   (dense w only; skipped when NULL)
     * Q is dequantized tile by tile, never as a whole matrix. */
    int (*linear_backward)(struct lq_backend *backend, const struct lq_linear *w, const float *L1,
                           const float *L2, int rank, const float *x, const float *dy, int n,
                           float *dx, int accumulate_dx, float *dL1, float *dL2, float *dW);
    /* Backward of matmul for the input: dx[n, cols] = dy[n, rows] · w (+= when accumulate). */
    int (*matmul_backward)(struct lq_backend *backend, const float *w, int rows, int cols,
                           const float *dy, int n, float *dx, int accumulate);
    /* Backward of rmsnorm (weight frozen): dx[n, dim] += dy · ∂rmsnorm(x)/∂x. */
    int (*rmsnorm_backward)(struct lq_backend *backend, const float *x, const float *weight,
                            const float *dy, int n, int dim, float eps, float *dx);
    /* Backward of rope, in place on the gradient dx[n, heads * head_dim] (the inverse rotation). */
    int (*rope_backward)(struct lq_backend *backend, float *dx, int n, int heads, int head_dim,
                         const int *positions, float theta);
    /* Backward of causal grouped-query attention over `batch` independent sequences of n
     * tokens each, every one attending to its own positions 0..i (as attention(q, k, v, n, 0,
     * ...) per sequence). q, dout, dq: [batch * n, heads * hd]; k, v, dk, dv: [batch * n,
     * kv_heads * hd]; q and k as attention saw them (after rope). The softmax is recomputed
     * from q and k. dq, dk, dv are overwritten. */
    int (*attention_backward)(struct lq_backend *backend, const float *q, const float *k,
                              const float *v, const float *dout, int batch, int n, int heads,
                              int kv_heads, int head_dim, float *dq, float *dk, float *dv);
    /* Backward of swiglu (out = silu(gate) ⊙ up) at the pre-activation gate and up:
     * dgate = dout ⊙ up ⊙ silu'(gate), dup = dout ⊙ silu(gate) (overwritten; dgate may be
     * dout itself). */
    int (*swiglu_backward)(struct lq_backend *backend, const float *gate, const float *up,
                           const float *dout, size_t count, float *dgate, float *dup);
    /* Token-level cross-entropy of logits[n, vocab] against targets (host, [n]) where mask
     * (host, [n]; NULL: every token) is nonzero: *loss_sum (host) += Σ (logsumexp − logit of
     * the target), in double. When dlogits is not NULL it receives grad_scale · (softmax −
     * onehot(target)) on masked-in rows and 0 elsewhere; it may be logits itself. */
    int (*cross_entropy)(struct lq_backend *backend, const float *logits, const int *targets,
                         const unsigned char *mask, int n, int vocab, float grad_scale,
                         double *loss_sum, float *dlogits);
    /* *out (host) = Σ x[i]², summed in double in an order that does not depend on threads. */
    int (*sum_squares)(struct lq_backend *backend, const float *x, size_t count, double *out);
    /* acc[i] += scale · x[i]² (the diagonal Fisher estimate from one sample's gradient). */
    int (*accumulate_squares)(struct lq_backend *backend, float *acc, const float *x, size_t count,
                              float scale);
    /* One AdamW update (struct lq_adamw_params) of params[0..count) from grads, with the
     * first and second moments m and v updated in place. */
    int (*adamw)(struct lq_backend *backend, float *params, const float *grads, float *m, float *v,
                 size_t count, const struct lq_adamw_params *hyper);

    /* ---- adapters in serving (core/forward.h, lq_adapter_weights): a batch that mixes
     * requests on different adapters runs each linear's shared part once for every row, then
     * each group of rows' own low-rank part. On a batch-invariant backend (the CPU's, up to 64
     * rows), linear_base then lowrank_add of w's own pair gives row for row the bits linear
     * gives. ---- */

    /* y[n, rows] = x · Qᵀ: the linear layer w without its own low-rank part (w->rank is
     * ignored); a dense w gives x · Wᵀ, as linear does. */
    int (*linear_base)(struct lq_backend *backend, const struct lq_linear *w, const float *x, int n,
                       float *y);
    /* y[n, rows] += (x[n, cols] · L2ᵀ) · L1ᵀ for device factors L1 [rows, rank] and L2
     * [rank, cols] (weights_upload'ed or buffers); x and y are device rows of cols and rows
     * floats. rank 0 or n 0: nothing. */
    int (*lowrank_add)(struct lq_backend *backend, const float *L1, const float *L2, int rows,
                       int cols, int rank, const float *x, int n, float *y);

    /* ---- the output head in the backend's own precision: NULL where the backend has none
     * (callers then run matmul on the fp32 head). ---- */

    /* Prepares the head w[rows, cols] (weights_upload'ed, borrowed) for head_matmul.
     * quantized_model: the model's linears are LQ (a backend may then pick a lower-precision
     * head by default, as the CPU's int8 one). *head is NULL when the backend keeps w as it is;
     * else it is the backend's own copy, which no longer needs w. */
    int (*head_prepare)(struct lq_backend *backend, const float *w, int rows, int cols,
                        int quantized_model, void **head, struct lq_error *err);
    void (*head_release)(struct lq_backend *backend, void *head);
    /* y[n, rows] = x[n, cols] · headᵀ for a non-NULL head from head_prepare. */
    int (*head_matmul)(struct lq_backend *backend, const void *head, const float *x, int n,
                       float *y);
    /* out[i] = row ids[i] of the head as the backend keeps it (embedding lookups of a tied
     * model served from the head's copy, so the fp32 table can go); NULL: not offered. */
    int (*head_embed)(struct lq_backend *backend, const void *head, const int *ids, int n,
                      float *out);

    /* ---- a decode step as a replayable graph: NULL where the backend has none (the CPU's).
     * Launching each op of a step costs the host microseconds, and a step of a large model is
     * hundreds of ops, so a GPU backend records the step once and replays it. For that the
     * step's per-step arguments live in device memory (the *_device ops below read token ids,
     * positions and KV-cache pointers there), so that the same recorded ops serve every step
     * with the same key. ---- */

    /* embed with ids in device memory. */
    int (*embed_device)(struct lq_backend *backend, const float *table, int dim, const int *ids,
                        int n, float *out);
    /* rope with positions in device memory. */
    int (*rope_device)(struct lq_backend *backend, float *x, int n, int heads, int head_dim,
                       const int *positions, float theta);
    /* attention_batch with k_caches, v_caches and positions in device memory. keys_bound is at
     * least every positions[i] + 1: launch shapes depend on it, never on the positions. */
    int (*attention_batch_device)(struct lq_backend *backend, const float *q, const float *k_new,
                                  const float *v_new, float *const *k_caches,
                                  float *const *v_caches, const int *positions, int n, int heads,
                                  int kv_heads, int head_dim, int keys_bound, float *out);
    /* rope_device on q [n, q_heads * head_dim] and k [n, k_heads * head_dim] in one launch. */
    int (*rope_qk_device)(struct lq_backend *backend, float *q, int q_heads, float *k, int k_heads,
                          int n, int head_dim, const int *positions, float theta);
    /* x += y, then out = rmsnorm(x) for n rows of dim: what add then rmsnorm give, bit for
     * bit, in one pass (the residual add and the next norm of a transformer block). */
    int (*add_rmsnorm)(struct lq_backend *backend, float *x, const float *y, const float *weight,
                       int n, int dim, float eps, float *out);
    /* Starts a step under `key`, which must name everything the step's ops are called with
     * (buffers, shapes, adapters) except what they read from device memory. Returns
     *   LQ_GRAPH_REPLAYED: the recorded step was queued; call none of its ops;
     *   LQ_GRAPH_EAGER: call the ops as usual (a key seen for the first time runs eagerly);
     *   LQ_GRAPH_RECORDING: call the ops, which are recorded and not run yet, then graph_end;
     * or a negative LQ_E* code. Between graph_begin and graph_end the calling thread holds
     * the backend: other threads' ops wait. */
    int (*graph_begin)(struct lq_backend *backend, uint64_t key);
    /* Ends a recording: failed (the first error an op returned, or 0) discards it. Returns 0
     * when the recorded step was queued, else an LQ_E* code, and then nothing of the step has
     * run: call its ops again (graph_begin will answer LQ_GRAPH_EAGER for this key). */
    int (*graph_end)(struct lq_backend *backend, int failed);

    /* ---- evaluation (core/eval.c): scoring on the device, so only [n] doubles come back
     * instead of [n, vocab] logits. NULL where the backend has none (callers then copy the
     * logits to the host). ---- */

    /* nll[i] (host, [n]) = log Σ_v exp(logits[i, v] − max_i) + max_i − logits[i, targets[i]]
     * for the device rows logits[n, vocab] and host targets[n] (each in 0..vocab-1, else
     * LQ_EINVAL and nothing written): the max in float, the sum of exponentials in double. */
    int (*token_nll)(struct lq_backend *backend, const float *logits, const int *targets, int n,
                     int vocab, double *nll);

    /* ---- sampling on the device (NULL where the backend has none: callers copy the logits
     * to the host and use core/sampler.h). ---- */

    /* tokens[i] (host) = the token core/sampler.h's lq_sampler_sample picks from row i of the
     * device logits (row i starts at logits + i * stride; its first vocab entries are sampled)
     * with rows[i]'s settings and uniform, i < n; logprobs (host, or NULL) gets each token's
     * log-softmax under the raw row. No repetition penalty: callers sample rows that have one
     * on the host. The logits are not modified. LQ_EINVAL for n < 1, vocab < 1, stride <
     * vocab or a row's settings out of core/sampler.h's ranges. */
    int (*sample)(struct lq_backend *backend, const float *logits, int n, int vocab, int stride,
                  const struct lq_sample_row *rows, int *tokens, float *logprobs);

    /* ---- linear layers of one input (a step's Q, K and V; gate and up): NULL where the
     * backend has none (callers then call linear for each). ---- */

    /* y[i] = what linear(w[i], x, n, y[i]) gives, bit for bit, for i < count; no y[i] overlaps
     * x or another y[j]. The backend may overlap one layer's work with the next's. */
    int (*linear_group)(struct lq_backend *backend, const struct lq_linear *const *w, int count,
                        const float *x, int n, float *const *y);

    /* ---- a decode step's rotary embedding and attention as one op: NULL where the backend
     * has none (callers then call rope_qk_device and attention_batch_device). ---- */

    /* rope_qk_device(q, heads, k_new, kv_heads, ...) then attention_batch_device(...): out and
     * the caches get the bits those two give; q and k_new are left rotated or as they came
     * (nothing may read them afterwards). */
    int (*rope_attention_batch_device)(struct lq_backend *backend, float *q, float *k_new,
                                       const float *v_new, float *const *k_caches,
                                       float *const *v_caches, const int *positions, int n,
                                       int heads, int kv_heads, int head_dim, int keys_bound,
                                       float theta, float *out);

    /* ---- linear layers fed by the op before them, fused with it: NULL where the backend has
     * none (callers then run rmsnorm or swiglu, linear_group, add). ---- */

    /* Whether linear_fused is worth calling for a step of n tokens: where it is not, the
     * backend would only run the unfused ops inside it, and callers do better with the
     * add_rmsnorm that the unfused path has. */
    int (*fuses_linears)(struct lq_backend *backend, int n);

    /* y[i] = W_i · f(in) for i < count, f(in) what in->kind names (struct lq_linear_input),
     * written, added (count == 1) or put through SwiGLU (count == 2) as `output` says (enum
     * lq_linear_output). Equal to the unfused ops within their precision: not bit for bit (an
     * rmsnorm's sum of squares may be taken in another order; the low-rank part may take the
     * norm's scale after its sum). No y[i] overlaps in->x or another y[j]. */
    int (*linear_fused)(struct lq_backend *backend, const struct lq_linear *const *w, int count,
                        const struct lq_linear_input *in, int n, float *const *y,
                        enum lq_linear_output output);
};

/* graph_begin's answers. */
enum { LQ_GRAPH_EAGER = 0, LQ_GRAPH_REPLAYED = 1, LQ_GRAPH_RECORDING = 2 };

/* AdamW as PyTorch's torch.optim.AdamW computes it (decoupled weight decay, bias-corrected
 * moments), with g = grad_scale · grad:
 *   p ← p·(1 − lr·weight_decay);  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²
 *   p ← p − lr/(1 − β1^step) · m / (√v / √(1 − β2^step) + eps) */
struct lq_adamw_params {
    float learning_rate, beta1, beta2, eps, weight_decay;
    float grad_scale; /* 1, or the clipping coefficient of the global gradient norm */
    long step;        /* this update's number, from 1 (the bias corrections) */
};

/* One row of the sample op: lq_sampler_params's settings (same ranges and meaning) and the
 * uniform u in [0, 1) that the host drew for this step from the request's own generator
 * (lq_sampler_draw), so that a seed gives the same tokens whatever backend samples. */
struct lq_sample_row {
    float temperature; /* >= 0; 0 = greedy */
    int top_k;         /* >= 0; 0 = off */
    float top_p;       /* (0, 1]; 1 = off */
    float min_p;       /* [0, 1]; 0 = off */
    double u;          /* [0, 1) */
};

/* Device memory by purpose, in bytes. Host backends report their allocations the same way,
 * with device_total 0. */
struct lq_backend_memory {
    size_t weights; /* weights_upload + linear_prepare */
    size_t buffers; /* buffer_alloc: KV caches, activations */
    size_t scratch; /* the backend's own workspaces */
    size_t jobs;    /* decompositions running on the device */
    size_t limit;   /* allocations beyond this are refused (0: none) */
    size_t device_free, device_total;
};

struct lq_backend {
    const struct lq_backend_ops *ops;
    void *impl;
};

/* The CPU backend (OpenBLAS + threads). Free with backend->ops->destroy(backend). */
int lq_backend_cpu_create(struct lq_backend **out, struct lq_error *err);

/* The CUDA backend on GPU `device` (cuBLAS, cuSOLVER, lqd's kernels). memory_limit caps what
 * it allocates in bytes (0: the device's free memory at creation less a 5% margin).
 * LQ_EUNSUPPORTED when the build has no CUDA or the machine no such GPU. Free with
 * backend->ops->destroy(backend). */
int lq_backend_cuda_create(int device, size_t memory_limit, struct lq_backend **out,
                           struct lq_error *err);

#endif
