/* Finetune jobs of the daemon: what server/jobs.c calls for a job of type "finetune". The job's
 * directory STATE_DIR/jobs/<id>/ holds hard links of its training (and validation) upload,
 * made at submission, and its checkpoint (checkpoint.safetensors + .json); a run that finds
 * the checkpoint continues from it, bit for bit (core/finetune.h). The adapter goes to
 * spec->output = STATE_DIR/adapters/<model>/<adapter>. */
#ifndef LQ_JOB_FINETUNE_H
#define LQ_JOB_FINETUNE_H

#include <stddef.h>

#include "core/error.h"
#include "server/jobs.h"

struct cJSON;

/* How a run talks to the job table (jobs.c implements them under its lock). */
struct lq_job_finetune_hooks {
    void *context;
    int (*stop_requested)(void *context); /* 0: go on, 1: cancelled, 2: the daemon is stopping */
    void (*event)(void *context, const char *type, struct cJSON *extra); /* appends; takes extra */
    void (*progress)(void *context, const char *phase, double progress, double eta_seconds);
};

/* The job's "request" object in its record, and back (model, source, output, name, seed and
 * activate are written under the keys compress jobs use, and read back by jobs.c). */
struct cJSON *lq_job_finetune_spec_json(const struct lq_job_spec *spec);
void lq_job_finetune_spec_read(const struct cJSON *request, struct lq_job_spec *spec);

/* At submission: creates job_dir and links the uploads into it (copying when a link is not
 * possible), pointing spec's data paths there. LQ_ENOTFOUND when an upload is gone. */
int lq_job_finetune_prepare(struct lq_job_spec *spec, const char *job_dir, struct lq_error *err);
/* Hard-links the upload at source (id: its name in messages) to job_dir/name (copying when a
 * link is not possible) and sets path to it; job_dir must exist. LQ_ENOTFOUND when the upload
 * is gone. Compress jobs link their Fisher calibration text with it too. */
int lq_job_link_upload(const char *source, const char *job_dir, const char *name, const char *id,
                       char *path, size_t size, struct lq_error *err);
/* Removes job_dir and what it holds. */
void lq_job_finetune_discard(const char *job_dir);

/* Runs (or resumes) the job: trains on the CPU, writes the adapter (replacing spec->output
 * only when resumed, since an earlier attempt may have written it), hands it to
 * options->adapter_ready. Returns the status to record: SUCCEEDED (*result set), FAILED (err),
 * CANCELLED, or QUEUED when the daemon is stopping (checkpoint saved: the next start resumes).
 * job_dir is removed unless QUEUED. */
enum lq_job_status lq_job_finetune_run(const struct lq_job_spec *spec, const char *job_dir,
                                       const struct lq_jobs_options *options, int resumed,
                                       const struct lq_job_finetune_hooks *hooks,
                                       struct cJSON **result, struct lq_error *err);

#endif
