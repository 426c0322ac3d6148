/* The CPU backend: host memory, OpenBLAS for matrix products, lq_parallel_for for the rest.
 * It is the reference every other backend is tested against. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/parallel.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/int_gemv.h"

/* What the backend has allocated, for memory(): buffers, and the bf16 heads it keeps (other
 * weights stay the model's). */
struct cpu_backend {
    struct lq_backend base;
    size_t buffers;                  /* bytes, updated atomically */
    size_t heads;                    /* bytes of bf16/int8 heads, updated atomically */
    enum lq_cpu_head_precision head; /* LQ_CPU_HEAD, read once at creation */
};

static void cpu_destroy(struct lq_backend *backend) {
    free(backend);
}

/* Each buffer carries its size in a 64-byte header before it, so free can count it. */
#define CPU_HEADER 64

static int cpu_buffer_alloc(struct lq_backend *backend, size_t bytes, void **out,
                            struct lq_error *err) {
    size_t total = CPU_HEADER + (bytes + 63) / 64 * 64;
    unsigned char *block = aligned_alloc(64, total);
    *out = NULL;
    if (!block) return lq_error_set(err, LQ_ENOMEM, "out of memory for a %zu-byte buffer", bytes);
    memcpy(block, &total, sizeof total);
    __atomic_add_fetch(&((struct cpu_backend *)backend)->buffers, total, __ATOMIC_RELAXED);
    *out = block + CPU_HEADER;
    return LQ_OK;
}

static void cpu_buffer_free(struct lq_backend *backend, void *buffer) {
    if (!buffer) return;
    unsigned char *block = (unsigned char *)buffer - CPU_HEADER;
    size_t total;
    memcpy(&total, block, sizeof total);
    __atomic_sub_fetch(&((struct cpu_backend *)backend)->buffers, total, __ATOMIC_RELAXED);
    free(block);
}

static int cpu_copy(struct lq_backend *backend, void *to, const void *from, size_t bytes) {
    (void)backend;
    memmove(to, from, bytes);
    return LQ_OK;
}

static int cpu_weights_upload(struct lq_backend *backend, const float *host, size_t count,
                              const float **device, struct lq_error *err) {
    (void)backend, (void)count, (void)err;
    *device = host; /* host memory is device memory here */
    return LQ_OK;
}

static void cpu_weights_release(struct lq_backend *backend, const float *device) {
    (void)backend, (void)device;
}

static int cpu_linear_prepare(struct lq_backend *backend, struct lq_linear *linear,
                              struct lq_error *err) {
    (void)backend;
    if (!linear->is_lq && !linear->dense)
        return lq_error_set(err, LQ_EINVAL, "linear layer %d x %d has no weights", linear->rows,
                            linear->cols);
    linear->backend_data = NULL;
    return LQ_OK;
}

static void cpu_linear_release(struct lq_backend *backend, struct lq_linear *linear) {
    (void)backend;
    linear->backend_data = NULL;
}

static int cpu_embed(struct lq_backend *backend, const float *table, int dim, const int *ids, int n,
                     float *out) {
    (void)backend;
    for (int i = 0; i < n; i++)
        memcpy(out + (size_t)i * dim, table + (size_t)ids[i] * dim, (size_t)dim * sizeof(float));
    return LQ_OK;
}

static int cpu_rmsnorm(struct lq_backend *backend, const float *x, const float *weight, int n,
                       int dim, float eps, float *out) {
    (void)backend;
    for (int i = 0; i < n; i++) {
        const float *row = x + (size_t)i * dim;
        float *y = out + (size_t)i * dim;
        double sum = 0.0;
        for (int j = 0; j < dim; j++) sum += (double)row[j] * row[j];
        float scale = (float)(1.0 / sqrt(sum / dim + eps));
        for (int j = 0; j < dim; j++) y[j] = row[j] * scale * weight[j];
    }
    return LQ_OK;
}

static int cpu_matmul(struct lq_backend *backend, const float *w, int rows, int cols,
                      const float *x, int n, float *y) {
    (void)backend;
    lq_cpu_gemm_nt(n, rows, cols, x, w, y, rows, 0.0f);
    return LQ_OK;
}

static int cpu_head_prepare(struct lq_backend *backend, const float *w, int rows, int cols,
                            int quantized_model, void **head, struct lq_error *err) {
    struct cpu_backend *cpu = (struct cpu_backend *)backend;
    *head = NULL;
    enum lq_cpu_head_precision precision = cpu->head;
    if (precision == LQ_CPU_HEAD_AUTO) /* the int8 head costs ~0 perplexity (README) */
        precision =
            quantized_model && lq_int_gemv_avx512_supported() ? LQ_CPU_HEAD_INT8 : LQ_CPU_HEAD_FP32;
    if (precision == LQ_CPU_HEAD_FP32) return LQ_OK; /* matmul on the fp32 head */
    if (precision == LQ_CPU_HEAD_INT8 && cols % LQ_INT_RUN) return LQ_OK; /* not runs of 32 */
    struct lq_cpu_head *copy;
    int rc = lq_cpu_head_create(w, rows, cols, precision, &copy, err);
    if (rc) return rc;
    __atomic_add_fetch(&cpu->heads, lq_cpu_head_bytes(copy), __ATOMIC_RELAXED);
    *head = copy;
    return LQ_OK;
}

static void cpu_head_release(struct lq_backend *backend, void *head) {
    if (!head) return;
    __atomic_sub_fetch(&((struct cpu_backend *)backend)->heads, lq_cpu_head_bytes(head),
                       __ATOMIC_RELAXED);
    lq_cpu_head_free(head);
}

static int cpu_head_matmul(struct lq_backend *backend, const void *head, const float *x, int n,
                           float *y) {
    (void)backend;
    return lq_cpu_head_matmul(head, x, n, y);
}

static int cpu_head_embed(struct lq_backend *backend, const void *head, const int *ids, int n,
                          float *out) {
    (void)backend;
    lq_cpu_head_embed(head, ids, n, out);
    return LQ_OK;
}

/* The cos and sin of a rope call's angles, kept per thread: every layer's q and k rope of a
 * forward call see the same positions, so a decode step of 8 sequences computed its 256 cos/sin
 * pairs (and their pow) 60 times over for SmolLM2. Only small calls are kept (decode batches,
 * short prompts); the values are the ones computed directly, so nothing changes a bit. */
#define ROPE_CACHE_PAIRS 2048
static _Thread_local struct {
    int n, half, valid;
    float theta;
    int positions[ROPE_CACHE_PAIRS];
    float cos_sin[2 * ROPE_CACHE_PAIRS];
} rope_cache;

static void rope_angles(const int *positions, int n, int half, int head_dim, float theta,
                        float *cos_sin) {
    for (int k = 0; k < half; k++) {
        /* HF: inv_freq = theta^(-2k/hd); the angle in double keeps long contexts exact */
        double inv_freq = pow((double)theta, -2.0 * k / head_dim);
        for (int i = 0; i < n; i++) {
            double angle = positions[i] * inv_freq;
            cos_sin[2 * ((size_t)i * half + k)] = (float)cos(angle);
            cos_sin[2 * ((size_t)i * half + k) + 1] = (float)sin(angle);
        }
    }
}

static void rope_apply(float *x, int n, int heads, int head_dim, const float *cos_sin) {
    int half = head_dim / 2;
    for (int i = 0; i < n; i++)
        for (int h = 0; h < heads; h++) {
            float *v = x + ((size_t)i * heads + h) * head_dim;
            const float *cs = cos_sin + 2 * (size_t)i * half;
            for (int k = 0; k < half; k++) {
                float c = cs[2 * k], s = cs[2 * k + 1], x0 = v[k], x1 = v[k + half];
                v[k] = x0 * c - x1 * s;
                v[k + half] = x0 * s + x1 * c;
            }
        }
}

static int cpu_rope(struct lq_backend *backend, float *x, int n, int heads, int head_dim,
                    const int *positions, float theta) {
    (void)backend;
    int half = head_dim / 2;
    if ((size_t)n * (size_t)half <= ROPE_CACHE_PAIRS) {
        if (!rope_cache.valid || rope_cache.n != n || rope_cache.half != half ||
            rope_cache.theta != theta ||
            memcmp(rope_cache.positions, positions, (size_t)n * sizeof *positions) != 0) {
            rope_angles(positions, n, half, head_dim, theta, rope_cache.cos_sin);
            memcpy(rope_cache.positions, positions, (size_t)n * sizeof *positions);
            rope_cache.n = n, rope_cache.half = half, rope_cache.theta = theta;
            rope_cache.valid = 1;
        }
        rope_apply(x, n, heads, head_dim, rope_cache.cos_sin);
        return LQ_OK;
    }
    /* long calls: per chunk of tokens that fits the table, computed afresh */
    float cos_sin[2 * ROPE_CACHE_PAIRS];
    int chunk = ROPE_CACHE_PAIRS / (half ? half : 1);
    for (int first = 0; first < n; first += chunk) {
        int count = n - first < chunk ? n - first : chunk;
        rope_angles(positions + first, count, half, head_dim, theta, cos_sin);
        rope_apply(x + (size_t)first * heads * head_dim, count, heads, head_dim, cos_sin);
    }
    return LQ_OK;
}

static int cpu_attention_batch(struct lq_backend *backend, const float *q, const float *k_new,
                               const float *v_new, float *const *k_caches, float *const *v_caches,
                               const int *positions, int n, int heads, int kv_heads, int head_dim,
                               float *out) {
    const size_t kv_dim = (size_t)kv_heads * head_dim;
    for (int i = 0; i < n; i++) {
        size_t row = (size_t)positions[i] * kv_dim;
        memcpy(k_caches[i] + row, k_new + i * kv_dim, kv_dim * sizeof(float));
        memcpy(v_caches[i] + row, v_new + i * kv_dim, kv_dim * sizeof(float));
    }
    (void)backend;
    /* every (sequence, head) in one loop over the pool: 8 sequences of 9 heads were 8 loops of
     * 9 tasks, mostly on one thread */
    return lq_cpu_attention_decode(q, (const float *const *)k_caches,
                                   (const float *const *)v_caches, positions, n, heads, kv_heads,
                                   head_dim, out);
}

struct swiglu_job {
    float *gate;
    const float *up;
};

static void swiglu_body(void *context, size_t begin, size_t end) {
    const struct swiglu_job *job = context;
    for (size_t i = begin; i < end; i++)
        job->gate[i] = job->gate[i] / (1.0f + expf(-job->gate[i])) * job->up[i];
}

static int cpu_swiglu(struct lq_backend *backend, float *gate, const float *up, size_t count) {
    (void)backend;
    /* elementwise, so the split changes no bit; a part of 4K expf is worth a thread */
    struct swiglu_job job = {gate, up};
    lq_parallel_for(count, 4096, swiglu_body, &job);
    return LQ_OK;
}

static int cpu_add(struct lq_backend *backend, float *x, const float *y, size_t count) {
    (void)backend;
    for (size_t i = 0; i < count; i++) x[i] += y[i];
    return LQ_OK;
}

/* add then rmsnorm: the same calls, so the same bits. */
static int cpu_add_rmsnorm(struct lq_backend *backend, float *x, const float *y,
                           const float *weight, int n, int dim, float eps, float *out) {
    int rc = cpu_add(backend, x, y, (size_t)n * dim);
    return rc ? rc : cpu_rmsnorm(backend, x, weight, n, dim, eps, out);
}

static int cpu_synchronize(struct lq_backend *backend, struct lq_error *err) {
    (void)backend, (void)err;
    return LQ_OK; /* every op has finished when it returns */
}

static void cpu_memory(struct lq_backend *backend, struct lq_backend_memory *out) {
    memset(out, 0, sizeof *out);
    out->buffers = __atomic_load_n(&((struct cpu_backend *)backend)->buffers, __ATOMIC_RELAXED);
    out->weights = __atomic_load_n(&((struct cpu_backend *)backend)->heads, __ATOMIC_RELAXED);
}

static const struct lq_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .buffer_alloc = cpu_buffer_alloc,
    .buffer_free = cpu_buffer_free,
    .copy_to_device = cpu_copy,
    .copy_to_host = cpu_copy,
    .weights_upload = cpu_weights_upload,
    .weights_release = cpu_weights_release,
    .linear_prepare = cpu_linear_prepare,
    .linear_release = cpu_linear_release,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .linear = lq_cpu_linear,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .attention = lq_cpu_attention,
    .attention_batch = cpu_attention_batch,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .add_rmsnorm = cpu_add_rmsnorm,
    .synchronize = cpu_synchronize,
    .memory = cpu_memory,
    .decompose = NULL, /* core's lq_decompose is the CPU's */
    .decompose_errors = NULL,
    /* training ops (train_cpu.c) */
    .zero = lq_cpu_zero,
    .copy = cpu_copy,
    .linear_lora = lq_cpu_linear_lora,
    .linear_backward = lq_cpu_linear_backward,
    .matmul_backward = lq_cpu_matmul_backward,
    .rmsnorm_backward = lq_cpu_rmsnorm_backward,
    .rope_backward = lq_cpu_rope_backward,
    .attention_backward = lq_cpu_attention_backward,
    .swiglu_backward = lq_cpu_swiglu_backward,
    .cross_entropy = lq_cpu_cross_entropy,
    .sum_squares = lq_cpu_sum_squares,
    .accumulate_squares = lq_cpu_accumulate_squares,
    .adamw = lq_cpu_adamw,
    /* adapter ops (lowrank_cpu.c) */
    .linear_base = lq_cpu_linear_base,
    .lowrank_add = lq_cpu_lowrank_add,
    /* the bf16 or int8 head (head_cpu.c) */
    .head_prepare = cpu_head_prepare,
    .head_release = cpu_head_release,
    .head_matmul = cpu_head_matmul,
    .head_embed = cpu_head_embed,
    .token_nll = lq_cpu_token_nll, /* evaluation (nll_cpu.c) */
    /* sampling (sample_cpu.c) */
    .sample = lq_cpu_sample,
};

int lq_backend_cpu_create(struct lq_backend **out, struct lq_error *err) {
    struct cpu_backend *cpu = calloc(1, sizeof *cpu);
    *out = cpu ? &cpu->base : NULL;
    if (!*out) return lq_error_set(err, LQ_ENOMEM, "out of memory");
    /* The backend parallelises over its own pool (core/parallel.h); OpenBLAS's threads would
     * spin against it, so OpenBLAS runs one thread per call from here on. */
    openblas_set_num_threads(1);
    cpu->head = lq_cpu_head_precision_from_env();
    (*out)->ops = &cpu_ops;
    return LQ_OK;
}
