/* The training network: the LLaMA forward pass over a micro-batch of rows that keeps its
 * activations, and the backward pass to the trainable pairs (core/train_internal.h). Like
 * core/forward.c it calls only the backend's ops table. */
#include "core/train_internal.h"

#include <stdlib.h>
#include <string.h>

int train_backend_check(const struct lq_backend *backend, struct lq_error *err) {
    const struct lq_backend_ops *o = backend->ops;
    struct {
        const char *name;
        int present;
    } needed[] = {
        {"zero", o->zero != NULL},
        {"copy", o->copy != NULL},
        {"linear_lora", o->linear_lora != NULL},
        {"linear_backward", o->linear_backward != NULL},
        {"matmul_backward", o->matmul_backward != NULL},
        {"rmsnorm_backward", o->rmsnorm_backward != NULL},
        {"rope_backward", o->rope_backward != NULL},
        {"attention_backward", o->attention_backward != NULL},
        {"swiglu_backward", o->swiglu_backward != NULL},
        {"cross_entropy", o->cross_entropy != NULL},
        {"sum_squares", o->sum_squares != NULL},
        {"accumulate_squares", o->accumulate_squares != NULL},
        {"adamw", o->adamw != NULL},
    };
    for (size_t i = 0; i < sizeof needed / sizeof needed[0]; i++)
        if (!needed[i].present)
            return lq_error_set(err, LQ_EUNSUPPORTED,
                                "the %s backend cannot train yet (no %s op): use the CPU backend",
                                o->name, needed[i].name);
    return LQ_OK;
}

struct train_matrix *train_net_matrix(struct train_net *net, int layer, enum lq_linear_kind kind) {
    return &net->matrices[(size_t)layer * LQ_LINEARS_PER_LAYER + kind];
}

static int buffer(struct train_net *net, size_t floats, float **out, struct lq_error *err) {
    return net->backend->ops->buffer_alloc(net->backend, (floats ? floats : 1) * sizeof(float),
                                           (void **)out, err);
}

int train_net_create(struct lq_backend *backend, const struct lq_model *model, int max_tokens,
                     int recompute, struct train_net **out, struct lq_error *err) {
    *out = NULL;
    int rc = train_backend_check(backend, err);
    if (rc) return rc;
    const struct lq_model_config *c = &model->config;
    if (max_tokens < 1) return lq_error_set(err, LQ_EINVAL, "a micro-batch needs >= 1 token");
    struct train_net *net = calloc(1, sizeof *net);
    if (!net) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    net->backend = backend, net->model = model;
    net->max_tokens = max_tokens, net->recompute = recompute;
    const int layers = c->n_layers, saved = recompute ? 1 : layers;
    net->matrices = calloc((size_t)layers * LQ_LINEARS_PER_LAYER, sizeof *net->matrices);
    net->attn_norm = calloc((size_t)layers, sizeof *net->attn_norm);
    net->ffn_norm = calloc((size_t)layers, sizeof *net->ffn_norm);
    net->x = calloc((size_t)layers + 1, sizeof *net->x);
    net->saved = calloc((size_t)saved, sizeof *net->saved);
    net->positions = malloc((size_t)max_tokens * sizeof *net->positions);
    if (!net->matrices || !net->attn_norm || !net->ffn_norm || !net->x || !net->saved ||
        !net->positions) {
        train_net_free(net);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    for (int l = 0; l < layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            struct train_matrix *m = train_net_matrix(net, l, (enum lq_linear_kind)k);
            m->frozen = model->layers[l].linear[k];
            m->frozen.backend_data = NULL;
        }
    const size_t T = (size_t)max_tokens, dim = (size_t)c->dim, hidden = (size_t)c->hidden_dim;
    const size_t q_dim = (size_t)c->n_heads * c->head_dim;
    const size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    for (int l = 0; l <= layers && !rc; l++) rc = buffer(net, T * dim, &net->x[l], err);
    for (int s = 0; s < saved && !rc; s++) {
        struct train_layer_saved *a = &net->saved[s];
        size_t widths[] = {q_dim, kv_dim, kv_dim, q_dim, dim, hidden, hidden};
        float **targets[] = {&a->q, &a->k, &a->v, &a->attn, &a->x_mid, &a->gate, &a->up};
        for (size_t i = 0; i < sizeof widths / sizeof widths[0] && !rc; i++)
            rc = buffer(net, T * widths[i], targets[i], err);
    }
    /* the output head runs on chunks of tokens: at most ~16 MB of logits at once */
    size_t chunk = ((size_t)4 << 20) / (size_t)c->vocab_size;
    net->logit_rows = (int)(chunk < 16 ? 16 : chunk > T ? T : chunk);
    struct {
        float **target;
        size_t floats;
    } scratch[] = {
        {&net->h, T * dim},
        {&net->act, T * hidden},
        {&net->dres, T * dim},
        {&net->dh, T * dim},
        {&net->dq, T * q_dim},
        {&net->dk, T * kv_dim},
        {&net->dv, T * kv_dim},
        {&net->dattn, T * q_dim},
        {&net->dgate, T * hidden},
        {&net->dup, T * hidden},
        {&net->logits, (size_t)net->logit_rows * c->vocab_size},
    };
    for (size_t i = 0; i < sizeof scratch / sizeof scratch[0] && !rc; i++)
        rc = buffer(net, scratch[i].floats, scratch[i].target, err);
    const struct lq_backend_ops *ops = backend->ops;
    size_t vocab_dim = (size_t)c->vocab_size * c->dim;
    if (!rc) rc = ops->weights_upload(backend, model->embed, vocab_dim, &net->embed, err);
    if (!rc) rc = ops->weights_upload(backend, model->final_norm, dim, &net->final_norm, err);
    if (!rc)
        rc = model->lm_head == model->embed
                 ? (net->lm_head = net->embed, 0)
                 : ops->weights_upload(backend, model->lm_head, vocab_dim, &net->lm_head, err);
    for (int l = 0; l < layers && !rc; l++) {
        rc = ops->weights_upload(backend, model->layers[l].attn_norm, dim, &net->attn_norm[l], err);
        if (!rc)
            rc = ops->weights_upload(backend, model->layers[l].ffn_norm, dim, &net->ffn_norm[l],
                                     err);
    }
    if (rc) {
        train_net_free(net);
        return rc;
    }
    net->uploaded = 1;
    *out = net;
    return LQ_OK;
}

int train_net_prepare(struct train_net *net, struct lq_error *err) {
    const int count = net->model->config.n_layers * LQ_LINEARS_PER_LAYER;
    for (int i = 0; i < count; i++) {
        struct train_matrix *m = &net->matrices[i];
        if (m->prepared) continue;
        int rc = net->backend->ops->linear_prepare(net->backend, &m->frozen, err);
        if (rc) return rc;
        m->prepared = 1;
    }
    return LQ_OK;
}

void train_net_free(struct train_net *net) {
    if (!net) return;
    struct lq_backend *b = net->backend;
    const struct lq_backend_ops *ops = b->ops;
    const int layers = net->model->config.n_layers;
    if (net->matrices)
        for (int i = 0; i < layers * LQ_LINEARS_PER_LAYER; i++)
            if (net->matrices[i].prepared) ops->linear_release(b, &net->matrices[i].frozen);
    if (net->x)
        for (int l = 0; l <= layers; l++)
            if (net->x[l]) ops->buffer_free(b, net->x[l]);
    if (net->saved)
        for (int s = 0; s < (net->recompute ? 1 : layers); s++) {
            struct train_layer_saved *a = &net->saved[s];
            float *buffers[] = {a->q, a->k, a->v, a->attn, a->x_mid, a->gate, a->up};
            for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++)
                if (buffers[i]) ops->buffer_free(b, buffers[i]);
        }
    float *scratch[] = {net->h,  net->act,   net->dres,  net->dh,  net->dq,    net->dk,
                        net->dv, net->dattn, net->dgate, net->dup, net->logits};
    for (size_t i = 0; i < sizeof scratch / sizeof scratch[0]; i++)
        if (scratch[i]) ops->buffer_free(b, scratch[i]);
    /* weights_upload results, released whether or not every upload succeeded */
    if (net->embed) ops->weights_release(b, net->embed);
    if (net->lm_head && net->lm_head != net->embed) ops->weights_release(b, net->lm_head);
    if (net->final_norm) ops->weights_release(b, net->final_norm);
    for (int l = 0; l < layers; l++) {
        if (net->attn_norm && net->attn_norm[l]) ops->weights_release(b, net->attn_norm[l]);
        if (net->ffn_norm && net->ffn_norm[l]) ops->weights_release(b, net->ffn_norm[l]);
    }
    free(net->matrices), free(net->attn_norm), free(net->ffn_norm), free(net->x);
    free(net->saved), free(net->positions);
    free(net);
}

static struct train_layer_saved *saved_of(struct train_net *net, int layer) {
    return &net->saved[net->recompute ? 0 : layer];
}

static int linear_forward(struct train_net *net, const struct train_matrix *m, const float *x,
                          int n, float *y) {
    return net->backend->ops->linear_lora(net->backend, &m->frozen, m->L1, m->L2, m->rank, x, n, y);
}

static int linear_backward(struct train_net *net, const struct train_matrix *m, const float *x,
                           const float *dy, int n, float *dx, int accumulate) {
    return net->backend->ops->linear_backward(net->backend, &m->frozen, m->L1, m->L2, m->rank, x,
                                              dy, n, dx, accumulate, m->dL1, m->dL2, m->dW);
}

/* Layer l on the micro-batch: x[l] → x[l + 1], keeping its activations. Recomputing (during
 * backward) stops before the down projection, whose output backward does not need. */
static int layer_forward(struct train_net *net, int l, int recomputing) {
    const struct lq_model_config *c = &net->model->config;
    struct lq_backend *b = net->backend;
    const struct lq_backend_ops *ops = b->ops;
    struct train_layer_saved *a = saved_of(net, l);
    const struct train_matrix *w = train_net_matrix(net, l, 0);
    const int n = net->rows * net->seq_len, T = net->seq_len;
    const size_t q_dim = (size_t)c->n_heads * c->head_dim,
                 kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    float *x = net->x[l], *next = net->x[l + 1];
    int rc;
    if ((rc = ops->rmsnorm(b, x, net->attn_norm[l], n, c->dim, c->norm_eps, net->h)) ||
        (rc = linear_forward(net, &w[LQ_Q_PROJ], net->h, n, a->q)) ||
        (rc = linear_forward(net, &w[LQ_K_PROJ], net->h, n, a->k)) ||
        (rc = linear_forward(net, &w[LQ_V_PROJ], net->h, n, a->v)) ||
        (rc = ops->rope(b, a->q, n, c->n_heads, c->head_dim, net->positions, c->rope_theta)) ||
        (rc = ops->rope(b, a->k, n, c->n_kv_heads, c->head_dim, net->positions, c->rope_theta)))
        return rc;
    /* each row is its own sequence from position 0: attention as a prefill of T tokens */
    for (int r = 0; r < net->rows; r++) {
        size_t qo = (size_t)r * T * q_dim, ko = (size_t)r * T * kv_dim;
        rc = ops->attention(b, a->q + qo, a->k + ko, a->v + ko, T, 0, c->n_heads, c->n_kv_heads,
                            c->head_dim, a->attn + qo);
        if (rc) return rc;
    }
    if ((rc = linear_forward(net, &w[LQ_O_PROJ], a->attn, n, a->x_mid)) ||
        (rc = ops->add(b, a->x_mid, x, (size_t)n * c->dim)) ||
        (rc = ops->rmsnorm(b, a->x_mid, net->ffn_norm[l], n, c->dim, c->norm_eps, net->h)) ||
        (rc = linear_forward(net, &w[LQ_GATE_PROJ], net->h, n, a->gate)) ||
        (rc = linear_forward(net, &w[LQ_UP_PROJ], net->h, n, a->up)))
        return rc;
    if (recomputing) return LQ_OK;
    const size_t hidden = (size_t)n * c->hidden_dim;
    if ((rc = ops->copy(b, net->act, a->gate, hidden * sizeof(float))) ||
        (rc = ops->swiglu(b, net->act, a->up, hidden)) ||
        (rc = linear_forward(net, &w[LQ_DOWN_PROJ], net->act, n, next)) ||
        (rc = ops->add(b, next, a->x_mid, (size_t)n * c->dim)))
        return rc;
    return LQ_OK;
}

int train_net_forward(struct train_net *net, const int *inputs, int rows, int seq_len,
                      struct lq_error *err) {
    const struct lq_model_config *c = &net->model->config;
    if (rows < 1 || seq_len < 1 || (size_t)rows * seq_len > (size_t)net->max_tokens)
        return lq_error_set(err, LQ_EINVAL, "a micro-batch of %d x %d tokens exceeds %d", rows,
                            seq_len, net->max_tokens);
    net->rows = rows, net->seq_len = seq_len;
    const int n = rows * seq_len;
    for (int i = 0; i < n; i++) net->positions[i] = i % seq_len;
    struct lq_backend *b = net->backend;
    int rc = b->ops->embed(b, net->embed, c->dim, inputs, n, net->x[0]);
    for (int l = 0; l < c->n_layers && !rc; l++) rc = layer_forward(net, l, 0);
    if (rc)
        return lq_error_set(err, rc, "training forward pass failed on the %s backend",
                            b->ops->name);
    return LQ_OK;
}

/* Layer l backward: net->dres holds ∂loss/∂x[l + 1] and leaves with ∂loss/∂x[l] (skipped for
 * layer 0, whose input is the frozen embedding). */
static int layer_backward(struct train_net *net, int l) {
    const struct lq_model_config *c = &net->model->config;
    struct lq_backend *b = net->backend;
    const struct lq_backend_ops *ops = b->ops;
    const struct train_matrix *w = train_net_matrix(net, l, 0);
    struct train_layer_saved *a = saved_of(net, l);
    const int n = net->rows * net->seq_len, dim = c->dim;
    const size_t hidden = (size_t)n * c->hidden_dim;
    float *x = net->x[l];
    int rc;
    if (net->recompute && (rc = layer_forward(net, l, 1))) return rc;
    /* MLP: x_out = x_mid + down(silu(gate(h2)) ⊙ up(h2)), h2 = rmsnorm(x_mid) */
    if ((rc = ops->copy(b, net->act, a->gate, hidden * sizeof(float))) ||
        (rc = ops->swiglu(b, net->act, a->up, hidden)) ||
        (rc = linear_backward(net, &w[LQ_DOWN_PROJ], net->act, net->dres, n, net->dgate, 0)) ||
        (rc = ops->swiglu_backward(b, a->gate, a->up, net->dgate, hidden, net->dgate, net->dup)) ||
        (rc = ops->rmsnorm(b, a->x_mid, net->ffn_norm[l], n, dim, c->norm_eps, net->h)) ||
        (rc = linear_backward(net, &w[LQ_GATE_PROJ], net->h, net->dgate, n, net->dh, 0)) ||
        (rc = linear_backward(net, &w[LQ_UP_PROJ], net->h, net->dup, n, net->dh, 1)) ||
        (rc = ops->rmsnorm_backward(b, a->x_mid, net->ffn_norm[l], net->dh, n, dim, c->norm_eps,
                                    net->dres)))
        return rc;
    /* attention: x_mid = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = rmsnorm(x) */
    if ((rc = linear_backward(net, &w[LQ_O_PROJ], a->attn, net->dres, n, net->dattn, 0)) ||
        (rc = ops->attention_backward(b, a->q, a->k, a->v, net->dattn, net->rows, net->seq_len,
                                      c->n_heads, c->n_kv_heads, c->head_dim, net->dq, net->dk,
                                      net->dv)) ||
        (rc = ops->rope_backward(b, net->dq, n, c->n_heads, c->head_dim, net->positions,
                                 c->rope_theta)) ||
        (rc = ops->rope_backward(b, net->dk, n, c->n_kv_heads, c->head_dim, net->positions,
                                 c->rope_theta)) ||
        (rc = ops->rmsnorm(b, x, net->attn_norm[l], n, dim, c->norm_eps, net->h)) ||
        (rc = linear_backward(net, &w[LQ_Q_PROJ], net->h, net->dq, n, net->dh, 0)) ||
        (rc = linear_backward(net, &w[LQ_K_PROJ], net->h, net->dk, n, net->dh, 1)) ||
        (rc = linear_backward(net, &w[LQ_V_PROJ], net->h, net->dv, n, net->dh, 1)))
        return rc;
    if (l > 0)
        rc =
            ops->rmsnorm_backward(b, x, net->attn_norm[l], net->dh, n, dim, c->norm_eps, net->dres);
    return rc;
}

int train_net_loss(struct train_net *net, const int *targets, const unsigned char *mask,
                   float grad_scale, int backward, double *loss_sum, struct lq_error *err) {
    const struct lq_model_config *c = &net->model->config;
    struct lq_backend *b = net->backend;
    const struct lq_backend_ops *ops = b->ops;
    const int n = net->rows * net->seq_len, dim = c->dim, vocab = c->vocab_size;
    const float *x = net->x[c->n_layers];
    int rc = backward ? ops->zero(b, net->dres, (size_t)n * dim) : 0, in_loss = 0;
    for (int first = 0; first < n && !rc; first += net->logit_rows) {
        int count = n - first < net->logit_rows ? n - first : net->logit_rows, any = !mask;
        for (int i = 0; i < count && !any; i++) any = mask[first + i] != 0;
        if (!any) continue; /* nothing in the loss here: no logits, and a zero gradient */
        in_loss = 1;
        size_t offset = (size_t)first * dim;
        float *h = net->h + offset;
        if ((rc = ops->rmsnorm(b, x + offset, net->final_norm, count, dim, c->norm_eps, h)) ||
            (rc = ops->matmul(b, net->lm_head, vocab, dim, h, count, net->logits)) ||
            (rc = ops->cross_entropy(b, net->logits, targets + first, mask ? mask + first : NULL,
                                     count, vocab, grad_scale, loss_sum,
                                     backward ? net->logits : NULL)))
            break;
        if (backward &&
            ((rc = ops->matmul_backward(b, net->lm_head, vocab, dim, net->logits, count,
                                        net->dh + offset, 0)) ||
             (rc = ops->rmsnorm_backward(b, x + offset, net->final_norm, net->dh + offset, count,
                                         dim, c->norm_eps, net->dres + offset))))
            break;
    }
    /* a micro-batch with nothing in the loss adds nothing to the gradient */
    for (int l = c->n_layers - 1; l >= 0 && backward && in_loss && !rc; l--)
        rc = layer_backward(net, l);
    if (rc)
        return lq_error_set(err, rc, "training backward pass failed on the %s backend", ops->name);
    return LQ_OK;
}
