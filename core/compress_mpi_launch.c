/* Whether an MPI launcher started this process, from its environment alone: a plain run of
 * lqd compress never initializes MPI (nor needs an MPI library to be built with). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compress_mpi.h"

static int environment_int(const char *const *names, int fallback) {
    for (; *names; names++) {
        const char *value = getenv(*names);
        if (value && *value) return atoi(value);
    }
    return fallback;
}

int lq_compress_mpi_launched(int *rank, int *size, int *local_rank) {
    /* Open MPI (and PMIx launchers such as Slurm's), then MPICH's Hydra (PMI). */
    static const char *const rank_names[] = {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", NULL};
    static const char *const size_names[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", NULL};
    static const char *const local_names[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                                              "SLURM_LOCALID", NULL};
    int launched = getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMIX_RANK") || getenv("PMI_RANK") ||
                   getenv("PMI_SIZE");
    *rank = launched ? environment_int(rank_names, 0) : 0;
    *size = launched ? environment_int(size_names, 1) : 1;
    *local_rank = launched ? environment_int(local_names, 0) : 0;
    return launched;
}

const char *lq_compress_mpi_rank_device(const char *device, int local_rank, int gpus, char *buffer,
                                        size_t size) {
    if (!device || gpus <= 0 || (strcmp(device, "cuda") != 0 && strcmp(device, "auto") != 0))
        return device;
    int index = local_rank % gpus;
    if (index < 0) index += gpus; /* a launcher's negative value: still a GPU of this host */
    if ((size_t)snprintf(buffer, size, "cuda:%d", index) >= size) return device;
    return buffer;
}
