/* Finetuning from a dataset file to an adapter (core/finetune.h): data, order, the step loop
 * with validation and checkpoints, and the adapter of the result. */
#include "core/finetune.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/file_util.h"
#include "core/gguf.h"
#include "core/rng.h"

#define RUN_FORMAT "lqd-finetune-run-1"

void lq_finetune_options_default(struct lq_finetune_options *o) {
    memset(o, 0, sizeof *o);
    lq_train_options_default(&o->train);
    o->format = LQ_DATASET_AUTO;
    o->chat_style = NULL;
    o->batch_size = 8;
    o->epochs = 1.0;
}

static double monotonic_seconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* ---------- data ---------- */

struct rows {
    int count, seq_len;
    int *inputs, *targets;
    unsigned char *mask;
    size_t targets_in_loss;
};

static void rows_free(struct rows *r) {
    free(r->inputs);
    free(r->targets);
    free(r->mask);
    memset(r, 0, sizeof *r);
}

/* Packs a dataset's documents (BOS/EOS already in them: no separators added) and keeps only
 * the rows with at least one loss target (a row of prompt alone teaches nothing, and a step
 * of such rows has no loss to take the mean of). */
static int pack_dataset(const struct lq_dataset *dataset, int seq_len, int pad_id, struct rows *out,
                        struct lq_error *err) {
    memset(out, 0, sizeof *out);
    struct lq_train_document *documents = calloc(dataset->n_documents + 1, sizeof *documents);
    if (!documents) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    for (size_t i = 0; i < dataset->n_documents; i++) {
        documents[i].tokens = dataset->documents[i].tokens;
        documents[i].mask = dataset->documents[i].mask;
        documents[i].length = dataset->documents[i].n_tokens;
    }
    struct lq_train_pack_options pack = {seq_len, -1, -1, pad_id};
    struct lq_train_packed packed;
    int rc = lq_train_pack(documents, dataset->n_documents, &pack, &packed, err);
    free(documents);
    if (rc) return rc;
    /* Compact in place: packed's arrays become ours. */
    int kept = 0;
    for (int r = 0; r < packed.rows; r++) {
        const unsigned char *mask = packed.mask + (size_t)r * seq_len;
        size_t n = 0;
        for (int i = 0; i < seq_len; i++) n += mask[i] != 0;
        if (!n) continue;
        if (kept != r) {
            size_t to = (size_t)kept * seq_len, from = (size_t)r * seq_len;
            memmove(packed.inputs + to, packed.inputs + from, seq_len * sizeof(int));
            memmove(packed.targets + to, packed.targets + from, seq_len * sizeof(int));
            memmove(packed.mask + to, packed.mask + from, (size_t)seq_len);
        }
        out->targets_in_loss += n;
        kept++;
    }
    out->count = kept, out->seq_len = seq_len;
    out->inputs = packed.inputs, out->targets = packed.targets, out->mask = packed.mask;
    return LQ_OK;
}

/* FNV-1a over the rows: the data part of a run's description. */
static uint64_t rows_hash(const struct rows *r, uint64_t h) {
    size_t n = (size_t)r->count * (size_t)r->seq_len;
    const unsigned char *parts[3] = {(const unsigned char *)r->inputs,
                                     (const unsigned char *)r->targets, r->mask};
    size_t sizes[3] = {n * sizeof(int), n * sizeof(int), n};
    for (int p = 0; p < 3; p++)
        for (size_t i = 0; i < sizes[p]; i++) h = (h ^ parts[p][i]) * 0x100000001b3ull;
    return h;
}

/* The permutation of epoch e's rows: Fisher-Yates from a generator seeded by (seed, e). */
struct order {
    uint64_t seed;
    int rows;
    long epoch; /* of perm; -1: none yet */
    int *perm;
};

static int order_row(struct order *o, long global) {
    long epoch = global / o->rows;
    if (epoch != o->epoch) {
        struct lq_rng rng;
        lq_rng_seed(&rng, o->seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(epoch + 1)));
        for (int i = 0; i < o->rows; i++) o->perm[i] = i;
        for (int i = o->rows - 1; i > 0; i--) {
            int j = (int)(lq_rng_next(&rng) % (uint64_t)(i + 1));
            int t = o->perm[i];
            o->perm[i] = o->perm[j], o->perm[j] = t;
        }
        o->epoch = epoch;
    }
    return o->perm[global % o->rows];
}

/* ---------- the run's description, beside its checkpoint ---------- */

static cJSON *run_description(const struct lq_finetune_options *o, const struct rows *train,
                              const struct rows *validation) {
    const struct lq_train_options *t = &o->train;
    cJSON *d = cJSON_CreateObject();
    char text[32];
    snprintf(text, sizeof text, "%016llx",
             (unsigned long long)rows_hash(validation, rows_hash(train, 0xcbf29ce484222325ull)));
    cJSON_AddStringToObject(d, "data", text);
    cJSON_AddNumberToObject(d, "train_rows", train->count);
    cJSON_AddNumberToObject(d, "validation_rows", validation->count);
    cJSON_AddNumberToObject(d, "batch_size", o->batch_size);
    cJSON_AddNumberToObject(d, "micro_batch", t->micro_batch);
    cJSON_AddNumberToObject(d, "seq_len", t->seq_len);
    snprintf(text, sizeof text, "%llu", (unsigned long long)t->seed);
    cJSON_AddStringToObject(d, "seed", text);
    cJSON_AddStringToObject(d, "init", lq_lora_init_name(t->init));
    cJSON_AddNumberToObject(d, "rank", t->init == LQ_LORA_INIT_ZERO ? t->rank : 0);
    cJSON_AddNumberToObject(d, "total_steps", t->total_steps);
    cJSON_AddNumberToObject(d, "warmup_steps", t->warmup_steps);
    cJSON_AddStringToObject(d, "schedule", lq_lr_schedule_name(t->schedule));
    cJSON_AddNumberToObject(d, "learning_rate", t->learning_rate);
    cJSON_AddNumberToObject(d, "min_lr_ratio", t->min_lr_ratio);
    cJSON_AddNumberToObject(d, "weight_decay", t->weight_decay);
    cJSON_AddNumberToObject(d, "max_grad_norm", t->max_grad_norm);
    cJSON_AddNumberToObject(d, "beta1", t->beta1);
    cJSON_AddNumberToObject(d, "beta2", t->beta2);
    cJSON_AddNumberToObject(d, "eps", t->eps);
    cJSON_AddNumberToObject(d, "recompute", t->recompute);
    return d;
}

static int write_description(const char *checkpoint, const cJSON *description,
                             struct lq_error *err) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "format", RUN_FORMAT);
    cJSON_AddItemToObject(root, "run", cJSON_Duplicate(description, 1));
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    char path[4096 + 8];
    snprintf(path, sizeof path, "%s.json", checkpoint);
    int rc = lq_file_write_atomic(path, text, strlen(text), err);
    cJSON_free(text);
    return rc;
}

/* 0 when checkpoint's description equals this run's; else LQ_EINVAL naming what differs. */
static int check_description(const char *checkpoint, const cJSON *description,
                             struct lq_error *err) {
    char path[4096 + 8];
    snprintf(path, sizeof path, "%s.json", checkpoint);
    char *text;
    size_t length;
    if (lq_file_read_all(path, 1u << 20, &text, &length, NULL))
        return lq_error_set(err, LQ_EINVAL,
                            "checkpoint %s exists but %s (the description of its run) does not: "
                            "remove the checkpoint to start over",
                            checkpoint, path);
    cJSON *root = lq_json_parse(text, length);
    free(text);
    const cJSON *saved = cJSON_GetObjectItemCaseSensitive(root, "run");
    int rc = LQ_OK;
    if (!cJSON_IsObject(saved)) {
        rc = lq_error_set(err, LQ_EFORMAT, "%s: not a finetuning run description", path);
    } else {
        const cJSON *item;
        cJSON_ArrayForEach(item, description) {
            const cJSON *other = cJSON_GetObjectItemCaseSensitive(saved, item->string);
            if (other && cJSON_Compare(item, other, 1)) continue;
            char *mine = cJSON_PrintUnformatted(item);
            char *theirs = other ? cJSON_PrintUnformatted(other) : NULL;
            rc = lq_error_set(err, LQ_EINVAL,
                              "checkpoint %s belongs to another run: its %s is %s, this run's %s "
                              "(use the same data and settings to resume, or remove it to start "
                              "over)",
                              checkpoint, item->string, theirs ? theirs : "absent",
                              mine ? mine : "?");
            cJSON_free(mine);
            cJSON_free(theirs);
            break;
        }
    }
    cJSON_Delete(root);
    return rc;
}

/* ---------- the adapter ---------- */

int lq_finetune_adapter(const struct lq_trainer *trainer, const struct lq_model *model,
                        struct lq_adapter **out, struct lq_error *err) {
    *out = NULL;
    const struct lq_train_options *o = lq_trainer_options(trainer);
    enum lq_adapter_mode mode = o->init == LQ_LORA_INIT_LQ ? LQ_ADAPTER_REPLACE : LQ_ADAPTER_ADD;
    struct lq_adapter *adapter;
    int rc = lq_adapter_create(model->config.n_layers, mode, &adapter, err);
    if (rc) return rc;
    snprintf(adapter->init, sizeof adapter->init, "%s", lq_lora_init_name(o->init));
    if (model->path) snprintf(adapter->base_model, sizeof adapter->base_model, "%s", model->path);
    for (int l = 0; l < model->config.n_layers && !rc; l++) {
        for (int k = 0; k < LQ_LINEARS_PER_LAYER && !rc; k++) {
            struct lq_trainer_matrix info;
            if (lq_trainer_matrix_info(trainer, l, (enum lq_linear_kind)k, &info)) {
                rc = lq_error_set(err, LQ_EINVAL, "the trainer has no matrix %d of layer %d", k, l);
                break;
            }
            if (info.rank == 0) continue;
            struct lq_adapter_matrix *m = lq_adapter_matrix(adapter, l, (enum lq_linear_kind)k);
            m->L1 = malloc(sizeof(float) * (size_t)info.rows * (size_t)info.rank);
            m->L2 = malloc(sizeof(float) * (size_t)info.rank * (size_t)info.cols);
            if (!m->L1 || !m->L2) {
                rc = lq_error_set(err, LQ_ENOMEM, "out of memory for the adapter");
                break;
            }
            m->rank = info.rank, m->rows = info.rows, m->cols = info.cols;
            rc = lq_trainer_get_lora(trainer, l, (enum lq_linear_kind)k, m->L1, m->L2, err);
        }
    }
    if (rc) {
        lq_adapter_free(adapter);
        return rc;
    }
    *out = adapter;
    return LQ_OK;
}

/* ---------- the run ---------- */

struct run {
    struct lq_trainer *trainer;
    const struct lq_finetune_options *o;
    struct rows train, validation;
    struct order order;
    int *batch_inputs, *batch_targets;
    unsigned char *batch_mask;
    struct lq_finetune_event base; /* counts every event carries */
};

static int evaluate(struct run *run, double *loss, struct lq_error *err) {
    *loss = NAN;
    int rows = run->validation.count;
    if (run->o->max_eval_rows > 0 && rows > run->o->max_eval_rows) rows = run->o->max_eval_rows;
    if (rows == 0) return LQ_OK;
    double sum = 0.0;
    long tokens = 0;
    const int T = run->validation.seq_len, chunk = run->o->train.micro_batch;
    for (int first = 0; first < rows; first += chunk) {
        int n = rows - first < chunk ? rows - first : chunk;
        size_t offset = (size_t)first * T;
        struct lq_train_batch batch = {n, T, run->validation.inputs + offset,
                                       run->validation.targets + offset,
                                       run->validation.mask + offset};
        int rc = lq_trainer_evaluate(run->trainer, &batch, &sum, &tokens, err);
        if (rc) return lq_error_prefix(err, "validation");
    }
    if (tokens) *loss = sum / (double)tokens;
    return LQ_OK;
}

static struct lq_train_batch gather(struct run *run, long step) {
    const int B = run->o->batch_size, T = run->train.seq_len;
    for (int j = 0; j < B; j++) {
        int row = order_row(&run->order, step * B + j);
        size_t to = (size_t)j * T, from = (size_t)row * T;
        memcpy(run->batch_inputs + to, run->train.inputs + from, T * sizeof(int));
        memcpy(run->batch_targets + to, run->train.targets + from, T * sizeof(int));
        memcpy(run->batch_mask + to, run->train.mask + from, (size_t)T);
    }
    struct lq_train_batch batch = {B, T, run->batch_inputs, run->batch_targets, run->batch_mask};
    return batch;
}

static int emit(struct run *run, struct lq_finetune_event *event) {
    return run->o->on_event ? run->o->on_event(run->o->context, event) : 0;
}

static int validate_options(const struct lq_finetune_options *o, struct lq_error *err) {
    if (!o->train_path) return lq_error_set(err, LQ_EINVAL, "no training file given");
    if (o->batch_size < 1)
        return lq_error_set(err, LQ_EINVAL, "batch size %d must be >= 1", o->batch_size);
    if (o->steps < 0) return lq_error_set(err, LQ_EINVAL, "steps %ld must be >= 1", o->steps);
    if (o->steps == 0 && !(o->epochs > 0 && o->epochs <= 1e6))
        return lq_error_set(err, LQ_EINVAL, "epochs %g must lie in (0, 1e6]", o->epochs);
    if (o->eval_every < 0 || o->checkpoint_every < 0 || o->max_eval_rows < 0 ||
        !(o->checkpoint_seconds >= 0))
        return lq_error_set(err, LQ_EINVAL,
                            "eval_every, checkpoint_every and max_eval_rows "
                            "must be >= 0");
    if (!(o->validation_fraction >= 0 && o->validation_fraction < 1))
        return lq_error_set(err, LQ_EINVAL, "validation fraction %g must lie in [0, 1)",
                            o->validation_fraction);
    if (o->validation_path && o->validation_fraction > 0)
        return lq_error_set(err, LQ_EINVAL,
                            "a validation file and a validation fraction exclude each other");
    return lq_train_options_validate(&o->train, err);
}

static int load_data(struct run *run, const struct lq_tokenizer *tokenizer, int pad_id,
                     struct lq_error *err) {
    const struct lq_finetune_options *o = run->o;
    struct lq_dataset_options d;
    lq_dataset_options_default(&d);
    d.format = o->format;
    d.label = o->train_label;
    d.chat_style = o->chat_style;
    d.validation_fraction = o->validation_fraction;
    d.seed = o->train.seed;
    d.validation_path = o->validation_path;
    d.validation_label = o->validation_label;
    struct lq_dataset *train = NULL, *validation = NULL;
    int rc = lq_dataset_load(o->train_path, tokenizer, &d, &train, &validation, err);
    if (rc) return rc;
    const char *label = o->train_label ? o->train_label : o->train_path;
    rc = pack_dataset(train, o->train.seq_len, pad_id, &run->train, err);
    if (!rc && validation)
        rc = pack_dataset(validation, o->train.seq_len, pad_id, &run->validation, err);
    if (!rc && run->train.count == 0)
        rc = lq_error_set(err, LQ_EFORMAT, "%s: no token to train on", label);
    run->base.train_documents = train->n_documents;
    run->base.validation_documents = validation ? validation->n_documents : 0;
    run->base.train_rows = (size_t)run->train.count;
    run->base.validation_rows = (size_t)run->validation.count;
    run->base.train_targets = run->train.targets_in_loss;
    lq_dataset_free(train);
    lq_dataset_free(validation);
    return rc;
}

int lq_finetune_run(struct lq_backend *backend, struct lq_model *model,
                    const struct lq_tokenizer *tokenizer, const struct lq_finetune_options *options,
                    struct lq_adapter **adapter, struct lq_finetune_result *result,
                    struct lq_error *err) {
    struct lq_finetune_result ignored;
    if (!result) result = &ignored;
    memset(result, 0, sizeof *result);
    result->train_loss = result->val_loss = result->initial_val_loss = NAN;
    *adapter = NULL;
    int rc = validate_options(options, err);
    if (rc) return rc;
    double started = monotonic_seconds();
    struct lq_finetune_options o = *options;
    struct run run;
    memset(&run, 0, sizeof run);
    run.o = &o;
    int pad_id = lq_tokenizer_eos_id(tokenizer) >= 0 ? lq_tokenizer_eos_id(tokenizer) : 0;
    cJSON *description = NULL;
    if ((rc = load_data(&run, tokenizer, pad_id, err))) goto done;

    long steps = o.steps;
    if (steps == 0) {
        double total = ceil(o.epochs * (double)run.train.count / (double)o.batch_size);
        steps = total < 1 ? 1 : total > 1e9 ? 1000000000L : (long)total;
    }
    o.train.total_steps = steps > 2147483647L ? 2147483647 : (int)steps;
    if ((rc = lq_trainer_create(backend, model, &o.train, &run.trainer, err))) goto done;
    run.order.seed = o.train.seed, run.order.rows = run.train.count, run.order.epoch = -1;
    size_t cells = (size_t)o.batch_size * (size_t)o.train.seq_len;
    run.order.perm = malloc(sizeof(int) * (size_t)run.train.count);
    run.batch_inputs = malloc(cells * sizeof(int));
    run.batch_targets = malloc(cells * sizeof(int));
    run.batch_mask = malloc(cells);
    if (!run.order.perm || !run.batch_inputs || !run.batch_targets || !run.batch_mask) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory for batches of %d x %d", o.batch_size,
                          o.train.seq_len);
        goto done;
    }

    /* Resume, or describe the run beside the checkpoint it is about to write. */
    long resumed_from = 0;
    if (o.checkpoint_path) {
        description = run_description(&o, &run.train, &run.validation);
        if (lq_path_is_file(o.checkpoint_path)) {
            if ((rc = check_description(o.checkpoint_path, description, err)) ||
                (rc = lq_trainer_load(run.trainer, o.checkpoint_path, err)))
                goto done;
            resumed_from = lq_trainer_step_count(run.trainer);
            if (resumed_from > steps) {
                rc =
                    lq_error_set(err, LQ_EINVAL, "checkpoint %s is at step %ld, past the %ld asked",
                                 o.checkpoint_path, resumed_from, steps);
                goto done;
            }
        } else if ((rc = write_description(o.checkpoint_path, description, err))) {
            goto done;
        }
    }
    result->resumed_from = resumed_from;
    result->total_steps = steps;
    run.base.total_steps = steps;
    run.base.resumed_from = resumed_from;
    run.base.train_loss = run.base.val_loss = NAN;
    run.base.eta_seconds = -1;

    struct lq_finetune_event event = run.base;
    event.type = LQ_FINETUNE_START;
    event.step = resumed_from;
    event.epoch = (double)resumed_from * o.batch_size / run.train.count;
    if (resumed_from == 0 && run.validation.count) {
        if ((rc = evaluate(&run, &event.val_loss, err))) goto done;
        result->initial_val_loss = event.val_loss;
    }
    int stop = emit(&run, &event);

    double train_started = monotonic_seconds(), trained_seconds = 0.0, last_save = train_started;
    long tokens_trained = 0, steps_here = 0;
    long step = resumed_from;
    while (!stop && step < steps) {
        struct lq_train_batch batch = gather(&run, step);
        struct lq_train_stats stats;
        double t0 = monotonic_seconds();
        if ((rc = lq_trainer_step(run.trainer, &batch, &stats, err))) {
            lq_error_prefix(err, "step %ld", step + 1);
            goto done;
        }
        trained_seconds += monotonic_seconds() - t0;
        step = stats.step;
        steps_here++;
        tokens_trained += stats.tokens;
        result->train_loss = stats.loss;
        event = run.base;
        event.type = LQ_FINETUNE_STEP;
        event.step = step;
        event.epoch = (double)step * o.batch_size / run.train.count;
        event.train_loss = stats.loss;
        event.val_loss = NAN;
        event.learning_rate = stats.learning_rate;
        event.grad_norm = stats.grad_norm;
        event.tokens = stats.tokens;
        event.tokens_per_second = trained_seconds > 0 ? tokens_trained / trained_seconds : 0;
        double elapsed = monotonic_seconds() - train_started;
        event.eta_seconds = (double)(steps - step) * elapsed / (double)steps_here;
        if (run.validation.count &&
            (step == steps || (o.eval_every > 0 && step % o.eval_every == 0))) {
            if ((rc = evaluate(&run, &event.val_loss, err))) goto done;
            result->val_loss = event.val_loss;
        }
        stop = emit(&run, &event);
        int save =
            o.checkpoint_path &&
            (stop || step == steps || (o.checkpoint_every > 0 && step % o.checkpoint_every == 0) ||
             (o.checkpoint_seconds > 0 && monotonic_seconds() - last_save >= o.checkpoint_seconds));
        if (save) {
            last_save = monotonic_seconds();
            if ((rc = lq_trainer_save(run.trainer, o.checkpoint_path, err))) goto done;
            event = run.base;
            event.type = LQ_FINETUNE_CHECKPOINT;
            event.step = step;
            event.epoch = (double)step * o.batch_size / run.train.count;
            event.train_loss = event.val_loss = NAN;
            event.path = o.checkpoint_path;
            stop |= emit(&run, &event);
        }
    }
    result->steps = step;
    if (step >= steps && run.validation.count && isnan(result->val_loss) &&
        (rc = evaluate(&run, &result->val_loss, err)))
        goto done;
    if (stop && step < steps) {
        result->interrupted = 1;
        rc = lq_error_set(err, LQ_EINVAL, "stopped at step %ld of %ld%s%s", step, steps,
                          o.checkpoint_path ? "; checkpoint saved: " : "",
                          o.checkpoint_path ? o.checkpoint_path : "");
        goto done;
    }
    rc = lq_finetune_adapter(run.trainer, model, adapter, err);
done:
    result->train_documents = run.base.train_documents;
    result->validation_documents = run.base.validation_documents;
    result->train_rows = run.base.train_rows;
    result->validation_rows = run.base.validation_rows;
    result->seconds = monotonic_seconds() - started;
    cJSON_Delete(description);
    lq_trainer_free(run.trainer);
    rows_free(&run.train);
    rows_free(&run.validation);
    free(run.order.perm);
    free(run.batch_inputs);
    free(run.batch_targets);
    free(run.batch_mask);
    return rc;
}

/* ---------- the model's chat style ---------- */

/* A GGUF model file's tokenizer.chat_template, as the daemon serves it (server/registry.c). */
static int gguf_chat_style(const char *file, struct lq_chat_style *out, struct lq_error *err) {
    char magic[4] = {0};
    FILE *f = fopen(file, "rb");
    if (!f) return LQ_OK;
    size_t got = fread(magic, 1, sizeof magic, f);
    fclose(f);
    if (got != sizeof magic || memcmp(magic, "GGUF", 4) != 0) return LQ_OK;
    struct lq_gguf *gguf = NULL;
    int rc = lq_gguf_open(file, &gguf, err);
    if (rc) return rc;
    const char *text = NULL;
    struct lq_error ignored = {0};
    if (lq_gguf_get_string(gguf, "tokenizer.chat_template", &text, NULL, &ignored)) text = NULL;
    rc = lq_chat_style_detect(text, out);
    lq_gguf_close(gguf);
    return rc ? lq_error_set(err, rc, "out of memory") : LQ_OK;
}

int lq_finetune_chat_style(const char *dir, struct lq_chat_style *out, struct lq_error *err) {
    *out = (struct lq_chat_style){LQ_CHAT_PLAIN, NULL};
    if (lq_path_is_file(dir)) return gguf_chat_style(dir, out, err);
    char path[4096 + 64];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    if (!lq_path_is_dir(dir) || !lq_path_is_file(path)) return LQ_OK;
    char *text;
    size_t length;
    int rc = lq_file_read_all(path, (size_t)64 << 20, &text, &length, err);
    if (rc) return rc;
    cJSON *json = lq_json_parse(text, length);
    free(text);
    if (!json) return lq_error_set(err, LQ_EFORMAT, "%s: not valid JSON", path);
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(json, "chat_template");
    const char *chosen = cJSON_IsString(item) ? item->valuestring : NULL;
    if (cJSON_IsArray(item)) {
        const cJSON *entry;
        cJSON_ArrayForEach(entry, item) {
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(entry, "name");
            const cJSON *body = cJSON_GetObjectItemCaseSensitive(entry, "template");
            if (!cJSON_IsString(body)) continue;
            if (!chosen) chosen = body->valuestring;
            if (cJSON_IsString(name) && strcmp(name->valuestring, "default") == 0) {
                chosen = body->valuestring;
                break;
            }
        }
    }
    rc = lq_chat_style_detect(chosen, out);
    cJSON_Delete(json);
    return rc ? lq_error_set(err, rc, "out of memory") : LQ_OK;
}
