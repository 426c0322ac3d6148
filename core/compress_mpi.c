/* lqd compress over MPI ranks: the session, the messaging helpers and rank 0's executor (a
 * request/response loop over point-to-point messages); the other ranks' serve loop is in
 * compress_mpi_serve.c. See compress_mpi.h for the design. Every wait
 * polls (MPI_Iprobe / MPI_Test, then a short sleep) rather than blocking in MPI: Open MPI's
 * blocking calls spin a core, which would steal it from the decompositions. */
#include "compress_mpi.h"

#include <limits.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/compress_mpi_internal.h"

int lq_compress_mpi_built(void) {
    return 1;
}

int lq_compress_mpi_rank(const struct lq_compress_mpi *mpi) {
    return mpi->rank;
}
int lq_compress_mpi_size(const struct lq_compress_mpi *mpi) {
    return mpi->size;
}

/* Sleeps a little longer each idle round, up to 2 ms: quick answers while busy, no spinning
 * while idle. */
void lq_mpi_idle_wait(int *rounds) {
    long microseconds = *rounds < 20 ? 50 : *rounds < 200 ? 500 : 2000;
    struct timespec t = {0, microseconds * 1000L};
    nanosleep(&t, NULL);
    (*rounds)++;
}

int lq_mpi_failed(int code, const char *what, struct lq_error *err) {
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    return lq_error_set(err, LQ_EIO, "MPI %s failed: %s", what, text);
}

/* A blocking receive that polls (see the file comment). */
int lq_mpi_receive_polling(void *buffer, int count, int source, int tag, struct lq_error *err) {
    MPI_Request request;
    int code = MPI_Irecv(buffer, count, MPI_BYTE, source, tag, MPI_COMM_WORLD, &request);
    if (code != MPI_SUCCESS) return lq_mpi_failed(code, "receive", err);
    for (int rounds = 0, done = 0;;) {
        if ((code = MPI_Test(&request, &done, MPI_STATUS_IGNORE)) != MPI_SUCCESS)
            return lq_mpi_failed(code, "receive", err);
        if (done) return LQ_OK;
        lq_mpi_idle_wait(&rounds);
    }
}

int lq_mpi_send_bytes(const void *buffer, size_t bytes, int destination, int tag,
                      struct lq_error *err) {
    if (bytes > INT_MAX)
        return lq_error_set(err, LQ_EUNSUPPORTED, "a message of %zu bytes is too large for MPI",
                            bytes);
    int code = MPI_Send(buffer, (int)bytes, MPI_BYTE, destination, tag, MPI_COMM_WORLD);
    return code == MPI_SUCCESS ? LQ_OK : lq_mpi_failed(code, "send", err);
}

/* The next message, if any: *buffer malloc'ed with its length. 1 when one was received. */
int lq_mpi_receive_any(int source, void **buffer, int *length, MPI_Status *status,
                       struct lq_error *err) {
    int flag = 0, code = MPI_Iprobe(source, MPI_ANY_TAG, MPI_COMM_WORLD, &flag, status);
    if (code != MPI_SUCCESS) return lq_mpi_failed(code, "probe", err);
    if (!flag) return 0;
    MPI_Get_count(status, MPI_BYTE, length);
    *buffer = malloc(*length > 0 ? (size_t)*length : 1);
    if (!*buffer) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    code = MPI_Recv(*buffer, *length, MPI_BYTE, status->MPI_SOURCE, status->MPI_TAG, MPI_COMM_WORLD,
                    MPI_STATUS_IGNORE);
    if (code != MPI_SUCCESS) {
        free(*buffer);
        return lq_mpi_failed(code, "receive", err);
    }
    return 1;
}

/* ---------- rank 0: the executor ---------- */

static int send_setup(struct lq_compress_mpi *mpi, const struct lq_compress_phase_work *w,
                      struct lq_error *err) {
    size_t bytes = sizeof(struct setup_message) + w->n_configs * sizeof *w->grid;
    unsigned char *message = malloc(bytes);
    if (!message) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    struct setup_message setup = {0};
    setup.protocol = lq_mpi_protocol_word();
    setup.rank = w->options->rank, setup.iters = w->options->iters;
    setup.has_fisher = w->options->fisher != NULL;
    setup.seed = w->options->seed;
    setup.n_matrices = w->n_matrices, setup.n_configs = w->n_configs;
    memcpy(message, &setup, sizeof setup);
    memcpy(message + sizeof setup, w->grid, w->n_configs * sizeof *w->grid);
    int rc = LQ_OK;
    for (int r = 1; r < mpi->size && !rc; r++)
        rc = lq_mpi_send_bytes(message, bytes, r, TAG_SETUP, err);
    free(message);
    return rc;
}

/* A final decomposition from its message; d owns copies of the buffers. */
static int final_from_message(const unsigned char *message, size_t length,
                              const struct lq_compress_phase_work *w, struct lq_decomposition *d,
                              struct lq_error *err) {
    struct final_result_header h;
    memset(d, 0, sizeof *d);
    if (length < sizeof h) return lq_error_set(err, LQ_EFORMAT, "a short final result");
    memcpy(&h, message, sizeof h);
    d->rows = h.rows, d->cols = h.cols, d->rank = h.rank;
    d->error = h.error, d->norm = h.norm;
    d->Q.config = h.config, d->Q.rows = h.rows, d->Q.cols = h.cols;
    d->Q.scale_offset = h.scale_offset;
    size_t factors = (size_t)h.rank * (h.rows + h.cols) * sizeof(float);
    int shapes_ok =
        h.matrix < w->n_matrices && h.rank >= 0 && h.codes_bytes == lq_nf_codes_bytes(&d->Q) &&
        h.scale_codes_bytes == lq_nf_scale_codes_bytes(&d->Q) &&
        h.group_scales_bytes == lq_nf_group_scales_bytes(&d->Q) &&
        length == sizeof h + h.codes_bytes + h.scale_codes_bytes + h.group_scales_bytes + factors;
    if (!shapes_ok) return lq_error_set(err, LQ_EFORMAT, "a malformed final result");
    const unsigned char *cursor = message + sizeof h;
    d->Q.codes = malloc(h.codes_bytes ? h.codes_bytes : 1);
    d->Q.scale_codes = malloc(h.scale_codes_bytes ? h.scale_codes_bytes : 1);
    d->Q.group_scales = malloc(h.group_scales_bytes ? h.group_scales_bytes : 1);
    if (h.rank > 0) {
        d->L1 = malloc(h.rows * (size_t)h.rank * sizeof(float));
        d->L2 = malloc((size_t)h.rank * h.cols * sizeof(float));
    }
    if (!d->Q.codes || !d->Q.scale_codes || !d->Q.group_scales ||
        (h.rank > 0 && (!d->L1 || !d->L2))) {
        lq_nf_matrix_free(&d->Q);
        free(d->L1), free(d->L2);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    memcpy(d->Q.codes, cursor, h.codes_bytes), cursor += h.codes_bytes;
    memcpy(d->Q.scale_codes, cursor, h.scale_codes_bytes), cursor += h.scale_codes_bytes;
    memcpy(d->Q.group_scales, cursor, h.group_scales_bytes), cursor += h.group_scales_bytes;
    if (h.rank > 0) {
        memcpy(d->L1, cursor, h.rows * (size_t)h.rank * sizeof(float));
        cursor += h.rows * (size_t)h.rank * sizeof(float);
        memcpy(d->L2, cursor, (size_t)h.rank * h.cols * sizeof(float));
    }
    return LQ_OK;
}

/* Handles one message from a worker rank. Returns 0, or an error that stops the run. */
static int executor_handle(struct lq_compress_mpi *mpi, struct lq_compress_phase_work *w,
                           int source, int tag, unsigned char *message, size_t length,
                           struct lq_error *err) {
    if (tag == TAG_REQUEST && length == sizeof(struct request_message)) {
        struct request_message r;
        memcpy(&r, message, sizeof r);
        mpi->wants[source] += r.slots;
        mpi->max_cells[source] = r.max_cells;
        return LQ_OK;
    }
    if (tag == TAG_TABLE_RESULT && length >= sizeof(struct table_result_header)) {
        struct table_result_header h;
        memcpy(&h, message, sizeof h);
        size_t count = h.config_end - h.config_begin;
        if (h.matrix >= w->n_matrices || h.config_end > w->n_configs ||
            h.config_begin >= h.config_end || length != sizeof h + count * sizeof(double))
            return lq_error_set(err, LQ_EFORMAT, "rank %d sent a malformed table result", source);
        mpi->in_flight[source]--, mpi->wants[source]++;  /* a result asks for the next item */
        if (w->phase != LQ_COMPRESS_TABLE) return LQ_OK; /* a stopped phase's straggler */
        mpi->cells[source] += count;
        double *costs = malloc(count * sizeof *costs);
        if (!costs) return lq_error_set(err, LQ_ENOMEM, "out of memory");
        memcpy(costs, message + sizeof h, count * sizeof *costs);
        struct lq_compress_item item = {h.matrix, h.config_begin, h.config_end};
        w->table_result(w, &item, costs);
        free(costs);
        return LQ_OK;
    }
    if (tag == TAG_FINAL_RESULT) {
        mpi->in_flight[source]--, mpi->wants[source]++;
        if (w->phase != LQ_COMPRESS_FINAL) return LQ_OK;
        struct lq_decomposition d;
        int rc = final_from_message(message, length, w, &d, err);
        if (rc) return lq_error_prefix(err, "rank %d", source);
        uint64_t matrix;
        memcpy(&matrix, message, sizeof matrix);
        w->final_result(w, (size_t)matrix, &d);
        mpi->cells[source]++;
        return LQ_OK;
    }
    if (tag == TAG_ERROR && length == sizeof(struct error_message)) {
        struct error_message e;
        memcpy(&e, message, sizeof e);
        e.message[sizeof e.message - 1] = '\0';
        mpi->gone[source] = 1;
        return lq_error_set(err, e.rc ? e.rc : LQ_EIO, "%s", e.message);
    }
    return lq_error_set(err, LQ_EFORMAT, "rank %d sent an unexpected message (tag %d, %zu bytes)",
                        source, tag, length);
}

/* Before the first phase: the setup to every rank, then their first requests, so that the
 * work is shared from the start (rank 0's threads would otherwise race the others' start). */
static int executor_prepare(void *context, struct lq_compress_phase_work *w, struct lq_error *err) {
    struct lq_compress_mpi *mpi = context;
    if (mpi->setup_sent) return LQ_OK;
    int rc = send_setup(mpi, w, err);
    if (rc) return rc;
    mpi->setup_sent = 1;
    for (int rounds = 0, waiting = 1; waiting;) {
        void *message = NULL;
        int length = 0;
        MPI_Status status;
        int got = lq_mpi_receive_any(MPI_ANY_SOURCE, &message, &length, &status, err);
        if (got < 0) return got;
        if (got) {
            rc = executor_handle(mpi, w, status.MPI_SOURCE, status.MPI_TAG, message, (size_t)length,
                                 err);
            free(message);
            if (rc) return rc;
            rounds = 0;
        } else {
            lq_mpi_idle_wait(&rounds);
        }
        waiting = 0;
        for (int r = 1; r < mpi->size; r++) waiting |= mpi->wants[r] == 0;
    }
    return LQ_OK;
}

static void executor_run_phase(void *context, struct lq_compress_phase_work *w) {
    struct lq_compress_mpi *mpi = context;
    struct lq_error err = {0};
    int rc = LQ_OK;
    for (int r = 0; r < mpi->size; r++) mpi->in_flight[r] = 0;
    int exhausted = 0, rounds = 0;
    for (;;) {
        if (w->stopping(w)) return;
        int busy = 0;
        for (;;) { /* every message waiting */
            void *message = NULL;
            int length = 0;
            MPI_Status status;
            int got = lq_mpi_receive_any(MPI_ANY_SOURCE, &message, &length, &status, &err);
            if (got < 0) {
                rc = got;
                goto fail;
            }
            if (!got) break;
            busy = 1;
            int source = status.MPI_SOURCE, tag = status.MPI_TAG;
            if (tag == TAG_FISHER_REQUEST && length == sizeof(struct fisher_request)) {
                struct fisher_request f;
                memcpy(&f, message, sizeof f);
                free(message);
                if (!w->options->fisher || f.matrix >= w->n_matrices ||
                    f.count != w->matrix_numel[f.matrix]) {
                    rc = lq_error_set(&err, LQ_EINVAL,
                                      "rank %d asked for Fisher information there is not", source);
                    goto fail;
                }
                if ((rc = lq_mpi_send_bytes(w->options->fisher[f.matrix], f.count * sizeof(float),
                                            source, TAG_FISHER, &err)))
                    goto fail;
                continue;
            }
            rc = executor_handle(mpi, w, source, tag, message, (size_t)length, &err);
            free(message);
            if (rc) goto fail;
        }
        /* hand out items to the ranks that asked, while there are any */
        for (int r = 1; r < mpi->size && !exhausted; r++)
            while (mpi->wants[r] > 0 && !mpi->gone[r]) {
                struct lq_compress_item item;
                if (!w->take(w, mpi->max_cells[r], &item)) {
                    exhausted = 1;
                    break;
                }
                struct item_message m = {0};
                m.phase = (int32_t)w->phase;
                m.matrix = item.matrix;
                m.config_begin = item.config_begin, m.config_end = item.config_end;
                m.hash = w->matrix_hash[item.matrix];
                if ((rc = lq_mpi_send_bytes(&m, sizeof m, r, TAG_ITEM, &err))) goto fail;
                mpi->wants[r]--, mpi->in_flight[r]++;
                busy = 1;
            }
        /* Done when nothing is left to take and every item out is back. A rank with nothing
         * out always has requests open (its first request, then one per result), so the
         * loop above finds out that nothing is left. */
        int in_flight = 0;
        for (int r = 1; r < mpi->size; r++) in_flight += mpi->in_flight[r];
        if (exhausted && in_flight == 0) return;
        if (busy)
            rounds = 0;
        else
            lq_mpi_idle_wait(&rounds);
    }
fail:
    w->fail(w, rc, &err);
}

int lq_compress_mpi_start(struct lq_compress_mpi **out, struct lq_error *err) {
    *out = NULL;
    int provided = 0, code = MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided);
    if (code != MPI_SUCCESS) return lq_mpi_failed(code, "initialization", err);
    if (provided < MPI_THREAD_SERIALIZED) {
        MPI_Finalize();
        return lq_error_set(err, LQ_EUNSUPPORTED,
                            "this MPI library gives no MPI_THREAD_SERIALIZED support");
    }
    /* Errors come back as codes, so that rank 0 can name the rank and exit cleanly. */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    struct lq_compress_mpi *mpi = calloc(1, sizeof *mpi);
    if (!mpi) {
        MPI_Finalize();
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &mpi->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &mpi->size);
    int length = 0;
    MPI_Get_processor_name(mpi->host, &length);
    size_t n = (size_t)mpi->size;
    mpi->wants = calloc(n, sizeof *mpi->wants);
    mpi->max_cells = calloc(n, sizeof *mpi->max_cells);
    mpi->in_flight = calloc(n, sizeof *mpi->in_flight);
    mpi->gone = calloc(n, sizeof *mpi->gone);
    mpi->cells = calloc(n, sizeof *mpi->cells);
    if (!mpi->wants || !mpi->max_cells || !mpi->in_flight || !mpi->gone || !mpi->cells) {
        lq_compress_mpi_finish(mpi, 1, 0);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    mpi->remote.prepare = executor_prepare;
    mpi->remote.run_phase = executor_run_phase;
    mpi->remote.context = mpi;
    *out = mpi;
    return LQ_OK;
}

const struct lq_compress_remote *lq_compress_mpi_remote(struct lq_compress_mpi *mpi) {
    return mpi->size > 1 ? &mpi->remote : NULL;
}

size_t lq_compress_mpi_cells(const struct lq_compress_mpi *mpi, int rank) {
    return rank > 0 && rank < mpi->size ? mpi->cells[rank] : 0;
}

void lq_compress_mpi_finish(struct lq_compress_mpi *mpi, int failed, int abandon) {
    if (!mpi) return;
    if (mpi->rank == 0 && !abandon) {
        int32_t status = failed ? 1 : 0;
        struct lq_error err = {0};
        for (int r = 1; r < mpi->size; r++) /* a rank that failed waits for it too */
            lq_mpi_send_bytes(&status, sizeof status, r, TAG_FINISH, &err);
    }
    if (!abandon) MPI_Finalize();
    free(mpi->wants), free(mpi->max_cells), free(mpi->in_flight), free(mpi->gone);
    free(mpi->cells);
    free(mpi);
}
