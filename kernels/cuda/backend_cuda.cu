// The CUDA backend: device memory with accounting, the op stream, the ops table. The ops
// themselves live in linear_cuda.cu, ops_cuda.cu, attention_cuda.cu and decompose_cuda.cu.
//
// Every op takes cuda->lock while it queues its work, so workspaces and staged host arguments
// are never shared between two ops in flight on the host side; on the device one stream keeps
// them in call order. Only copy_to_host and synchronize wait for the device.
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/connections_cuda.h"
#include "kernels/cuda/cuda_internal.h"

struct lq_cuda_allocation {
    void *pointer; // NULL: empty entry; LQ_TOMBSTONE: deleted
    size_t bytes;
    enum lq_cuda_purpose purpose;
};

static void *const LQ_TOMBSTONE = (void *)(uintptr_t)1;

// ---------- errors ----------

static int report(int code, struct lq_error *err, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

static int report(int code, struct lq_error *err, const char *format, ...) {
    char message[LQ_ERROR_MESSAGE_SIZE];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    fprintf(stderr, "lqd: cuda: %s\n", message);
    if (err) lq_error_set(err, code, "%s", message);
    return code;
}

int lq_cuda_fail(cudaError_t status, const char *what, struct lq_error *err) {
    int code = status == cudaErrorMemoryAllocation ? LQ_ENOMEM : LQ_EIO;
    cudaGetLastError(); // clear a non-sticky error so later calls are not blamed for it
    return report(code, err, "%s: %s", what, cudaGetErrorString(status));
}

int lq_cublas_fail(cublasStatus_t status, const char *what, struct lq_error *err) {
    int code = status == CUBLAS_STATUS_ALLOC_FAILED ? LQ_ENOMEM : LQ_EIO;
    return report(code, err, "%s: %s", what, cublasGetStatusString(status));
}

int lq_cusolver_fail(cusolverStatus_t status, const char *what, struct lq_error *err) {
    int code = status == CUSOLVER_STATUS_ALLOC_FAILED ? LQ_ENOMEM : LQ_ESOLVER;
    return report(code, err, "%s: cuSOLVER status %d", what, (int)status);
}

// ---------- memory accounting ----------

static size_t *purpose_counter(struct lq_backend_memory *memory, enum lq_cuda_purpose purpose) {
    switch (purpose) {
    case LQ_CUDA_WEIGHTS:
        return &memory->weights;
    case LQ_CUDA_BUFFERS:
        return &memory->buffers;
    case LQ_CUDA_SCRATCH:
        return &memory->scratch;
    case LQ_CUDA_JOBS:
        return &memory->jobs;
    }
    return &memory->scratch;
}

static size_t pointer_hash(const void *pointer, size_t capacity) {
    uint64_t x = (uint64_t)(uintptr_t)pointer;
    x ^= x >> 33, x *= 0xff51afd7ed558ccdull, x ^= x >> 33;
    return (size_t)(x & (capacity - 1));
}

static size_t held(const struct lq_backend_memory *m) {
    return m->weights + m->buffers + m->scratch + m->jobs;
}

// Keeps the table at most half full (capacity a power of two). memory_lock held.
static int table_reserve(struct lq_cuda *cuda) {
    if ((cuda->allocation_count + 1) * 2 <= cuda->allocation_capacity) return LQ_OK;
    size_t capacity = cuda->allocation_capacity ? cuda->allocation_capacity * 2 : 1024;
    struct lq_cuda_allocation *table = (struct lq_cuda_allocation *)calloc(capacity, sizeof *table);
    if (!table) return LQ_ENOMEM;
    for (size_t i = 0; i < cuda->allocation_capacity; i++) {
        struct lq_cuda_allocation *a = &cuda->allocations[i];
        if (!a->pointer || a->pointer == LQ_TOMBSTONE) continue;
        size_t slot = pointer_hash(a->pointer, capacity);
        while (table[slot].pointer) slot = (slot + 1) & (capacity - 1);
        table[slot] = *a;
    }
    free(cuda->allocations);
    cuda->allocations = table;
    cuda->allocation_capacity = capacity;
    return LQ_OK;
}

static double mib(size_t bytes) {
    return (double)bytes / (1024.0 * 1024.0);
}

int lq_cuda_malloc(struct lq_cuda *cuda, size_t bytes, enum lq_cuda_purpose purpose, void **out,
                   struct lq_error *err) {
    *out = NULL;
    if (bytes == 0) bytes = 1;
    pthread_mutex_lock(&cuda->memory_lock);
    struct lq_backend_memory *m = &cuda->memory;
    if (m->limit && held(m) + bytes > m->limit) {
        struct lq_backend_memory copy = *m;
        pthread_mutex_unlock(&cuda->memory_lock);
        return report(LQ_ENOMEM, err,
                      "%.1f MiB more does not fit in the %.1f MiB lqd may use on %s: it holds "
                      "%.1f MiB of weights, %.1f MiB of KV caches and activations, %.1f MiB of "
                      "workspaces and %.1f MiB for jobs",
                      mib(bytes), mib(copy.limit), cuda->name, mib(copy.weights), mib(copy.buffers),
                      mib(copy.scratch), mib(copy.jobs));
    }
    int rc = table_reserve(cuda);
    if (rc) {
        pthread_mutex_unlock(&cuda->memory_lock);
        return report(LQ_ENOMEM, err, "out of host memory for the allocation table");
    }
    cudaSetDevice(cuda->device);
    void *pointer = NULL;
    cudaError_t status = cudaMalloc(&pointer, bytes);
    if (status != cudaSuccess) {
        pthread_mutex_unlock(&cuda->memory_lock);
        char what[128];
        snprintf(what, sizeof what, "cudaMalloc of %.1f MiB", mib(bytes));
        return lq_cuda_fail(status, what, err);
    }
    size_t slot = pointer_hash(pointer, cuda->allocation_capacity);
    while (cuda->allocations[slot].pointer && cuda->allocations[slot].pointer != LQ_TOMBSTONE)
        slot = (slot + 1) & (cuda->allocation_capacity - 1);
    cuda->allocations[slot] = (struct lq_cuda_allocation){pointer, bytes, purpose};
    cuda->allocation_count++;
    *purpose_counter(m, purpose) += bytes;
    pthread_mutex_unlock(&cuda->memory_lock);
    *out = pointer;
    return LQ_OK;
}

void lq_cuda_free(struct lq_cuda *cuda, void *pointer) {
    if (!pointer) return;
    pthread_mutex_lock(&cuda->memory_lock);
    size_t capacity = cuda->allocation_capacity;
    size_t slot = capacity ? pointer_hash(pointer, capacity) : 0;
    for (size_t probes = 0; capacity && probes < capacity; probes++) {
        struct lq_cuda_allocation *a = &cuda->allocations[slot];
        if (!a->pointer) break;
        if (a->pointer == pointer) {
            *purpose_counter(&cuda->memory, a->purpose) -= a->bytes;
            // recorded graphs may point into weights and workspaces (graph_cuda.cu)
            if (a->purpose == LQ_CUDA_WEIGHTS || a->purpose == LQ_CUDA_SCRATCH)
                __atomic_add_fetch(&cuda->generation, 1, __ATOMIC_RELEASE);
            a->pointer = LQ_TOMBSTONE;
            break;
        }
        slot = (slot + 1) & (capacity - 1);
    }
    pthread_mutex_unlock(&cuda->memory_lock);
    // cudaFree waits for the device, so no queued kernel still reads the memory
    cudaFree(pointer);
}

int lq_cuda_slot(struct lq_cuda *cuda, enum lq_cuda_slot slot, size_t bytes, void **out) {
    if (cuda->slot_bytes[slot] < bytes) {
        lq_cuda_free(cuda, cuda->slot[slot]);
        cuda->slot[slot] = NULL, cuda->slot_bytes[slot] = 0;
        size_t grown = bytes < 4096 ? 4096 : bytes + bytes / 4; // fewer regrowths
        int rc = lq_cuda_malloc(cuda, grown, LQ_CUDA_SCRATCH, &cuda->slot[slot], NULL);
        if (rc) return rc;
        cuda->slot_bytes[slot] = grown;
    }
    *out = cuda->slot[slot];
    return LQ_OK;
}

// Copies host into the pinned ring and returns where; NULL when it does not fit a segment.
// Moving on from a segment records one event behind its last copy (the stream orders them),
// and a segment is written again only once its event has completed: one event per segment
// lap, not one per copy.
static void *ring_put(struct lq_cuda *cuda, const void *host, size_t bytes) {
    const size_t segment_bytes = LQ_CUDA_RING_BYTES / LQ_CUDA_RING_SEGMENTS;
    const size_t rounded = (bytes + 15) / 16 * 16; // the next copy starts 16-byte aligned
    if (!cuda->ring || rounded > segment_bytes) return NULL;
    if (cuda->ring_head % segment_bytes + rounded > segment_bytes) // on to the next segment
        cuda->ring_head += segment_bytes - cuda->ring_head % segment_bytes;
    cuda->ring_head %= LQ_CUDA_RING_BYTES;
    const int segment = (int)(cuda->ring_head / segment_bytes);
    if (cuda->ring_open >= 0 && cuda->ring_open != segment) {
        // every copy out of the open segment is queued by now: one event covers them all
        if (cudaEventRecord(cuda->ring_events[cuda->ring_open], cuda->stream) != cudaSuccess)
            return NULL;
        cuda->ring_recorded[cuda->ring_open] = 1;
        cuda->ring_open = -1;
    }
    if (cuda->ring_open != segment) {
        if (cuda->ring_recorded[segment]) {
            // a lap ago this segment fed copies: they must have read it (long done in practice)
            cudaEventSynchronize(cuda->ring_events[segment]);
            cuda->ring_recorded[segment] = 0;
        }
        cuda->ring_open = segment;
    }
    void *at = cuda->ring + cuda->ring_head;
    memcpy(at, host, bytes);
    cuda->ring_head += rounded;
    return at;
}

int lq_cuda_stage(struct lq_cuda *cuda, enum lq_cuda_slot slot, const void *host, size_t bytes,
                  void **device) {
    // a recorded copy would read the ring again at every replay, long after it was reused
    if (cuda->recording >= 0) return LQ_EUNSUPPORTED;
    int rc = lq_cuda_slot(cuda, slot, bytes, device);
    if (rc) return rc;
    void *pinned = ring_put(cuda, host, bytes);
    if (!pinned) {
        // Large arguments (long prefills) come from pageable memory: the driver stages them,
        // and the call may wait for the stream.
        LQ_CUDA_TRY(cudaMemcpyAsync(*device, host, bytes, cudaMemcpyHostToDevice, cuda->stream),
                    "staging op arguments");
        return LQ_OK;
    }
    LQ_CUDA_TRY(cudaMemcpyAsync(*device, pinned, bytes, cudaMemcpyHostToDevice, cuda->stream),
                "staging op arguments");
    return LQ_OK;
}

// ---------- the ops table ----------

static void cuda_destroy(struct lq_backend *backend) {
    if (!backend) return;
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (cuda) {
        cudaSetDevice(cuda->device);
        cudaStreamSynchronize(cuda->stream);
        lq_cuda_graphs_destroy(cuda);
        for (int i = 0; i < LQ_CUDA_SLOT_COUNT; i++) lq_cuda_free(cuda, cuda->slot[i]);
        lq_cuda_free(cuda, cuda->cublas_workspace);
        for (int i = 0; i < LQ_CUDA_ROPE_TABLES; i++)
            lq_cuda_free(cuda, cuda->rope_tables[i].table);
        for (int i = 0; i < LQ_CUDA_RING_SEGMENTS; i++)
            if (cuda->ring_events[i]) cudaEventDestroy(cuda->ring_events[i]);
        if (cuda->ring) cudaFreeHost(cuda->ring);
        if (cuda->cublas) cublasDestroy(cuda->cublas);
        if (cuda->stream) cudaStreamDestroy(cuda->stream);
        pthread_mutex_destroy(&cuda->lock);
        pthread_mutex_destroy(&cuda->memory_lock);
        free(cuda->allocations);
        free(cuda);
    }
    free(backend);
}

static int cuda_buffer_alloc(struct lq_backend *backend, size_t bytes, void **out,
                             struct lq_error *err) {
    return lq_cuda_malloc(lq_cuda_of(backend), bytes, LQ_CUDA_BUFFERS, out, err);
}

static void cuda_buffer_free(struct lq_backend *backend, void *buffer) {
    lq_cuda_free(lq_cuda_of(backend), buffer);
}

static int cuda_copy_to_device(struct lq_backend *backend, void *device, const void *host,
                               size_t bytes) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    pthread_mutex_lock(&cuda->lock);
    cudaError_t status = cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, cuda->stream);
    // the caller may free or change host right after: wait until the copy has read it
    if (status == cudaSuccess) status = cudaStreamSynchronize(cuda->stream);
    pthread_mutex_unlock(&cuda->lock);
    return status == cudaSuccess ? LQ_OK : lq_cuda_fail(status, "copy to device", NULL);
}

static int cuda_copy_to_host(struct lq_backend *backend, void *host, const void *device,
                             size_t bytes) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    pthread_mutex_lock(&cuda->lock);
    cudaError_t status = cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, cuda->stream);
    if (status == cudaSuccess) status = cudaStreamSynchronize(cuda->stream);
    pthread_mutex_unlock(&cuda->lock);
    return status == cudaSuccess ? LQ_OK : lq_cuda_fail(status, "copy to host", NULL);
}

static int cuda_weights_upload(struct lq_backend *backend, const float *host, size_t count,
                               const float **device, struct lq_error *err) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    void *pointer = NULL;
    int rc = lq_cuda_malloc(cuda, count * sizeof(float), LQ_CUDA_WEIGHTS, &pointer, err);
    if (rc) return rc;
    cudaError_t status = cudaMemcpy(pointer, host, count * sizeof(float), cudaMemcpyHostToDevice);
    if (status != cudaSuccess) {
        lq_cuda_free(cuda, pointer);
        return lq_cuda_fail(status, "uploading weights", err);
    }
    *device = (const float *)pointer;
    return LQ_OK;
}

static void cuda_weights_release(struct lq_backend *backend, const float *device) {
    lq_cuda_free(lq_cuda_of(backend), (void *)device);
}

static int cuda_synchronize(struct lq_backend *backend, struct lq_error *err) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    cudaError_t status = cudaStreamSynchronize(cuda->stream);
    return status == cudaSuccess ? LQ_OK : lq_cuda_fail(status, "synchronize", err);
}

static void cuda_memory(struct lq_backend *backend, struct lq_backend_memory *out) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    pthread_mutex_lock(&cuda->memory_lock);
    *out = cuda->memory;
    pthread_mutex_unlock(&cuda->memory_lock);
    size_t free_bytes = 0, total = 0;
    cudaSetDevice(cuda->device);
    if (cudaMemGetInfo(&free_bytes, &total) == cudaSuccess)
        out->device_free = free_bytes, out->device_total = total;
}

// Every op runs under the op lock (see the top of the file).
#define LOCKED(call)                                                                               \
    struct lq_cuda *cuda = lq_cuda_of(backend);                                                    \
    pthread_mutex_lock(&cuda->lock);                                                               \
    cudaSetDevice(cuda->device); /* the calling thread's current device */                         \
    int rc = (call);                                                                               \
    pthread_mutex_unlock(&cuda->lock);                                                             \
    return rc

static int op_linear_prepare(struct lq_backend *backend, struct lq_linear *linear,
                             struct lq_error *err) {
    LOCKED(lq_cuda_linear_prepare(backend, linear, err));
}

static void op_linear_release(struct lq_backend *backend, struct lq_linear *linear) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    pthread_mutex_lock(&cuda->lock);
    lq_cuda_linear_release(backend, linear);
    pthread_mutex_unlock(&cuda->lock);
}

static int op_embed(struct lq_backend *backend, const float *table, int dim, const int *ids, int n,
                    float *out) {
    LOCKED(lq_cuda_embed(backend, table, dim, ids, n, out));
}

static int op_rmsnorm(struct lq_backend *backend, const float *x, const float *weight, int n,
                      int dim, float eps, float *out) {
    LOCKED(lq_cuda_rmsnorm(backend, x, weight, n, dim, eps, out));
}

static int op_linear(struct lq_backend *backend, const struct lq_linear *w, const float *x, int n,
                     float *y) {
    LOCKED(lq_cuda_linear(backend, w, x, n, y));
}

static int op_linear_group(struct lq_backend *backend, const struct lq_linear *const *w, int count,
                           const float *x, int n, float *const *y) {
    LOCKED(lq_cuda_linear_group(backend, w, count, x, n, y));
}

static int op_fuses_linears(struct lq_backend *backend, int n) {
    return lq_cuda_fuses_linears(backend, n); // the environment only: no lock
}

static int op_linear_fused(struct lq_backend *backend, const struct lq_linear *const *w, int count,
                           const struct lq_linear_input *in, int n, float *const *y,
                           enum lq_linear_output output) {
    LOCKED(lq_cuda_linear_fused(backend, w, count, in, n, y, output));
}

static int op_rope_attention_batch_device(struct lq_backend *backend, float *q, float *k_new,
                                          const float *v_new, float *const *k_caches,
                                          float *const *v_caches, const int *positions, int n,
                                          int heads, int kv_heads, int head_dim, int keys_bound,
                                          float theta, float *out) {
    LOCKED(lq_cuda_rope_attention_batch_device(backend, q, k_new, v_new, k_caches, v_caches,
                                               positions, n, heads, kv_heads, head_dim, keys_bound,
                                               theta, out));
}

static int op_matmul(struct lq_backend *backend, const float *w, int rows, int cols, const float *x,
                     int n, float *y) {
    LOCKED(lq_cuda_matmul(backend, w, rows, cols, x, n, y));
}

static int op_rope(struct lq_backend *backend, float *x, int n, int heads, int head_dim,
                   const int *positions, float theta) {
    LOCKED(lq_cuda_rope(backend, x, n, heads, head_dim, positions, theta));
}

static int op_attention(struct lq_backend *backend, const float *q, const float *k_cache,
                        const float *v_cache, int n, int start, int heads, int kv_heads,
                        int head_dim, float *out) {
    LOCKED(
        lq_cuda_attention(backend, q, k_cache, v_cache, n, start, heads, kv_heads, head_dim, out));
}

static int op_attention_batch(struct lq_backend *backend, const float *q, const float *k_new,
                              const float *v_new, float *const *k_caches, float *const *v_caches,
                              const int *positions, int n, int heads, int kv_heads, int head_dim,
                              float *out) {
    LOCKED(lq_cuda_attention_batch(backend, q, k_new, v_new, k_caches, v_caches, positions, n,
                                   heads, kv_heads, head_dim, out));
}

static int op_swiglu(struct lq_backend *backend, float *gate, const float *up, size_t count) {
    LOCKED(lq_cuda_swiglu(backend, gate, up, count));
}

static int op_add(struct lq_backend *backend, float *x, const float *y, size_t count) {
    LOCKED(lq_cuda_add(backend, x, y, count));
}

static int op_embed_device(struct lq_backend *backend, const float *table, int dim, const int *ids,
                           int n, float *out) {
    LOCKED(lq_cuda_embed_device(backend, table, dim, ids, n, out));
}

static int op_rope_device(struct lq_backend *backend, float *x, int n, int heads, int head_dim,
                          const int *positions, float theta) {
    LOCKED(lq_cuda_rope_device(backend, x, n, heads, head_dim, positions, theta));
}

static int op_rope_qk_device(struct lq_backend *backend, float *q, int q_heads, float *k,
                             int k_heads, int n, int head_dim, const int *positions, float theta) {
    LOCKED(lq_cuda_rope_qk_device(backend, q, q_heads, k, k_heads, n, head_dim, positions, theta));
}

static int op_add_rmsnorm(struct lq_backend *backend, float *x, const float *y, const float *weight,
                          int n, int dim, float eps, float *out) {
    LOCKED(lq_cuda_add_rmsnorm(backend, x, y, weight, n, dim, eps, out));
}

static int op_attention_batch_device(struct lq_backend *backend, const float *q, const float *k_new,
                                     const float *v_new, float *const *k_caches,
                                     float *const *v_caches, const int *positions, int n, int heads,
                                     int kv_heads, int head_dim, int keys_bound, float *out) {
    LOCKED(lq_cuda_attention_batch_device(backend, q, k_new, v_new, k_caches, v_caches, positions,
                                          n, heads, kv_heads, head_dim, keys_bound, out));
}

static int op_token_nll(struct lq_backend *backend, const float *logits, const int *targets, int n,
                        int vocab, double *nll) {
    LOCKED(lq_cuda_token_nll(backend, logits, targets, n, vocab, nll));
}

static const struct lq_backend_ops cuda_ops = {
    /* name */ "cuda",
    /* destroy */ cuda_destroy,
    /* buffer_alloc */ cuda_buffer_alloc,
    /* buffer_free */ cuda_buffer_free,
    /* copy_to_device */ cuda_copy_to_device,
    /* copy_to_host */ cuda_copy_to_host,
    /* weights_upload */ cuda_weights_upload,
    /* weights_release */ cuda_weights_release,
    /* linear_prepare */ op_linear_prepare,
    /* linear_release */ op_linear_release,
    /* embed */ op_embed,
    /* rmsnorm */ op_rmsnorm,
    /* linear */ op_linear,
    /* matmul */ op_matmul,
    /* rope */ op_rope,
    /* attention */ op_attention,
    /* attention_batch */ op_attention_batch,
    /* swiglu */ op_swiglu,
    /* add */ op_add,
    /* synchronize */ cuda_synchronize,
    /* memory */ cuda_memory,
    /* decompose */ lq_cuda_decompose,
    /* decompose_errors */ lq_cuda_decompose_errors,
    // The training ops (train_cuda.cu, attention_backward_cuda.cu).
    /* zero */ lq_cuda_op_zero,
    /* copy */ lq_cuda_op_copy,
    /* linear_lora */ lq_cuda_op_linear_lora,
    /* linear_backward */ lq_cuda_op_linear_backward,
    /* matmul_backward */ lq_cuda_op_matmul_backward,
    /* rmsnorm_backward */ lq_cuda_op_rmsnorm_backward,
    /* rope_backward */ lq_cuda_op_rope_backward,
    /* attention_backward */ lq_cuda_op_attention_backward,
    /* swiglu_backward */ lq_cuda_op_swiglu_backward,
    /* cross_entropy */ lq_cuda_op_cross_entropy,
    /* sum_squares */ lq_cuda_op_sum_squares,
    /* accumulate_squares */ lq_cuda_op_accumulate_squares,
    /* adamw */ lq_cuda_op_adamw,
    // Adapters in serving (lowrank_cuda.cu; the entries take the op lock themselves).
    /* linear_base */ lq_cuda_op_linear_base,
    /* lowrank_add */ lq_cuda_op_lowrank_add,
    /* head_prepare */ NULL,
    /* head_release */ NULL,
    /* head_matmul */ NULL,
    /* head_embed */ NULL,
    // Decode-step graphs (graph_cuda.cu).
    /* embed_device */ op_embed_device,
    /* rope_device */ op_rope_device,
    /* attention_batch_device */ op_attention_batch_device,
    /* rope_qk_device */ op_rope_qk_device,
    /* add_rmsnorm */ op_add_rmsnorm,
    /* graph_begin */ lq_cuda_op_graph_begin,
    /* graph_end */ lq_cuda_op_graph_end,
    // Evaluation (nll_cuda.cu).
    /* token_nll */ op_token_nll,
    // Sampling on the device (sample_cuda.cu; the entry takes the op lock itself).
    /* sample */ lq_cuda_op_sample,
    /* linear_group */ op_linear_group,
    /* rope_attention_batch_device */ op_rope_attention_batch_device,
    /* fuses_linears */ op_fuses_linears,
    /* linear_fused */ op_linear_fused,
};

extern "C" int lq_backend_cuda_create(int device, size_t memory_limit, struct lq_backend **out,
                                      struct lq_error *err) {
    *out = NULL;
    int count = 0;
    lq_cuda_default_connections();
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0) {
        cudaGetLastError();
        return lq_error_set(err, LQ_EUNSUPPORTED, "no CUDA device is available (%s)",
                            status == cudaSuccess ? "none found" : cudaGetErrorString(status));
    }
    if (device < 0 || device >= count)
        return lq_error_set(err, LQ_EUNSUPPORTED, "CUDA device %d does not exist (%d found)",
                            device, count);
    struct lq_backend *backend = (struct lq_backend *)calloc(1, sizeof *backend);
    struct lq_cuda *cuda = (struct lq_cuda *)calloc(1, sizeof *cuda);
    if (!backend || !cuda) {
        free(backend), free(cuda);
        return lq_error_set(err, LQ_ENOMEM, "out of memory");
    }
    backend->ops = &cuda_ops, backend->impl = cuda;
    cuda->device = device;
    {
        // recursive: graph_begin holds it across a recorded step's ops (graph_cuda.cu)
        pthread_mutexattr_t attributes;
        pthread_mutexattr_init(&attributes);
        pthread_mutexattr_settype(&attributes, PTHREAD_MUTEX_RECURSIVE);
        pthread_mutex_init(&cuda->lock, &attributes);
        pthread_mutexattr_destroy(&attributes);
    }
    cuda->recording = -1;
    {
        const char *graphs = getenv("LQ_CUDA_GRAPHS");
        cuda->graphs_enabled = !(graphs && strcmp(graphs, "0") == 0);
        const char *prefetch = getenv("LQ_CUDA_PREFETCH");
        // off unless asked for: measured slower on an H100 (README, "The GPU")
        cuda->prefetch_enabled = prefetch && strcmp(prefetch, "1") == 0;
    }
    pthread_mutex_init(&cuda->memory_lock, NULL);
    int rc = LQ_OK;
    cudaDeviceProp properties;
    // The op stream at the device's greatest priority: a compress job's decompositions run
    // beside serving on streams of their own at the default, the least (decompose_cuda.cu), and
    // the block scheduler hands a freed SM slot to the higher priority's waiting CTAs first. So
    // a decode step does not queue behind an error table's kernels, and the decode kernel that
    // projects t itself (LQ_CUDA_MMA1_INLINE_T), whose CTAs wait for each other, gets the rest
    // of its grid onto the GPU as soon as slots free (a hint to the scheduler, not a guarantee:
    // a warp whose poll runs out takes the sums it needs itself, slower but the same bits).
    int least_priority = 0, greatest_priority = 0;
    if ((status = cudaSetDevice(device)) != cudaSuccess ||
        (status = cudaGetDeviceProperties(&properties, device)) != cudaSuccess ||
        (status = cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority)) !=
            cudaSuccess ||
        (status = cudaStreamCreateWithPriority(&cuda->stream, cudaStreamNonBlocking,
                                               greatest_priority)) != cudaSuccess) {
        rc = lq_cuda_fail(status, "opening the device", err);
        goto fail;
    }
    snprintf(cuda->name, sizeof cuda->name, "CUDA device %d (%.200s)", device, properties.name);
    cuda->sm_count = properties.multiProcessorCount;
    cuda->reserved_shared = (unsigned)properties.reservedSharedMemPerBlock;
    cuda->shared_per_sm = properties.sharedMemPerMultiprocessor;
    cuda->l2_bytes = (size_t)properties.l2CacheSize;
    {
        const char *pdl = getenv("LQ_CUDA_PDL");
        cuda->pdl = !(pdl && strcmp(pdl, "0") == 0) && lq_cuda_pdl_supported(cuda);
    }
    {
        cublasStatus_t blas = cublasCreate(&cuda->cublas);
        if (blas == CUBLAS_STATUS_SUCCESS) blas = cublasSetStream(cuda->cublas, cuda->stream);
        if (blas != CUBLAS_STATUS_SUCCESS) {
            rc = lq_cublas_fail(blas, "creating the cuBLAS handle", err);
            goto fail;
        }
    }
    if (memory_limit == 0) {
        size_t free_bytes = 0, total = 0;
        if ((status = cudaMemGetInfo(&free_bytes, &total)) != cudaSuccess) {
            rc = lq_cuda_fail(status, "cudaMemGetInfo", err);
            goto fail;
        }
        memory_limit = free_bytes - free_bytes / 20; // cuBLAS and the driver need some room
    }
    cuda->memory.limit = memory_limit;
    {
        // cuBLAS's own workspace, fixed, so that a recorded step's cuBLAS calls allocate nothing
        const size_t bytes = (size_t)32 << 20;
        rc = lq_cuda_malloc(cuda, bytes, LQ_CUDA_SCRATCH, &cuda->cublas_workspace, err);
        if (rc) goto fail;
        cublasStatus_t blas = cublasSetWorkspace(cuda->cublas, cuda->cublas_workspace, bytes);
        if (blas != CUBLAS_STATUS_SUCCESS) {
            rc = lq_cublas_fail(blas, "setting the cuBLAS workspace", err);
            goto fail;
        }
    }
    cuda->ring_open = -1;
    if ((status = cudaHostAlloc((void **)&cuda->ring, LQ_CUDA_RING_BYTES, cudaHostAllocDefault)) !=
        cudaSuccess) {
        rc = lq_cuda_fail(status, "pinned staging memory", err);
        goto fail;
    }
    for (int i = 0; i < LQ_CUDA_RING_SEGMENTS; i++)
        if ((status = cudaEventCreateWithFlags(&cuda->ring_events[i], cudaEventDisableTiming)) !=
            cudaSuccess) {
            rc = lq_cuda_fail(status, "staging events", err);
            goto fail;
        }
    *out = backend;
    return LQ_OK;
fail:
    cuda_destroy(backend);
    return rc;
}
