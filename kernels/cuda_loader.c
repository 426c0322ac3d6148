/* lqd's view of the CUDA backend: the backend lives in a module (liblqd_cuda.so, built beside
 * lqd when CUDA is) that is loaded on the first call here, so that a process that never asks for
 * a GPU never maps cuBLAS and cuSOLVER (~260 MB of RSS from their relocations and constructors
 * alone). The module is looked for at $LQD_CUDA_MODULE, next to the executable, in the build
 * tree (../kernels/ from server/lqd) and where `meson install` puts it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/backend.h"
#include "kernels/device_probe.h"

#ifndef LQD_CUDA_MODULE_INSTALLED
#define LQD_CUDA_MODULE_INSTALLED "/usr/local/lib/lqd/liblqd_cuda.so"
#endif

struct cuda_module {
    void *handle;
    char error[512]; /* why it did not load */
    int (*device_count)(int *, struct lq_error *);
    int (*device_describe)(int, char *, int, struct lq_error *);
    int (*backend_create)(int, size_t, struct lq_backend **, struct lq_error *);
};

static struct cuda_module module;
static pthread_once_t module_once = PTHREAD_ONCE_INIT;

static int try_open(const char *path) {
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        const char *why = dlerror();
        /* keep the first real failure (a module that exists but does not load) over "no file" */
        if (!module.error[0] || access(path, F_OK) == 0)
            snprintf(module.error, sizeof module.error, "%s", why ? why : path);
        return 0;
    }
    module.device_count = (int (*)(int *, struct lq_error *))dlsym(handle, "lq_cuda_device_count");
    module.device_describe =
        (int (*)(int, char *, int, struct lq_error *))dlsym(handle, "lq_cuda_device_describe");
    module.backend_create = (int (*)(int, size_t, struct lq_backend **, struct lq_error *))dlsym(
        handle, "lq_backend_cuda_create");
    if (!module.device_count || !module.device_describe || !module.backend_create) {
        snprintf(module.error, sizeof module.error, "%s: not an lqd CUDA module", path);
        dlclose(handle);
        return 0;
    }
    module.handle = handle;
    return 1;
}

static void open_module(void) {
    const char *env = getenv("LQD_CUDA_MODULE");
    if (env && *env) {
        try_open(env);
        return;
    }
    char exe[PATH_MAX], path[PATH_MAX + 64];
    ssize_t length = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (length > 0) {
        exe[length] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) *slash = '\0';
        snprintf(path, sizeof path, "%s/liblqd_cuda.so", exe);
        if (try_open(path)) return;
        snprintf(path, sizeof path, "%s/../kernels/liblqd_cuda.so", exe);
        if (try_open(path)) return;
    }
    try_open(LQD_CUDA_MODULE_INSTALLED);
}

static int loaded(struct lq_error *err) {
    pthread_once(&module_once, open_module);
    if (module.handle) return 1;
    lq_error_set(err, LQ_EUNSUPPORTED, "the CUDA backend module did not load: %s", module.error);
    return 0;
}

int lq_cuda_compiled(void) {
    return 1; /* built with CUDA; whether the module loads is the device count's answer */
}

int lq_cuda_device_count(int *count, struct lq_error *err) {
    *count = 0;
    if (!loaded(err)) return LQ_EUNSUPPORTED;
    return module.device_count(count, err);
}

int lq_cuda_device_describe(int index, char *buffer, int buffer_size, struct lq_error *err) {
    if (buffer_size > 0) buffer[0] = '\0';
    if (!loaded(err)) return LQ_EUNSUPPORTED;
    return module.device_describe(index, buffer, buffer_size, err);
}

int lq_backend_cuda_create(int device, size_t memory_limit, struct lq_backend **out,
                           struct lq_error *err) {
    *out = NULL;
    if (!loaded(err)) return LQ_EUNSUPPORTED;
    return module.backend_create(device, memory_limit, out, err);
}
