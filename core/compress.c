/* lq_compress: the error table, the allocation and the final decompositions over a pool of
 * worker threads (and other processes, options->remote). What one cell of the table is, and
 * the grid's parsing, live in compress_grid.c. */
#include "compress.h"

#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "error_table.h"
#include "ilp.h"
#include "lq.h"
#include "parallel.h"

/* ---------- the work shared by the worker threads ---------- */

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Round-trip formatting, so that a printed minimum budget, pasted back, is feasible. */
static void format_exact(char *buffer, size_t size, double value) {
    for (int decimals = 6; decimals <= 20; decimals++) {
        snprintf(buffer, size, "%.*f", decimals, value);
        if (strtod(buffer, NULL) == value) return;
    }
}

struct matrix_ref {
    const float *w;
    size_t rows, cols;
    char name[128];
};

struct job {
    const struct lq_compress_options *options;
    const struct lq_nf_config *grid;
    size_t n_configs, n_matrices;
    const struct matrix_ref *matrices;

    pthread_mutex_t lock;
    pthread_cond_t wake; /* a row finished, or a worker exited */
    /* Under lock: */
    size_t next_task, task_count, tasks_done;
    int workers_running, stop, rc;
    struct lq_error err;

    /* Table phase (cells written under lock). */
    struct lq_error_table table;
    const size_t *pending_rows; /* the rows to compute, in order */
    size_t *row_remaining;
    int save_pending;

    /* Final phase: results, one slot per matrix (written by the one task that owns it). */
    const int *choice;
    struct lq_linear *out;
    double *final_error;

    int (*run)(struct job *job, size_t task, struct lq_error *err);
    size_t task_stride; /* tasks one run() call covers (a table row on a device), else 1 */

    /* Other processes (options->remote): the phase as offered to them. */
    const uint64_t *matrix_hash;
    const size_t *matrix_numel;
    struct lq_compress_phase_work remote_work;
};

static struct lq_backend *device_of(const struct job *job) {
    return lq_compress_device(job->options);
}

static const float *fisher_of(const struct job *job, size_t matrix) {
    return job->options->fisher ? job->options->fisher[matrix] : NULL;
}

static int decompose_cell(const struct job *job, size_t matrix, size_t config,
                          struct lq_decomposition *d, struct lq_error *err) {
    const struct matrix_ref *m = &job->matrices[matrix];
    return lq_compress_decompose_cell(job->options, m->w, m->rows, m->cols, matrix, m->name,
                                      &job->grid[config], fisher_of(job, matrix), d, err);
}

static int run_table_cell(struct job *job, size_t task, struct lq_error *err) {
    size_t row = job->pending_rows[task / job->n_configs], config = task % job->n_configs;
    struct lq_decomposition d;
    int rc = decompose_cell(job, row, config, &d, err);
    if (rc) return rc;
    double cost = d.error * d.error; /* the paper's cost: squared absolute Frobenius error */
    lq_decomposition_free(&d);
    pthread_mutex_lock(&job->lock);
    job->table.cost[row * job->n_configs + config] = cost;
    if (--job->row_remaining[row] == 0) {
        job->table.done[row] = 1;
        job->save_pending = 1;
        pthread_cond_signal(&job->wake);
    }
    pthread_mutex_unlock(&job->lock);
    return LQ_OK;
}

/* A whole row of the table in one device call (the matrix is uploaded once). */
static int run_table_row(struct job *job, size_t task, struct lq_error *err) {
    size_t row = job->pending_rows[task / job->n_configs];
    const struct matrix_ref *m = &job->matrices[row];
    size_t G = job->n_configs;
    double *costs = malloc(G * sizeof *costs);
    if (!costs) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    int rc = lq_compress_table_costs(job->options, m->w, m->rows, m->cols, row, m->name, job->grid,
                                     G, fisher_of(job, row), costs, err);
    if (!rc) {
        pthread_mutex_lock(&job->lock);
        memcpy(job->table.cost + row * G, costs, G * sizeof *costs);
        job->table.done[row] = 1;
        job->save_pending = 1;
        /* the pool counts a task as one cell: the row's other cells are done too */
        job->tasks_done += G - 1;
        pthread_cond_signal(&job->wake);
        pthread_mutex_unlock(&job->lock);
    }
    free(costs);
    return rc;
}

/* Moves a final decomposition into the output linear; call with d owned by the caller. */
static void store_final(struct job *job, size_t matrix, struct lq_decomposition *d) {
    struct lq_linear *linear = &job->out[matrix];
    linear->rows = (int)d->rows, linear->cols = (int)d->cols;
    linear->is_lq = 1;
    linear->q = d->Q; /* ownership moves to the linear */
    linear->rank = d->rank;
    if (d->rank > 0) {
        linear->lora_A = d->L2, linear->lora_B = d->L1;
    } else {
        free(d->L1), free(d->L2);
    }
    job->final_error[matrix] = d->error * d->error;
    free(d->history);
    memset(d, 0, sizeof *d);
}

static int run_final_matrix(struct job *job, size_t matrix, struct lq_error *err) {
    struct lq_decomposition d;
    int rc = decompose_cell(job, matrix, (size_t)job->choice[matrix], &d, err);
    if (rc) return rc;
    store_final(job, matrix, &d);
    return LQ_OK;
}

/* ---------- the phase offered to other processes (options->remote) ---------- */

static int remote_take(struct lq_compress_phase_work *w, size_t max_cells,
                       struct lq_compress_item *item) {
    struct job *job = w->internal;
    int taken = 0;
    pthread_mutex_lock(&job->lock);
    if (!job->stop && job->next_task < job->task_count) {
        size_t task = job->next_task;
        if (w->phase == LQ_COMPRESS_TABLE) {
            size_t G = job->n_configs, config = task % G, count = G - config;
            /* a device row (stride G) stays whole: the local workers take rows too */
            if (job->task_stride == 1 && max_cells > 0 && max_cells < count) count = max_cells;
            item->matrix = job->pending_rows[task / G];
            item->config_begin = config, item->config_end = config + count;
            job->next_task += count;
        } else {
            item->matrix = task;
            item->config_begin = (size_t)job->choice[task];
            item->config_end = item->config_begin + 1;
            job->next_task++;
        }
        taken = 1;
    }
    pthread_mutex_unlock(&job->lock);
    return taken;
}

static void remote_table_result(struct lq_compress_phase_work *w,
                                const struct lq_compress_item *item, const double *costs) {
    struct job *job = w->internal;
    size_t G = job->n_configs, count = item->config_end - item->config_begin;
    pthread_mutex_lock(&job->lock);
    memcpy(job->table.cost + item->matrix * G + item->config_begin, costs, count * sizeof *costs);
    job->row_remaining[item->matrix] -= count;
    if (job->row_remaining[item->matrix] == 0) {
        job->table.done[item->matrix] = 1;
        job->save_pending = 1;
    }
    job->tasks_done += count;
    pthread_cond_signal(&job->wake);
    pthread_mutex_unlock(&job->lock);
}

static void remote_final_result(struct lq_compress_phase_work *w, size_t matrix,
                                struct lq_decomposition *d) {
    struct job *job = w->internal;
    store_final(job, matrix, d); /* the slot is this item's alone */
    pthread_mutex_lock(&job->lock);
    job->tasks_done++;
    pthread_cond_signal(&job->wake);
    pthread_mutex_unlock(&job->lock);
}

static void remote_fail(struct lq_compress_phase_work *w, int rc, const struct lq_error *err) {
    struct job *job = w->internal;
    pthread_mutex_lock(&job->lock);
    if (!job->rc) job->rc = rc, job->err = *err;
    job->stop = 1;
    pthread_cond_signal(&job->wake);
    pthread_mutex_unlock(&job->lock);
}

static int remote_stopping(struct lq_compress_phase_work *w) {
    struct job *job = w->internal;
    pthread_mutex_lock(&job->lock);
    int stop = job->stop;
    pthread_mutex_unlock(&job->lock);
    return stop;
}

static void *remote_main(void *argument) {
    struct job *job = argument;
    const struct lq_compress_remote *remote = job->options->remote;
    remote->run_phase(remote->context, &job->remote_work);
    pthread_mutex_lock(&job->lock);
    job->workers_running--;
    pthread_cond_signal(&job->wake);
    pthread_mutex_unlock(&job->lock);
    return NULL;
}

static void *worker_main(void *argument) {
    struct job *job = argument;
    struct lq_error err = {0};
    pthread_mutex_lock(&job->lock);
    while (!job->stop && job->next_task < job->task_count) {
        size_t task = job->next_task;
        job->next_task += job->task_stride;
        pthread_mutex_unlock(&job->lock);
        int rc = job->run(job, task, &err);
        pthread_mutex_lock(&job->lock);
        job->tasks_done++;
        if (rc && !job->rc) {
            job->rc = rc, job->err = err, job->stop = 1;
        }
    }
    job->workers_running--;
    pthread_cond_signal(&job->wake);
    pthread_mutex_unlock(&job->lock);
    return NULL;
}

struct phase_state {
    enum lq_compress_phase phase;
    size_t matrices_total, cells_total, cells_cached;
    double start, last_save;
    const char *cache_path; /* table phase: where rows are saved, or NULL */
    const struct lq_error_table_key *key;
    struct lq_error_table *snapshot;
    int save_failed; /* warned once; no more tries */
};

static void warn(const struct lq_compress_options *o, const char *format, const char *detail) {
    if (!o->warning) return;
    char message[LQ_ERROR_MESSAGE_SIZE + 128];
    snprintf(message, sizeof message, format, detail);
    o->warning(o->context, message);
}

/* Copies the table under the lock and writes it outside it. Call with the lock held. */
static void save_snapshot(struct job *job, struct phase_state *s) {
    job->save_pending = 0;
    size_t cells = job->n_matrices * job->n_configs;
    memcpy(s->snapshot->cost, job->table.cost, cells * sizeof(double));
    memcpy(s->snapshot->done, job->table.done, job->n_matrices);
    pthread_mutex_unlock(&job->lock);
    struct lq_error err = {0};
    if (lq_error_table_save(s->cache_path, s->key, s->snapshot, &err)) {
        warn(job->options, "cannot save the error table (the run goes on without): %s",
             err.message);
        s->save_failed = 1;
    }
    s->last_save = seconds_now();
    pthread_mutex_lock(&job->lock);
}

/* Calls the progress callback; call with the lock held. Returns its code. */
static int report_progress(struct job *job, const struct phase_state *s, int finished) {
    const struct lq_compress_options *o = job->options;
    if (!o->progress) return 0;
    struct lq_compress_progress p = {0};
    p.phase = s->phase;
    p.matrices_total = s->matrices_total;
    p.cells_total = s->cells_total;
    p.cells_cached = s->cells_cached;
    p.cells_done = s->cells_cached + job->tasks_done;
    if (s->phase == LQ_COMPRESS_TABLE) {
        for (size_t i = 0; i < job->n_matrices; i++) p.matrices_done += job->table.done[i];
    } else {
        p.matrices_done = job->tasks_done;
    }
    p.elapsed_seconds = seconds_now() - s->start;
    size_t computed = job->tasks_done, left = job->task_count - job->tasks_done;
    p.eta_seconds = computed ? p.elapsed_seconds / (double)computed * (double)left : -1.0;
    if (left == 0) p.eta_seconds = 0.0;
    p.finished = finished;
    pthread_mutex_unlock(&job->lock);
    int rc = o->progress(o->context, &p);
    pthread_mutex_lock(&job->lock);
    return rc;
}

/* Runs job->run over task_count tasks on `threads` workers while this thread reports
 * progress and saves the table. OpenBLAS runs single-threaded meanwhile: each worker is one
 * core, and the SVDs are then the same whoever runs them. */
static int run_pool(struct job *job, size_t task_count, int threads, struct phase_state *s,
                    struct lq_error *err) {
    job->next_task = 0, job->task_count = task_count, job->tasks_done = 0;
    if (job->task_stride == 0) job->task_stride = 1;
    job->stop = 0, job->rc = 0;
    const struct lq_compress_remote *remote = job->options->remote;
    if (remote) {
        struct lq_compress_phase_work *w = &job->remote_work;
        memset(w, 0, sizeof *w);
        w->phase = s->phase, w->options = job->options, w->grid = job->grid;
        w->n_configs = job->n_configs, w->n_matrices = job->n_matrices;
        w->matrix_hash = job->matrix_hash, w->matrix_numel = job->matrix_numel;
        w->choice = job->choice;
        w->take = remote_take, w->table_result = remote_table_result;
        w->final_result = remote_final_result, w->fail = remote_fail;
        w->stopping = remote_stopping, w->internal = job;
        int rc = remote->prepare ? remote->prepare(remote->context, w, err) : LQ_OK;
        if (rc) return rc;
    }
    if ((size_t)threads > task_count) threads = task_count ? (int)task_count : 1;
    pthread_t *handles = calloc((size_t)threads, sizeof *handles);
    if (!handles) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    int saved_blas_threads = openblas_get_num_threads();
    openblas_set_num_threads(1);
    s->start = s->last_save = seconds_now();
    pthread_mutex_lock(&job->lock);
    int rc = report_progress(job, s, 0);
    if (rc) {
        job->stop = 1, job->rc = rc;
        lq_error_set(&job->err, rc, "stopped before the %s phase",
                     lq_compress_phase_name(s->phase));
    }
    job->workers_running = 0;
    int started = 0;
    for (; started < threads && !job->stop; started++) {
        if (pthread_create(&handles[started], NULL, worker_main, job) != 0) break;
        job->workers_running++;
    }
    pthread_t remote_thread;
    int remote_started = 0;
    if (remote && remote->run_phase && !job->stop) {
        if (pthread_create(&remote_thread, NULL, remote_main, job) == 0) {
            remote_started = 1;
            job->workers_running++;
        } else if (!job->rc) {
            job->rc = lq_error_set(&job->err, LQ_ENOMEM, "cannot start the remote executor");
            job->stop = 1;
        }
    }
    if (started == 0 && !job->stop) {
        job->workers_running++;
        pthread_mutex_unlock(&job->lock);
        worker_main(job); /* no thread could start: run the tasks here */
        pthread_mutex_lock(&job->lock);
    }
    while (job->workers_running > 0) {
        struct timespec deadline;
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_nsec += 250 * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) deadline.tv_sec++, deadline.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&job->wake, &job->lock, &deadline);
        /* Saving each finished row, at most once a second, bounds the work an interrupt loses. */
        if (s->cache_path && !s->save_failed && job->save_pending &&
            seconds_now() - s->last_save >= 1.0)
            save_snapshot(job, s);
        if (job->workers_running > 0 && !job->stop && (rc = report_progress(job, s, 0)) != 0) {
            job->stop = 1;
            if (!job->rc) {
                job->rc = rc;
                lq_error_set(&job->err, rc, "stopped during the %s phase",
                             lq_compress_phase_name(s->phase));
            }
        }
    }
    if (s->cache_path && !s->save_failed && job->save_pending) save_snapshot(job, s);
    rc = job->rc;
    if (rc)
        *err = job->err;
    else
        rc = report_progress(job, s, 1);
    pthread_mutex_unlock(&job->lock);
    for (int t = 0; t < started; t++) pthread_join(handles[t], NULL);
    if (remote_started) pthread_join(remote_thread, NULL);
    openblas_set_num_threads(saved_blas_threads);
    free(handles);
    if (rc && !job->rc)
        lq_error_set(err, rc, "stopped after the %s phase", lq_compress_phase_name(s->phase));
    return rc;
}

/* ---------- checks before any work ---------- */

static int collect_matrices(const struct lq_model *source, int rank, struct matrix_ref **out,
                            struct lq_error *err) {
    const struct lq_model_config *c = &source->config;
    size_t n = (size_t)c->n_layers * LQ_LINEARS_PER_LAYER;
    struct matrix_ref *m = calloc(n, sizeof *m);
    if (!m) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    for (int l = 0; l < c->n_layers; l++)
        for (int k = 0; k < LQ_LINEARS_PER_LAYER; k++) {
            const struct lq_linear *linear = &source->layers[l].linear[k];
            struct matrix_ref *r = &m[(size_t)l * LQ_LINEARS_PER_LAYER + (size_t)k];
            lq_model_linear_name(l, (enum lq_linear_kind)k, r->name, sizeof r->name);
            r->w = linear->dense, r->rows = (size_t)linear->rows, r->cols = (size_t)linear->cols;
            size_t smaller = r->rows < r->cols ? r->rows : r->cols;
            int rc = LQ_OK;
            if (!linear->dense || linear->is_lq)
                rc = lq_error_set(err, LQ_EINVAL,
                                  "%s: %s is already LQ-compressed; compress the full-precision "
                                  "source",
                                  source->path ? source->path : "model", r->name);
            else if ((size_t)rank > smaller)
                rc = lq_error_set(err, LQ_EINVAL,
                                  "rank %d is larger than %s (%zu x %zu): at most %zu", rank,
                                  r->name, r->rows, r->cols, smaller);
            if (rc) {
                free(m);
                return rc;
            }
        }
    *out = m;
    return LQ_OK;
}

static int check_options(const struct lq_compress_options *o, const struct lq_nf_config *grid,
                         size_t n_configs, struct lq_error *err) {
    if (!(o->budget > 0.0) || !isfinite(o->budget))
        return lq_error_set(err, LQ_EINVAL, "budget %g bits/param: must be a positive number",
                            o->budget);
    if (o->rank < 0) return lq_error_set(err, LQ_EINVAL, "rank %d: must be >= 0", o->rank);
    if (o->iters < 1) return lq_error_set(err, LQ_EINVAL, "iters %d: must be >= 1", o->iters);
    if (o->threads < 0) return lq_error_set(err, LQ_EINVAL, "threads %d: must be >= 0", o->threads);
    if (n_configs == 0) return lq_error_set(err, LQ_EINVAL, "empty configuration grid");
    for (size_t c = 0; c < n_configs; c++) {
        int rc = lq_nf_config_validate(&grid[c], err);
        if (rc) return lq_error_prefix(err, "grid entry %zu", c + 1);
    }
    return LQ_OK;
}

/* The source's identity for the cache: shapes and float bytes of every linear matrix. */
static uint64_t hash_source(const struct matrix_ref *m, size_t n) {
    uint64_t h = 0x6c7164ull;
    for (size_t i = 0; i < n; i++) {
        uint64_t shape[2] = {m[i].rows, m[i].cols};
        h = lq_hash_bytes(shape, sizeof shape, h);
        h = lq_hash_bytes(m[i].w, m[i].rows * m[i].cols * sizeof(float), h);
    }
    return h;
}

/* The Fisher information's identity for the cache ("fisher-<hash>" of every matrix's floats
 * and how they were estimated), after checking what lq_decompose would refuse mid-run. */
static int fisher_weighting(const struct lq_compress_options *o, const struct matrix_ref *m,
                            size_t n, char *weighting, size_t size, struct lq_error *err) {
    if (!o->fisher) {
        snprintf(weighting, size, "none");
        return LQ_OK;
    }
    const char *source = o->fisher_source ? o->fisher_source : "";
    uint64_t h = lq_hash_bytes(source, strlen(source), 0x666973686572ull);
    for (size_t i = 0; i < n; i++) {
        const float *f = o->fisher[i];
        size_t numel = m[i].rows * m[i].cols, nonzero = 0;
        if (!f) return lq_error_set(err, LQ_EINVAL, "no Fisher information for %s", m[i].name);
        for (size_t j = 0; j < numel; j++) {
            if (!(f[j] >= 0.0f) || isinf(f[j]))
                return lq_error_set(err, LQ_EINVAL,
                                    "Fisher information of %s: value %zu is %g, not finite and "
                                    ">= 0",
                                    m[i].name, j, (double)f[j]);
            nonzero += f[j] > 0.0f;
        }
        if (!nonzero)
            return lq_error_set(err, LQ_EINVAL,
                                "Fisher information of %s is all zero: the calibration data "
                                "never reached it",
                                m[i].name);
        h = lq_hash_bytes(f, numel * sizeof *f, h);
    }
    snprintf(weighting, size, "fisher-%016llx", (unsigned long long)h);
    return LQ_OK;
}

/* ---------- the output model ---------- */

static float *copy_floats(const float *source, size_t count) {
    float *copy = malloc((count ? count : 1) * sizeof *copy);
    if (copy && count) memcpy(copy, source, count * sizeof *copy);
    return copy;
}

/* A model with source's non-linear tensors copied and empty linears (filled later). */
static int model_shell(const struct lq_model *source, struct lq_model **out, struct lq_error *err) {
    const struct lq_model_config *c = &source->config;
    struct lq_model *m = calloc(1, sizeof *m);
    if (!m) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    m->config = *c;
    m->is_lq = 1;
    size_t vd = (size_t)c->vocab_size * (size_t)c->dim;
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    m->embed = copy_floats(source->embed, vd);
    m->final_norm = copy_floats(source->final_norm, (size_t)c->dim);
    m->lm_head = source->lm_head == source->embed ? m->embed : copy_floats(source->lm_head, vd);
    m->path = strdup(source->path ? source->path : "");
    int oom = !m->layers || !m->embed || !m->final_norm || !m->lm_head || !m->path;
    for (int l = 0; l < c->n_layers && !oom; l++) {
        m->layers[l].attn_norm = copy_floats(source->layers[l].attn_norm, (size_t)c->dim);
        m->layers[l].ffn_norm = copy_floats(source->layers[l].ffn_norm, (size_t)c->dim);
        oom = !m->layers[l].attn_norm || !m->layers[l].ffn_norm;
    }
    if (oom) {
        lq_model_free(m);
        return lq_error_set(err, LQ_ENOMEM, "out of memory copying the model");
    }
    *out = m;
    return LQ_OK;
}

/* ---------- Algorithm 1 ---------- */

struct compress_state {
    struct matrix_ref *matrices;
    struct lq_nf_config *table1;
    double *storage, *cost_for_ilp;
    size_t *numel, *pending, *remaining;
    uint64_t *matrix_hash; /* with options->remote only */
    struct lq_error_table snapshot;
    struct lq_linear *linears;
    struct lq_ilp_result ilp;
};

static void state_free(struct compress_state *s, size_t n) {
    free(s->matrices), free(s->table1), free(s->storage), free(s->cost_for_ilp);
    free(s->numel), free(s->pending), free(s->remaining), free(s->matrix_hash);
    lq_error_table_free(&s->snapshot);
    if (s->linears)
        for (size_t i = 0; i < n; i++) lq_linear_free(&s->linears[i]);
    free(s->linears);
    lq_ilp_result_free(&s->ilp);
}

/* Reads what a cache file holds for key into job->table; warns when it cannot be used. */
static void cache_read(const struct lq_compress_options *o, const char *path,
                       const struct lq_error_table_key *key, struct lq_error_table *table) {
    struct lq_error err = {0};
    int rc = lq_error_table_load(path, key, table, &err);
    if (rc == LQ_EFORMAT)
        warn(o, "error-table cache ignored: %s", err.message);
    else if (rc && rc != LQ_ENOTFOUND)
        warn(o, "error-table cache unreadable: %s", err.message);
}

int lq_compress(const struct lq_model *source, const struct lq_compress_options *o,
                struct lq_model **out, struct lq_compress_report *report, struct lq_error *err) {
    *out = NULL;
    memset(report, 0, sizeof *report);
    struct compress_state s = {0};
    struct job job = {0};
    const struct lq_nf_config *grid = o->grid;
    size_t G = o->grid_size;
    int rc;
    if (!grid) {
        if (!(s.table1 = malloc(LQ_NF_TABLE1_SIZE * sizeof *s.table1)))
            return lq_error_set(err, LQ_ENOMEM, "out of memory");
        lq_nf_grid_table1(s.table1);
        grid = s.table1, G = LQ_NF_TABLE1_SIZE;
    }
    size_t n = (size_t)source->config.n_layers * LQ_LINEARS_PER_LAYER;
    if ((rc = check_options(o, grid, G, err)) ||
        (rc = collect_matrices(source, o->rank, &s.matrices, err)) ||
        (rc = fisher_weighting(o, s.matrices, n, report->weighting, sizeof report->weighting, err)))
        goto done;

    /* Storage depends on shapes only: an impossible budget is refused before any work. */
    s.storage = malloc(n * G * sizeof *s.storage);
    s.cost_for_ilp = calloc(n * G, sizeof *s.cost_for_ilp);
    s.numel = malloc(n * sizeof *s.numel);
    s.pending = malloc(n * sizeof *s.pending);
    s.remaining = calloc(n, sizeof *s.remaining);
    s.linears = calloc(n, sizeof *s.linears);
    report->chosen = calloc(n, sizeof *report->chosen);
    report->choice = calloc(n, sizeof *report->choice);
    report->error = calloc(n, sizeof *report->error);
    report->norm = calloc(n, sizeof *report->norm);
    report->table_error = calloc(n, sizeof *report->table_error);
    if (!report->table_error || !s.storage || !s.cost_for_ilp || !s.numel || !s.pending ||
        !s.remaining || !s.linears || !report->chosen || !report->choice || !report->error ||
        !report->norm) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        s.numel[i] = s.matrices[i].rows * s.matrices[i].cols;
        for (size_t c = 0; c < G; c++)
            s.storage[i * G + c] = lq_nf_storage_bits(s.numel[i], &grid[c]);
    }
    struct lq_ilp_problem problem = {n, G, s.cost_for_ilp, s.storage, s.numel, o->budget};
    report->min_budget = lq_ilp_min_budget(&problem);
    if (o->budget < report->min_budget) {
        char minimum[64];
        format_exact(minimum, sizeof minimum, report->min_budget);
        rc = lq_error_set(err, LQ_EINFEASIBLE,
                          "budget %g bits/param is infeasible: the smallest feasible budget "
                          "for this grid is %s bits/param (every matrix at its cheapest "
                          "configuration)",
                          o->budget, minimum);
        goto done;
    }
    report->n_matrices = n, report->n_configs = G;
    report->threads = o->threads ? o->threads : lq_parallel_threads();

    /* The cache key and whatever the cache already holds. */
    double t0 = seconds_now();
    struct lq_error_table_key key = {0};
    key.source_hash = hash_source(s.matrices, n);
    key.n_matrices = n, key.grid = grid, key.n_configs = G;
    lq_decompose_options_default(&key.decompose);
    key.decompose.rank = o->rank, key.decompose.max_iters = o->iters;
    key.decompose.svd.seed = o->seed;
    snprintf(key.weighting, sizeof key.weighting, "%s", report->weighting);
    for (size_t i = 0; i < n; i++) /* weighted like the errors, so error / norm is relative */
        report->norm[i] = pow(lq_weighted_distance(s.matrices[i].w, NULL,
                                                   o->fisher ? o->fisher[i] : NULL, s.numel[i]),
                              2);
    if (o->remote) { /* other processes read the source themselves: they check it is this one */
        if (!(s.matrix_hash = malloc(n * sizeof *s.matrix_hash))) {
            rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
            goto done;
        }
        for (size_t i = 0; i < n; i++)
            s.matrix_hash[i] =
                lq_compress_matrix_hash(s.matrices[i].w, s.matrices[i].rows, s.matrices[i].cols);
    }
    report->seconds_hash = seconds_now() - t0;
    if ((rc = lq_error_table_create(n, G, &job.table, err)) ||
        (rc = lq_error_table_create(n, G, &s.snapshot, err)))
        goto done;
    const char *cache_path = NULL;
    if (o->use_cache) {
        char dir[4096];
        struct lq_error cache_err = {0};
        if (o->cache_dir) snprintf(dir, sizeof dir, "%s", o->cache_dir);
        if ((!o->cache_dir && lq_error_table_cache_dir_default(dir, sizeof dir, &cache_err)) ||
            lq_error_table_cache_path(dir, &key, report->cache_path, sizeof report->cache_path,
                                      &cache_err)) {
            warn(o, "no error-table cache: %s", cache_err.message);
        } else {
            cache_path = report->cache_path;
            report->cache_used = 1;
            cache_read(o, cache_path, &key, &job.table);
        }
    }

    /* Phase 1: the error table, for the rows the cache does not hold. */
    job.options = o, job.grid = grid, job.n_configs = G, job.n_matrices = n;
    job.matrices = s.matrices, job.matrix_hash = s.matrix_hash, job.matrix_numel = s.numel;
    job.pending_rows = s.pending, job.row_remaining = s.remaining;
    pthread_mutex_init(&job.lock, NULL);
    pthread_condattr_t attributes;
    pthread_condattr_init(&attributes);
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC);
    pthread_cond_init(&job.wake, &attributes);
    pthread_condattr_destroy(&attributes);
    size_t pending = 0;
    for (size_t i = 0; i < n; i++)
        if (!job.table.done[i]) s.pending[pending++] = i, s.remaining[i] = G;
    report->cells_cached = (n - pending) * G;
    report->decompositions = pending * G;
    struct phase_state phase = {.phase = LQ_COMPRESS_TABLE,
                                .matrices_total = n,
                                .cells_total = n * G,
                                .cells_cached = report->cells_cached,
                                .cache_path = cache_path,
                                .key = &key,
                                .snapshot = &s.snapshot};
    job.run = run_table_cell, job.task_stride = 1;
    int table_threads = report->threads;
    if (device_of(&job)) {
        job.run = run_table_row, job.task_stride = G;
        table_threads = o->device_workers > 0 ? o->device_workers : 2;
    }
    t0 = seconds_now();
    rc = run_pool(&job, pending * G, table_threads, &phase, err);
    report->seconds_table = seconds_now() - t0;
    if (phase.save_failed && report->cells_cached == 0) report->cache_used = 0;
    if (rc) goto destroy;

    /* Phase 2: the allocation (Algorithm 3). */
    t0 = seconds_now();
    struct phase_state ilp_phase = {
        .phase = LQ_COMPRESS_ILP, .matrices_total = n, .cells_total = 1, .start = t0};
    pthread_mutex_lock(&job.lock);
    job.task_count = 1, job.tasks_done = 0;
    rc = report_progress(&job, &ilp_phase, 0);
    pthread_mutex_unlock(&job.lock);
    if (rc) {
        lq_error_set(err, rc, "stopped before the allocation");
        goto destroy;
    }
    struct lq_ilp_options ilp_options;
    lq_ilp_options_default(&ilp_options);
    ilp_options.time_limit_seconds = o->ilp_time_limit_seconds;
    problem.cost = job.table.cost;
    if ((rc = lq_ilp_allocate(&problem, &ilp_options, &s.ilp, err))) goto destroy;
    report->seconds_ilp = seconds_now() - t0;
    report->ilp_proven_optimal = s.ilp.proven_optimal;
    pthread_mutex_lock(&job.lock);
    job.tasks_done = 1;
    rc = report_progress(&job, &ilp_phase, 1);
    pthread_mutex_unlock(&job.lock);
    if (rc) {
        lq_error_set(err, rc, "stopped after the allocation");
        goto destroy;
    }

    /* Phase 3: each matrix at its configuration, with the table's seed: the same result. */
    job.choice = s.ilp.choice, job.out = s.linears, job.final_error = report->error;
    job.run = run_final_matrix, job.task_stride = 1;
    struct phase_state final_phase = {
        .phase = LQ_COMPRESS_FINAL, .matrices_total = n, .cells_total = n};
    t0 = seconds_now();
    rc = run_pool(&job, n, device_of(&job) ? table_threads : report->threads, &final_phase, err);
    report->seconds_final = seconds_now() - t0;
    if (rc) goto destroy;

    /* The report, then the model. */
    double total_bits = 0.0, factor_bits = 0.0, params = 0.0;
    report->table_min = INFINITY, report->table_max = 0.0;
    for (size_t i = 0; i < n; i++) {
        report->choice[i] = s.ilp.choice[i];
        report->chosen[i] = grid[s.ilp.choice[i]];
        report->table_error[i] = job.table.cost[i * G + (size_t)s.ilp.choice[i]];
        report->total_error += report->error[i];
        total_bits += s.storage[i * G + (size_t)s.ilp.choice[i]];
        factor_bits += 32.0 * o->rank * (double)(s.matrices[i].rows + s.matrices[i].cols);
        params += (double)s.numel[i];
        for (size_t c = 0; c < G && report->norm[i] > 0; c++) {
            double relative = sqrt(job.table.cost[i * G + c] / report->norm[i]);
            report->table_min = fmin(report->table_min, relative);
            report->table_max = fmax(report->table_max, relative);
        }
    }
    report->bits_per_param = s.ilp.bits_per_param;
    report->effective_bits = (total_bits + factor_bits) / params;
    if ((rc = model_shell(source, out, err))) goto destroy;
    for (size_t i = 0; i < n; i++) {
        (*out)->layers[i / LQ_LINEARS_PER_LAYER].linear[i % LQ_LINEARS_PER_LAYER] = s.linears[i];
        memset(&s.linears[i], 0, sizeof s.linears[i]);
    }
destroy:
    pthread_mutex_destroy(&job.lock);
    pthread_cond_destroy(&job.wake);
done:
    lq_error_table_free(&job.table);
    state_free(&s, n);
    if (rc) lq_compress_report_free(report);
    return rc;
}

void lq_compress_report_free(struct lq_compress_report *report) {
    free(report->chosen);
    free(report->choice);
    free(report->error);
    free(report->norm);
    free(report->table_error);
    report->chosen = NULL, report->choice = NULL, report->error = NULL, report->norm = NULL;
    report->table_error = NULL;
}
