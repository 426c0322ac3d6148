/* The LLaMA forward pass on a backend: RMSNorm, RoPE, grouped-query attention with a KV
 * cache, SwiGLU, tied or separate output head. A runtime holds a model prepared for one
 * backend (shared, read-only); a session is one sequence with its own KV cache. */
#ifndef LQ_FORWARD_H
#define LQ_FORWARD_H

#include "core/error.h"
#include "core/model.h"
#include "kernels/backend.h"

struct lq_runtime;
struct lq_session;

/* Prepares model's weights on backend (both borrowed: they must outlive the runtime). */
int lq_runtime_create(struct lq_backend *backend, struct lq_model *model, struct lq_runtime **out,
                      struct lq_error *err);
void lq_runtime_free(struct lq_runtime *runtime);
/* Frees the model's embedding table when this runtime no longer reads it (a tied model whose
 * backend embeds from its own copy of the head: the CPU's int8 head), and returns the bytes
 * freed (0: nothing released). The model can then not be given to another runtime; the
 * daemon calls it for the models it serves. */
size_t lq_runtime_release_model_embedding(struct lq_runtime *runtime);
const struct lq_model_config *lq_runtime_config(const struct lq_runtime *runtime);

/* A sequence of at most context tokens, fed at most max_batch tokens per forward call. */
int lq_session_create(struct lq_runtime *runtime, int context, int max_batch,
                      struct lq_session **out, struct lq_error *err);
void lq_session_free(struct lq_session *session);
/* The bytes of backend buffers lq_session_create(runtime, context, max_batch) allocates: its
 * KV caches and activations (what a caller weighs against the device's free memory). */
size_t lq_session_bytes(const struct lq_runtime *runtime, int context, int max_batch);
/* Forgets the sequence (the KV cache is overwritten from position 0 on). */
void lq_session_reset(struct lq_session *session);
int lq_session_position(const struct lq_session *session);
int lq_session_context(const struct lq_session *session);
int lq_session_max_batch(const struct lq_session *session);
/* The model's hyperparameters (logits rows hold config->vocab_size values). */
const struct lq_model_config *lq_session_config(const struct lq_session *session);

/* Appends tokens[0..n) (n <= max_batch, position + n <= context) and writes logits to the
 * host array logits: [n, vocab] when all_logits, else the last token's [vocab]. With logits
 * NULL they stay on the device (lq_session_device_logits). */
int lq_session_forward(struct lq_session *session, const int *tokens, int n, int all_logits,
                       float *logits, struct lq_error *err);
/* The device buffer the last lq_session_forward wrote its logits to (the same rows it gives
 * the host), for backend ops that read them in place (token_nll). Owned by the session; valid
 * until its next forward call. */
const float *lq_session_device_logits(const struct lq_session *session);
/* The backend the session runs on (borrowed from its runtime). */
struct lq_backend *lq_session_backend(const struct lq_session *session);
/* The runtime the session belongs to (borrowed). */
struct lq_runtime *lq_session_runtime(const struct lq_session *session);

/* Adapters (forward_adapter.c): a LoRA adapter (core/adapter.h) prepared for one runtime, its
 * factors on the runtime's backend (weights_upload) while it lives. Shared and read-only like
 * the runtime: any number of sessions may use it at once. A session on an adapter computes
 * every linear layer as the adapter's mode says: REPLACE, Q + L1'·L2' (the model's own pair
 * left out); ADD, the layer as it is + L1'·L2'. */
struct lq_adapter;
struct lq_adapter_weights;

/* Checks adapter against the runtime's model (lq_adapter_check: LQ_EINVAL naming the first
 * mismatch) and uploads its factors. Both runtime and adapter are borrowed and must outlive
 * the weights (the CPU backend computes with adapter's own arrays). */
int lq_adapter_weights_create(struct lq_runtime *runtime, const struct lq_adapter *adapter,
                              struct lq_adapter_weights **out, struct lq_error *err);
void lq_adapter_weights_free(struct lq_adapter_weights *weights);
/* Device bytes the weights hold (the factors). */
size_t lq_adapter_weights_bytes(const struct lq_adapter_weights *weights);
/* Runs session with weights (NULL: the bare model) from its next token on; set it before the
 * first token (or after a reset), since the KV cache keeps what the earlier tokens saw.
 * LQ_EINVAL when the weights belong to another runtime. Borrowed: weights must outlive the
 * session's use of them. */
int lq_session_set_adapter(struct lq_session *session, const struct lq_adapter_weights *weights,
                           struct lq_error *err);
const struct lq_adapter_weights *lq_session_adapter(const struct lq_session *session);

/* Batched decoding (forward_batch.c). A batch is the scratch space of one decode step of up to
 * max_sequences sequences of one runtime; use it from one thread at a time. */
struct lq_batch;

int lq_batch_create(struct lq_runtime *runtime, int max_sequences, struct lq_batch **out,
                    struct lq_error *err);
void lq_batch_free(struct lq_batch *batch);
int lq_batch_max_sequences(const struct lq_batch *batch);

/* Appends tokens[i] to sessions[i] for i < n (distinct sessions of the batch's runtime, each
 * with room for one more position) in one pass: every linear layer runs once on the n stacked
 * tokens, RoPE and attention per sequence at its own position. Sessions may use different
 * adapters (or none): the layer's shared part runs once for all rows, then each run of
 * consecutive sessions on the same adapter gets its low-rank part (callers order sessions by
 * adapter for the fewest runs). logits (host) receives [n, vocab]: row i is what
 * lq_session_forward(sessions[i], &tokens[i], 1, ...) would give (bit for bit on a
 * batch-invariant backend, such as the CPU's, whatever adapters the other rows use). Each
 * position advances by one; on error none does. logits NULL: nothing is copied to the host,
 * and the logits stay on the device (lq_batch_device_logits) until the next step. */
int lq_forward_batch(struct lq_batch *batch, struct lq_session **sessions, const int *tokens, int n,
                     float *logits, struct lq_error *err);
/* The last step's logits on the batch's backend: device [n, vocab] (vocab_size of the model),
 * owned by the batch, overwritten by the next lq_forward_batch (the backend's sample op reads
 * them there). */
const float *lq_batch_device_logits(const struct lq_batch *batch);

#endif
