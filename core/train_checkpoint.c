/* The trainer's values going out: checkpoints (safetensors, atomic) and back in, and the
 * trained pairs written into a model (core/train.h). */
#include <cblas.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/safetensors.h"
#include "core/train_internal.h"

#define CHECKPOINT_FORMAT "lqd-train-checkpoint-1"

/* The six tensors of a matrix: name suffix, which flat array, which factor. */
enum { ARRAY_PARAMS, ARRAY_M, ARRAY_V };
static const struct {
    const char *suffix;
    int array, is_L2;
} tensor_kinds[] = {
    {"lora_A", ARRAY_PARAMS, 1},       {"lora_B", ARRAY_PARAMS, 0},
    {"lora_A.exp_avg", ARRAY_M, 1},    {"lora_B.exp_avg", ARRAY_M, 0},
    {"lora_A.exp_avg_sq", ARRAY_V, 1}, {"lora_B.exp_avg_sq", ARRAY_V, 0},
};
#define TENSOR_KINDS (sizeof tensor_kinds / sizeof tensor_kinds[0])

/* "model.layers.3.mlp.up_proj.lora_A.exp_avg" and the factor's place and shape. */
static void tensor_layout(const struct lq_trainer *t, int index, size_t kind, char *name,
                          size_t size, size_t *offset, int64_t shape[2]) {
    const struct lq_trainer_matrix *info = &t->matrices[index];
    char base[160];
    lq_model_linear_name(index / LQ_LINEARS_PER_LAYER,
                         (enum lq_linear_kind)(index % LQ_LINEARS_PER_LAYER), base, sizeof base);
    base[strlen(base) - strlen(".weight")] = '\0';
    snprintf(name, size, "%s.%s", base, tensor_kinds[kind].suffix);
    if (tensor_kinds[kind].is_L2) {
        *offset = info->L2_offset, shape[0] = info->rank, shape[1] = info->cols;
    } else {
        *offset = info->L1_offset, shape[0] = info->rows, shape[1] = info->rank;
    }
}

/* params, m and v copied to one host allocation of 3 · count floats. */
static int state_to_host(const struct lq_trainer *t, float **out, struct lq_error *err) {
    float *host = malloc((3 * t->count + 1) * sizeof *host);
    if (!host) return lq_error_set(err, LQ_ENOMEM, "out of memory for the trainer's state");
    const float *device[] = {t->params, t->m, t->v};
    for (int i = 0; i < 3; i++) {
        int rc = t->backend->ops->copy_to_host(t->backend, host + i * t->count, device[i],
                                               t->count * sizeof(float));
        if (rc) {
            free(host);
            return lq_error_set(err, rc, "copying the trainer's state from the device failed");
        }
    }
    *out = host;
    return LQ_OK;
}

static void rng_format(const struct lq_rng *rng, char *buffer, size_t size) {
    uint64_t spare;
    memcpy(&spare, &rng->spare, sizeof spare);
    snprintf(buffer, size,
             "%016" PRIx64 ",%016" PRIx64 ",%016" PRIx64 ",%016" PRIx64 ",%d,%016" PRIx64,
             rng->state[0], rng->state[1], rng->state[2], rng->state[3], rng->has_spare, spare);
}

static int rng_parse(const char *text, struct lq_rng *rng) {
    uint64_t s[4], spare;
    int has_spare, used = 0;
    if (sscanf(text, "%" SCNx64 ",%" SCNx64 ",%" SCNx64 ",%" SCNx64 ",%d,%" SCNx64 "%n", &s[0],
               &s[1], &s[2], &s[3], &has_spare, &spare, &used) != 6 ||
        text[used] != '\0')
        return -1;
    memcpy(rng->state, s, sizeof s);
    rng->has_spare = has_spare != 0;
    memcpy(&rng->spare, &spare, sizeof spare);
    return 0;
}

int lq_trainer_save(const struct lq_trainer *t, const char *path, struct lq_error *err) {
    float *host = NULL;
    int rc = state_to_host(t, &host, err);
    if (rc) return rc;
    struct lq_safetensors_writer *w = NULL;
    rc = lq_safetensors_writer_create(&w, err);
    const int matrices = t->model->config.n_layers * LQ_LINEARS_PER_LAYER;
    for (int i = 0; i < matrices && !rc; i++)
        for (size_t kind = 0; kind < TENSOR_KINDS && !rc; kind++) {
            char name[256];
            size_t offset;
            int64_t shape[2];
            tensor_layout(t, i, kind, name, sizeof name, &offset, shape);
            const float *array = host + (size_t)tensor_kinds[kind].array * t->count;
            rc = lq_safetensors_writer_add(w, name, LQ_DTYPE_F32, 2, shape, array + offset, err);
        }
    const struct lq_train_options *o = &t->options;
    char rng[160], text[64];
    rng_format(&t->rng, rng, sizeof rng);
    struct {
        const char *key, *format;
        double value;
    } numbers[] = {
        {"lqd.step", "%.0f", (double)t->step},
        {"lqd.rank", "%.0f", o->init == LQ_LORA_INIT_ZERO ? (double)o->rank : 0.0},
        {"lqd.learning_rate", "%.17g", o->learning_rate},
        {"lqd.warmup_steps", "%.0f", (double)o->warmup_steps},
        {"lqd.total_steps", "%.0f", (double)o->total_steps},
        {"lqd.min_lr_ratio", "%.17g", o->min_lr_ratio},
        {"lqd.beta1", "%.17g", o->beta1},
        {"lqd.beta2", "%.17g", o->beta2},
        {"lqd.eps", "%.17g", o->eps},
        {"lqd.weight_decay", "%.17g", o->weight_decay},
        {"lqd.max_grad_norm", "%.17g", o->max_grad_norm},
    };
    if (!rc) rc = lq_safetensors_writer_set_metadata(w, "lqd.format", CHECKPOINT_FORMAT, err);
    if (!rc)
        rc = lq_safetensors_writer_set_metadata(w, "lqd.init", lq_lora_init_name(o->init), err);
    if (!rc) rc = lq_safetensors_writer_set_metadata(w, "lqd.rng", rng, err);
    if (!rc)
        rc = lq_safetensors_writer_set_metadata(w, "lqd.schedule", lq_lr_schedule_name(o->schedule),
                                                err);
    for (size_t i = 0; i < sizeof numbers / sizeof numbers[0] && !rc; i++) {
        snprintf(text, sizeof text, numbers[i].format, numbers[i].value);
        rc = lq_safetensors_writer_set_metadata(w, numbers[i].key, text, err);
    }
    if (!rc && t->model->path)
        rc = lq_safetensors_writer_set_metadata(w, "lqd.model", t->model->path, err);
    if (!rc) rc = lq_safetensors_writer_write(w, path, err);
    lq_safetensors_writer_free(w);
    free(host);
    return rc;
}

int lq_trainer_load(struct lq_trainer *t, const char *path, struct lq_error *err) {
    struct lq_safetensors *file = NULL;
    int rc = lq_safetensors_open(path, &file, err);
    if (rc) return rc;
    const char *format = lq_safetensors_metadata(file, "lqd.format");
    const char *init = lq_safetensors_metadata(file, "lqd.init");
    const char *step = lq_safetensors_metadata(file, "lqd.step");
    const char *rng_text = lq_safetensors_metadata(file, "lqd.rng");
    struct lq_rng rng;
    char *end = NULL;
    long steps = step ? strtol(step, &end, 10) : -1;
    if (!format || strcmp(format, CHECKPOINT_FORMAT))
        rc = lq_error_set(err, LQ_EFORMAT, "%s: not an lqd training checkpoint (lqd.format %s)",
                          path, format ? format : "missing");
    else if (!init || strcmp(init, lq_lora_init_name(t->options.init)))
        rc = lq_error_set(err, LQ_EFORMAT, "%s: saved with LoRA init '%s', this trainer uses '%s'",
                          path, init ? init : "?", lq_lora_init_name(t->options.init));
    else if (steps < 0 || !end || *end)
        rc = lq_error_set(err, LQ_EFORMAT, "%s: bad lqd.step '%s'", path, step ? step : "");
    else if (!rng_text || rng_parse(rng_text, &rng))
        rc = lq_error_set(err, LQ_EFORMAT, "%s: bad lqd.rng", path);
    float *host = NULL;
    if (!rc && !(host = malloc((3 * t->count + 1) * sizeof *host)))
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory for the trainer's state");
    const int matrices = t->model->config.n_layers * LQ_LINEARS_PER_LAYER;
    for (int i = 0; i < matrices && !rc; i++)
        for (size_t kind = 0; kind < TENSOR_KINDS && !rc; kind++) {
            char name[256];
            size_t offset;
            int64_t shape[2];
            tensor_layout(t, i, kind, name, sizeof name, &offset, shape);
            const struct lq_safetensors_tensor *tensor = lq_safetensors_find(file, name);
            if (!tensor)
                rc = lq_error_set(err, LQ_EFORMAT, "%s: missing tensor '%s'", path, name);
            else if (tensor->dtype != LQ_DTYPE_F32 || tensor->ndim != 2 ||
                     tensor->shape[0] != shape[0] || tensor->shape[1] != shape[1])
                rc = lq_error_set(err, LQ_EFORMAT,
                                  "%s: tensor '%s' is %s [%" PRId64 " x %" PRId64
                                  "], this trainer needs F32 [%" PRId64 " x %" PRId64 "]",
                                  path, name, lq_dtype_name(tensor->dtype), tensor->shape[0],
                                  tensor->ndim > 1 ? tensor->shape[1] : 0, shape[0], shape[1]);
            else
                memcpy(host + (size_t)tensor_kinds[kind].array * t->count + offset,
                       lq_safetensors_data(file, tensor), tensor->nbytes);
        }
    /* nothing changes until everything was read and checked */
    float *device[] = {t->params, t->m, t->v};
    for (int i = 0; i < 3 && !rc; i++)
        if (t->backend->ops->copy_to_device(t->backend, device[i], host + i * t->count,
                                            t->count * sizeof(float)))
            rc = lq_error_set(err, LQ_EIO, "copying the checkpoint to the device failed");
    if (!rc) t->step = steps, t->rng = rng;
    free(host);
    lq_safetensors_close(file);
    return rc;
}

/* ---------- into a model ---------- */

/* One matrix's new factors (LQ_LORA_INIT_ZERO on an LQ matrix), built before any is set. */
struct merged_pair {
    float *lora_A, *lora_B;
    int rank;
};

static int merge_pair(const struct lq_linear *w, const float *L1, const float *L2, int r,
                      struct merged_pair *out) {
    const int r0 = w->rank, rank = r0 + r;
    out->rank = rank;
    out->lora_B = malloc((size_t)w->rows * rank * sizeof(float));
    out->lora_A = malloc((size_t)rank * w->cols * sizeof(float));
    if (!out->lora_B || !out->lora_A) return LQ_ENOMEM;
    /* B' = [B | L1] row by row; A' = [A ; L2]: B'·A' = B·A + L1·L2 */
    for (int i = 0; i < w->rows; i++) {
        float *row = out->lora_B + (size_t)i * rank;
        if (r0) memcpy(row, w->lora_B + (size_t)i * r0, (size_t)r0 * sizeof(float));
        memcpy(row + r0, L1 + (size_t)i * r, (size_t)r * sizeof(float));
    }
    if (r0) memcpy(out->lora_A, w->lora_A, (size_t)r0 * w->cols * sizeof(float));
    memcpy(out->lora_A + (size_t)r0 * w->cols, L2, (size_t)r * w->cols * sizeof(float));
    return LQ_OK;
}

static int matrix_problem(struct lq_error *err, int index, const char *problem) {
    char name[128];
    lq_model_linear_name(index / LQ_LINEARS_PER_LAYER,
                         (enum lq_linear_kind)(index % LQ_LINEARS_PER_LAYER), name, sizeof name);
    return lq_error_set(err, LQ_EINVAL, "target %s %s", name, problem);
}

int lq_trainer_apply_to_model(const struct lq_trainer *t, struct lq_model *target,
                              struct lq_error *err) {
    if (target == t->model)
        return lq_error_set(err, LQ_EINVAL,
                            "the trainer reads its own model: apply the trained "
                            "values to another copy");
    const struct lq_model_config *c = &t->model->config;
    if (target->config.n_layers != c->n_layers)
        return lq_error_set(err, LQ_EINVAL, "the target has %d layers, the trainer's model %d",
                            target->config.n_layers, c->n_layers);
    const int matrices = c->n_layers * LQ_LINEARS_PER_LAYER;
    const int zero_init = t->options.init == LQ_LORA_INIT_ZERO;
    for (int i = 0; i < matrices; i++) {
        const struct lq_linear *w =
            &target->layers[i / LQ_LINEARS_PER_LAYER].linear[i % LQ_LINEARS_PER_LAYER];
        const struct lq_trainer_matrix *info = &t->matrices[i];
        const char *problem = NULL;
        if (w->rows != info->rows || w->cols != info->cols)
            problem = "has another shape";
        else if (!zero_init && (!w->is_lq || w->rank != info->rank))
            problem = "is not an LQ matrix of the trained rank";
        else if (!w->is_lq && !w->dense)
            problem = "has no weights";
        if (problem) return matrix_problem(err, i, problem);
    }
    float *host = NULL;
    int rc = state_to_host(t, &host, err);
    if (rc) return rc;
    struct merged_pair *merged = calloc((size_t)matrices, sizeof *merged);
    if (!merged) rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    /* first every allocation, so that a failure leaves the target as it was */
    for (int i = 0; i < matrices && !rc && zero_init; i++) {
        const struct lq_linear *w =
            &target->layers[i / LQ_LINEARS_PER_LAYER].linear[i % LQ_LINEARS_PER_LAYER];
        const struct lq_trainer_matrix *info = &t->matrices[i];
        if (w->is_lq &&
            merge_pair(w, host + info->L1_offset, host + info->L2_offset, info->rank, &merged[i]))
            rc = lq_error_set(err, LQ_ENOMEM, "out of memory for the merged LoRA factors");
    }
    for (int i = 0; i < matrices && !rc; i++) {
        struct lq_linear *w =
            &target->layers[i / LQ_LINEARS_PER_LAYER].linear[i % LQ_LINEARS_PER_LAYER];
        const struct lq_trainer_matrix *info = &t->matrices[i];
        const float *L1 = host + info->L1_offset, *L2 = host + info->L2_offset;
        if (!zero_init) {
            memcpy(w->lora_B, L1, (size_t)info->rows * info->rank * sizeof(float));
            memcpy(w->lora_A, L2, (size_t)info->rank * info->cols * sizeof(float));
        } else if (!w->is_lq) { /* W ← W + L1·L2 */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, w->rows, w->cols, info->rank,
                        1.0f, L1, info->rank, L2, w->cols, 1.0f, w->dense, w->cols);
        } else {
            free(w->lora_A), free(w->lora_B);
            w->lora_A = merged[i].lora_A, w->lora_B = merged[i].lora_B, w->rank = merged[i].rank;
            merged[i].lora_A = merged[i].lora_B = NULL;
        }
    }
    for (int i = 0; merged && i < matrices; i++) free(merged[i].lora_A), free(merged[i].lora_B);
    free(merged);
    free(host);
    return rc;
}
