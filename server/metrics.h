/* The daemon's counters and histograms, and their Prometheus text exposition (format 0.0.4).
 * Every observe/count function is safe from any thread and never blocks for long: histograms
 * are atomic counters, so the scheduler's callbacks may observe latencies directly. */
#ifndef LQ_METRICS_H
#define LQ_METRICS_H

#include "kernels/backend.h"

#include <stddef.h>

struct lq_metrics;

int lq_metrics_create(struct lq_metrics **out); /* 0 or LQ_ENOMEM */
void lq_metrics_free(struct lq_metrics *metrics);

/* One HTTP request finished: route is the matched route's pattern ("/v1/models/{id}") or
 * "unmatched", so that label values stay few; method one of GET, POST, HEAD, or "OTHER". */
void lq_metrics_count_request(struct lq_metrics *metrics, const char *route, const char *method,
                              int status, double seconds);
/* Generation: prompt and completion tokens of a finished sequence. */
void lq_metrics_count_tokens(struct lq_metrics *metrics, long long prompt, long long completion);
/* Time from the request's arrival to its first generated text. */
void lq_metrics_observe_first_token(struct lq_metrics *metrics, double seconds);
/* Time between consecutive generated tokens of one sequence. */
void lq_metrics_observe_token_interval(struct lq_metrics *metrics, double seconds);
/* A request refused before it ran: reason "queue_full", "draining", "timeout", ... (a static
 * string). */
void lq_metrics_count_rejected(struct lq_metrics *metrics, const char *reason);

/* What is read at scrape time rather than counted. */
struct lq_metrics_model {
    const char *name;
    size_t memory_bytes;
    double bits_per_param;
};
struct lq_metrics_gauges {
    int queued, running;
    unsigned long long deferred; /* the scheduler's count (struct lq_scheduler_stats) */
    int draining;
    const struct lq_metrics_model *models;
    size_t n_models;
    /* Background jobs by status, in the order of enum lq_job_status (server/jobs.h):
     * queued, running, succeeded, failed, cancelled. */
    int jobs[5];
    /* What the compute device holds (kernels/backend.h), and its name ("cpu", "cuda"). */
    struct lq_backend_memory device_memory;
    const char *device;
};

/* The exposition text, malloc'ed (the caller frees it). NULL when out of memory. */
char *lq_metrics_render(struct lq_metrics *metrics, const struct lq_metrics_gauges *gauges,
                        size_t *length);

#endif
