/* Under mpirun (core/compress_mpi.h): what the launcher's environment says about this rank, and
 * the GPU each rank opens (local rank modulo the host's GPUs). Needs no MPI library. */
#include "core/compress_mpi.h"
#include "tests/unit/lq_test.h"

#include <stdlib.h>
#include <string.h>

static void test_rank_device(void) {
    char buffer[32];
    /* two ranks on a host with one GPU share cuda:0; on two GPUs, one each */
    const char *device = lq_compress_mpi_rank_device("cuda", 0, 1, buffer, sizeof buffer);
    CHECK(device == buffer && strcmp(device, "cuda:0") == 0);
    device = lq_compress_mpi_rank_device("cuda", 1, 1, buffer, sizeof buffer);
    CHECK(device && strcmp(device, "cuda:0") == 0);
    device = lq_compress_mpi_rank_device("cuda", 1, 2, buffer, sizeof buffer);
    CHECK(device && strcmp(device, "cuda:1") == 0);
    device = lq_compress_mpi_rank_device("auto", 5, 4, buffer, sizeof buffer);
    CHECK(device && strcmp(device, "cuda:1") == 0);
    device = lq_compress_mpi_rank_device("cuda", 12, 8, buffer, sizeof buffer);
    CHECK(device && strcmp(device, "cuda:4") == 0);
    device = lq_compress_mpi_rank_device("cuda", -3, 2, buffer, sizeof buffer);
    CHECK(device && strcmp(device, "cuda:1") == 0);
    /* as given: the CPU, an explicit GPU, no GPU found (opening says why), a buffer too small */
    CHECK(strcmp(lq_compress_mpi_rank_device("cpu", 1, 2, buffer, sizeof buffer), "cpu") == 0);
    CHECK(strcmp(lq_compress_mpi_rank_device("cuda:3", 1, 2, buffer, sizeof buffer), "cuda:3") ==
          0);
    CHECK(strcmp(lq_compress_mpi_rank_device("cuda", 1, 0, buffer, sizeof buffer), "cuda") == 0);
    CHECK(strcmp(lq_compress_mpi_rank_device("auto", 1, 0, buffer, sizeof buffer), "auto") == 0);
    CHECK(strcmp(lq_compress_mpi_rank_device("cuda", 1, 2, buffer, 4), "cuda") == 0);
    CHECK(lq_compress_mpi_rank_device(NULL, 1, 2, buffer, sizeof buffer) == NULL);
}

static void test_launched(void) {
    static const char *const names[] = {"OMPI_COMM_WORLD_RANK",
                                        "OMPI_COMM_WORLD_SIZE",
                                        "OMPI_COMM_WORLD_LOCAL_RANK",
                                        "PMIX_RANK",
                                        "PMI_RANK",
                                        "PMI_SIZE",
                                        "MPI_LOCALRANKID",
                                        "SLURM_LOCALID"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) unsetenv(names[i]);
    int rank = -1, size = -1, local = -1;
    CHECK(lq_compress_mpi_launched(&rank, &size, &local) == 0);
    CHECK(rank == 0 && size == 1 && local == 0);
    /* Open MPI: rank 3 of 4, the second on its host */
    setenv("OMPI_COMM_WORLD_RANK", "3", 1);
    setenv("OMPI_COMM_WORLD_SIZE", "4", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
    CHECK(lq_compress_mpi_launched(&rank, &size, &local) == 1);
    CHECK(rank == 3 && size == 4 && local == 1);
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) unsetenv(names[i]);
    /* MPICH's Hydra */
    setenv("PMI_RANK", "2", 1);
    setenv("PMI_SIZE", "3", 1);
    setenv("MPI_LOCALRANKID", "2", 1);
    CHECK(lq_compress_mpi_launched(&rank, &size, &local) == 1);
    CHECK(rank == 2 && size == 3 && local == 2);
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) unsetenv(names[i]);
}

LQ_TEST_MAIN(LQ_TEST(test_rank_device), LQ_TEST(test_launched))
