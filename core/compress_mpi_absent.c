/* lqd compress without MPI (Meson found none, or -Dmpi=disabled): the single-process command
 * works as ever, and a run under mpirun is refused by the CLI with this file's message. */
#include <stdlib.h>

#include "compress_mpi.h"

int lq_compress_mpi_built(void) {
    return 0;
}

int lq_compress_mpi_start(struct lq_compress_mpi **out, struct lq_error *err) {
    *out = NULL;
    return lq_error_set(err, LQ_EUNSUPPORTED,
                        "this lqd was built without MPI (meson setup -Dmpi=enabled needs "
                        "libopenmpi-dev)");
}

int lq_compress_mpi_rank(const struct lq_compress_mpi *mpi) {
    (void)mpi;
    return 0;
}

int lq_compress_mpi_size(const struct lq_compress_mpi *mpi) {
    (void)mpi;
    return 1;
}

const struct lq_compress_remote *lq_compress_mpi_remote(struct lq_compress_mpi *mpi) {
    (void)mpi;
    return NULL;
}

size_t lq_compress_mpi_cells(const struct lq_compress_mpi *mpi, int rank) {
    (void)mpi, (void)rank;
    return 0;
}

int lq_compress_mpi_serve(struct lq_compress_mpi *mpi,
                          const struct lq_compress_mpi_worker_options *options, int *reported,
                          struct lq_error *err) {
    (void)mpi, (void)options;
    *reported = 0;
    return lq_error_set(err, LQ_EUNSUPPORTED, "this lqd was built without MPI");
}

void lq_compress_mpi_finish(struct lq_compress_mpi *mpi, int failed, int abandon) {
    (void)mpi, (void)failed, (void)abandon;
}
