#include "server/metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/error.h"

#define MAX_BUCKETS 16
#define MAX_REQUEST_SERIES 256 /* routes x methods x statuses: a few dozen in practice */
#define MAX_REJECT_REASONS 8

/* A Prometheus histogram: cumulative only when rendered, so observing is one atomic increment
 * of one bucket plus the count and sum. The sum is a double kept as its bit pattern. */
struct histogram {
    const char *name, *help;
    size_t n_bounds;
    double bounds[MAX_BUCKETS];
    atomic_ullong buckets[MAX_BUCKETS + 1]; /* the last is +Inf */
    atomic_ullong count;
    _Atomic uint64_t sum_bits;
};

struct request_series {
    const char *route, *method;
    int status;
    unsigned long long count;
};

struct lq_metrics {
    pthread_mutex_t lock; /* guards requests[] and rejected[] */
    struct request_series requests[MAX_REQUEST_SERIES];
    size_t n_requests;
    struct {
        const char *reason;
        unsigned long long count;
    } rejected[MAX_REJECT_REASONS];
    size_t n_rejected;
    atomic_ullong prompt_tokens, completion_tokens, sequences;
    struct histogram first_token, token_interval, request_duration;
    time_t started;
};

static void histogram_init(struct histogram *h, const char *name, const char *help,
                           const double *bounds, size_t n_bounds) {
    h->name = name, h->help = help, h->n_bounds = n_bounds;
    memcpy(h->bounds, bounds, n_bounds * sizeof *bounds);
    for (size_t i = 0; i <= MAX_BUCKETS; i++) atomic_init(&h->buckets[i], 0);
    atomic_init(&h->count, 0);
    atomic_init(&h->sum_bits, 0); /* +0.0 */
}

static void histogram_observe(struct histogram *h, double value) {
    if (!isfinite(value) || value < 0) value = 0;
    size_t bucket = 0;
    while (bucket < h->n_bounds && value > h->bounds[bucket]) bucket++;
    atomic_fetch_add(&h->buckets[bucket], 1);
    uint64_t old_bits = atomic_load(&h->sum_bits), new_bits;
    do {
        double sum;
        memcpy(&sum, &old_bits, sizeof sum);
        sum += value;
        memcpy(&new_bits, &sum, sizeof sum);
    } while (!atomic_compare_exchange_weak(&h->sum_bits, &old_bits, new_bits));
    atomic_fetch_add(&h->count, 1);
}

int lq_metrics_create(struct lq_metrics **out) {
    struct lq_metrics *m = calloc(1, sizeof *m);
    if (!m) return LQ_ENOMEM;
    pthread_mutex_init(&m->lock, NULL);
    atomic_init(&m->prompt_tokens, 0);
    atomic_init(&m->completion_tokens, 0);
    atomic_init(&m->sequences, 0);
    /* Bounds cover a tiny CPU model (sub-millisecond tokens) up to a large one under load. */
    static const double first_token[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                         0.25,  0.5,    1,     2.5,  5,     10,   30};
    static const double interval[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                      0.025,  0.05,    0.1,    0.25,  0.5,    1,     2.5};
    static const double duration[] = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                      0.5,   1,     2.5,  5,     10,   30,  120};
    histogram_init(&m->first_token, "lqd_time_to_first_token_seconds",
                   "Time from a generation request's arrival to its first generated text.",
                   first_token, sizeof first_token / sizeof first_token[0]);
    histogram_init(&m->token_interval, "lqd_time_per_output_token_seconds",
                   "Time between consecutive generated tokens of a sequence.", interval,
                   sizeof interval / sizeof interval[0]);
    histogram_init(&m->request_duration, "lqd_http_request_duration_seconds",
                   "Time from a request's arrival to the end of its response.", duration,
                   sizeof duration / sizeof duration[0]);
    m->started = time(NULL);
    *out = m;
    return LQ_OK;
}

void lq_metrics_free(struct lq_metrics *metrics) {
    if (!metrics) return;
    pthread_mutex_destroy(&metrics->lock);
    free(metrics);
}

void lq_metrics_count_request(struct lq_metrics *m, const char *route, const char *method,
                              int status, double seconds) {
    histogram_observe(&m->request_duration, seconds);
    pthread_mutex_lock(&m->lock);
    size_t i = 0;
    while (i < m->n_requests &&
           !(m->requests[i].status == status && strcmp(m->requests[i].route, route) == 0 &&
             strcmp(m->requests[i].method, method) == 0))
        i++;
    if (i == m->n_requests && m->n_requests < MAX_REQUEST_SERIES) {
        m->requests[i] = (struct request_series){route, method, status, 0};
        m->n_requests++;
    }
    if (i < m->n_requests) m->requests[i].count++;
    pthread_mutex_unlock(&m->lock);
}

void lq_metrics_count_tokens(struct lq_metrics *m, long long prompt, long long completion) {
    if (prompt > 0) atomic_fetch_add(&m->prompt_tokens, (unsigned long long)prompt);
    if (completion > 0) atomic_fetch_add(&m->completion_tokens, (unsigned long long)completion);
    atomic_fetch_add(&m->sequences, 1);
}

void lq_metrics_observe_first_token(struct lq_metrics *m, double seconds) {
    histogram_observe(&m->first_token, seconds);
}

void lq_metrics_observe_token_interval(struct lq_metrics *m, double seconds) {
    histogram_observe(&m->token_interval, seconds);
}

void lq_metrics_count_rejected(struct lq_metrics *m, const char *reason) {
    pthread_mutex_lock(&m->lock);
    size_t i = 0;
    while (i < m->n_rejected && strcmp(m->rejected[i].reason, reason) != 0) i++;
    if (i == m->n_rejected && m->n_rejected < MAX_REJECT_REASONS) {
        m->rejected[i].reason = reason, m->rejected[i].count = 0;
        m->n_rejected++;
    }
    if (i < m->n_rejected) m->rejected[i].count++;
    pthread_mutex_unlock(&m->lock);
}

/* Label values are escaped as the exposition format asks: backslash, quote, newline. */
static void write_label_value(FILE *out, const char *value) {
    for (; *value; value++) {
        if (*value == '\\' || *value == '"')
            fprintf(out, "\\%c", *value);
        else if (*value == '\n')
            fputs("\\n", out);
        else
            fputc(*value, out);
    }
}

static void header(FILE *out, const char *name, const char *type, const char *help) {
    fprintf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void write_histogram(FILE *out, struct histogram *h) {
    header(out, h->name, "histogram", h->help);
    unsigned long long cumulative = 0;
    for (size_t i = 0; i <= h->n_bounds; i++) {
        cumulative += atomic_load(&h->buckets[i]);
        if (i < h->n_bounds)
            fprintf(out, "%s_bucket{le=\"%g\"} %llu\n", h->name, h->bounds[i], cumulative);
        else
            fprintf(out, "%s_bucket{le=\"+Inf\"} %llu\n", h->name, cumulative);
    }
    uint64_t bits = atomic_load(&h->sum_bits);
    double sum;
    memcpy(&sum, &bits, sizeof sum);
    /* Count and buckets are read a moment apart; report the buckets' total as the count so
     * that the +Inf bucket always equals it, as scrapers check. */
    fprintf(out, "%s_sum %.9g\n%s_count %llu\n", h->name, sum, h->name, cumulative);
}

char *lq_metrics_render(struct lq_metrics *m, const struct lq_metrics_gauges *g, size_t *length) {
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    if (!out) return NULL;
    header(out, "lqd_http_requests_total", "counter", "HTTP requests by route, method and status.");
    pthread_mutex_lock(&m->lock);
    for (size_t i = 0; i < m->n_requests; i++) {
        fputs("lqd_http_requests_total{route=\"", out);
        write_label_value(out, m->requests[i].route);
        fprintf(out, "\",method=\"%s\",status=\"%d\"} %llu\n", m->requests[i].method,
                m->requests[i].status, m->requests[i].count);
    }
    header(out, "lqd_requests_rejected_total", "counter",
           "Generation requests refused before running, by reason.");
    for (size_t i = 0; i < m->n_rejected; i++)
        fprintf(out, "lqd_requests_rejected_total{reason=\"%s\"} %llu\n", m->rejected[i].reason,
                m->rejected[i].count);
    pthread_mutex_unlock(&m->lock);
    write_histogram(out, &m->request_duration);
    header(out, "lqd_prompt_tokens_total", "counter", "Prompt tokens of finished sequences.");
    fprintf(out, "lqd_prompt_tokens_total %llu\n", atomic_load(&m->prompt_tokens));
    header(out, "lqd_completion_tokens_total", "counter", "Tokens generated.");
    fprintf(out, "lqd_completion_tokens_total %llu\n", atomic_load(&m->completion_tokens));
    header(out, "lqd_sequences_finished_total", "counter", "Sequences finished (any reason).");
    fprintf(out, "lqd_sequences_finished_total %llu\n", atomic_load(&m->sequences));
    write_histogram(out, &m->first_token);
    write_histogram(out, &m->token_interval);
    header(out, "lqd_queue_depth", "gauge", "Requests waiting for the scheduler.");
    fprintf(out, "lqd_queue_depth %d\n", g->queued);
    header(out, "lqd_running_sequences", "gauge", "Sequences being decoded.");
    fprintf(out, "lqd_running_sequences %d\n", g->running);
    header(out, "lqd_admissions_deferred_total", "counter",
           "Scheduler steps at which the request at the head of the queue could not start: its "
           "KV cache did not fit the device's memory while other sequences ran.");
    fprintf(out, "lqd_admissions_deferred_total %llu\n", g->deferred);
    header(out, "lqd_draining", "gauge", "1 while the daemon drains before exiting.");
    fprintf(out, "lqd_draining %d\n", g->draining ? 1 : 0);
    header(out, "lqd_models_loaded", "gauge", "Models being served.");
    fprintf(out, "lqd_models_loaded %zu\n", g->n_models);
    header(out, "lqd_model_memory_bytes", "gauge", "Memory the weights of each model need.");
    for (size_t i = 0; i < g->n_models; i++) {
        fputs("lqd_model_memory_bytes{model=\"", out);
        write_label_value(out, g->models[i].name);
        fprintf(out, "\"} %zu\n", g->models[i].memory_bytes);
    }
    header(out, "lqd_model_bits_per_param", "gauge",
           "Average bits per parameter of each model's quantized part (0 when dense).");
    for (size_t i = 0; i < g->n_models; i++) {
        fputs("lqd_model_bits_per_param{model=\"", out);
        write_label_value(out, g->models[i].name);
        fprintf(out, "\"} %.6g\n", g->models[i].bits_per_param);
    }
    header(out, "lqd_jobs", "gauge", "Background jobs (POST /v1/jobs) by status.");
    static const char *const job_statuses[5] = {"queued", "running", "succeeded", "failed",
                                                "cancelled"};
    for (int i = 0; i < 5; i++)
        fprintf(out, "lqd_jobs{status=\"%s\"} %d\n", job_statuses[i], g->jobs[i]);
    if (g->device) {
        const struct lq_backend_memory *d = &g->device_memory;
        header(out, "lqd_device_memory_bytes", "gauge",
               "Memory the compute device holds for lqd, by purpose.");
        const struct {
            const char *purpose;
            size_t bytes;
        } rows[] = {{"weights", d->weights},
                    {"kv_and_activations", d->buffers},
                    {"workspace", d->scratch},
                    {"jobs", d->jobs}};
        for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
            fprintf(out, "lqd_device_memory_bytes{device=\"%s\",purpose=\"%s\"} %zu\n", g->device,
                    rows[i].purpose, rows[i].bytes);
        header(out, "lqd_device_memory_limit_bytes", "gauge",
               "Most device memory lqd may take (0: no limit, the CPU).");
        fprintf(out, "lqd_device_memory_limit_bytes{device=\"%s\"} %zu\n", g->device, d->limit);
        if (d->device_total) {
            header(out, "lqd_device_memory_free_bytes", "gauge", "Free memory on the GPU.");
            fprintf(out, "lqd_device_memory_free_bytes{device=\"%s\"} %zu\n", g->device,
                    d->device_free);
        }
    }
    header(out, "lqd_start_time_seconds", "gauge", "Unix time the daemon started.");
    fprintf(out, "lqd_start_time_seconds %lld\n", (long long)m->started);
    if (fclose(out) != 0) {
        free(text);
        return NULL;
    }
    *length = size;
    return text;
}
