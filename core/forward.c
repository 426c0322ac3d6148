#include "forward.h"
#include "forward_internal.h"

#include <stdlib.h>
#include <string.h>

const struct lq_model_config *lq_runtime_config(const struct lq_runtime *runtime) {
    return &runtime->model->config;
}

int lq_runtime_create(struct lq_backend *backend, struct lq_model *model, struct lq_runtime **out,
                      struct lq_error *err) {
    *out = NULL;
    const struct lq_model_config *c = &model->config;
    if (!model->embed)
        return lq_error_set(err, LQ_EINVAL,
                            "%s: its embedding table was released to another runtime's head",
                            model->path ? model->path : "model");
    struct lq_runtime *r = calloc(1, sizeof *r);
    if (!r) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    r->backend = backend;
    r->model = model;
    pthread_mutex_init(&r->own_lock, NULL);
    r->attn_norm = calloc((size_t)c->n_layers, sizeof *r->attn_norm);
    r->ffn_norm = calloc((size_t)c->n_layers, sizeof *r->ffn_norm);
    const struct lq_backend_ops *ops = backend->ops;
    size_t vocab_dim = (size_t)c->vocab_size * c->dim;
    int rc = !r->attn_norm || !r->ffn_norm ? lq_error_set(err, LQ_ENOMEM, "out of memory") : 0;
    if (!rc) rc = ops->weights_upload(backend, model->embed, vocab_dim, &r->embed, err);
    if (!rc)
        rc = ops->weights_upload(backend, model->final_norm, (size_t)c->dim, &r->final_norm, err);
    if (!rc)
        rc = model->lm_head == model->embed
                 ? (r->lm_head = r->embed, 0)
                 : ops->weights_upload(backend, model->lm_head, vocab_dim, &r->lm_head, err);
    if (!rc && ops->head_prepare)
        rc = ops->head_prepare(backend, r->lm_head, c->vocab_size, c->dim, model->is_lq, &r->head,
                               err);
    r->embed_from_head = !rc && r->head && ops->head_embed && model->lm_head == model->embed;
    for (int l = 0; l < c->n_layers && !rc; l++) {
        struct lq_layer *layer = &model->layers[l];
        rc = ops->weights_upload(backend, layer->attn_norm, (size_t)c->dim, &r->attn_norm[l], err);
        if (!rc)
            rc =
                ops->weights_upload(backend, layer->ffn_norm, (size_t)c->dim, &r->ffn_norm[l], err);
        for (int k = 0; k < LQ_LINEARS_PER_LAYER && !rc; k++)
            rc = ops->linear_prepare(backend, &layer->linear[k], err);
        if (!rc) r->prepared_layers = l + 1;
    }
    if (rc) {
        lq_runtime_free(r);
        return rc;
    }
    *out = r;
    return LQ_OK;
}

size_t lq_runtime_release_model_embedding(struct lq_runtime *r) {
    struct lq_model *m = r->model;
    /* only where the runtime's table is the model's own memory (a host backend) */
    if (!r->embed_from_head || r->embed != m->embed || m->lm_head != m->embed) return 0;
    r->backend->ops->weights_release(r->backend, r->embed);
    free(m->embed);
    m->embed = m->lm_head = NULL;
    r->embed = r->lm_head = NULL;
    return (size_t)m->config.vocab_size * (size_t)m->config.dim * sizeof(float);
}

void lq_runtime_free(struct lq_runtime *r) {
    if (!r) return;
    const struct lq_backend_ops *ops = r->backend->ops;
    for (int l = 0; l < r->prepared_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++)
            ops->linear_release(r->backend, &r->model->layers[l].linear[k]);
    for (int l = 0; l < r->model->config.n_layers; l++) {
        if (r->attn_norm && r->attn_norm[l]) ops->weights_release(r->backend, r->attn_norm[l]);
        if (r->ffn_norm && r->ffn_norm[l]) ops->weights_release(r->backend, r->ffn_norm[l]);
    }
    if (r->head) ops->head_release(r->backend, r->head);
    if (r->lm_head && r->lm_head != r->embed) ops->weights_release(r->backend, r->lm_head);
    if (r->embed) ops->weights_release(r->backend, r->embed);
    if (r->final_norm) ops->weights_release(r->backend, r->final_norm);
    lq_runtime_free_own_pairs(r);
    pthread_mutex_destroy(&r->own_lock);
    free(r->attn_norm);
    free(r->ffn_norm);
    free(r);
}

/* A session's buffers on the backend: K and V caches per layer, then the activations. */
enum { SESSION_ACTIVATIONS = 8 };
struct session_sizes {
    size_t cache;                           /* bytes of each layer's K (and V) cache */
    size_t activation[SESSION_ACTIVATIONS]; /* x, h, q, attn, out, gate, up, logits */
};

static struct session_sizes session_sizes(const struct lq_model_config *c, int context,
                                          int max_batch) {
    struct session_sizes z;
    size_t B = (size_t)max_batch, q_dim = (size_t)c->n_heads * c->head_dim;
    size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t widest = q_dim > (size_t)c->dim ? q_dim : (size_t)c->dim;
    z.cache = (size_t)context * kv_dim * sizeof(float);
    for (int i = 0; i < 5; i++) z.activation[i] = B * widest * sizeof(float);
    z.activation[5] = z.activation[6] = B * (size_t)c->hidden_dim * sizeof(float);
    z.activation[7] = B * (size_t)c->vocab_size * sizeof(float);
    return z;
}

size_t lq_session_bytes(const struct lq_runtime *runtime, int context, int max_batch) {
    const struct lq_model_config *c = &runtime->model->config;
    if (max_batch > context) max_batch = context;
    const struct session_sizes z = session_sizes(c, context, max_batch);
    size_t total = 2 * (size_t)c->n_layers * z.cache;
    for (int i = 0; i < SESSION_ACTIVATIONS; i++) total += z.activation[i];
    return total;
}

int lq_session_create(struct lq_runtime *runtime, int context, int max_batch,
                      struct lq_session **out, struct lq_error *err) {
    *out = NULL;
    const struct lq_model_config *c = &runtime->model->config;
    if (context < 1 || context > c->max_seq_len)
        return lq_error_set(err, LQ_EINVAL, "context %d: the model allows 1..%d positions", context,
                            c->max_seq_len);
    if (max_batch < 1) return lq_error_set(err, LQ_EINVAL, "batch %d must be >= 1", max_batch);
    if (max_batch > context) max_batch = context;
    struct lq_session *s = calloc(1, sizeof *s);
    if (!s) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    s->runtime = runtime, s->context = context, s->max_batch = max_batch;
    struct lq_backend *b = runtime->backend;
    const struct session_sizes z = session_sizes(c, context, max_batch);
    s->k_cache = calloc((size_t)c->n_layers, sizeof *s->k_cache);
    s->v_cache = calloc((size_t)c->n_layers, sizeof *s->v_cache);
    s->positions = malloc((size_t)max_batch * sizeof *s->positions);
    int rc = !s->k_cache || !s->v_cache || !s->positions
                 ? lq_error_set(err, LQ_ENOMEM, "out of memory")
                 : 0;
    for (int l = 0; l < c->n_layers && !rc; l++) {
        rc = b->ops->buffer_alloc(b, z.cache, (void **)&s->k_cache[l], err);
        if (!rc) rc = b->ops->buffer_alloc(b, z.cache, (void **)&s->v_cache[l], err);
    }
    float **buffers[SESSION_ACTIVATIONS] = {&s->x,   &s->h,    &s->q,  &s->attn,
                                            &s->out, &s->gate, &s->up, &s->logits};
    for (int i = 0; i < SESSION_ACTIVATIONS && !rc; i++)
        rc = b->ops->buffer_alloc(b, z.activation[i], (void **)buffers[i], err);
    if (rc) {
        lq_session_free(s);
        return rc;
    }
    *out = s;
    return LQ_OK;
}

void lq_session_free(struct lq_session *s) {
    if (!s) return;
    struct lq_backend *b = s->runtime->backend;
    int layers = s->runtime->model->config.n_layers;
    for (int l = 0; l < layers; l++) {
        if (s->k_cache && s->k_cache[l]) b->ops->buffer_free(b, s->k_cache[l]);
        if (s->v_cache && s->v_cache[l]) b->ops->buffer_free(b, s->v_cache[l]);
    }
    float *buffers[] = {s->x, s->h, s->q, s->attn, s->out, s->gate, s->up, s->logits};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++)
        if (buffers[i]) b->ops->buffer_free(b, buffers[i]);
    free(s->k_cache);
    free(s->v_cache);
    free(s->positions);
    free(s);
}

void lq_session_reset(struct lq_session *s) {
    s->position = 0;
}

int lq_session_position(const struct lq_session *s) {
    return s->position;
}

int lq_session_context(const struct lq_session *s) {
    return s->context;
}

int lq_session_max_batch(const struct lq_session *s) {
    return s->max_batch;
}

const struct lq_model_config *lq_session_config(const struct lq_session *s) {
    return &s->runtime->model->config;
}

const float *lq_session_device_logits(const struct lq_session *s) {
    return s->logits;
}

struct lq_backend *lq_session_backend(const struct lq_session *s) {
    return s->runtime->backend;
}

struct lq_runtime *lq_session_runtime(const struct lq_session *s) {
    return s->runtime;
}

/* One transformer block on n tokens at positions start..start+n-1 (x updated in place). */
static int block(struct lq_session *s, int l, int n) {
    const struct lq_runtime *r = s->runtime;
    const struct lq_model_config *c = &r->model->config;
    struct lq_backend *b = r->backend;
    const struct lq_backend_ops *ops = b->ops;
    const int start = s->position, q_dim = c->n_heads * c->head_dim;
    const size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    float *k_new = s->k_cache[l] + (size_t)start * kv_dim,
          *v_new = s->v_cache[l] + (size_t)start * kv_dim;
    /* every token of the call on the session's adapter (or none) */
    const struct lq_row_run run = {s->adapter, 0, n};
#define LINEAR(kind, x, y) lq_forward_linear(r, l, kind, &run, 1, x, n, y)
    static const enum lq_linear_kind qkv[] = {LQ_Q_PROJ, LQ_K_PROJ, LQ_V_PROJ};
    static const enum lq_linear_kind gate_up[] = {LQ_GATE_PROJ, LQ_UP_PROJ};
    float *const qkv_out[] = {s->q, k_new, v_new};
    float *const gate_up_out[] = {s->gate, s->up};
    int rc;
    /* K and V are written straight into the cache rows of the new positions. */
    if ((rc = ops->rmsnorm(b, s->x, r->attn_norm[l], n, c->dim, c->norm_eps, s->h)) ||
        (rc = lq_forward_linears(r, l, qkv, 3, &run, 1, s->h, n, qkv_out)) ||
        (rc = ops->rope(b, s->q, n, c->n_heads, c->head_dim, s->positions, c->rope_theta)) ||
        (rc = ops->rope(b, k_new, n, c->n_kv_heads, c->head_dim, s->positions, c->rope_theta)) ||
        (rc = ops->attention(b, s->q, s->k_cache[l], s->v_cache[l], n, start, c->n_heads,
                             c->n_kv_heads, c->head_dim, s->attn)) ||
        (rc = LINEAR(LQ_O_PROJ, s->attn, s->out)) ||
        (rc = ops->add(b, s->x, s->out, (size_t)n * c->dim)) ||
        (rc = ops->rmsnorm(b, s->x, r->ffn_norm[l], n, c->dim, c->norm_eps, s->h)) ||
        (rc = lq_forward_linears(r, l, gate_up, 2, &run, 1, s->h, n, gate_up_out)) ||
        (rc = ops->swiglu(b, s->gate, s->up, (size_t)n * c->hidden_dim)) ||
        (rc = LINEAR(LQ_DOWN_PROJ, s->gate, s->out)) ||
        (rc = ops->add(b, s->x, s->out, (size_t)n * c->dim)))
        return rc;
#undef LINEAR
    (void)q_dim;
    return LQ_OK;
}

int lq_session_forward(struct lq_session *s, const int *tokens, int n, int all_logits,
                       float *logits, struct lq_error *err) {
    const struct lq_runtime *r = s->runtime;
    const struct lq_model_config *c = &r->model->config;
    struct lq_backend *b = r->backend;
    if (n < 1 || n > s->max_batch)
        return lq_error_set(err, LQ_EINVAL, "%d tokens in one call: 1..%d allowed", n,
                            s->max_batch);
    if (s->position + n > s->context)
        return lq_error_set(err, LQ_EINVAL, "context full: %d + %d tokens exceed %d positions",
                            s->position, n, s->context);
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return lq_error_set(err, LQ_EINVAL, "token %d is outside the vocabulary (%d)",
                                tokens[i], c->vocab_size);
        s->positions[i] = s->position + i;
    }
    int rc = lq_runtime_embed(r, tokens, n, s->x);
    for (int l = 0; l < c->n_layers && !rc; l++) rc = block(s, l, n);
    int first = all_logits ? 0 : n - 1, rows = n - first;
    const float *x_last = s->x + (size_t)first * c->dim;
    if (!rc) rc = b->ops->rmsnorm(b, x_last, r->final_norm, rows, c->dim, c->norm_eps, s->h);
    if (!rc) rc = lq_runtime_logits(r, s->h, rows, s->logits);
    if (!rc && logits)
        rc = b->ops->copy_to_host(b, logits, s->logits,
                                  (size_t)rows * c->vocab_size * sizeof(float));
    if (rc) return lq_error_set(err, rc, "forward pass failed on the %s backend", b->ops->name);
    s->position += n;
    return LQ_OK;
}
