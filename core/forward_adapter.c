/* LoRA adapters in the forward pass. An adapter prepared for a runtime holds its pairs on the
 * backend; a session points at one (or none), and every linear layer of a forward call runs
 * as follows, for rows grouped in runs of one adapter:
 *
 *   - no row on an adapter: ops->linear, exactly as without adapters;
 *   - no row on a REPLACE adapter: ops->linear for every row (Q + the model's own L1·L2),
 *     then each ADD run's pair with lowrank_add;
 *   - some row on a REPLACE adapter: ops->linear_base for every row (Q alone, read once for
 *     the whole batch), then per run: the model's own pair unless the run is REPLACE, and the
 *     run's adapter pair.
 *
 * So every row goes through the same sequence of rounded operations whatever its batch-mates
 * use — the shared part, then its own pair (if its mode keeps it), then its adapter's pair —
 * and on a batch-invariant backend (the CPU's linear, whose linear is linear_base followed by
 * lowrank_add of the own pair) a request's logits are the same bits alone and in any mix. A
 * REPLACE adapter alone is also bit for bit an LQ model whose L1, L2 were replaced by the
 * adapter's. */
#include "core/adapter.h"
#include "forward.h"
#include "forward_internal.h"

#include <stdlib.h>

#define PAIRS_PER_LAYER LQ_LINEARS_PER_LAYER

static void release_pairs(struct lq_backend *backend, struct lq_lowrank_pair *pairs, size_t count) {
    for (size_t i = 0; pairs && i < count; i++) {
        if (pairs[i].L1) backend->ops->weights_release(backend, pairs[i].L1);
        if (pairs[i].L2) backend->ops->weights_release(backend, pairs[i].L2);
    }
    free(pairs);
}

/* Uploads one pair (L1 [rows, rank], L2 [rank, cols]) into *pair. */
static int upload_pair(struct lq_backend *backend, int rank, int rows, int cols, const float *L1,
                       const float *L2, struct lq_lowrank_pair *pair, size_t *bytes,
                       struct lq_error *err) {
    if (rank <= 0) return LQ_OK;
    if (!L1 || !L2) return lq_error_set(err, LQ_EINVAL, "a rank-%d pair without factors", rank);
    int rc = backend->ops->weights_upload(backend, L1, (size_t)rows * rank, &pair->L1, err);
    if (!rc) rc = backend->ops->weights_upload(backend, L2, (size_t)rank * cols, &pair->L2, err);
    if (!rc) pair->rank = rank;
    *bytes += (size_t)rank * ((size_t)rows + (size_t)cols) * sizeof(float);
    return rc;
}

/* The model's own pairs as device arrays, made once per runtime (see forward_internal.h). */
static int ensure_own_pairs(struct lq_runtime *r, struct lq_error *err) {
    pthread_mutex_lock(&r->own_lock);
    int rc = LQ_OK;
    if (!r->own) {
        const int layers = r->model->config.n_layers;
        size_t count = (size_t)layers * PAIRS_PER_LAYER, bytes = 0;
        struct lq_lowrank_pair *own = calloc(count, sizeof *own);
        if (!own) rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
        for (int l = 0; l < layers && !rc; l++)
            for (int k = 0; k < PAIRS_PER_LAYER && !rc; k++) {
                const struct lq_linear *w = &r->model->layers[l].linear[k];
                if (w->is_lq)
                    rc = upload_pair(r->backend, w->rank, w->rows, w->cols, w->lora_B, w->lora_A,
                                     &own[(size_t)l * PAIRS_PER_LAYER + k], &bytes, err);
            }
        if (rc)
            release_pairs(r->backend, own, count);
        else
            r->own = own;
    }
    pthread_mutex_unlock(&r->own_lock);
    return rc;
}

void lq_runtime_free_own_pairs(struct lq_runtime *r) {
    if (!r->own) return;
    release_pairs(r->backend, r->own, (size_t)r->model->config.n_layers * PAIRS_PER_LAYER);
    r->own = NULL;
}

int lq_adapter_weights_create(struct lq_runtime *runtime, const struct lq_adapter *adapter,
                              struct lq_adapter_weights **out, struct lq_error *err) {
    *out = NULL;
    const struct lq_backend_ops *ops = runtime->backend->ops;
    if (!ops->linear_base || !ops->lowrank_add)
        return lq_error_set(err, LQ_EUNSUPPORTED, "the %s backend cannot serve adapters",
                            ops->name);
    int rc = lq_adapter_check(adapter, runtime->model, err);
    if (rc) return rc;
    struct lq_adapter_weights *a = calloc(1, sizeof *a);
    const int layers = runtime->model->config.n_layers;
    const size_t count = (size_t)layers * PAIRS_PER_LAYER;
    if (!a || !(a->pairs = calloc(count, sizeof *a->pairs))) {
        free(a);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    a->runtime = runtime;
    a->replace = adapter->mode == LQ_ADAPTER_REPLACE;
    for (size_t i = 0; i < count && !rc; i++) {
        const struct lq_adapter_matrix *m = &adapter->matrices[i];
        rc = upload_pair(runtime->backend, m->rank, m->rows, m->cols, m->L1, m->L2, &a->pairs[i],
                         &a->bytes, err);
    }
    /* bare rows batched with this adapter's need the model's own pairs as arrays */
    if (!rc && a->replace) rc = ensure_own_pairs(runtime, err);
    if (rc) {
        lq_adapter_weights_free(a);
        return rc;
    }
    *out = a;
    return LQ_OK;
}

void lq_adapter_weights_free(struct lq_adapter_weights *weights) {
    if (!weights) return;
    release_pairs(weights->runtime->backend, weights->pairs,
                  (size_t)weights->runtime->model->config.n_layers * PAIRS_PER_LAYER);
    free(weights);
}

size_t lq_adapter_weights_bytes(const struct lq_adapter_weights *weights) {
    return weights ? weights->bytes : 0;
}

int lq_session_set_adapter(struct lq_session *session, const struct lq_adapter_weights *weights,
                           struct lq_error *err) {
    if (weights && weights->runtime != session->runtime)
        return lq_error_set(err, LQ_EINVAL, "the adapter was prepared for another model");
    session->adapter = weights;
    return LQ_OK;
}

const struct lq_adapter_weights *lq_session_adapter(const struct lq_session *session) {
    return session->adapter;
}

/* y[rows of the run] += x[rows of the run] · (L1·L2)ᵀ. */
static int add_pair(struct lq_backend *b, const struct lq_lowrank_pair *pair,
                    const struct lq_linear *w, const struct lq_row_run *run, const float *x,
                    float *y) {
    if (pair->rank <= 0) return LQ_OK;
    return b->ops->lowrank_add(b, pair->L1, pair->L2, w->rows, w->cols, pair->rank,
                               x + (size_t)run->first * w->cols, run->count,
                               y + (size_t)run->first * w->rows);
}

int lq_forward_linear(const struct lq_runtime *r, int layer, enum lq_linear_kind kind,
                      const struct lq_row_run *runs, int n_runs, const float *x, int n, float *y) {
    struct lq_backend *b = r->backend;
    const struct lq_linear *w = &r->model->layers[layer].linear[kind];
    const size_t index = (size_t)layer * PAIRS_PER_LAYER + kind;
    int any_adapter = 0, any_replace = 0;
    for (int i = 0; i < n_runs; i++) {
        any_adapter |= runs[i].adapter != NULL;
        any_replace |= runs[i].adapter && runs[i].adapter->replace;
    }
    if (!any_adapter) return b->ops->linear(b, w, x, n, y);
    if (!b->ops->linear_base || !b->ops->lowrank_add) return LQ_EUNSUPPORTED;
    /* The own pair is split off only where some row must go without it. */
    const int split = any_replace && w->is_lq && w->rank > 0;
    if (split && !r->own) return LQ_EINVAL; /* made when the REPLACE adapter was prepared */
    int rc = split ? b->ops->linear_base(b, w, x, n, y) : b->ops->linear(b, w, x, n, y);
    for (int i = 0; i < n_runs && !rc; i++) {
        const struct lq_adapter_weights *a = runs[i].adapter;
        if (split && (!a || !a->replace)) rc = add_pair(b, &r->own[index], w, &runs[i], x, y);
        if (!rc && a) rc = add_pair(b, &a->pairs[index], w, &runs[i], x, y);
    }
    return rc;
}

int lq_forward_linears(const struct lq_runtime *r, int layer, const enum lq_linear_kind *kinds,
                       int count, const struct lq_row_run *runs, int n_runs, const float *x, int n,
                       float *const *y) {
    struct lq_backend *b = r->backend;
    int any_adapter = 0;
    for (int i = 0; i < n_runs; i++) any_adapter |= runs[i].adapter != NULL;
    if (!any_adapter && b->ops->linear_group && count <= LQ_LINEARS_PER_LAYER) {
        const struct lq_linear *w[LQ_LINEARS_PER_LAYER];
        for (int i = 0; i < count; i++) w[i] = &r->model->layers[layer].linear[kinds[i]];
        return b->ops->linear_group(b, w, count, x, n, y);
    }
    for (int i = 0; i < count; i++) {
        const int rc = lq_forward_linear(r, layer, kinds[i], runs, n_runs, x, n, y[i]);
        if (rc) return rc;
    }
    return LQ_OK;
}

int lq_forward_fuses(const struct lq_runtime *r, const struct lq_row_run *runs, int n_runs, int n) {
    const struct lq_backend_ops *ops = r->backend->ops;
    if (!ops->linear_fused || !ops->fuses_linears) return 0;
    for (int i = 0; i < n_runs; i++)
        if (runs[i].adapter) return 0;
    return ops->fuses_linears(r->backend, n);
}

int lq_forward_linears_fused(const struct lq_runtime *r, int layer,
                             const enum lq_linear_kind *kinds, int count,
                             const struct lq_linear_input *in, int n, float *const *y,
                             enum lq_linear_output output) {
    if (count < 1 || count > LQ_LINEARS_PER_LAYER) return LQ_EINVAL;
    const struct lq_linear *w[LQ_LINEARS_PER_LAYER];
    for (int i = 0; i < count; i++) w[i] = &r->model->layers[layer].linear[kinds[i]];
    return r->backend->ops->linear_fused(r->backend, w, count, in, n, y, output);
}
