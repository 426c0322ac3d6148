/* lqd version: what this binary was built with and which accelerators it sees. */
#include <cblas.h>
#include <cjson/cJSON.h>
#include <glpk.h>
#include <microhttpd.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "kernels/device_probe.h"
#include "server/cli.h"

#ifndef LQD_VERSION
#define LQD_VERSION "unknown"
#endif

int lq_cli_version(int argc, char **argv) {
    if (argc > 1 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        printf("usage: lqd version\n\nPrints the versions of lqd and of the libraries it runs on, "
               "and the CUDA devices this build can use.\n");
        return 0;
    }
    printf("lqd %s\n", LQD_VERSION);
    printf("OpenBLAS   %s (%d threads)\n", openblas_get_config(), openblas_get_num_threads());
    printf("GLPK       %s\n", glp_version());
    printf("libmicrohttpd %s\n", MHD_get_version());
    printf("cJSON      %s\n", cJSON_Version());
    printf("libuv      %s\n", uv_version_string());
    if (!lq_cuda_compiled()) {
        printf("CUDA       not built (meson -Dcuda=enabled needs nvcc)\n");
        return 0;
    }
    int count = 0;
    struct lq_error err = {0};
    if (lq_cuda_device_count(&count, &err)) {
        printf("CUDA       built; probe failed: %s\n", err.message);
        return 1;
    }
    printf("CUDA       built; %d device(s)\n", count);
    for (int i = 0; i < count; i++) {
        char description[256];
        if (lq_cuda_device_describe(i, description, sizeof description, &err)) {
            printf("  device %d: probe failed: %s\n", i, err.message);
            return 1;
        }
        printf("  device %d: %s\n", i, description);
    }
    return 0;
}
