/* Finetune jobs (server/job_finetune.h): the job's data and checkpoint directory, the run on
 * the CPU through core/finetune.h, its events, and the adapter handed to the daemon. */
#define _XOPEN_SOURCE 700 /* nftw */
#include "server/job_finetune.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/adapter.h"
#include "core/file_util.h"
#include "core/finetune.h"
#include "core/lq_model_file.h"
#include "kernels/backend.h"

#define CHECKPOINT_NAME "checkpoint.safetensors"
#define CHECKPOINT_SECONDS 30.0 /* without checkpoint_every: at most this much work is lost */
#define STEP_EVENT_INTERVAL                                                                        \
    0.5 /* seconds between step events (validation steps always get one)                           \
         */

/* ---------- the request ---------- */

cJSON *lq_job_finetune_spec_json(const struct lq_job_spec *s) {
    const struct lq_finetune_job_spec *f = &s->finetune;
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "type", "finetune");
    cJSON_AddStringToObject(r, "model", s->model);
    cJSON_AddStringToObject(r, "source", s->source);
    cJSON_AddStringToObject(r, "output", s->output);
    cJSON_AddStringToObject(r, "name", s->name);
    cJSON_AddStringToObject(r, "adapter", s->name);
    cJSON_AddStringToObject(r, "training_file", f->training_file);
    cJSON_AddStringToObject(r, "training_filename", f->training_name);
    cJSON_AddStringToObject(r, "training_path", f->training_path);
    if (f->validation_file[0]) {
        cJSON_AddStringToObject(r, "validation_file", f->validation_file);
        cJSON_AddStringToObject(r, "validation_filename", f->validation_name);
        cJSON_AddStringToObject(r, "validation_path", f->validation_path);
    } else {
        cJSON_AddNullToObject(r, "validation_file");
    }
    cJSON_AddNumberToObject(r, "validation_fraction", f->validation_fraction);
    cJSON_AddStringToObject(r, "format", lq_dataset_format_name((enum lq_dataset_format)f->format));
    cJSON_AddStringToObject(r, "init", f->init);
    cJSON_AddNumberToObject(r, "rank", f->rank);
    if (f->steps > 0)
        cJSON_AddNumberToObject(r, "steps", (double)f->steps);
    else
        cJSON_AddNumberToObject(r, "epochs", f->epochs);
    cJSON_AddNumberToObject(r, "learning_rate", f->learning_rate);
    cJSON_AddNumberToObject(r, "batch_size", f->batch_size);
    cJSON_AddNumberToObject(r, "micro_batch", f->micro_batch);
    cJSON_AddNumberToObject(r, "seq_len", f->seq_len);
    cJSON_AddNumberToObject(r, "warmup", f->warmup);
    cJSON_AddStringToObject(r, "schedule", f->schedule);
    cJSON_AddNumberToObject(r, "weight_decay", f->weight_decay);
    cJSON_AddNumberToObject(r, "max_grad_norm", f->max_grad_norm);
    cJSON_AddNumberToObject(r, "eval_every", f->eval_every);
    cJSON_AddNumberToObject(r, "checkpoint_every", f->checkpoint_every);
    cJSON_AddNumberToObject(r, "seed", (double)s->seed);
    cJSON_AddBoolToObject(r, "activate", s->activate);
    return r;
}

static void copy_string(const cJSON *object, const char *key, char *out, size_t size) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, key);
    snprintf(out, size, "%s", cJSON_IsString(item) ? item->valuestring : "");
}

static double number_of(const cJSON *object, const char *key, double otherwise) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, key);
    return cJSON_IsNumber(item) ? item->valuedouble : otherwise;
}

void lq_job_finetune_spec_read(const cJSON *request, struct lq_job_spec *s) {
    struct lq_finetune_job_spec *f = &s->finetune;
    s->type = LQ_JOB_FINETUNE;
    copy_string(request, "training_file", f->training_file, sizeof f->training_file);
    copy_string(request, "training_filename", f->training_name, sizeof f->training_name);
    copy_string(request, "training_path", f->training_path, sizeof f->training_path);
    copy_string(request, "validation_file", f->validation_file, sizeof f->validation_file);
    copy_string(request, "validation_filename", f->validation_name, sizeof f->validation_name);
    copy_string(request, "validation_path", f->validation_path, sizeof f->validation_path);
    f->validation_fraction = number_of(request, "validation_fraction", 0);
    char format[32];
    copy_string(request, "format", format, sizeof format);
    enum lq_dataset_format parsed = LQ_DATASET_AUTO;
    lq_dataset_format_parse(format, &parsed);
    f->format = (int)parsed;
    copy_string(request, "init", f->init, sizeof f->init);
    f->rank = (int)number_of(request, "rank", 8);
    f->steps = (long)number_of(request, "steps", 0);
    f->epochs = number_of(request, "epochs", 1);
    f->learning_rate = number_of(request, "learning_rate", 2e-4);
    f->batch_size = (int)number_of(request, "batch_size", 8);
    f->micro_batch = (int)number_of(request, "micro_batch", 4);
    f->seq_len = (int)number_of(request, "seq_len", 256);
    f->warmup = (int)number_of(request, "warmup", 0);
    copy_string(request, "schedule", f->schedule, sizeof f->schedule);
    f->weight_decay = number_of(request, "weight_decay", 0);
    f->max_grad_norm = number_of(request, "max_grad_norm", 1);
    f->eval_every = (int)number_of(request, "eval_every", 0);
    f->checkpoint_every = (int)number_of(request, "checkpoint_every", 0);
}

/* ---------- the job's directory ---------- */

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

void lq_job_finetune_discard(const char *job_dir) {
    struct stat st;
    if (lstat(job_dir, &st) == 0) nftw(job_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* A hard link keeps the upload's bytes alive after DELETE /v1/files/{id}; both live under
 * STATE_DIR, on one file system, so it costs no copy. */
int lq_job_link_upload(const char *source, const char *job_dir, const char *name, const char *id,
                       char *path, size_t size, struct lq_error *err) {
    char target[PATH_MAX + 64];
    snprintf(target, sizeof target, "%s/%s", job_dir, name);
    if (link(source, target) != 0) {
        if (errno == ENOENT)
            return lq_error_set(err, LQ_ENOTFOUND, "the file '%s' was deleted", id);
        int rc = lq_file_copy(source, target, err);
        if (rc) return rc;
    }
    if ((size_t)snprintf(path, size, "%s", target) >= size)
        return lq_error_set(err, LQ_EINVAL, "%s: path too long", target);
    return LQ_OK;
}

int lq_job_finetune_prepare(struct lq_job_spec *spec, const char *job_dir, struct lq_error *err) {
    struct lq_finetune_job_spec *f = &spec->finetune;
    if (mkdir(job_dir, 0700) != 0 && errno != EEXIST)
        return lq_error_set(err, LQ_EIO, "cannot create %s: %s", job_dir, strerror(errno));
    int rc = lq_job_link_upload(f->training_path, job_dir, "training_file", f->training_file,
                                f->training_path, sizeof f->training_path, err);
    if (!rc && f->validation_file[0])
        rc = lq_job_link_upload(f->validation_path, job_dir, "validation_file", f->validation_file,
                                f->validation_path, sizeof f->validation_path, err);
    if (rc) lq_job_finetune_discard(job_dir);
    return rc;
}

/* ---------- the run ---------- */

struct run {
    const struct lq_job_finetune_hooks *hooks;
    double last_step_event; /* monotonic */
    int stop;               /* what stop_requested said */
};

static double monotonic(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int on_event(void *context, const struct lq_finetune_event *e) {
    struct run *run = context;
    const struct lq_job_finetune_hooks *h = run->hooks;
    cJSON *x = NULL;
    if (e->type == LQ_FINETUNE_START) {
        x = cJSON_CreateObject();
        cJSON_AddNumberToObject(x, "step", (double)e->step);
        cJSON_AddNumberToObject(x, "total_steps", (double)e->total_steps);
        cJSON_AddNumberToObject(x, "resumed_from", (double)e->resumed_from);
        cJSON_AddNumberToObject(x, "train_documents", (double)e->train_documents);
        cJSON_AddNumberToObject(x, "validation_documents", (double)e->validation_documents);
        cJSON_AddNumberToObject(x, "train_rows", (double)e->train_rows);
        cJSON_AddNumberToObject(x, "validation_rows", (double)e->validation_rows);
        cJSON_AddNumberToObject(x, "train_targets", (double)e->train_targets);
        cJSON_AddNumberToObject(x, "val_loss", e->val_loss);
        h->event(h->context, "start", x);
        h->progress(h->context, "training", (double)e->step / (double)e->total_steps, -1);
    } else if (e->type == LQ_FINETUNE_STEP) {
        double progress = (double)e->step / (double)e->total_steps, now = monotonic();
        h->progress(h->context, "training", progress, e->eta_seconds);
        if (!isnan(e->val_loss) || e->step == e->total_steps ||
            now - run->last_step_event >= STEP_EVENT_INTERVAL) {
            run->last_step_event = now;
            x = cJSON_CreateObject();
            cJSON_AddNumberToObject(x, "step", (double)e->step);
            cJSON_AddNumberToObject(x, "total_steps", (double)e->total_steps);
            cJSON_AddNumberToObject(x, "epoch", e->epoch);
            cJSON_AddNumberToObject(x, "train_loss", e->train_loss);
            cJSON_AddNumberToObject(x, "val_loss", e->val_loss); /* NaN: null */
            cJSON_AddNumberToObject(x, "learning_rate", e->learning_rate);
            cJSON_AddNumberToObject(x, "grad_norm", e->grad_norm);
            cJSON_AddNumberToObject(x, "tokens_per_second", e->tokens_per_second);
            cJSON_AddNumberToObject(x, "eta_seconds", e->eta_seconds);
            cJSON_AddNumberToObject(x, "progress", progress);
            h->event(h->context, "step", x);
        }
    } else {
        x = cJSON_CreateObject();
        cJSON_AddNumberToObject(x, "step", (double)e->step);
        h->event(h->context, "checkpoint", x);
    }
    run->stop = h->stop_requested(h->context);
    return run->stop;
}

static int load_inputs(const struct lq_job_spec *s, struct lq_model **model,
                       struct lq_tokenizer **tokenizer, struct lq_chat_style *chat,
                       struct lq_error *err) {
    struct lq_tokenizer_files files;
    int rc = lq_model_file_find_tokenizer(s->source, 1, &files, err);
    if (rc) return rc;
    const char *path = lq_tokenizer_files_primary(&files);
    if (!path)
        return lq_error_set(err, LQ_ENOTFOUND, "%s: no tokenizer beside the model", s->source);
    if ((rc = lq_tokenizer_load(path, tokenizer, err))) return rc;
    if ((rc = lq_finetune_chat_style(s->source, chat, err))) return rc;
    return lq_model_load(s->source, model, err);
}

static void options_from_spec(const struct lq_job_spec *s, const char *checkpoint,
                              struct lq_finetune_options *o) {
    const struct lq_finetune_job_spec *f = &s->finetune;
    lq_finetune_options_default(o);
    o->train_path = f->training_path;
    o->train_label = f->training_name[0] ? f->training_name : f->training_file;
    if (f->validation_file[0]) {
        o->validation_path = f->validation_path;
        o->validation_label = f->validation_name[0] ? f->validation_name : f->validation_file;
    }
    o->validation_fraction = f->validation_fraction;
    o->format = (enum lq_dataset_format)f->format;
    lq_lora_init_parse(f->init, &o->train.init, NULL);
    o->train.rank = f->rank;
    o->train.seed = s->seed;
    o->train.seq_len = f->seq_len;
    o->train.micro_batch = f->micro_batch;
    o->train.learning_rate = f->learning_rate;
    o->train.weight_decay = f->weight_decay;
    o->train.max_grad_norm = f->max_grad_norm;
    o->train.warmup_steps = f->warmup;
    lq_lr_schedule_parse(f->schedule[0] ? f->schedule : "cosine", &o->train.schedule, NULL);
    o->batch_size = f->batch_size;
    o->steps = f->steps;
    o->epochs = f->epochs;
    o->eval_every = f->eval_every;
    o->checkpoint_path = checkpoint;
    o->checkpoint_every = f->checkpoint_every;
    o->checkpoint_seconds = f->checkpoint_every ? 0 : CHECKPOINT_SECONDS;
}

static int ensure_dir(const char *path, struct lq_error *err) {
    if (mkdir(path, 0755) == 0 || errno == EEXIST) return LQ_OK;
    return lq_error_set(err, LQ_EIO, "cannot create %s: %s", path, strerror(errno));
}

/* STATE_DIR/adapters/<model>/ for output = STATE_DIR/adapters/<model>/<adapter>. */
static int make_parents(const char *output, struct lq_error *err) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s", output);
    char *model_slash = strrchr(path, '/');
    if (!model_slash) return LQ_OK;
    *model_slash = '\0';
    char *adapters_slash = strrchr(path, '/');
    int rc = LQ_OK;
    if (adapters_slash) {
        *adapters_slash = '\0';
        rc = ensure_dir(path, err);
        *adapters_slash = '/';
    }
    return rc ? rc : ensure_dir(path, err);
}

static cJSON *result_json(const struct lq_job_spec *s, const struct lq_adapter *adapter,
                          const struct lq_finetune_result *r) {
    int rank = 0, pairs = 0;
    for (int i = 0; i < adapter->n_layers * LQ_LINEARS_PER_LAYER; i++)
        if (adapter->matrices[i].rank) rank = adapter->matrices[i].rank, pairs++;
    cJSON *x = cJSON_CreateObject();
    cJSON_AddStringToObject(x, "adapter", s->name);
    cJSON_AddStringToObject(x, "model", s->model);
    cJSON_AddStringToObject(x, "path", s->output);
    cJSON_AddStringToObject(x, "mode", lq_adapter_mode_name(adapter->mode));
    cJSON_AddStringToObject(x, "init", adapter->init);
    cJSON_AddNumberToObject(x, "rank", rank);
    cJSON_AddNumberToObject(x, "matrices", pairs);
    cJSON_AddNumberToObject(x, "steps", (double)r->steps);
    cJSON_AddNumberToObject(x, "resumed_from", (double)r->resumed_from);
    cJSON_AddNumberToObject(x, "train_loss", r->train_loss);
    cJSON_AddNumberToObject(x, "val_loss", r->val_loss);
    cJSON_AddNumberToObject(x, "initial_val_loss", r->initial_val_loss);
    cJSON_AddNumberToObject(x, "train_documents", (double)r->train_documents);
    cJSON_AddNumberToObject(x, "validation_documents", (double)r->validation_documents);
    cJSON_AddNumberToObject(x, "train_rows", (double)r->train_rows);
    cJSON_AddNumberToObject(x, "validation_rows", (double)r->validation_rows);
    cJSON_AddNumberToObject(x, "training_seconds", r->seconds);
    return x;
}

enum lq_job_status lq_job_finetune_run(const struct lq_job_spec *s, const char *job_dir,
                                       const struct lq_jobs_options *options, int resumed,
                                       const struct lq_job_finetune_hooks *hooks, cJSON **result,
                                       struct lq_error *err) {
    *result = NULL;
    struct lq_model *model = NULL;
    struct lq_tokenizer *tokenizer = NULL;
    struct lq_backend *backend = NULL;
    struct lq_adapter *adapter = NULL;
    enum lq_job_status status = LQ_JOB_FAILED;
    struct lq_chat_style chat = {LQ_CHAT_PLAIN, NULL};
    hooks->progress(hooks->context, "loading", 0, -1);
    int rc = load_inputs(s, &model, &tokenizer, &chat, err);
    /* On the daemon's GPU when its backend has the training ops (borrowed: the op lock keeps
     * serving and training apart), else on a CPU backend of the job's own. */
    struct lq_backend *device = options->device;
    if (!rc && device && strcmp(device->ops->name, "cpu") != 0 && device->ops->linear_lora &&
        device->ops->linear_backward && device->ops->attention_backward && device->ops->adamw)
        backend = device;
    else if (!rc)
        rc = lq_backend_cpu_create(&backend, err);
    if (rc) goto done;
    char checkpoint[PATH_MAX + 64];
    snprintf(checkpoint, sizeof checkpoint, "%s/" CHECKPOINT_NAME, job_dir);
    struct lq_finetune_options o;
    options_from_spec(s, checkpoint, &o);
    o.chat_style = &chat;
    struct run run = {hooks, -1e9, 0};
    o.on_event = on_event, o.context = &run;
    struct lq_finetune_result r;
    rc = lq_finetune_run(backend, model, tokenizer, &o, &adapter, &r, err);
    if (rc && r.interrupted) {
        status = run.stop == 1 ? LQ_JOB_CANCELLED : LQ_JOB_QUEUED;
        if (status == LQ_JOB_QUEUED)
            lq_error_set(err, LQ_EINVAL,
                         "interrupted by a daemon shutdown at step %ld; resumes from its "
                         "checkpoint at the next start",
                         r.steps);
        else
            lq_error_set(err, LQ_EINVAL, "cancelled");
        goto done;
    }
    if (rc) goto done;
    hooks->progress(hooks->context, "writing", 1.0, 0);
    snprintf(adapter->base_model, sizeof adapter->base_model, "%.255s", s->source);
    struct stat st;
    int replace = resumed && lstat(s->output, &st) == 0;
    if ((rc = make_parents(s->output, err)) ||
        (rc = lq_adapter_save(adapter, s->output, replace, err)))
        goto done;
    if (hooks->stop_requested(hooks->context) == 1) {
        /* A cancel that came during the write undoes it: the client asked for nothing. */
        lq_job_finetune_discard(s->output);
        status = LQ_JOB_CANCELLED;
        lq_error_set(err, LQ_EINVAL, "cancelled");
        goto done;
    }
    *result = result_json(s, adapter, &r);
    int activated = 0;
    if (options->adapter_ready) {
        struct lq_error ready = {0};
        if (options->adapter_ready(options->adapter_context, s->model, s->name, s->output,
                                   s->activate, &ready)) {
            lq_error_set(err, ready.code ? ready.code : LQ_EINVAL,
                         "the adapter was written to %.200s but the daemon could not take it: "
                         "%.250s",
                         s->output, ready.message);
            cJSON_Delete(*result);
            *result = NULL;
            goto done;
        }
        activated = s->activate;
    }
    cJSON_AddStringToObject(*result, "device", backend->ops->name); /* where it trained */
    cJSON_AddBoolToObject(*result, "registered", options->adapter_ready != NULL);
    cJSON_AddBoolToObject(*result, "activated", activated);
    status = LQ_JOB_SUCCEEDED;
done:
    if (status != LQ_JOB_QUEUED) lq_job_finetune_discard(job_dir);
    lq_adapter_free(adapter);
    if (backend && backend != options->device) backend->ops->destroy(backend);
    lq_chat_style_free(&chat);
    lq_tokenizer_free(tokenizer);
    lq_model_free(model);
    return status;
}
