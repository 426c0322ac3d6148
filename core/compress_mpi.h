/* lqd compress over MPI ranks (`mpirun -n K lqd compress ...`). Rank 0 runs lq_compress as a
 * single process would, with an executor (options.remote) that hands slices of each phase to
 * the other ranks on request: a rank asks for as many items as it has free threads (or GPUs'
 * streams), and every result it sends back asks for one more, so fast and slow ranks stay
 * busy. Ranks > 0 read the model's matrices themselves (lq_model_reader: only the tensors
 * their items need from a HuggingFace directory), check each against rank 0's hash, and run
 * lq_compress_decompose_cell / lq_compress_table_costs, the very code rank 0's threads run
 * with the same per-(matrix, configuration) seeds: the table and the model do not depend on
 * K. Rank 0 keeps the cache, the ILP and the output. Built from compress_mpi.c (rank 0) and
 * compress_mpi_serve.c (the others) when Meson finds MPI, else from compress_mpi_absent.c
 * (every call then says so). */
#ifndef LQ_COMPRESS_MPI_H
#define LQ_COMPRESS_MPI_H

#include "core/compress.h"
#include "core/error.h"
#include "kernels/backend.h"

/* 1 when this build has MPI. */
int lq_compress_mpi_built(void);

/* 1 when an MPI launcher started this process (OMPI_COMM_WORLD_SIZE, PMIX_RANK, PMI_RANK
 * or PMI_SIZE in the environment); a plain run never initializes MPI. *rank, *size and
 * *local_rank (rank among the ranks of this host) come from the launcher's variables where
 * it sets them (Open MPI, MPICH/Hydra), else 0, 1, 0. */
int lq_compress_mpi_launched(int *rank, int *size, int *local_rank);

/* One GPU per rank: the device a rank opens for --device `device` when its host has `gpus`
 * GPUs. "cuda" and "auto" become "cuda:N", N = local_rank modulo gpus (two ranks on a host
 * with one GPU both get cuda:0), written into buffer (size bytes); anything else (cpu, an
 * explicit cuda:N), or gpus <= 0 (opening then says why), is returned as given. */
const char *lq_compress_mpi_rank_device(const char *device, int local_rank, int gpus, char *buffer,
                                        size_t size);

struct lq_compress_mpi; /* one MPI session: MPI_Init to MPI_Finalize */

/* Initializes MPI (threads: serialized, rank 0 talks from the executor's thread). */
int lq_compress_mpi_start(struct lq_compress_mpi **out, struct lq_error *err);
int lq_compress_mpi_rank(const struct lq_compress_mpi *mpi);
int lq_compress_mpi_size(const struct lq_compress_mpi *mpi);

/* Rank 0: the executor for lq_compress_options.remote (borrowed from mpi; NULL with one
 * rank). */
const struct lq_compress_remote *lq_compress_mpi_remote(struct lq_compress_mpi *mpi);
/* Rank 0: decompositions (table cells and final matrices) rank `rank` > 0 has sent back. */
size_t lq_compress_mpi_cells(const struct lq_compress_mpi *mpi, int rank);

struct lq_compress_mpi_worker_options {
    const char *model;         /* the source, as rank 0 was given it (shared or copied files) */
    int threads;               /* decompositions at once on the CPU (0: lq_parallel_threads) */
    struct lq_backend *device; /* decomposes on this GPU (borrowed), or NULL */
    int device_workers;        /* items at once on the device (0: 2) */
};

/* Ranks > 0: serves rank 0 until it says finish. Returns 0, or the error this rank hit;
 * *reported = 1 when rank 0 got it (and prints it, naming the rank and host). */
int lq_compress_mpi_serve(struct lq_compress_mpi *mpi,
                          const struct lq_compress_mpi_worker_options *options, int *reported,
                          struct lq_error *err);

/* Rank 0: tells the other ranks to exit (failed: with a non-zero status) and finalizes MPI;
 * abandon = 1 (a signal stopped the run: mpirun is tearing the job down) skips the
 * finalization, which would wait for ranks that are gone. Ranks > 0 call it after serve.
 * Frees mpi. */
void lq_compress_mpi_finish(struct lq_compress_mpi *mpi, int failed, int abandon);

#endif
