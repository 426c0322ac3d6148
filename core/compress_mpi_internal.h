/* What the two halves of lqd compress over MPI share (core/compress_mpi.c: rank 0's executor;
 * core/compress_mpi_serve.c: the other ranks): the messages, the session and the polling
 * helpers. Internal to those two files. */
#ifndef LQ_COMPRESS_MPI_INTERNAL_H
#define LQ_COMPRESS_MPI_INTERNAL_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "core/compress.h"
#include "core/compress_mpi.h"
#include "core/error.h"

enum {
    TAG_SETUP = 1,     /* 0 -> w: struct setup_message + the grid */
    TAG_ITEM,          /* 0 -> w: struct item_message */
    TAG_FINISH,        /* 0 -> w: int32 status (0: success) */
    TAG_FISHER,        /* 0 -> w: F of one matrix, floats */
    TAG_REQUEST,       /* w -> 0: struct request_message (free slots) */
    TAG_TABLE_RESULT,  /* w -> 0: struct table_result_header + costs */
    TAG_FINAL_RESULT,  /* w -> 0: struct final_result_header + Q's buffers + L1 + L2 */
    TAG_ERROR,         /* w -> 0: struct error_message */
    TAG_FISHER_REQUEST /* w -> 0: uint64 matrix */
};

/* Every rank runs the same lqd build, so these plain structs travel as bytes; the setup's
 * protocol word catches a rank that runs another build's layout. */
#define PROTOCOL_VERSION 1u

struct setup_message {
    uint32_t protocol; /* lq_mpi_protocol_word() */
    int32_t rank, iters, has_fisher;
    uint64_t seed, n_matrices, n_configs;
};

struct item_message {
    int32_t phase, reserved;
    uint64_t matrix, config_begin, config_end, hash;
};

struct request_message {
    int32_t slots, reserved;
    uint64_t max_cells; /* cells per table item this rank wants at most (0: whole rows) */
};

struct table_result_header {
    uint64_t matrix, config_begin, config_end;
};

struct final_result_header {
    uint64_t matrix, rows, cols, codes_bytes, scale_codes_bytes, group_scales_bytes;
    int32_t rank, reserved;
    struct lq_nf_config config;
    float scale_offset;
    double error, norm;
};

struct error_message {
    int32_t rc, reserved;
    char message[LQ_ERROR_MESSAGE_SIZE];
};

/* The worker names the matrix and the size it read; rank 0 checks it against its own. */
struct fisher_request {
    uint64_t matrix, count;
};

static inline uint32_t lq_mpi_protocol_word(void) {
    return PROTOCOL_VERSION << 24 ^
           (uint32_t)(sizeof(struct final_result_header) << 12 ^ sizeof(struct lq_nf_config) << 4 ^
                      sizeof(struct item_message));
}

struct lq_compress_mpi {
    int rank, size;
    char host[MPI_MAX_PROCESSOR_NAME];
    struct lq_compress_remote remote;
    int setup_sent;
    int *wants;        /* per rank: items it asked for and has not got */
    size_t *max_cells; /* per rank: its preferred table item size */
    int *in_flight;    /* per rank: items of this phase not yet back */
    int *gone;         /* per rank: failed (its error is reported): no more items */
    size_t *cells;     /* per rank: decompositions it sent back, both phases */
};

/* Sleeps a little longer each idle round, up to 2 ms. */
void lq_mpi_idle_wait(int *rounds);
/* An LQ_EIO error naming the MPI call and MPI's message for code. */
int lq_mpi_failed(int code, const char *what, struct lq_error *err);
/* A blocking receive of exactly count bytes that polls (MPI_Irecv, MPI_Test, a short sleep). */
int lq_mpi_receive_polling(void *buffer, int count, int source, int tag, struct lq_error *err);
int lq_mpi_send_bytes(const void *buffer, size_t bytes, int destination, int tag,
                      struct lq_error *err);
/* The next message from source (or MPI_ANY_SOURCE), if any: 1 with *buffer malloc'ed (the
 * caller frees it) and *length, 0 when none is waiting, or a negative LQ_E* code. */
int lq_mpi_receive_any(int source, void **buffer, int *length, MPI_Status *status,
                       struct lq_error *err);

#endif
