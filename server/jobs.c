/* The job table and its workers (see jobs.h). One mutex guards the table and every job's
 * mutable fields; records are serialized and written under it, so a record on disk is always
 * one state the table went through. The compression itself runs outside the lock; it learns
 * of a cancel or a shutdown from the flags its progress callback reads. */
#include "server/jobs.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "core/compress.h"
#include "core/file_util.h"
#include "core/fisher.h"
#include "core/lq_model_file.h"
#include "core/model.h"
#include "core/tokenizer.h"
#include "kernels/backend.h"
#include "server/job_finetune.h"
#include "server/job_launcher.h"
#include "server/log.h"

/* The share of the progress fraction each phase takes: the table dominates a cold run. */
#define SHARE_TABLE 0.85
#define SHARE_ILP 0.05
#define SHARE_FISHER 0.15   /* of a Fisher-weighted job: the estimate, before the table */
#define RECORD_INTERVAL 1.0 /* seconds between progress writes of a running job's record */
#define EVENT_INTERVAL 2.0  /* seconds between progress events */

struct job {
    char id[40];
    struct lq_job_spec spec;
    enum lq_job_status status;
    double created_at, started_at, finished_at; /* unix seconds; 0: not yet */
    char phase[32];
    double progress, eta; /* fraction in [0, 1]; seconds, < 0 unknown */
    int attempts;
    int resumed;    /* interrupted once: the output may exist, written by an earlier attempt */
    long event_seq; /* events appended so far */
    cJSON *result;  /* owned, or NULL */
    char error[LQ_ERROR_MESSAGE_SIZE + 128];
    atomic_int cancel;
    double last_record, last_event;     /* monotonic seconds of the last progress write */
    double run_started;                 /* monotonic */
    char launcher[LQ_LAUNCHER_MAX + 1]; /* compress: the launcher of its last run (or of the
                                            daemon it was queued on); "": in-process */
};

struct lq_jobs {
    struct lq_jobs_options options;
    char dir[PATH_MAX];
    pthread_mutex_t lock; /* the table and every job's fields but cancel */
    pthread_cond_t wake;  /* a job was queued, or stopping */
    struct job **jobs;    /* in creation order */
    size_t count, capacity;
    atomic_int stopping; /* workers: finish up */
    atomic_int stopped;  /* workers joined: no job changes any more */
    pthread_t *workers;
    int n_workers;
};

static const char *const status_names[LQ_JOB_STATUS_COUNT] = {"queued", "running", "succeeded",
                                                              "failed", "cancelled"};

const char *lq_job_type_name(enum lq_job_type type) {
    return type == LQ_JOB_FINETUNE ? "finetune" : "compress";
}

const char *lq_job_status_name(enum lq_job_status status) {
    return status < LQ_JOB_STATUS_COUNT ? status_names[status] : "unknown";
}

static double unix_now(void) {
    struct timeval now;
    gettimeofday(&now, NULL);
    return (double)now.tv_sec + (double)now.tv_usec * 1e-6;
}

static double monotonic_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static int finished(enum lq_job_status status) {
    return status == LQ_JOB_SUCCEEDED || status == LQ_JOB_FAILED || status == LQ_JOB_CANCELLED;
}

/* ---------- records and events (called with the lock held) ---------- */

static cJSON *spec_json(const struct lq_job_spec *s) {
    if (s->type == LQ_JOB_FINETUNE) return lq_job_finetune_spec_json(s);
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "type", "compress");
    cJSON_AddStringToObject(r, "model", s->model);
    cJSON_AddStringToObject(r, "source", s->source);
    cJSON_AddStringToObject(r, "output", s->output);
    cJSON_AddStringToObject(r, "configs", s->configs);
    cJSON_AddNumberToObject(r, "target_bits", s->target_bits);
    cJSON_AddNumberToObject(r, "rank", s->rank);
    cJSON_AddNumberToObject(r, "iters", s->iters);
    cJSON_AddNumberToObject(r, "seed", (double)s->seed);
    cJSON_AddBoolToObject(r, "activate", s->activate);
    cJSON_AddStringToObject(r, "name", s->name);
    if (s->fisher.file[0]) {
        cJSON *f = cJSON_AddObjectToObject(r, "fisher");
        cJSON_AddStringToObject(f, "file", s->fisher.file);
        cJSON_AddStringToObject(f, "filename", s->fisher.filename);
        cJSON_AddStringToObject(f, "path", s->fisher.path);
        cJSON_AddNumberToObject(f, "samples", s->fisher.samples);
        cJSON_AddNumberToObject(f, "seq_len", s->fisher.seq_len);
        cJSON_AddNumberToObject(f, "seed", (double)s->fisher.seed);
    } else {
        cJSON_AddNullToObject(r, "fisher");
    }
    return r;
}

static void add_time(cJSON *object, const char *key, double value) {
    if (value > 0)
        cJSON_AddNumberToObject(object, key, floor(value));
    else
        cJSON_AddNullToObject(object, key);
}

static cJSON *job_json(const struct job *job) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "id", job->id);
    cJSON_AddStringToObject(r, "object", "job");
    cJSON_AddStringToObject(r, "type", lq_job_type_name(job->spec.type));
    cJSON_AddStringToObject(r, "status", status_names[job->status]);
    cJSON_AddStringToObject(r, "model", job->spec.model);
    add_time(r, "created_at", job->created_at);
    add_time(r, "started_at", job->started_at);
    add_time(r, "finished_at", job->finished_at);
    if (job->phase[0])
        cJSON_AddStringToObject(r, "phase", job->phase);
    else
        cJSON_AddNullToObject(r, "phase");
    cJSON_AddNumberToObject(r, "progress", job->progress);
    if (job->status == LQ_JOB_RUNNING && job->eta >= 0)
        cJSON_AddNumberToObject(r, "eta_seconds", job->eta);
    else
        cJSON_AddNullToObject(r, "eta_seconds");
    cJSON_AddNumberToObject(r, "attempts", job->attempts);
    if (job->launcher[0])
        cJSON_AddStringToObject(r, "launcher", job->launcher);
    else
        cJSON_AddNullToObject(r, "launcher");
    cJSON_AddItemToObject(r, "request", spec_json(&job->spec));
    if (job->result)
        cJSON_AddItemToObject(r, "result", cJSON_Duplicate(job->result, 1));
    else
        cJSON_AddNullToObject(r, "result");
    if (job->error[0]) {
        cJSON *error = cJSON_AddObjectToObject(r, "error");
        cJSON_AddStringToObject(error, "message", job->error);
    } else {
        cJSON_AddNullToObject(r, "error");
    }
    return r;
}

static void record_write(struct lq_jobs *jobs, struct job *job) {
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s.json", jobs->dir, job->id);
    cJSON *r = job_json(job);
    char *text = cJSON_Print(r);
    cJSON_Delete(r);
    struct lq_error err = {0};
    if (!text || lq_file_write_atomic(path, text, strlen(text), &err))
        lq_log(LQ_LOG_ERROR, "cannot write a job record", LQ_LOG_STR("job", job->id),
               LQ_LOG_STR("error", text ? err.message : "out of memory"));
    cJSON_free(text);
    job->last_record = monotonic_now();
}

/* Appends {"seq", "time", "type", ...extra} to the job's event log; takes extra. */
static void event_append(struct lq_jobs *jobs, struct job *job, const char *type, cJSON *extra) {
    cJSON *e = extra ? extra : cJSON_CreateObject();
    cJSON_AddNumberToObject(e, "seq", (double)++job->event_seq);
    cJSON_AddNumberToObject(e, "time", unix_now());
    cJSON_AddStringToObject(e, "type", type);
    cJSON_AddStringToObject(e, "job", job->id);
    char *text = cJSON_PrintUnformatted(e);
    cJSON_Delete(e);
    if (!text) return;
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s.events.jsonl", jobs->dir, job->id);
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
        size_t length = strlen(text);
        text[length] = '\n'; /* replaces the NUL: one write, so a reader sees whole lines */
        ssize_t written = write(fd, text, length + 1);
        (void)written;
        close(fd);
    }
    cJSON_free(text);
    job->last_event = monotonic_now();
}

static void event_status(struct lq_jobs *jobs, struct job *job, const char *message) {
    cJSON *e = cJSON_CreateObject();
    cJSON_AddStringToObject(e, "status", status_names[job->status]);
    if (message) cJSON_AddStringToObject(e, "message", message);
    event_append(jobs, job, "status", e);
}

/* Moves job to status, records it and logs an event (lock held). */
static void job_set_status(struct lq_jobs *jobs, struct job *job, enum lq_job_status status,
                           const char *message) {
    job->status = status;
    if (status == LQ_JOB_RUNNING) job->started_at = unix_now();
    if (finished(status)) {
        job->finished_at = unix_now();
        job->eta = -1;
    }
    event_status(jobs, job, message);
    record_write(jobs, job);
    lq_log(LQ_LOG_INFO, "job", LQ_LOG_STR("id", job->id),
           LQ_LOG_STR("status", status_names[status]),
           LQ_LOG_STR("detail", message ? message : ""));
}

/* ---------- files of a job's output ---------- */

/* rm -r path (links removed, not followed). */
static void remove_tree(const char *path) {
    struct stat info;
    if (lstat(path, &info)) return;
    if (S_ISDIR(info.st_mode)) {
        DIR *dir = opendir(path);
        struct dirent *entry;
        while (dir && (entry = readdir(dir))) {
            if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
            char inner[PATH_MAX * 2];
            snprintf(inner, sizeof inner, "%s/%s", path, entry->d_name);
            remove_tree(inner);
        }
        if (dir) closedir(dir);
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* Removes "OUTPUT.tmp-*" left beside output by a write that did not finish. */
static void remove_partial(const char *output) {
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", output);
    char *slash = strrchr(parent, '/');
    if (!slash) return;
    const char *base = output + (slash - parent) + 1;
    *slash = '\0';
    char prefix[PATH_MAX];
    snprintf(prefix, sizeof prefix, "%s.tmp-", base);
    DIR *dir = opendir(parent[0] ? parent : "/");
    if (!dir) return;
    struct dirent *entry;
    while ((entry = readdir(dir)))
        if (strncmp(entry->d_name, prefix, strlen(prefix)) == 0) {
            char path[PATH_MAX * 2];
            snprintf(path, sizeof path, "%s/%s", parent, entry->d_name);
            remove_tree(path);
        }
    closedir(dir);
}

/* STATE_DIR/jobs/<id>/: a finetune job's data and checkpoints, a weighted compress job's
 * calibration text. */
static void job_dir(const struct lq_jobs *jobs, const char *id, char *out, size_t size) {
    snprintf(out, size, "%s/%s", jobs->dir, id);
}

/* ---------- running one job (worker thread, lock not held) ---------- */

struct run {
    struct lq_jobs *jobs;
    struct job *job;
    int last_phase;
    double base; /* progress before the compression's phases: SHARE_FISHER when weighted */
};

static int on_progress(void *context, const struct lq_compress_progress *p) {
    struct run *run = context;
    struct job *job = run->job;
    if (atomic_load(&job->cancel) || atomic_load(&run->jobs->stopping)) return LQ_EINVAL;
    double fraction = p->cells_total ? (double)p->cells_done / (double)p->cells_total : 1.0;
    double start = p->phase == LQ_COMPRESS_TABLE ? 0.0
                   : p->phase == LQ_COMPRESS_ILP ? SHARE_TABLE
                                                 : SHARE_TABLE + SHARE_ILP;
    double share = p->phase == LQ_COMPRESS_TABLE ? SHARE_TABLE
                   : p->phase == LQ_COMPRESS_ILP ? SHARE_ILP
                                                 : 1.0 - SHARE_TABLE - SHARE_ILP;
    double overall = start + share * (p->phase == LQ_COMPRESS_ILP ? p->finished : fraction);
    overall = run->base + (1.0 - run->base) * overall;
    double now = monotonic_now(), elapsed = now - job->run_started;
    pthread_mutex_lock(&run->jobs->lock);
    int phase_changed = run->last_phase != (int)p->phase;
    run->last_phase = (int)p->phase;
    snprintf(job->phase, sizeof job->phase, "%s", lq_compress_phase_name(p->phase));
    job->progress = overall > job->progress ? overall : job->progress;
    /* From this run's own rate: a resumed run's cached cells make its first seconds fast, so
     * the estimate settles as it goes. */
    job->eta = job->progress > 0.02 ? elapsed * (1.0 - job->progress) / job->progress : -1;
    if (phase_changed || p->finished || now - job->last_event >= EVENT_INTERVAL) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "phase", job->phase);
        cJSON_AddNumberToObject(e, "progress", job->progress);
        if (job->eta >= 0) cJSON_AddNumberToObject(e, "eta_seconds", job->eta);
        cJSON_AddNumberToObject(e, "cells_done", (double)p->cells_done);
        cJSON_AddNumberToObject(e, "cells_total", (double)p->cells_total);
        cJSON_AddNumberToObject(e, "cells_cached", (double)p->cells_cached);
        cJSON_AddBoolToObject(e, "phase_finished", p->finished);
        event_append(run->jobs, job, "progress", e);
    }
    if (phase_changed || p->finished || now - job->last_record >= RECORD_INTERVAL)
        record_write(run->jobs, job);
    pthread_mutex_unlock(&run->jobs->lock);
    return 0;
}

static void on_warning(void *context, const char *message) {
    struct run *run = context;
    pthread_mutex_lock(&run->jobs->lock);
    cJSON *e = cJSON_CreateObject();
    cJSON_AddStringToObject(e, "message", message);
    event_append(run->jobs, run->job, "warning", e);
    pthread_mutex_unlock(&run->jobs->lock);
}

/* 1: cancelled, 2: the daemon is stopping, 0: go on (finetune and launched jobs ask). */
static int run_stop_requested(void *context) {
    struct run *run = context;
    return atomic_load(&run->job->cancel) ? 1 : atomic_load(&run->jobs->stopping) ? 2 : 0;
}

static void run_event(void *context, const char *type, cJSON *extra) {
    struct run *run = context;
    pthread_mutex_lock(&run->jobs->lock);
    event_append(run->jobs, run->job, type, extra);
    pthread_mutex_unlock(&run->jobs->lock);
}

/* ---------- the Fisher information of a weighted job (as lqd compress --fisher) ---------- */

struct fisher_summary {
    int seq_len; /* the cap applied: min(spec seq_len, the model's context) */
    size_t tokens, documents;
    double seconds;
};

/* After each sequence (and once before the first): phase "fisher", progress events, and the
 * cancel or shutdown, which stops the estimate between sequences. */
static int on_fisher_progress(void *context, int done, int total) {
    struct run *run = context;
    struct job *job = run->job;
    if (atomic_load(&job->cancel) || atomic_load(&run->jobs->stopping)) return LQ_EINVAL;
    double now = monotonic_now(), elapsed = now - job->run_started;
    double overall = SHARE_FISHER * (total > 0 ? (double)done / (double)total : 1.0);
    pthread_mutex_lock(&run->jobs->lock);
    int phase_changed = strcmp(job->phase, "fisher") != 0, last = done == total;
    snprintf(job->phase, sizeof job->phase, "fisher");
    job->progress = overall > job->progress ? overall : job->progress;
    job->eta = job->progress > 0.02 ? elapsed * (1.0 - job->progress) / job->progress : -1;
    if (phase_changed || last || now - job->last_event >= EVENT_INTERVAL) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "phase", job->phase);
        cJSON_AddNumberToObject(e, "progress", job->progress);
        if (job->eta >= 0) cJSON_AddNumberToObject(e, "eta_seconds", job->eta);
        cJSON_AddNumberToObject(e, "sequences_done", done);
        cJSON_AddNumberToObject(e, "sequences_total", total);
        cJSON_AddBoolToObject(e, "phase_finished", last);
        event_append(run->jobs, job, "progress", e);
    }
    if (phase_changed || last || now - job->last_record >= RECORD_INTERVAL)
        record_write(run->jobs, job);
    pthread_mutex_unlock(&run->jobs->lock);
    return 0;
}

/* The draw is made: progress 0 of its sequences, where a cancelled job stops. */
static int on_fisher_drawn(void *context, const struct lq_fisher_calibration *calibration) {
    return on_fisher_progress(context, 0, calibration->count);
}

/* F of every linear matrix of source, estimated on a CPU backend from the job's calibration
 * text with lqd compress --fisher's draw (the same text, N, L and seed give the same F and
 * the same fisher->source, hence the same error-table cache key). On error fisher is freed. */
static int fisher_estimate(struct run *run, const struct lq_model *source,
                           const struct lq_tokenizer_files *files, struct lq_fisher *fisher,
                           struct fisher_summary *summary, struct lq_error *err) {
    const struct lq_fisher_job_spec *f = &run->job->spec.fisher;
    struct lq_tokenizer *tokenizer = NULL;
    struct lq_fisher_calibration calibration = {0};
    char *text = NULL;
    size_t length = 0;
    double start = monotonic_now();
    int context = source->config.max_seq_len;
    summary->seq_len = f->seq_len < context ? f->seq_len : context;
    int rc = lq_file_read_all(f->path, (size_t)1 << 32, &text, &length, err);
    if (rc) {
        lq_error_prefix(err, "fisher.file %s", f->file);
        goto done;
    }
    /* The tokenizer the output gets, as lqd compress picks it. */
    const char *path = lq_tokenizer_files_primary(files);
    if (path)
        rc = lq_tokenizer_load(path, &tokenizer, err);
    else
        rc = lq_error_set(err, LQ_ENOTFOUND,
                          "fisher: no tokenizer found beside %s to read the calibration text with",
                          run->job->spec.source);
    if (rc) goto done;
    char draw_label[LQ_ERROR_MESSAGE_SIZE];
    snprintf(draw_label, sizeof draw_label, "fisher.file %s (%s)", f->file, f->filename);
    struct lq_fisher_text_options options = {
        .samples = f->samples,
        .max_seq_len = summary->seq_len,
        .seed = f->seed,
        .draw_label = draw_label,
        .backend = NULL,
        .create_backend = lq_backend_cpu_create,
        .drawn = on_fisher_drawn,
        .drawn_context = run,
        .progress = on_fisher_progress,
        .progress_context = run,
    };
    /* on the daemon's GPU when it has the training ops, as finetune jobs */
    struct lq_backend *device = run->jobs->options.device;
    if (device && strcmp(device->ops->name, "cpu") != 0 && device->ops->linear_backward &&
        device->ops->attention_backward && device->ops->accumulate_squares)
        options.backend = device;
    rc = lq_fisher_estimate_text(source, tokenizer, text, length, &options, &calibration, fisher,
                                 err);
    if (calibration.count) /* drawn */
        summary->tokens = calibration.tokens, summary->documents = calibration.documents;
done:
    summary->seconds = monotonic_now() - start;
    if (rc) lq_fisher_free(fisher);
    lq_fisher_calibration_free(&calibration);
    lq_tokenizer_free(tokenizer);
    free(text);
    return rc;
}

static cJSON *result_json(const struct job *job, const struct lq_compress_report *r,
                          const struct lq_nf_config *grid, const struct fisher_summary *fisher) {
    cJSON *result = cJSON_CreateObject();
    cJSON_AddStringToObject(result, "output", job->spec.output);
    cJSON_AddNumberToObject(result, "target_bits", job->spec.target_bits);
    cJSON_AddNumberToObject(result, "min_budget", r->min_budget);
    cJSON_AddNumberToObject(result, "bits_per_param", r->bits_per_param);
    cJSON_AddNumberToObject(result, "effective_bits", r->effective_bits);
    cJSON_AddNumberToObject(result, "rank", job->spec.rank);
    double norm = 0.0;
    for (size_t i = 0; i < r->n_matrices; i++) norm += r->norm[i];
    cJSON_AddNumberToObject(result, "total_error", r->total_error);
    cJSON_AddNumberToObject(result, "relative_error", norm > 0 ? sqrt(r->total_error / norm) : 0);
    cJSON_AddStringToObject(result, "weighting", r->weighting);
    if (job->spec.fisher.file[0]) {
        cJSON *f = cJSON_AddObjectToObject(result, "fisher");
        cJSON_AddStringToObject(f, "file", job->spec.fisher.file);
        cJSON_AddNumberToObject(f, "samples", job->spec.fisher.samples);
        cJSON_AddNumberToObject(f, "seq_len", fisher->seq_len);
        cJSON_AddNumberToObject(f, "seed", (double)job->spec.fisher.seed);
        cJSON_AddNumberToObject(f, "tokens", (double)fisher->tokens);
        cJSON_AddNumberToObject(f, "documents", (double)fisher->documents);
        cJSON_AddNumberToObject(f, "seconds", fisher->seconds);
    } else {
        cJSON_AddNullToObject(result, "fisher");
    }
    cJSON_AddNumberToObject(result, "n_matrices", (double)r->n_matrices);
    cJSON_AddNumberToObject(result, "n_configs", (double)r->n_configs);
    cJSON_AddNumberToObject(result, "decompositions", (double)r->decompositions);
    cJSON_AddNumberToObject(result, "cells_cached", (double)r->cells_cached);
    if (r->cache_used)
        cJSON_AddStringToObject(result, "cache", r->cache_path);
    else
        cJSON_AddNullToObject(result, "cache");
    cJSON_AddBoolToObject(result, "ilp_proven_optimal", r->ilp_proven_optimal);
    cJSON *seconds = cJSON_AddObjectToObject(result, "seconds");
    cJSON_AddNumberToObject(seconds, "table", r->seconds_table);
    cJSON_AddNumberToObject(seconds, "ilp", r->seconds_ilp);
    cJSON_AddNumberToObject(seconds, "final", r->seconds_final);
    cJSON *configs = cJSON_AddObjectToObject(result, "configs");
    for (size_t c = 0; c < r->n_configs; c++) {
        int count = 0;
        for (size_t i = 0; i < r->n_matrices; i++) count += r->choice[i] == (int)c;
        if (!count) continue;
        char text[96];
        snprintf(text, sizeof text, "%d,%d,%s,%d,%d", grid[c].b0, grid[c].b1,
                 lq_scale_dtype_name(grid[c].b2), grid[c].B0, grid[c].B1);
        cJSON_AddNumberToObject(configs, text, count);
    }
    return result;
}

/* A compress job through the daemon's --compress-launcher (server/job_launcher.c runs the
 * child): the same progress, events, result and clean-up as in-process, the work done by
 * lqd compress wherever the launcher puts it. */
static enum lq_job_status run_compress_launched(struct lq_jobs *jobs, struct job *job,
                                                cJSON **result, struct lq_error *err) {
    const struct lq_job_spec *s = &job->spec;
    int weighted = s->fisher.file[0] != '\0';
    int force = job->resumed && lq_path_is_dir(s->output);
    remove_partial(s->output);
    pthread_mutex_lock(&jobs->lock);
    snprintf(job->launcher, sizeof job->launcher, "%s", jobs->options.compress_launcher);
    record_write(jobs, job);
    pthread_mutex_unlock(&jobs->lock);
    struct run run = {jobs, job, -1, weighted ? SHARE_FISHER : 0.0};
    struct lq_job_launcher_hooks hooks = {
        &run, run_stop_requested, on_progress, on_fisher_progress, on_warning, run_event};
    int wrote_output = 0;
    enum lq_job_status status =
        lq_job_launcher_run(jobs->options.compress_launcher, job->id, s, jobs->options.cache_dir,
                            force, &hooks, result, &wrote_output, err);
    /* A cancel that came after the child wrote the output undoes it, as in-process. */
    if (status == LQ_JOB_CANCELLED && wrote_output) remove_tree(s->output);
    if (status != LQ_JOB_SUCCEEDED) remove_partial(s->output);
    if (weighted && status != LQ_JOB_QUEUED) {
        char dir[PATH_MAX + 64];
        job_dir(jobs, job->id, dir, sizeof dir);
        remove_tree(dir);
    }
    return status;
}

/* What ended the run: 0 succeeded, else the status to record (err holds the message). */
static enum lq_job_status run_compress(struct lq_jobs *jobs, struct job *job, cJSON **result,
                                       struct lq_error *err) {
    if (jobs->options.compress_launcher) return run_compress_launched(jobs, job, result, err);
    const struct lq_job_spec *s = &job->spec;
    struct lq_nf_config *grid = NULL;
    size_t grid_size = 0;
    struct lq_model *source = NULL, *compressed = NULL;
    struct lq_compress_report report = {0};
    struct lq_tokenizer_files tokenizer;
    struct lq_fisher fisher = {0};
    struct fisher_summary fisher_summary = {0};
    int weighted = s->fisher.file[0] != '\0';
    enum lq_job_status status = LQ_JOB_FAILED;
    int force = job->resumed && lq_path_is_dir(s->output);
    remove_partial(s->output);
    pthread_mutex_lock(&jobs->lock);
    job->launcher[0] = '\0';
    pthread_mutex_unlock(&jobs->lock);
    if (lq_compress_grid_parse(s->configs, &grid, &grid_size, err) ||
        lq_model_file_check_destination(s->output, force, err) ||
        lq_model_file_find_tokenizer(s->source, 1, &tokenizer, err) ||
        lq_model_load(s->source, &source, err))
        goto done;
    struct run run = {jobs, job, -1, weighted ? SHARE_FISHER : 0.0};
    struct lq_compress_options options;
    lq_compress_options_default(&options);
    options.budget = s->target_bits, options.rank = s->rank, options.iters = s->iters;
    options.grid = grid, options.grid_size = grid_size, options.seed = s->seed;
    options.cache_dir = jobs->options.cache_dir;
    options.device = jobs->options.device; /* compress ignores a backend without decompose */
    options.progress = on_progress, options.warning = on_warning, options.context = &run;
    int rc =
        weighted ? fisher_estimate(&run, source, &tokenizer, &fisher, &fisher_summary, err) : LQ_OK;
    if (weighted) {
        options.fisher = (const float *const *)fisher.matrices;
        options.fisher_source = fisher.source;
    }
    if (!rc) rc = lq_compress(source, &options, &compressed, &report, err);
    if (!rc && !atomic_load(&job->cancel)) {
        struct lq_model_file_options file;
        lq_model_file_options_default(&file);
        file.source = s->source, file.budget = s->target_bits;
        file.achieved_bits = report.bits_per_param, file.rank = s->rank;
        file.grid_size = grid_size, file.iters = s->iters, file.seed = s->seed;
        file.weighting = report.weighting, file.tokenizer = &tokenizer, file.force = force;
        pthread_mutex_lock(&jobs->lock);
        snprintf(job->phase, sizeof job->phase, "writing");
        record_write(jobs, job);
        pthread_mutex_unlock(&jobs->lock);
        rc = lq_model_file_write(compressed, s->output, &file, err);
    }
    if (atomic_load(&job->cancel)) {
        /* A cancel that came during the write undoes it: the client asked for nothing. */
        remove_partial(s->output);
        if (!rc) remove_tree(s->output);
        status = LQ_JOB_CANCELLED;
        lq_error_set(err, LQ_EINVAL, "cancelled");
    } else if (rc && atomic_load(&jobs->stopping)) {
        status = LQ_JOB_QUEUED;
        lq_error_set(err, LQ_EINVAL,
                     "interrupted by a daemon shutdown; resumes (from the cached error table) "
                     "at the next start");
    } else if (!rc) {
        *result = result_json(job, &report, grid, &fisher_summary);
        status = LQ_JOB_SUCCEEDED;
    }
done:
    if (status != LQ_JOB_SUCCEEDED) remove_partial(s->output);
    if (weighted && status != LQ_JOB_QUEUED) { /* the calibration text's link: no longer needed */
        char dir[PATH_MAX + 64];
        job_dir(jobs, job->id, dir, sizeof dir);
        remove_tree(dir);
    }
    free(grid);
    lq_fisher_free(&fisher);
    lq_compress_report_free(&report);
    lq_model_free(compressed);
    lq_model_free(source);
    return status;
}

/* ---------- finetune jobs (server/job_finetune.c does the work) ---------- */

static void finetune_progress(void *context, const char *phase, double progress, double eta) {
    struct run *run = context;
    struct job *job = run->job;
    pthread_mutex_lock(&run->jobs->lock);
    int phase_changed = strcmp(job->phase, phase) != 0;
    snprintf(job->phase, sizeof job->phase, "%s", phase);
    job->progress = progress > job->progress ? progress : job->progress;
    job->eta = eta;
    if (phase_changed || monotonic_now() - job->last_record >= RECORD_INTERVAL)
        record_write(run->jobs, job);
    pthread_mutex_unlock(&run->jobs->lock);
}

static enum lq_job_status run_finetune(struct lq_jobs *jobs, struct job *job, cJSON **result,
                                       struct lq_error *err) {
    struct run run = {jobs, job, -1, 0.0};
    struct lq_job_finetune_hooks hooks = {&run, run_stop_requested, run_event, finetune_progress};
    char dir[PATH_MAX + 64];
    job_dir(jobs, job->id, dir, sizeof dir);
    remove_partial(job->spec.output);
    enum lq_job_status status =
        lq_job_finetune_run(&job->spec, dir, &jobs->options, job->resumed, &hooks, result, err);
    if (status != LQ_JOB_SUCCEEDED) remove_partial(job->spec.output);
    return status;
}

static void run_job(struct lq_jobs *jobs, struct job *job) {
    struct lq_error err = {0};
    cJSON *result = NULL;
    job->run_started = monotonic_now();
    enum lq_job_status status = job->spec.type == LQ_JOB_FINETUNE
                                    ? run_finetune(jobs, job, &result, &err)
                                    : run_compress(jobs, job, &result, &err);
    char message[LQ_ERROR_MESSAGE_SIZE + 128] = "";
    /* A finetune job hands its adapter over itself (lq_jobs_options.adapter_ready). */
    if (job->spec.type == LQ_JOB_COMPRESS && status == LQ_JOB_SUCCEEDED && job->spec.activate) {
        struct lq_error load_err = {0};
        int rc = lq_registry_load(jobs->options.registry, job->spec.name, job->spec.output, NULL,
                                  &load_err);
        cJSON_AddBoolToObject(result, "activated", rc == 0);
        cJSON_AddStringToObject(result, "name", job->spec.name);
        if (rc) {
            status = LQ_JOB_FAILED;
            snprintf(message, sizeof message, "%.200s was written but could not be loaded: %.400s",
                     job->spec.output, load_err.message);
        }
    } else if (result && !cJSON_HasObjectItem(result, "activated")) {
        cJSON_AddBoolToObject(result, "activated", 0);
    }
    if (status != LQ_JOB_SUCCEEDED && !message[0])
        snprintf(message, sizeof message, "%s", err.message);
    pthread_mutex_lock(&jobs->lock);
    cJSON_Delete(job->result);
    job->result = result;
    if (status == LQ_JOB_QUEUED) {
        job->resumed = 1;
        job->phase[0] = '\0';
        job_set_status(jobs, job, LQ_JOB_QUEUED, message);
    } else {
        if (status == LQ_JOB_SUCCEEDED) {
            job->progress = 1.0;
            snprintf(job->phase, sizeof job->phase, "done");
            if (job->spec.activate &&
                cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(result, "activated"))) {
                cJSON *e = cJSON_CreateObject();
                cJSON_AddStringToObject(e, "name", job->spec.name);
                cJSON_AddStringToObject(e, "path", job->spec.output);
                event_append(jobs, job, "activated", e);
            }
        }
        if (status == LQ_JOB_FAILED) snprintf(job->error, sizeof job->error, "%s", message);
        job_set_status(jobs, job, status, status == LQ_JOB_SUCCEEDED ? NULL : message);
    }
    pthread_mutex_unlock(&jobs->lock);
}

static void *worker_main(void *argument) {
    struct lq_jobs *jobs = argument;
    pthread_mutex_lock(&jobs->lock);
    for (;;) {
        struct job *next = NULL;
        while (!atomic_load(&jobs->stopping)) {
            for (size_t i = 0; i < jobs->count && !next; i++)
                if (jobs->jobs[i]->status == LQ_JOB_QUEUED) next = jobs->jobs[i];
            if (next) break;
            pthread_cond_wait(&jobs->wake, &jobs->lock);
        }
        if (!next) break;
        next->attempts++;
        next->progress = 0, next->eta = -1;
        job_set_status(jobs, next, LQ_JOB_RUNNING, next->attempts > 1 ? "resumed" : NULL);
        pthread_mutex_unlock(&jobs->lock);
        run_job(jobs, next);
        pthread_mutex_lock(&jobs->lock);
    }
    pthread_mutex_unlock(&jobs->lock);
    return NULL;
}

/* ---------- the table ---------- */

static int table_add(struct lq_jobs *jobs, struct job *job) {
    if (jobs->count == jobs->capacity) {
        size_t capacity = jobs->capacity ? jobs->capacity * 2 : 16;
        struct job **grown = realloc(jobs->jobs, capacity * sizeof *grown);
        if (!grown) return LQ_ENOMEM;
        jobs->jobs = grown, jobs->capacity = capacity;
    }
    jobs->jobs[jobs->count++] = job;
    return LQ_OK;
}

static struct job *table_find(struct lq_jobs *jobs, const char *id) {
    for (size_t i = 0; i < jobs->count; i++)
        if (strcmp(jobs->jobs[i]->id, id) == 0) return jobs->jobs[i];
    return NULL;
}

static void job_free(struct job *job) {
    if (!job) return;
    cJSON_Delete(job->result);
    free(job);
}

/* A weighted compress job's calibration text, linked into its directory at submission (so
 * that deleting the upload does not break a resume). */
static int fisher_prepare(struct lq_job_spec *spec, const char *dir, struct lq_error *err) {
    struct lq_fisher_job_spec *f = &spec->fisher;
    if (mkdir(dir, 0700) != 0 && errno != EEXIST)
        return lq_error_set(err, LQ_EIO, "cannot create %s: %s", dir, strerror(errno));
    int rc = lq_job_link_upload(f->path, dir, "fisher_file", f->file, f->path, sizeof f->path, err);
    if (rc) remove_tree(dir);
    return rc;
}

static void new_id(char *id, size_t size) {
    unsigned char bytes[8] = {0};
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd < 0 || read(fd, bytes, sizeof bytes) != (ssize_t)sizeof bytes) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        unsigned long long mix =
            (unsigned long long)now.tv_nsec ^ ((unsigned long long)getpid() << 32);
        memcpy(bytes, &mix, sizeof bytes);
    }
    if (fd >= 0) close(fd);
    snprintf(id, size, "job-");
    for (size_t i = 0; i < sizeof bytes; i++)
        snprintf(id + 4 + 2 * i, size - 4 - 2 * i, "%02x", bytes[i]);
}

int lq_jobs_submit(struct lq_jobs *jobs, const struct lq_job_spec *spec, cJSON **record,
                   struct lq_error *err) {
    struct job *job = calloc(1, sizeof *job);
    if (!job) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    job->spec = *spec;
    if (spec->type == LQ_JOB_COMPRESS && jobs->options.compress_launcher)
        snprintf(job->launcher, sizeof job->launcher, "%s", jobs->options.compress_launcher);
    job->created_at = unix_now();
    job->eta = -1;
    atomic_init(&job->cancel, 0);
    struct stat info;
    if (spec->type == LQ_JOB_FINETUNE) {
        char state[PATH_MAX];
        if (!realpath(jobs->options.state_dir, state))
            snprintf(state, sizeof state, "%s", jobs->options.state_dir);
        snprintf(job->spec.output, sizeof job->spec.output, "%.*s/adapters/%s/%s", PATH_MAX / 2,
                 state, spec->model, spec->name);
        if (lstat(job->spec.output, &info) == 0) {
            int rc = lq_error_set(err, LQ_EINVAL, "the adapter '%s' of '%s' already exists (%s)",
                                  spec->name, spec->model, job->spec.output);
            free(job);
            return rc;
        }
    }
    pthread_mutex_lock(&jobs->lock);
    for (size_t i = 0; i < jobs->count; i++)
        if (!finished(jobs->jobs[i]->status) &&
            strcmp(jobs->jobs[i]->spec.output, job->spec.output) == 0) {
            int rc = lq_error_set(err, LQ_EINVAL, "job %s is already writing %s", jobs->jobs[i]->id,
                                  job->spec.output);
            pthread_mutex_unlock(&jobs->lock);
            free(job);
            return rc;
        }
    do new_id(job->id, sizeof job->id);
    while (table_find(jobs, job->id));
    if (spec->type == LQ_JOB_FINETUNE || spec->fisher.file[0]) {
        char dir[PATH_MAX + 64];
        job_dir(jobs, job->id, dir, sizeof dir);
        int rc = spec->type == LQ_JOB_FINETUNE ? lq_job_finetune_prepare(&job->spec, dir, err)
                                               : fisher_prepare(&job->spec, dir, err);
        if (rc) {
            pthread_mutex_unlock(&jobs->lock);
            free(job);
            return rc;
        }
    }
    if (table_add(jobs, job)) {
        pthread_mutex_unlock(&jobs->lock);
        free(job);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    job_set_status(jobs, job, LQ_JOB_QUEUED, NULL);
    if (record) *record = job_json(job);
    pthread_cond_signal(&jobs->wake);
    pthread_mutex_unlock(&jobs->lock);
    return LQ_OK;
}

cJSON *lq_jobs_get(struct lq_jobs *jobs, const char *id) {
    pthread_mutex_lock(&jobs->lock);
    struct job *job = table_find(jobs, id);
    cJSON *r = job ? job_json(job) : NULL;
    pthread_mutex_unlock(&jobs->lock);
    return r;
}

cJSON *lq_jobs_list(struct lq_jobs *jobs) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(root, "data");
    pthread_mutex_lock(&jobs->lock);
    for (size_t i = 0; i < jobs->count; i++) cJSON_AddItemToArray(data, job_json(jobs->jobs[i]));
    pthread_mutex_unlock(&jobs->lock);
    return root;
}

int lq_jobs_cancel(struct lq_jobs *jobs, const char *id, cJSON **record, struct lq_error *err) {
    pthread_mutex_lock(&jobs->lock);
    struct job *job = table_find(jobs, id);
    int rc = LQ_OK;
    if (!job) {
        rc = lq_error_set(err, LQ_ENOTFOUND, "the job '%s' does not exist", id);
    } else if (finished(job->status)) {
        rc = lq_error_set(err, LQ_EINVAL, "the job '%s' has already %s", id,
                          status_names[job->status]);
    } else {
        atomic_store(&job->cancel, 1);
        if (job->status == LQ_JOB_QUEUED) {
            remove_partial(job->spec.output);
            if (job->spec.type == LQ_JOB_FINETUNE || job->spec.fisher.file[0]) {
                char dir[PATH_MAX + 64];
                job_dir(jobs, job->id, dir, sizeof dir);
                lq_job_finetune_discard(dir);
            }
            job_set_status(jobs, job, LQ_JOB_CANCELLED, "cancelled before it ran");
        } else {
            cJSON *e = cJSON_CreateObject();
            cJSON_AddStringToObject(e, "message", "cancel requested");
            event_append(jobs, job, "cancel_requested", e);
        }
    }
    if (job && record) *record = job_json(job);
    pthread_mutex_unlock(&jobs->lock);
    return rc;
}

int lq_jobs_events_path(struct lq_jobs *jobs, const char *id, char *path, size_t size) {
    pthread_mutex_lock(&jobs->lock);
    struct job *job = table_find(jobs, id);
    if (job) snprintf(path, size, "%s/%s.events.jsonl", jobs->dir, job->id);
    pthread_mutex_unlock(&jobs->lock);
    return job ? LQ_OK : LQ_ENOTFOUND;
}

cJSON *lq_jobs_events(struct lq_jobs *jobs, const char *id) {
    char path[PATH_MAX + 64];
    if (lq_jobs_events_path(jobs, id, path, sizeof path)) return NULL;
    cJSON *events = cJSON_CreateArray();
    char *text = NULL;
    size_t length = 0;
    pthread_mutex_lock(&jobs->lock); /* no event is half-appended while we read */
    int rc = lq_file_read_all(path, 64u << 20, &text, &length, NULL);
    pthread_mutex_unlock(&jobs->lock);
    if (rc) return events;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        cJSON *event = lq_json_parse(line, strlen(line));
        if (event) cJSON_AddItemToArray(events, event);
    }
    free(text);
    return events;
}

int lq_jobs_finished(struct lq_jobs *jobs, const char *id) {
    pthread_mutex_lock(&jobs->lock);
    struct job *job = table_find(jobs, id);
    int rc = job ? finished(job->status) || atomic_load(&jobs->stopped) : -1;
    pthread_mutex_unlock(&jobs->lock);
    return rc;
}

void lq_jobs_count(struct lq_jobs *jobs, int *counts) {
    for (int s = 0; s < LQ_JOB_STATUS_COUNT; s++) counts[s] = 0;
    pthread_mutex_lock(&jobs->lock);
    for (size_t i = 0; i < jobs->count; i++) counts[jobs->jobs[i]->status]++;
    pthread_mutex_unlock(&jobs->lock);
}

/* ---------- start and stop ---------- */

static const char *json_string(const cJSON *object, const char *key) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, key);
    return cJSON_IsString(item) ? item->valuestring : "";
}

static double json_number(const cJSON *object, const char *key, double otherwise) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, key);
    return cJSON_IsNumber(item) ? item->valuedouble : otherwise;
}

static long count_lines(const char *path) {
    FILE *file = fopen(path, "r");
    long lines = 0;
    int c;
    while (file && (c = getc(file)) != EOF) lines += c == '\n';
    if (file) fclose(file);
    return lines;
}

/* A job from its record; NULL when the record is unreadable (logged, left in place). */
static struct job *job_read(struct lq_jobs *jobs, const char *path) {
    char *text = NULL;
    size_t length = 0;
    struct lq_error err = {0};
    if (lq_file_read_all(path, 16u << 20, &text, &length, &err)) return NULL;
    cJSON *r = lq_json_parse(text, length);
    free(text);
    const cJSON *request = cJSON_GetObjectItemCaseSensitive(r, "request");
    struct job *job = calloc(1, sizeof *job);
    int status = -1;
    for (int s = 0; r && s < LQ_JOB_STATUS_COUNT; s++)
        if (strcmp(json_string(r, "status"), status_names[s]) == 0) status = s;
    if (!job || !cJSON_IsObject(request) || status < 0 || !json_string(r, "id")[0]) {
        lq_log(LQ_LOG_WARN, "unreadable job record ignored", LQ_LOG_STR("path", path));
        cJSON_Delete(r);
        free(job);
        return NULL;
    }
    snprintf(job->id, sizeof job->id, "%s", json_string(r, "id"));
    struct lq_job_spec *s = &job->spec;
    snprintf(s->model, sizeof s->model, "%s", json_string(request, "model"));
    snprintf(s->source, sizeof s->source, "%s", json_string(request, "source"));
    snprintf(s->output, sizeof s->output, "%s", json_string(request, "output"));
    snprintf(s->configs, sizeof s->configs, "%s", json_string(request, "configs"));
    snprintf(s->name, sizeof s->name, "%s", json_string(request, "name"));
    s->target_bits = json_number(request, "target_bits", 0);
    s->rank = (int)json_number(request, "rank", 0);
    s->iters = (int)json_number(request, "iters", 20);
    s->seed = (unsigned long long)json_number(request, "seed", 0);
    s->activate = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(request, "activate"));
    const cJSON *fisher = cJSON_GetObjectItemCaseSensitive(request, "fisher");
    if (cJSON_IsObject(fisher)) {
        snprintf(s->fisher.file, sizeof s->fisher.file, "%s", json_string(fisher, "file"));
        snprintf(s->fisher.filename, sizeof s->fisher.filename, "%s",
                 json_string(fisher, "filename"));
        snprintf(s->fisher.path, sizeof s->fisher.path, "%s", json_string(fisher, "path"));
        s->fisher.samples = (int)json_number(fisher, "samples", 0);
        s->fisher.seq_len = (int)json_number(fisher, "seq_len", 1024);
        s->fisher.seed = (unsigned long long)json_number(fisher, "seed", 0);
    }
    if (strcmp(json_string(request, "type"), "finetune") == 0)
        lq_job_finetune_spec_read(request, s);
    job->status = (enum lq_job_status)status;
    job->created_at = json_number(r, "created_at", 0);
    job->started_at = json_number(r, "started_at", 0);
    job->finished_at = json_number(r, "finished_at", 0);
    job->progress = json_number(r, "progress", 0);
    job->eta = -1;
    job->attempts = (int)json_number(r, "attempts", 0);
    snprintf(job->phase, sizeof job->phase, "%s", json_string(r, "phase"));
    snprintf(job->launcher, sizeof job->launcher, "%s", json_string(r, "launcher"));
    const cJSON *result = cJSON_GetObjectItemCaseSensitive(r, "result");
    if (cJSON_IsObject(result)) job->result = cJSON_Duplicate(result, 1);
    const cJSON *error = cJSON_GetObjectItemCaseSensitive(r, "error");
    if (cJSON_IsObject(error))
        snprintf(job->error, sizeof job->error, "%s", json_string(error, "message"));
    atomic_init(&job->cancel, 0);
    cJSON_Delete(r);
    char events[PATH_MAX + 64];
    snprintf(events, sizeof events, "%s/%s.events.jsonl", jobs->dir, job->id);
    job->event_seq = count_lines(events);
    return job;
}

static int by_creation(const void *a, const void *b) {
    const struct job *x = *(struct job *const *)a, *y = *(struct job *const *)b;
    return x->created_at < y->created_at ? -1 : x->created_at > y->created_at;
}

static int load_records(struct lq_jobs *jobs) {
    DIR *dir = opendir(jobs->dir);
    if (!dir) return LQ_OK;
    struct dirent *entry;
    int rc = LQ_OK;
    while (!rc && (entry = readdir(dir))) {
        size_t length = strlen(entry->d_name);
        if (length < 6 || strcmp(entry->d_name + length - 5, ".json") != 0 ||
            strncmp(entry->d_name, "job-", 4) != 0)
            continue;
        char path[PATH_MAX * 2];
        snprintf(path, sizeof path, "%s/%s", jobs->dir, entry->d_name);
        struct job *job = job_read(jobs, path);
        if (job && (rc = table_add(jobs, job))) job_free(job);
    }
    closedir(dir);
    if (jobs->count) qsort(jobs->jobs, jobs->count, sizeof *jobs->jobs, by_creation);
    for (size_t i = 0; i < jobs->count; i++) {
        struct job *job = jobs->jobs[i];
        if (job->status == LQ_JOB_RUNNING) {
            /* The daemon died under it: run it again; the error-table rows it finished are
             * cached, so the new run starts about where this one stopped. */
            job->resumed = 1;
            job->phase[0] = '\0';
            job_set_status(jobs, job, LQ_JOB_QUEUED, "resumed after restart");
        } else if (job->status == LQ_JOB_QUEUED) {
            job->resumed = job->attempts > 0;
            event_status(jobs, job, "queued again after restart");
        }
    }
    return rc;
}

int lq_jobs_create(const struct lq_jobs_options *options, struct lq_jobs **out,
                   struct lq_error *err) {
    *out = NULL;
    struct lq_jobs *jobs = calloc(1, sizeof *jobs);
    if (!jobs) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    jobs->options = *options;
    if (jobs->options.max_jobs < 1) jobs->options.max_jobs = 1;
    snprintf(jobs->dir, sizeof jobs->dir, "%s/jobs", options->state_dir);
    if (mkdir(jobs->dir, 0700) && errno != EEXIST) {
        free(jobs);
        return lq_error_set(err, LQ_EIO, "cannot create %s: %s", jobs->dir, strerror(errno));
    }
    pthread_mutex_init(&jobs->lock, NULL);
    pthread_cond_init(&jobs->wake, NULL);
    atomic_init(&jobs->stopping, 0);
    atomic_init(&jobs->stopped, 0);
    int rc = load_records(jobs);
    jobs->workers = calloc((size_t)jobs->options.max_jobs, sizeof *jobs->workers);
    if (rc || !jobs->workers) {
        lq_jobs_free(jobs);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    for (int i = 0; i < jobs->options.max_jobs; i++) {
        if (pthread_create(&jobs->workers[i], NULL, worker_main, jobs)) {
            lq_jobs_free(jobs);
            return lq_error_set(err, LQ_ENOMEM, "cannot start a job worker thread");
        }
        jobs->n_workers++;
    }
    *out = jobs;
    return LQ_OK;
}

void lq_jobs_stop(struct lq_jobs *jobs) {
    pthread_mutex_lock(&jobs->lock);
    atomic_store(&jobs->stopping, 1);
    pthread_cond_broadcast(&jobs->wake);
    pthread_mutex_unlock(&jobs->lock);
    for (int i = 0; i < jobs->n_workers; i++) pthread_join(jobs->workers[i], NULL);
    jobs->n_workers = 0;
    atomic_store(&jobs->stopped, 1);
}

void lq_jobs_free(struct lq_jobs *jobs) {
    if (!jobs) return;
    lq_jobs_stop(jobs);
    free(jobs->workers);
    for (size_t i = 0; i < jobs->count; i++) job_free(jobs->jobs[i]);
    free(jobs->jobs);
    pthread_cond_destroy(&jobs->wake);
    pthread_mutex_destroy(&jobs->lock);
    free(jobs);
}
