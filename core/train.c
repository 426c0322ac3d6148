/* The LoRA trainer (core/train.h): options, the learning-rate schedule, the trainable pairs
 * in one flat device array with their gradients and AdamW moments, and the optimizer step.
 * The forward and backward passes are core/train_net.c's. */
#include "core/train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/train_internal.h"

const char *lq_lora_init_name(enum lq_lora_init init) {
    return init == LQ_LORA_INIT_ZERO ? "zero" : "lq";
}

int lq_lora_init_parse(const char *text, enum lq_lora_init *out, struct lq_error *err) {
    if (!strcmp(text, "lq")) return *out = LQ_LORA_INIT_LQ, LQ_OK;
    if (!strcmp(text, "zero")) return *out = LQ_LORA_INIT_ZERO, LQ_OK;
    return lq_error_set(err, LQ_EINVAL, "LoRA init '%s': expected lq or zero", text);
}

const char *lq_lr_schedule_name(enum lq_lr_schedule schedule) {
    return schedule == LQ_LR_LINEAR ? "linear" : schedule == LQ_LR_CONSTANT ? "constant" : "cosine";
}

int lq_lr_schedule_parse(const char *text, enum lq_lr_schedule *out, struct lq_error *err) {
    if (!strcmp(text, "cosine")) return *out = LQ_LR_COSINE, LQ_OK;
    if (!strcmp(text, "linear")) return *out = LQ_LR_LINEAR, LQ_OK;
    if (!strcmp(text, "constant")) return *out = LQ_LR_CONSTANT, LQ_OK;
    return lq_error_set(err, LQ_EINVAL, "schedule '%s': expected cosine, linear or constant", text);
}

void lq_train_options_default(struct lq_train_options *o) {
    memset(o, 0, sizeof *o);
    o->init = LQ_LORA_INIT_LQ;
    o->rank = 8;
    o->seq_len = 256;
    o->micro_batch = 4;
    o->learning_rate = 2e-4;
    o->beta1 = 0.9, o->beta2 = 0.999, o->eps = 1e-8;
    o->max_grad_norm = 1.0;
    o->schedule = LQ_LR_COSINE;
}

int lq_train_options_validate(const struct lq_train_options *o, struct lq_error *err) {
    if (o->init != LQ_LORA_INIT_LQ && o->init != LQ_LORA_INIT_ZERO)
        return lq_error_set(err, LQ_EINVAL, "unknown LoRA init %d", (int)o->init);
    if (o->init == LQ_LORA_INIT_ZERO && o->rank < 1)
        return lq_error_set(err, LQ_EINVAL, "rank %d: a new LoRA pair needs rank >= 1", o->rank);
    if (o->seq_len < 1) return lq_error_set(err, LQ_EINVAL, "seq_len %d must be >= 1", o->seq_len);
    if (o->micro_batch < 1)
        return lq_error_set(err, LQ_EINVAL, "micro_batch %d must be >= 1", o->micro_batch);
    if (!(o->learning_rate >= 0 && isfinite(o->learning_rate)))
        return lq_error_set(err, LQ_EINVAL, "learning rate %g must be finite and >= 0",
                            o->learning_rate);
    if (!(o->beta1 >= 0 && o->beta1 < 1) || !(o->beta2 >= 0 && o->beta2 < 1))
        return lq_error_set(err, LQ_EINVAL, "AdamW betas (%g, %g) must lie in [0, 1)", o->beta1,
                            o->beta2);
    if (!(o->eps > 0)) return lq_error_set(err, LQ_EINVAL, "AdamW eps %g must be > 0", o->eps);
    if (!(o->weight_decay >= 0))
        return lq_error_set(err, LQ_EINVAL, "weight decay %g must be >= 0", o->weight_decay);
    if (!(o->max_grad_norm >= 0))
        return lq_error_set(err, LQ_EINVAL, "max_grad_norm %g must be >= 0 (0: no clipping)",
                            o->max_grad_norm);
    if (o->schedule != LQ_LR_COSINE && o->schedule != LQ_LR_LINEAR && o->schedule != LQ_LR_CONSTANT)
        return lq_error_set(err, LQ_EINVAL, "unknown schedule %d", (int)o->schedule);
    if (o->warmup_steps < 0 || o->total_steps < 0)
        return lq_error_set(err, LQ_EINVAL, "warmup_steps %d and total_steps %d must be >= 0",
                            o->warmup_steps, o->total_steps);
    if (!(o->min_lr_ratio >= 0 && o->min_lr_ratio <= 1))
        return lq_error_set(err, LQ_EINVAL, "min_lr_ratio %g must lie in [0, 1]", o->min_lr_ratio);
    return LQ_OK;
}

double lq_train_learning_rate(const struct lq_train_options *o, long step) {
    const double peak = o->learning_rate, low = peak * o->min_lr_ratio;
    if (step < 0) step = 0;
    /* (step + 1)/warmup: the first update already moves, the last warmup step is the peak */
    if (step < o->warmup_steps) return peak * (double)(step + 1) / o->warmup_steps;
    if (o->schedule == LQ_LR_CONSTANT || o->total_steps <= o->warmup_steps) return peak;
    double progress = (double)(step - o->warmup_steps) / (o->total_steps - o->warmup_steps);
    if (progress > 1) progress = 1;
    if (o->schedule == LQ_LR_LINEAR) return peak - (peak - low) * progress;
    return low + (peak - low) * 0.5 * (1.0 + cos(M_PI * progress));
}

/* ---------- creation ---------- */

static int matrix_name_error(struct lq_error *err, int code, int layer, int kind,
                             const char *what) {
    char name[128];
    lq_model_linear_name(layer, (enum lq_linear_kind)kind, name, sizeof name);
    return lq_error_set(err, code, "%s: %s", name, what);
}

/* Sets every matrix's view and rank, and the flat layout; fills host (when not NULL) with the
 * initial values of the pairs. */
static int plan_matrices(struct lq_trainer *t, float *host, struct lq_error *err) {
    const struct lq_model_config *c = &t->model->config;
    size_t offset = 0;
    for (int l = 0; l < c->n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            const struct lq_linear *w = &t->model->layers[l].linear[k];
            struct lq_trainer_matrix *info = &t->matrices[l * LQ_LINEARS_PER_LAYER + k];
            struct train_matrix *m = train_net_matrix(t->net, l, (enum lq_linear_kind)k);
            info->rows = w->rows, info->cols = w->cols;
            if (t->options.init == LQ_LORA_INIT_LQ) {
                if (!w->is_lq || w->rank < 1 || !w->lora_A || !w->lora_B)
                    return matrix_name_error(err, LQ_EINVAL, l, k,
                                             "no low-rank part to train (LoRA init 'lq' needs an "
                                             "LQ model of rank > 0; use init 'zero')");
                info->rank = w->rank;
                /* the view keeps Q alone: the pair is now the trainer's */
                m->frozen.rank = 0, m->frozen.lora_A = m->frozen.lora_B = NULL;
            } else {
                if (t->options.rank > w->rows || t->options.rank > w->cols)
                    return matrix_name_error(err, LQ_EINVAL, l, k,
                                             "the LoRA rank is larger than the matrix");
                info->rank = t->options.rank;
            }
            info->L1_offset = offset;
            info->L2_offset = offset + (size_t)w->rows * info->rank;
            offset = info->L2_offset + (size_t)info->rank * w->cols;
            if (!host) continue;
            size_t l1 = (size_t)w->rows * info->rank, l2 = (size_t)info->rank * w->cols;
            if (t->options.init == LQ_LORA_INIT_LQ) {
                memcpy(host + info->L1_offset, w->lora_B, l1 * sizeof(float));
                memcpy(host + info->L2_offset, w->lora_A, l2 * sizeof(float));
            } else {
                /* PEFT: lora_B = 0; lora_A by kaiming_uniform(a = √5), bound
                 * gain·√(3/fan_in) = √(1/3)·√(3/cols) = 1/√cols */
                double bound = 1.0 / sqrt((double)w->cols);
                memset(host + info->L1_offset, 0, l1 * sizeof(float));
                for (size_t i = 0; i < l2; i++)
                    host[info->L2_offset + i] =
                        (float)((2.0 * lq_rng_uniform(&t->rng) - 1.0) * bound);
            }
        }
    t->count = offset;
    return LQ_OK;
}

static void attach_pairs(struct lq_trainer *t) {
    const int count = t->model->config.n_layers * LQ_LINEARS_PER_LAYER;
    for (int i = 0; i < count; i++) {
        const struct lq_trainer_matrix *info = &t->matrices[i];
        struct train_matrix *m = &t->net->matrices[i];
        m->rank = info->rank;
        m->L1 = t->params + info->L1_offset, m->L2 = t->params + info->L2_offset;
        m->dL1 = t->grads + info->L1_offset, m->dL2 = t->grads + info->L2_offset;
    }
}

int lq_trainer_create(struct lq_backend *backend, struct lq_model *model,
                      const struct lq_train_options *options, struct lq_trainer **out,
                      struct lq_error *err) {
    *out = NULL;
    int rc = lq_train_options_validate(options, err);
    if (rc) return rc;
    if (options->seq_len > model->config.max_seq_len)
        return lq_error_set(err, LQ_EINVAL, "seq_len %d: the model allows %d positions",
                            options->seq_len, model->config.max_seq_len);
    if ((long long)options->seq_len * options->micro_batch > (1 << 30))
        return lq_error_set(err, LQ_EINVAL, "micro-batches of %d x %d tokens are too large",
                            options->micro_batch, options->seq_len);
    struct lq_trainer *t = calloc(1, sizeof *t);
    if (!t) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    t->backend = backend, t->model = model, t->options = *options;
    lq_rng_seed(&t->rng, options->seed);
    t->matrices =
        calloc((size_t)model->config.n_layers * LQ_LINEARS_PER_LAYER, sizeof *t->matrices);
    if (!t->matrices) rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    if (!rc)
        rc = train_net_create(backend, model, options->seq_len * options->micro_batch,
                              options->recompute, &t->net, err);
    if (!rc) rc = plan_matrices(t, NULL, err); /* the sizes first */
    float *host = NULL;
    if (!rc && !(host = malloc((t->count ? t->count : 1) * sizeof *host)))
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory for %zu LoRA parameters", t->count);
    if (!rc) rc = plan_matrices(t, host, err);
    float **arrays[] = {&t->params, &t->grads, &t->m, &t->v};
    for (size_t i = 0; i < 4 && !rc; i++) {
        rc = backend->ops->buffer_alloc(backend, (t->count ? t->count : 1) * sizeof(float),
                                        (void **)arrays[i], err);
        if (!rc && i > 0) rc = backend->ops->zero(backend, *arrays[i], t->count);
    }
    if (!rc) rc = backend->ops->copy_to_device(backend, t->params, host, t->count * sizeof(float));
    free(host);
    if (!rc) {
        attach_pairs(t);
        rc = train_net_prepare(t->net, err);
    }
    if (rc) {
        lq_trainer_free(t);
        return rc;
    }
    *out = t;
    return LQ_OK;
}

void lq_trainer_free(struct lq_trainer *t) {
    if (!t) return;
    train_net_free(t->net);
    float *arrays[] = {t->params, t->grads, t->m, t->v};
    for (size_t i = 0; i < 4; i++)
        if (arrays[i]) t->backend->ops->buffer_free(t->backend, arrays[i]);
    free(t->matrices);
    free(t);
}

const struct lq_train_options *lq_trainer_options(const struct lq_trainer *t) {
    return &t->options;
}

/* ---------- steps ---------- */

/* Checks the batch and counts its masked-in targets. */
static int check_batch(const struct lq_trainer *t, const struct lq_train_batch *batch, long *count,
                       struct lq_error *err) {
    const int vocab = t->model->config.vocab_size;
    if (!batch || batch->rows < 1 || batch->seq_len < 1 || !batch->inputs || !batch->targets)
        return lq_error_set(err, LQ_EINVAL,
                            "a batch needs >= 1 row of >= 1 token, inputs and "
                            "targets");
    if (batch->seq_len > t->options.seq_len)
        return lq_error_set(err, LQ_EINVAL, "rows of %d tokens: the trainer takes at most %d",
                            batch->seq_len, t->options.seq_len);
    size_t n = (size_t)batch->rows * batch->seq_len;
    *count = 0;
    for (size_t i = 0; i < n; i++) {
        int in_loss = !batch->mask || batch->mask[i];
        if (batch->inputs[i] < 0 || batch->inputs[i] >= vocab)
            return lq_error_set(err, LQ_EINVAL,
                                "input token %d at %zu is outside the vocabulary "
                                "(%d)",
                                batch->inputs[i], i, vocab);
        if (in_loss && (batch->targets[i] < 0 || batch->targets[i] >= vocab))
            return lq_error_set(err, LQ_EINVAL,
                                "target token %d at %zu is outside the "
                                "vocabulary (%d)",
                                batch->targets[i], i, vocab);
        *count += in_loss;
    }
    return LQ_OK;
}

/* Forward (and backward) over the batch in micro-batches. */
static int run_batch(struct lq_trainer *t, const struct lq_train_batch *batch, float grad_scale,
                     int backward, double *loss_sum, struct lq_error *err) {
    const int T = batch->seq_len, micro = t->options.micro_batch;
    for (int first = 0; first < batch->rows; first += micro) {
        int rows = batch->rows - first < micro ? batch->rows - first : micro;
        size_t offset = (size_t)first * T;
        int rc = train_net_forward(t->net, batch->inputs + offset, rows, T, err);
        if (!rc)
            rc = train_net_loss(t->net, batch->targets + offset,
                                batch->mask ? batch->mask + offset : NULL, grad_scale, backward,
                                loss_sum, err);
        if (rc) return rc;
    }
    return LQ_OK;
}

int lq_trainer_gradient(struct lq_trainer *t, const struct lq_train_batch *batch, double *loss,
                        long *tokens, struct lq_error *err) {
    long count;
    int rc = check_batch(t, batch, &count, err);
    if (rc) return rc;
    if (count == 0) return lq_error_set(err, LQ_EINVAL, "the batch has no target in the loss");
    rc = t->backend->ops->zero(t->backend, t->grads, t->count);
    double sum = 0.0;
    /* every micro-batch scales by the whole batch's count: the mean over all its targets */
    if (!rc) rc = run_batch(t, batch, (float)(1.0 / count), 1, &sum, err);
    if (rc) return rc;
    if (loss) *loss = sum / count;
    if (tokens) *tokens = count;
    return LQ_OK;
}

int lq_trainer_step(struct lq_trainer *t, const struct lq_train_batch *batch,
                    struct lq_train_stats *stats, struct lq_error *err) {
    double loss = 0.0, norm2 = 0.0;
    long tokens = 0;
    int rc = lq_trainer_gradient(t, batch, &loss, &tokens, err);
    if (rc) return rc;
    const struct lq_backend_ops *ops = t->backend->ops;
    if ((rc = ops->sum_squares(t->backend, t->grads, t->count, &norm2)))
        return lq_error_set(err, rc, "gradient norm failed on the %s backend", ops->name);
    double norm = sqrt(norm2);
    if (!isfinite(loss) || !isfinite(norm))
        return lq_error_set(err, LQ_ENUMERIC,
                            "step %ld: loss %g, gradient norm %g: not finite "
                            "(no update made)",
                            t->step + 1, loss, norm);
    /* as torch.nn.utils.clip_grad_norm_: scale by max_norm/(norm + 1e-6) when below 1 */
    double clip = 1.0;
    if (t->options.max_grad_norm > 0) {
        clip = t->options.max_grad_norm / (norm + 1e-6);
        if (clip > 1.0) clip = 1.0;
    }
    double lr = lq_train_learning_rate(&t->options, t->step);
    struct lq_adamw_params hyper = {(float)lr,
                                    (float)t->options.beta1,
                                    (float)t->options.beta2,
                                    (float)t->options.eps,
                                    (float)t->options.weight_decay,
                                    (float)clip,
                                    t->step + 1};
    if ((rc = ops->adamw(t->backend, t->params, t->grads, t->m, t->v, t->count, &hyper)))
        return lq_error_set(err, rc, "AdamW failed on the %s backend", ops->name);
    t->step++;
    if (stats) {
        stats->step = t->step, stats->loss = loss, stats->tokens = tokens;
        stats->grad_norm = norm, stats->clip_scale = clip, stats->learning_rate = lr;
    }
    return LQ_OK;
}

int lq_trainer_evaluate(struct lq_trainer *t, const struct lq_train_batch *batch, double *loss_sum,
                        long *tokens, struct lq_error *err) {
    long count;
    int rc = check_batch(t, batch, &count, err);
    if (!rc) rc = run_batch(t, batch, 0.0f, 0, loss_sum, err);
    if (!rc) *tokens += count;
    return rc;
}

/* ---------- values ---------- */

size_t lq_trainer_parameter_count(const struct lq_trainer *t) {
    return t->count;
}

int lq_trainer_matrix_info(const struct lq_trainer *t, int layer, enum lq_linear_kind kind,
                           struct lq_trainer_matrix *out) {
    if (layer < 0 || layer >= t->model->config.n_layers || (int)kind < 0 ||
        kind >= LQ_LINEARS_PER_LAYER)
        return LQ_EINVAL;
    *out = t->matrices[layer * LQ_LINEARS_PER_LAYER + kind];
    return LQ_OK;
}

int lq_trainer_get_lora(const struct lq_trainer *t, int layer, enum lq_linear_kind kind, float *L1,
                        float *L2, struct lq_error *err) {
    struct lq_trainer_matrix info;
    if (lq_trainer_matrix_info(t, layer, kind, &info))
        return lq_error_set(err, LQ_EINVAL, "no matrix %d of layer %d", (int)kind, layer);
    struct lq_backend *b = t->backend;
    int rc = 0;
    if (L1)
        rc = b->ops->copy_to_host(b, L1, t->params + info.L1_offset,
                                  (size_t)info.rows * info.rank * sizeof(float));
    if (!rc && L2)
        rc = b->ops->copy_to_host(b, L2, t->params + info.L2_offset,
                                  (size_t)info.rank * info.cols * sizeof(float));
    return rc ? lq_error_set(err, rc, "copying LoRA factors from the device failed") : LQ_OK;
}

int lq_trainer_get_parameters(const struct lq_trainer *t, float *host, struct lq_error *err) {
    int rc = t->backend->ops->copy_to_host(t->backend, host, t->params, t->count * sizeof(float));
    return rc ? lq_error_set(err, rc, "copying parameters from the device failed") : LQ_OK;
}

int lq_trainer_set_parameters(struct lq_trainer *t, const float *host, struct lq_error *err) {
    int rc = t->backend->ops->copy_to_device(t->backend, t->params, host, t->count * sizeof(float));
    return rc ? lq_error_set(err, rc, "copying parameters to the device failed") : LQ_OK;
}

int lq_trainer_get_gradients(const struct lq_trainer *t, float *host, struct lq_error *err) {
    int rc = t->backend->ops->copy_to_host(t->backend, host, t->grads, t->count * sizeof(float));
    return rc ? lq_error_set(err, rc, "copying gradients from the device failed") : LQ_OK;
}

long lq_trainer_step_count(const struct lq_trainer *t) {
    return t->step;
}

struct lq_rng *lq_trainer_rng(struct lq_trainer *t) {
    return &t->rng;
}
