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
int lq_runtime_create(struct lq_backend *backend, struct lq_model *model,
                      struct lq_runtime **out, struct lq_error *err);
void lq_runtime_free(struct lq_runtime *runtime);
const struct lq_model_config *lq_runtime_config(const struct lq_runtime *runtime);

/* A sequence of at most context tokens, fed at most max_batch tokens per forward call. */
int lq_session_create(struct lq_runtime *runtime, int context, int max_batch,
                      struct lq_session **out, struct lq_error *err);
void lq_session_free(struct lq_session *session);
/* Forgets the sequence (the KV cache is overwritten from position 0 on). */
void lq_session_reset(struct lq_session *session);
int lq_session_position(const struct lq_session *session);
int lq_session_context(const struct lq_session *session);
int lq_session_max_batch(const struct lq_session *session);

/* Appends tokens[0..n) (n <= max_batch, position + n <= context) and writes logits to the
 * host array logits: [n, vocab] when all_logits, else the last token's [vocab]. */
int lq_session_forward(struct lq_session *session, const int *tokens, int n, int all_logits,
                       float *logits, struct lq_error *err);

#endif
