/* Background jobs of the daemon (compress and finetune): a table of jobs, each a record in
 * STATE_DIR/jobs/<id>.json (rewritten atomically at every change of state and about once a
 * second while it runs) and an event log STATE_DIR/jobs/<id>.events.jsonl (appended). A fixed
 * pool of worker threads runs the queued jobs, oldest first; the HTTP threads only submit,
 * read and cancel. Records outlive the process: a job found queued at start is queued again,
 * one found running (the daemon died under it) is resumed, cheaply, since the error-table rows
 * it finished are cached (compress) or from its last checkpoint in STATE_DIR/jobs/<id>/
 * (finetune, which also keeps a hard link of its data there, as a Fisher-weighted compress job
 * does of its calibration text). With lq_jobs_options.compress_launcher a compress job runs as
 * "<launcher> lqd compress ..." child processes instead (server/job_launcher.h). */
#ifndef LQ_JOBS_H
#define LQ_JOBS_H

#include <limits.h>
#include <stddef.h>

#include "core/error.h"
#include "server/registry.h"

struct cJSON;
struct lq_jobs;

enum lq_job_status {
    LQ_JOB_QUEUED,
    LQ_JOB_RUNNING,
    LQ_JOB_SUCCEEDED,
    LQ_JOB_FAILED,
    LQ_JOB_CANCELLED,
    LQ_JOB_STATUS_COUNT
};
const char *lq_job_status_name(enum lq_job_status status); /* "queued", ... */

struct lq_jobs_options {
    const char *state_dir;        /* records go to state_dir/jobs (created) */
    int max_jobs;                 /* jobs running at once (worker threads), >= 1 */
    const char *cache_dir;        /* error-table cache; NULL: lq_compress's default */
    struct lq_registry *registry; /* borrowed: "activate" loads the result into it */
    struct lq_backend *device;    /* borrowed: decomposes on its GPU when it can; NULL: CPU */
    /* Compress jobs run as "<compress_launcher words> <this lqd> compress ..." child processes
     * (server/job_launcher.h), e.g. "mpirun -n 4 --hostfile F"; NULL: in the daemon. */
    const char *compress_launcher;
    /* Called (on the job's worker) by a finetune job that has written its adapter to dir,
     * STATE_DIR/adapters/<model>/<adapter> (PEFT layout, core/adapter.h): hands it to the
     * daemon's adapter registry, activate asking to make it the model's active adapter.
     * Nonzero (err filled) fails the job; the adapter stays on disk. NULL: the job only
     * records the adapter's path in its result. */
    int (*adapter_ready)(void *context, const char *model, const char *adapter, const char *dir,
                         int activate, struct lq_error *err);
    void *adapter_context;
};

enum lq_job_type { LQ_JOB_COMPRESS, LQ_JOB_FINETUNE };
const char *lq_job_type_name(enum lq_job_type type); /* "compress", "finetune" */

/* A finetune job's settings (server/job_finetune.c runs it; core/finetune.h trains). */
struct lq_finetune_job_spec {
    char training_file[40], validation_file[40];   /* upload ids ("" for no validation file) */
    char training_name[256], validation_name[256]; /* their filenames: labels in messages */
    /* The data as linked into the job's directory at submission (so deleting an upload does
     * not break a resume); before submission, the upload's own path. */
    char training_path[PATH_MAX], validation_path[PATH_MAX];
    int format;                 /* enum lq_dataset_format: the upload's */
    double validation_fraction; /* of the training file, when no validation file */
    char init[8];               /* "lq" or "zero" */
    int rank;                   /* zero init: of the new pair */
    long steps;                 /* > 0, else epochs */
    double epochs;
    double learning_rate, weight_decay, max_grad_norm;
    int batch_size, micro_batch, seq_len, warmup;
    char schedule[16];
    int eval_every, checkpoint_every; /* 0: validation before and after; time-based checkpoints */
};

/* A compress job's Fisher weighting (LQ-LoRA §3.3, as lqd compress --fisher): F estimated on the
 * CPU from an uploaded calibration text before the error table. file[0] == '\0': unweighted. */
struct lq_fisher_job_spec {
    char file[40];           /* the upload's id */
    char filename[256];      /* its filename: a label in messages */
    char path[PATH_MAX];     /* the text as linked into the job's directory at submission (before
                                submission, the upload's own path) */
    int samples;             /* sequences drawn (N) */
    int seq_len;             /* tokens per sequence at most, BOS included (capped at the context) */
    unsigned long long seed; /* of the draw */
};

/* A job as validated by the API (server/api_jobs.c): every path already resolved. A finetune
 * job uses model, source (the model's path), output (its adapter directory, set at
 * submission), seed, activate, name (the adapter's name) and finetune. */
struct lq_job_spec {
    enum lq_job_type type;
    char model[72];          /* the served model named by the client */
    char source[PATH_MAX];   /* what is compressed: that model's path */
    char output[PATH_MAX];   /* the LQ directory to create (absolute; must not exist) */
    char configs[4096];      /* grid as lqd compress --configs takes it ("table1", a list) */
    double target_bits;      /* budget, bits/param of the quantized part */
    int rank, iters;         /* rank of L1 L2; decomposition steps */
    unsigned long long seed; /* of the randomized SVDs */
    int activate;            /* load the output into the registry when done */
    char name[72];           /* the name it is loaded under */
    struct lq_fisher_job_spec fisher; /* compress: Fisher weighting, or file "" */
    struct lq_finetune_job_spec finetune;
};

/* Reads the records under state_dir/jobs (queued ones queued again, running ones resumed)
 * and starts the workers. */
int lq_jobs_create(const struct lq_jobs_options *options, struct lq_jobs **out,
                   struct lq_error *err);
/* Stops the workers: a running job is interrupted and left queued, so the next start resumes
 * it. Waits for them (a job stops at its next progress report, a few times a second). The
 * table still answers reads; nothing runs any more. Idempotent. */
void lq_jobs_stop(struct lq_jobs *jobs);
/* Stops (if not yet) and frees. */
void lq_jobs_free(struct lq_jobs *jobs);

/* Queues a job; *record (optional) receives its JSON (the caller frees it). LQ_EINVAL with a
 * message when another unfinished job writes the same output (or a finetune job's adapter
 * exists already); LQ_ENOTFOUND when a finetune job's upload (or a compress job's Fisher
 * calibration file) was deleted meanwhile. */
int lq_jobs_submit(struct lq_jobs *jobs, const struct lq_job_spec *spec, struct cJSON **record,
                   struct lq_error *err);
/* A job's record as JSON (the caller frees it), or NULL for an unknown id. */
struct cJSON *lq_jobs_get(struct lq_jobs *jobs, const char *id);
/* {"object": "list", "data": [records, oldest first]}. */
struct cJSON *lq_jobs_list(struct lq_jobs *jobs);
/* Cancels a queued or running job (a running one stops within seconds and its partial output
 * is removed); *record (optional) receives its JSON. LQ_ENOTFOUND for an unknown id, LQ_EINVAL
 * when the job has already finished. */
int lq_jobs_cancel(struct lq_jobs *jobs, const char *id, struct cJSON **record,
                   struct lq_error *err);
/* The events so far as a JSON array (the caller frees it), or NULL for an unknown id. */
struct cJSON *lq_jobs_events(struct lq_jobs *jobs, const char *id);
/* The path of a job's event log; 0, or LQ_ENOTFOUND for an unknown id. */
int lq_jobs_events_path(struct lq_jobs *jobs, const char *id, char *path, size_t size);
/* 1 when the job has ended (succeeded, failed, cancelled) or the table is stopped (it will not
 * change any more), 0 when not, -1 for an unknown id. */
int lq_jobs_finished(struct lq_jobs *jobs, const char *id);
/* Jobs by status (counts[LQ_JOB_STATUS_COUNT]). */
void lq_jobs_count(struct lq_jobs *jobs, int *counts);

#endif
