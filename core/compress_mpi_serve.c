/* lqd compress over MPI, ranks > 0: the serve loop. The MPI thread (this process's main
 * thread) receives items from rank 0, reads each matrix they need once (lq_model_reader,
 * checked against rank 0's hash; F fetched from rank 0 when weighted) into a small cache,
 * and queues them for the decomposition threads; it sends every result back, each one
 * asking for the next item. See compress_mpi.h. */
#include <cblas.h>
#include <limits.h>
#include <mpi.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/compress_mpi_internal.h"
#include "core/model.h"
#include "core/parallel.h"

/* One source matrix this rank has read, with its F when weighted. */
struct cached_matrix {
    int valid;
    size_t matrix;
    float *w, *fisher;
    size_t rows, cols;
    char name[128];
    int refs;      /* items queued or running on it */
    uint64_t used; /* for least-recently-used eviction */
};

struct worker_item {
    struct worker_item *next;
    int phase;
    struct lq_compress_item item;
    struct cached_matrix *matrix;
    struct worker_result *result; /* allocated with the item: a thread never fails to report */
};

struct worker_result {
    struct worker_result *next;
    int phase, rc;
    struct lq_compress_item item;
    struct lq_error err;
    double *costs;
    struct lq_decomposition d;
};

struct worker {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    struct worker_item *queue, *queue_tail;       /* under lock */
    struct worker_result *results, *results_tail; /* under lock */
    int quit;                                     /* under lock */
    struct cached_matrix *cache;                  /* refs under lock */
    size_t cache_size;
    uint64_t clock;
    struct lq_compress_options options; /* rank, iters, seed, device */
    struct lq_nf_config *grid;
    size_t n_configs, n_matrices;
    int has_fisher;
};

static void *worker_thread(void *argument) {
    struct worker *k = argument;
    for (;;) {
        pthread_mutex_lock(&k->lock);
        while (!k->quit && !k->queue) pthread_cond_wait(&k->wake, &k->lock);
        if (k->quit) {
            pthread_mutex_unlock(&k->lock);
            return NULL;
        }
        struct worker_item *item = k->queue;
        k->queue = item->next;
        if (!k->queue) k->queue_tail = NULL;
        pthread_mutex_unlock(&k->lock);

        struct worker_result *result = item->result;
        struct cached_matrix *m = item->matrix;
        const struct lq_compress_item *it = &item->item;
        result->phase = item->phase, result->item = *it;
        if (item->phase == LQ_COMPRESS_TABLE) {
            size_t count = it->config_end - it->config_begin;
            result->costs = malloc(count * sizeof *result->costs);
            result->rc =
                result->costs
                    ? lq_compress_table_costs(&k->options, m->w, m->rows, m->cols, m->matrix,
                                              m->name, k->grid + it->config_begin, count, m->fisher,
                                              result->costs, &result->err)
                    : lq_error_set(&result->err, LQ_ENOMEM, "out of memory");
        } else {
            result->rc = lq_compress_decompose_cell(&k->options, m->w, m->rows, m->cols, m->matrix,
                                                    m->name, &k->grid[it->config_begin], m->fisher,
                                                    &result->d, &result->err);
        }
        free(item);
        pthread_mutex_lock(&k->lock);
        m->refs--;
        if (k->results_tail)
            k->results_tail->next = result;
        else
            k->results = result;
        k->results_tail = result;
        pthread_mutex_unlock(&k->lock);
    }
}

/* The matrix an item needs: from the cache, or read from the model files (and F fetched from
 * rank 0), checked against rank 0's hash. Called on the MPI thread. */
static int worker_matrix(struct worker *k, struct lq_model_reader *reader,
                         const struct item_message *item, struct cached_matrix **out,
                         struct lq_error *err) {
    struct cached_matrix *free_slot = NULL;
    pthread_mutex_lock(&k->lock);
    for (size_t i = 0; i < k->cache_size; i++) {
        struct cached_matrix *c = &k->cache[i];
        if (c->valid && c->matrix == item->matrix) {
            c->refs++, c->used = ++k->clock;
            pthread_mutex_unlock(&k->lock);
            *out = c;
            return LQ_OK;
        }
        if (c->refs == 0 &&
            (!free_slot || !c->valid || (free_slot->valid && c->used < free_slot->used)))
            free_slot = c;
    }
    if (free_slot) free_slot->refs = 1, free_slot->used = ++k->clock;
    pthread_mutex_unlock(&k->lock);
    if (!free_slot) /* at most `slots` items are out at once, and the cache is larger */
        return lq_error_set(err, LQ_EINVAL, "internal error: no free matrix slot");
    struct cached_matrix *c = free_slot;
    free(c->w), free(c->fisher);
    c->w = c->fisher = NULL, c->valid = 0;
    c->matrix = item->matrix;
    int layer = (int)(item->matrix / LQ_LINEARS_PER_LAYER);
    enum lq_linear_kind kind = (enum lq_linear_kind)(item->matrix % LQ_LINEARS_PER_LAYER);
    lq_model_linear_name(layer, kind, c->name, sizeof c->name);
    int rows = 0, cols = 0;
    int rc = lq_model_reader_linear(reader, layer, kind, &c->w, &rows, &cols, err);
    c->rows = (size_t)rows, c->cols = (size_t)cols;
    if (!rc && lq_compress_matrix_hash(c->w, c->rows, c->cols) != item->hash)
        rc = lq_error_set(err, LQ_EINVAL,
                          "%s differs from rank 0's: every rank must read the same model files",
                          c->name);
    if (!rc && k->has_fisher) {
        struct fisher_request f = {item->matrix, c->rows * c->cols};
        if (!(c->fisher = malloc(f.count * sizeof *c->fisher)))
            rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
        else if (f.count * sizeof(float) > INT_MAX)
            rc = lq_error_set(err, LQ_EUNSUPPORTED, "%s: too large for one MPI message", c->name);
        else if (!(rc = lq_mpi_send_bytes(&f, sizeof f, 0, TAG_FISHER_REQUEST, err)))
            rc = lq_mpi_receive_polling(c->fisher, (int)(f.count * sizeof(float)), 0, TAG_FISHER,
                                        err);
    }
    if (rc) {
        pthread_mutex_lock(&k->lock);
        c->refs = 0;
        pthread_mutex_unlock(&k->lock);
        return rc;
    }
    c->valid = 1;
    *out = c;
    return LQ_OK;
}

static int send_result(const struct worker_result *r, struct lq_error *err) {
    if (r->phase == LQ_COMPRESS_TABLE) {
        size_t count = r->item.config_end - r->item.config_begin;
        size_t bytes = sizeof(struct table_result_header) + count * sizeof(double);
        unsigned char *message = malloc(bytes);
        if (!message) return lq_error_set(err, LQ_ENOMEM, "out of memory");
        struct table_result_header h = {r->item.matrix, r->item.config_begin, r->item.config_end};
        memcpy(message, &h, sizeof h);
        memcpy(message + sizeof h, r->costs, count * sizeof(double));
        int rc = lq_mpi_send_bytes(message, bytes, 0, TAG_TABLE_RESULT, err);
        free(message);
        return rc;
    }
    const struct lq_decomposition *d = &r->d;
    struct final_result_header h;
    memset(&h, 0, sizeof h);
    h.matrix = r->item.matrix, h.rows = d->rows, h.cols = d->cols;
    h.codes_bytes = lq_nf_codes_bytes(&d->Q);
    h.scale_codes_bytes = lq_nf_scale_codes_bytes(&d->Q);
    h.group_scales_bytes = lq_nf_group_scales_bytes(&d->Q);
    h.rank = d->rank, h.config = d->Q.config, h.scale_offset = d->Q.scale_offset;
    h.error = d->error, h.norm = d->norm;
    size_t l1 = d->rank > 0 ? d->rows * (size_t)d->rank * sizeof(float) : 0;
    size_t l2 = d->rank > 0 ? (size_t)d->rank * d->cols * sizeof(float) : 0;
    size_t bytes = sizeof h + h.codes_bytes + h.scale_codes_bytes + h.group_scales_bytes + l1 + l2;
    unsigned char *message = malloc(bytes), *cursor = message;
    if (!message) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    memcpy(cursor, &h, sizeof h), cursor += sizeof h;
    memcpy(cursor, d->Q.codes, h.codes_bytes), cursor += h.codes_bytes;
    memcpy(cursor, d->Q.scale_codes, h.scale_codes_bytes), cursor += h.scale_codes_bytes;
    memcpy(cursor, d->Q.group_scales, h.group_scales_bytes), cursor += h.group_scales_bytes;
    if (l1) memcpy(cursor, d->L1, l1), cursor += l1;
    if (l2) memcpy(cursor, d->L2, l2);
    int rc = lq_mpi_send_bytes(message, bytes, 0, TAG_FINAL_RESULT, err);
    free(message);
    return rc;
}

static void result_free(struct worker_result *r) {
    free(r->costs);
    if (r->phase == LQ_COMPRESS_FINAL && !r->rc) lq_decomposition_free(&r->d);
    free(r);
}

/* Waits for the setup (or an early finish); *finish_status is set on a finish. */
static int worker_wait_setup(struct worker *k, int *finished, int *finish_status,
                             struct lq_error *err) {
    for (int rounds = 0;;) {
        void *message = NULL;
        int length = 0;
        MPI_Status status;
        int got = lq_mpi_receive_any(0, &message, &length, &status, err);
        if (got < 0) return got;
        if (!got) {
            lq_mpi_idle_wait(&rounds);
            continue;
        }
        int rc = LQ_OK;
        if (status.MPI_TAG == TAG_FINISH && length == sizeof(int32_t)) {
            int32_t s;
            memcpy(&s, message, sizeof s);
            *finished = 1, *finish_status = s;
        } else if (status.MPI_TAG == TAG_SETUP && (size_t)length >= sizeof(struct setup_message)) {
            struct setup_message setup;
            memcpy(&setup, message, sizeof setup);
            if (setup.protocol != lq_mpi_protocol_word()) {
                rc = lq_error_set(err, LQ_EUNSUPPORTED,
                                  "rank 0 runs another lqd build (protocol %08x, here %08x): "
                                  "every rank must run the same one",
                                  (unsigned)setup.protocol, (unsigned)lq_mpi_protocol_word());
            } else if ((size_t)length != sizeof setup + setup.n_configs * sizeof *k->grid ||
                       setup.n_configs == 0) {
                rc = lq_error_set(err, LQ_EFORMAT, "a malformed setup from rank 0");
            } else if (!(k->grid = malloc(setup.n_configs * sizeof *k->grid))) {
                rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
            } else {
                memcpy(k->grid, (unsigned char *)message + sizeof setup,
                       setup.n_configs * sizeof *k->grid);
                k->n_configs = setup.n_configs, k->n_matrices = setup.n_matrices;
                k->options.rank = setup.rank, k->options.iters = setup.iters;
                k->options.seed = setup.seed;
                k->has_fisher = setup.has_fisher;
            }
        } else {
            rc = lq_error_set(err, LQ_EFORMAT, "an unexpected message from rank 0 (tag %d)",
                              status.MPI_TAG);
        }
        free(message);
        return rc;
    }
}

static int send_error(const struct lq_compress_mpi *mpi, int rc, const struct lq_error *err) {
    struct error_message e;
    memset(&e, 0, sizeof e);
    e.rc = rc;
    char text[sizeof e.message + MPI_MAX_PROCESSOR_NAME + 32];
    snprintf(text, sizeof text, "rank %d on %s: %s", mpi->rank, mpi->host, err->message);
    size_t length = strlen(text);
    if (length >= sizeof e.message) length = sizeof e.message - 1; /* cut, as lq_error does */
    memcpy(e.message, text, length);
    struct lq_error ignored = {0};
    return lq_mpi_send_bytes(&e, sizeof e, 0, TAG_ERROR, &ignored);
}

int lq_compress_mpi_serve(struct lq_compress_mpi *mpi,
                          const struct lq_compress_mpi_worker_options *o, int *reported_out,
                          struct lq_error *err) {
    struct worker k;
    memset(&k, 0, sizeof k);
    pthread_mutex_init(&k.lock, NULL);
    pthread_cond_init(&k.wake, NULL);
    lq_compress_options_default(&k.options);
    k.options.device = o->device;
    int slots = o->device ? (o->device_workers > 0 ? o->device_workers : 2)
                          : (o->threads > 0 ? o->threads : lq_parallel_threads());
    struct lq_model_reader *reader = NULL;
    pthread_t *threads = NULL;
    int started = 0, finished = 0, finish_status = 0, reported = 0;
    /* Read the model's index while rank 0 loads the model. */
    struct lq_error open_err = {0};
    int open_rc = lq_model_reader_open(o->model, &reader, &open_err);
    int rc = worker_wait_setup(&k, &finished, &finish_status, err);
    if (finished) goto done;
    /* from here every error goes to rank 0, and this rank waits for its finish */
    if (!rc && open_rc) {
        rc = open_rc, *err = open_err;
    } else if (!rc && (size_t)lq_model_reader_config(reader)->n_layers * LQ_LINEARS_PER_LAYER !=
                          k.n_matrices) {
        rc = lq_error_set(err, LQ_EINVAL, "%s has %d layers here, not rank 0's %zu", o->model,
                          lq_model_reader_config(reader)->n_layers,
                          k.n_matrices / LQ_LINEARS_PER_LAYER);
    }
    k.cache_size = (size_t)slots + 2;
    k.cache = calloc(k.cache_size, sizeof *k.cache);
    threads = calloc((size_t)slots, sizeof *threads);
    if (!rc && (!k.cache || !threads)) rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
    /* one core per decomposition, as lq_compress's threads: the same SVDs bit for bit */
    openblas_set_num_threads(1);
    for (; !rc && started < slots; started++)
        if (pthread_create(&threads[started], NULL, worker_thread, &k) != 0) break;
    if (!rc && started == 0) rc = lq_error_set(err, LQ_ENOMEM, "cannot start a thread");
    if (!rc) {
        size_t per_item = o->device ? 0 : (k.n_configs + 7) / 8;
        struct request_message request = {started, 0, per_item};
        rc = lq_mpi_send_bytes(&request, sizeof request, 0, TAG_REQUEST, err);
    }
    if (rc) {
        send_error(mpi, rc, err);
        reported = 1;
    }
    for (int rounds = 0; !finished;) {
        int busy = 0;
        void *message = NULL;
        int length = 0;
        MPI_Status status;
        int got = lq_mpi_receive_any(0, &message, &length, &status, err);
        if (got < 0) {
            rc = got;
            break;
        }
        if (got) {
            busy = 1;
            if (status.MPI_TAG == TAG_FINISH && length == sizeof(int32_t)) {
                int32_t s;
                memcpy(&s, message, sizeof s);
                finished = 1, finish_status = s;
            } else if (status.MPI_TAG == TAG_ITEM && length == sizeof(struct item_message) &&
                       !reported) {
                struct item_message m;
                memcpy(&m, message, sizeof m);
                struct cached_matrix *matrix = NULL;
                int item_rc = m.matrix < k.n_matrices && m.config_end <= k.n_configs &&
                                      m.config_begin < m.config_end
                                  ? worker_matrix(&k, reader, &m, &matrix, err)
                                  : lq_error_set(err, LQ_EFORMAT, "a malformed item from rank 0");
                struct worker_item *item = item_rc ? NULL : calloc(1, sizeof *item);
                if (item && !(item->result = calloc(1, sizeof *item->result))) {
                    free(item);
                    item = NULL;
                }
                if (!item_rc && !item) item_rc = lq_error_set(err, LQ_ENOMEM, "out of memory");
                if (item_rc) {
                    rc = item_rc;
                    send_error(mpi, rc, err);
                    reported = 1;
                } else {
                    item->phase = m.phase, item->matrix = matrix;
                    item->item = (struct lq_compress_item){m.matrix, m.config_begin, m.config_end};
                    pthread_mutex_lock(&k.lock);
                    if (k.queue_tail)
                        k.queue_tail->next = item;
                    else
                        k.queue = item;
                    k.queue_tail = item;
                    pthread_cond_signal(&k.wake);
                    pthread_mutex_unlock(&k.lock);
                }
            }
            free(message);
        }
        pthread_mutex_lock(&k.lock);
        struct worker_result *results = k.results;
        k.results = k.results_tail = NULL;
        pthread_mutex_unlock(&k.lock);
        while (results) {
            struct worker_result *r = results;
            results = r->next;
            busy = 1;
            if (!reported && r->rc) {
                rc = r->rc, *err = r->err;
                send_error(mpi, rc, err);
                reported = 1;
            } else if (!reported) {
                int send_rc = send_result(r, err);
                if (send_rc) {
                    rc = send_rc, reported = 1; /* rank 0 is unreachable: nothing to tell */
                }
            }
            result_free(r);
        }
        if (rc && !reported) break;
        if (busy)
            rounds = 0;
        else
            lq_mpi_idle_wait(&rounds);
    }
done:
    pthread_mutex_lock(&k.lock);
    k.quit = 1;
    pthread_cond_broadcast(&k.wake);
    pthread_mutex_unlock(&k.lock);
    for (int t = 0; t < started; t++) pthread_join(threads[t], NULL);
    while (k.queue) {
        struct worker_item *item = k.queue;
        k.queue = item->next;
        free(item->result);
        free(item);
    }
    while (k.results) {
        struct worker_result *r = k.results;
        k.results = r->next;
        result_free(r);
    }
    for (size_t i = 0; k.cache && i < k.cache_size; i++)
        free(k.cache[i].w), free(k.cache[i].fisher);
    free(k.cache), free(threads), free(k.grid);
    lq_model_reader_close(reader);
    pthread_mutex_destroy(&k.lock);
    pthread_cond_destroy(&k.wake);
    (void)finish_status; /* a failure of rank 0's own: it says why */
    *reported_out = reported;
    return rc;
}
