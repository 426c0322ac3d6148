// What the CUDA backend's files share: the backend's state, error checks, device memory with
// accounting, growable workspaces, and the op entry points each file implements. CUDA C++ only.
//
// Threading: every op of the ops table runs with cuda->lock held (backend_cuda.cu takes it),
// so an op's kernels, workspaces and host-argument staging are never interleaved with
// another op's; all ops queue on cuda->stream in call order. Decompositions are long: they run
// on their own stream and handles without the op lock, and take only memory_lock to count.
#ifndef LQ_CUDA_INTERNAL_H
#define LQ_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include <pthread.h>

extern "C" {
#include "kernels/backend.h"
}

enum lq_cuda_purpose {
    LQ_CUDA_WEIGHTS,
    LQ_CUDA_BUFFERS,
    LQ_CUDA_SCRATCH,
    LQ_CUDA_JOBS,
};

// Workspaces, one per use, grown on demand and kept: only ever used inside an op (lock held).
enum lq_cuda_slot {
    LQ_CUDA_STAGE_0, // host arguments copied to the device (positions, ids, pointers)
    LQ_CUDA_STAGE_1,
    LQ_CUDA_STAGE_2,
    LQ_CUDA_LINEAR_TILE,  // dequantized weight tiles (large-batch linear)
    LQ_CUDA_LINEAR_INPUT, // the activations converted for the tensor-core path
    LQ_CUDA_LOWRANK,      // x·L2ᵀ of the low-rank path
    LQ_CUDA_ATTENTION,    // attention partial results
    LQ_CUDA_FUSED_INPUT,  // linear_fused's input, where its kernels cannot take the op before
    LQ_CUDA_FUSED_OUTPUT, // linear_fused's result before its add, likewise
    LQ_CUDA_TRAIN_INPUT,  // training's bf16 copy of x or dy for the bf16 products
    LQ_CUDA_SLOT_COUNT
};

struct lq_cuda_allocation; // the accounting table's entries (backend_cuda.cu)

// RoPE's cos/sin for positions below LQ_CUDA_ROPE_POSITIONS, per (theta, head_dim), computed
// once on the device as the CPU computes them (ops_cuda.cu): a decode step's RoPE then reads
// them instead of evaluating double pow and sincos (11 us per launch at batch 1 on an H100).
#define LQ_CUDA_ROPE_TABLES 4
#define LQ_CUDA_ROPE_POSITIONS 8192
struct lq_cuda_rope_table {
    float theta;
    int head_dim;
    float *table; // [positions][cos half | sin half], scratch; NULL: unused entry
};

// Recorded decode steps (graph_cuda.cu): an entry per key, its executable graph once recorded.
#define LQ_CUDA_GRAPHS 128
struct lq_cuda_graph {
    uint64_t key;
    uint64_t generation;  // cuda->generation when it was recorded
    uint64_t last_used;   // for eviction
    cudaGraphExec_t exec; // NULL: the key was seen (its step ran eagerly), not recorded yet
    int failures;         // recordings that failed; from 2 on the key always runs eagerly
    int used;
};

#define LQ_CUDA_RING_BYTES ((size_t)1 << 20)
#define LQ_CUDA_RING_SEGMENTS 16

struct lq_cuda {
    int device;
    int sm_count;
    unsigned reserved_shared; // bytes of shared memory the driver keeps below a CTA's own
    size_t shared_per_sm;     // shared memory of an SM, for all its CTAs (their reserves too)
    size_t l2_bytes;
    char name[256];
    cudaStream_t stream;
    cublasHandle_t cublas; // bound to stream
    pthread_mutex_t lock;  // held by every op (see above)

    pthread_mutex_t memory_lock; // the accounting below
    struct lq_backend_memory memory;
    struct lq_cuda_allocation *allocations; // open-addressing table keyed by pointer
    size_t allocation_capacity, allocation_count;

    void *slot[LQ_CUDA_SLOT_COUNT];
    size_t slot_bytes[LQ_CUDA_SLOT_COUNT];

    // Pinned host ring that op arguments pass through on their way to the device, so that
    // staging never waits for the stream (a copy from pageable memory can). Segments are
    // reused only after the event recorded behind their last copy has completed.
    unsigned char *ring;
    size_t ring_head;
    cudaEvent_t ring_events[LQ_CUDA_RING_SEGMENTS];
    int ring_recorded[LQ_CUDA_RING_SEGMENTS];
    int ring_open; // the segment copies are being queued from (no event yet), or -1

    // Bumped (atomically) whenever memory a recorded graph may point into goes away: a weight
    // or workspace freed, a workspace grown. Graphs recorded before are dropped, not replayed.
    // Buffers (KV caches, activations) do not count: graph keys name the buffers they use.
    uint64_t generation;
    int graphs_enabled; // LQ_CUDA_GRAPHS=0 turns recording off
    struct lq_cuda_graph graphs[LQ_CUDA_GRAPHS];
    uint64_t graph_clock;
    int recording;                 // index of the graph being recorded, or -1
    uint64_t recording_generation; // cuda->generation when the recording began
    void *cublas_workspace;        // fixed, so that recorded cuBLAS calls allocate nothing
    struct lq_cuda_rope_table rope_tables[LQ_CUDA_ROPE_TABLES];

    // Weight prefetch (linear_cuda.cu): the LQ layer whose decode kernel ran last, so the next
    // one learns it follows it; links made before link_generation changed are stale.
    struct lq_cuda_linear_data *last_decoded;
    uint64_t link_generation;
    int prefetch_enabled; // LQ_CUDA_PREFETCH=1 turns it on
    // The kernels of a step (norms, RoPE, attention, SwiGLU, add, embedding, the decode
    // projections) launch with programmatic dependent launch (pdl_cuda.cuh): a Hopper device
    // and sm_90 code; LQ_CUDA_PDL=0 turns it off.
    int pdl;
};

static inline struct lq_cuda *lq_cuda_of(struct lq_backend *backend) {
    return (struct lq_cuda *)backend->impl;
}

// Turns a failed CUDA/cuBLAS/cuSOLVER status into an LQ_E* code, printing "lqd: cuda: what:
// reason" to stderr (ops return bare codes, so the reason would otherwise be lost) and into
// err when given. cudaErrorMemoryAllocation gives LQ_ENOMEM, others LQ_EIO.
int lq_cuda_fail(cudaError_t status, const char *what, struct lq_error *err);
int lq_cublas_fail(cublasStatus_t status, const char *what, struct lq_error *err);
int lq_cusolver_fail(cusolverStatus_t status, const char *what, struct lq_error *err);

#define LQ_CUDA_TRY(call, what)                                                                    \
    do {                                                                                           \
        cudaError_t lq_status_ = (call);                                                           \
        if (lq_status_ != cudaSuccess) return lq_cuda_fail(lq_status_, (what), NULL);              \
    } while (0)
// After a kernel launch: the launch's own error (bad configuration, no kernel image).
#define LQ_CUDA_LAUNCHED(what) LQ_CUDA_TRY(cudaGetLastError(), (what))
#define LQ_CUBLAS_TRY(call, what)                                                                  \
    do {                                                                                           \
        cublasStatus_t lq_status_ = (call);                                                        \
        if (lq_status_ != CUBLAS_STATUS_SUCCESS) return lq_cublas_fail(lq_status_, (what), NULL);  \
    } while (0)

// Device memory, counted under `purpose` and refused (LQ_ENOMEM, with a message saying what
// the device holds) beyond the backend's limit. Never managed memory. Free with lq_cuda_free.
int lq_cuda_malloc(struct lq_cuda *cuda, size_t bytes, enum lq_cuda_purpose purpose, void **out,
                   struct lq_error *err);
void lq_cuda_free(struct lq_cuda *cuda, void *pointer);

// The workspace `slot`, at least `bytes` large (grown, counted as scratch). Lock held.
int lq_cuda_slot(struct lq_cuda *cuda, enum lq_cuda_slot slot, size_t bytes, void **out);
// Copies bytes of host memory into workspace `slot` on the op stream; *device gets the copy.
int lq_cuda_stage(struct lq_cuda *cuda, enum lq_cuda_slot slot, const void *host, size_t bytes,
                  void **device);

// graph_cuda.cu: the ops-table entries graph_begin / graph_end (kernels/backend.h), and the
// cleanup at destroy.
int lq_cuda_op_graph_begin(struct lq_backend *backend, uint64_t key);
int lq_cuda_op_graph_end(struct lq_backend *backend, int failed);
void lq_cuda_graphs_destroy(struct lq_cuda *cuda);

// ---- the ops, by file; each runs with cuda->lock held and queues on cuda->stream ----

// Device memory a kernel asks L2 to fetch while it runs: the next LQ layer's buffers, so that
// HBM streams the weights of the whole decode step without pausing at kernel boundaries
// (linear_cuda.cu). Regions start 16-byte aligned; sizes are multiples of 16.
#define LQ_PREFETCH_REGIONS 5
struct lq_prefetch {
    const char *base[LQ_PREFETCH_REGIONS];
    uint32_t bytes[LQ_PREFETCH_REGIONS];
    uint32_t end_piece[LQ_PREFETCH_REGIONS]; // pieces (prefetch_cuda.cuh) of regions 0..r
    int count;
};

// linear_cuda.cu: LQ layers stay packed on the device (codes, scale codes, group scales,
// L1/L2); dense layers are uploaded as they are.
// What lq_cuda_linear_prepare leaves in lq_linear.backend_data (owned by the backend):
struct lq_cuda_linear_data {
    float *dense;            // dense layers: rows x cols
    uint32_t *codes;         // the packed codes as 32-bit words (+ padding)
    uint32_t *scale_codes;   // the packed block-scale codes (+ padding)
    uint8_t *group_scales;   // the group scales (+ padding)
    float *table;            // the NF table of b0 bits
    float *group_scales_f32; // b0 = 2, 3, 4 with bf16 or fp16 group scales: them in fp32 (v6)
    float *lora_A;           // L2 [rank, cols]
    float *lora_B;           // L1 [rows, rank]
    unsigned *tickets;       // per decode row band: slices finished (back to 0 after each call)
    int overlap;             // programmatic dependent launch works (sm_90 device and code)
    size_t codes_bytes, scale_codes_bytes, group_scales_bytes; // what the buffers hold
    // The layer that ran after this one last time (learned; see struct lq_cuda): its decode
    // kernel prefetches that layer's buffers into L2 while it runs.
    struct lq_cuda_linear_data *next;
    uint64_t next_generation;
    int rows, cols, rank;
};

int lq_cuda_linear_prepare(struct lq_backend *backend, struct lq_linear *linear,
                           struct lq_error *err);
// Blocks per 32-value chunk for the fast decode and tensor-core kernels (1, 2 or 4), or 0 when
// they cannot run: cols % 32 == 0, rows·cols < 2^31, and each chunk inside one group, holding
// whole blocks (B0 = 8, 16) or inside one (B0 % 32 == 0).
int lq_cuda_blocks_per_chunk(const struct lq_linear *w);
// y[n, rows] (leading dimension ldy) = x[n, cols] · w[rows, cols]ᵀ + beta · y for row-major
// fp32 arrays on cuda->stream: on TF32 tensor cores (inputs rounded to 10-bit mantissas, fp32
// sums) when tf32, else as an SGEMM.
int lq_cuda_gemm_nt(struct lq_cuda *cuda, bool tf32, const float *w, int rows, int cols,
                    const float *x, int n, float beta, float *y, int ldy);
// Whether the prefill path's low-rank products (its main product takes fp16 tensor cores) run
// on TF32 ones: LQ_CUDA_LOWRANK_TF32, read on every call, 0 for SGEMMs, anything else or unset
// for TF32.
bool lq_cuda_lowrank_tf32(void);
// Rows [r0, r0 + count) of an LQ layer's Q, dequantized into tile (count·cols fp32 values,
// the caller's device memory) on cuda->stream, each value core/nf.c's bit for bit. LQ_EINVAL
// for a dense layer or rows past the matrix.
int lq_cuda_dequant_rows_f32(struct lq_cuda *cuda, const struct lq_linear *w,
                             const struct lq_cuda_linear_data *data, size_t r0, size_t count,
                             float *tile);
// The same rounded to bf16 (the fp32 value's nearest).
int lq_cuda_dequant_rows_bf16(struct lq_cuda *cuda, const struct lq_linear *w,
                              const struct lq_cuda_linear_data *data, size_t r0, size_t count,
                              __nv_bfloat16 *tile);
// Whether programmatic dependent launch works here: a Hopper device and code compiled for it.
int lq_cuda_pdl_supported(struct lq_cuda *cuda);
void lq_cuda_linear_release(struct lq_backend *backend, struct lq_linear *linear);
int lq_cuda_linear(struct lq_backend *backend, const struct lq_linear *w, const float *x, int n,
                   float *y);
// linear_group (kernels/backend.h): one to four tokens through LQ layers decode together
// (projections first, then the decode kernels, each launching while the one before runs);
// anything else runs lq_cuda_linear per layer. At most LQ_CUDA_GROUP_MAX layers together.
#define LQ_CUDA_GROUP_MAX 4
int lq_cuda_linear_group(struct lq_backend *backend, const struct lq_linear *const *w, int count,
                         const float *x, int n, float *const *y);
// linear_fused and fuses_linears (kernels/backend.h): the input's norm, the residual add and
// SwiGLU in the one-token tensor-core kernel (v6, gemv_mma1_kernel.h) where every layer takes
// it, at one token where v6 is the kernel (LQ_CUDA_DECODE unset, auto or v6; LQ_CUDA_FUSE=0:
// never); otherwise the unfused ops.
int lq_cuda_fuses_linears(struct lq_backend *backend, int n);
int lq_cuda_linear_fused(struct lq_backend *backend, const struct lq_linear *const *w, int count,
                         const struct lq_linear_input *in, int n, float *const *y,
                         enum lq_linear_output output);
int lq_cuda_matmul(struct lq_backend *backend, const float *w, int rows, int cols, const float *x,
                   int n, float *y);

// linear_mma_cuda.cu: LQ layers at 8 < n <= 64 tokens (batched decode) on tensor cores, the
// packed codes dequantized in registers into mma fragments. The device buffers of a prepared
// LQ layer (linear_cuda.cu's), and whether programmatic dependent launch works.
#define LQ_CUDA_MMA_MAX_TOKENS 64
struct lq_cuda_lq_buffers {
    const uint32_t *codes, *scale_codes;
    const uint8_t *group_scales;
    const float *table, *lora_A, *lora_B;
    int overlap;
    struct lq_prefetch prefetch; // what the kernel prefetches for the next layer
};
// Records that the LQ layer `data` runs now (so the layer before learns it comes next) and
// fills *out with the buffers of the layer that came after `data` last time, if still valid.
void lq_cuda_prefetch_plan(struct lq_cuda *cuda, struct lq_cuda_linear_data *data,
                           struct lq_prefetch *out);
// Whether lq_cuda_linear_mma runs w at n tokens (b0 2..4, chunks inside groups, sm_80+ code).
int lq_cuda_linear_mma_supported(struct lq_cuda *cuda, const struct lq_linear *w, int n);
// Layers of one input x (count 1 to LQ_CUDA_GROUP_MAX, equal cols, distinct outputs apart
// from x) at n tokens: one projection launch for all, then each layer's GEMM (and reduction),
// each starting while the one before runs; the same bits as one layer at a time.
int lq_cuda_linear_mma_group(struct lq_cuda *cuda, const struct lq_linear *const *w,
                             const struct lq_cuda_lq_buffers *const *buffers, int count,
                             const float *x, int n, float *const *y);
int lq_cuda_linear_mma(struct lq_cuda *cuda, const struct lq_linear *w,
                       const struct lq_cuda_lq_buffers *buffers, const float *x, int n, float *y);

// t[i][n, rank[i]] = x · L2ᵀ (lora_A[i] [rank[i], cols]) for each of count layers (1 to
// LQ_CUDA_GROUP_MAX, ranks >= 1) in one launch, a CTA per rank row and 8 tokens. This beats
// cuBLAS, whose SGEMM of the skinny shape (M = rank, N = n, K = cols) runs on a handful of CTAs
// (an H200: 12 us of a 25 us layer at 8 tokens), and launches with PDL.
int lq_cuda_lowrank_project_group(struct lq_cuda *cuda, int count, const float *const *lora_A,
                                  const int *rank, int cols, const float *x, int n,
                                  float *const *t);

// ops_cuda.cu: the element-wise and row-wise ops.
int lq_cuda_embed(struct lq_backend *backend, const float *table, int dim, const int *ids, int n,
                  float *out);
int lq_cuda_rmsnorm(struct lq_backend *backend, const float *x, const float *weight, int n, int dim,
                    float eps, float *out);
int lq_cuda_rope(struct lq_backend *backend, float *x, int n, int heads, int head_dim,
                 const int *positions, float theta);
// The same with ids / positions already in device memory (decode-step graphs).
int lq_cuda_embed_device(struct lq_backend *backend, const float *table, int dim, const int *ids,
                         int n, float *out);
int lq_cuda_rope_device(struct lq_backend *backend, float *x, int n, int heads, int head_dim,
                        const int *positions, float theta);
int lq_cuda_rope_qk_device(struct lq_backend *backend, float *q, int q_heads, float *k, int k_heads,
                           int n, int head_dim, const int *positions, float theta);
// The cached cos/sin table of rope_qk_device for (theta, head_dim) (row p: cos[head_dim/2] then
// sin[head_dim/2]) and *positions, its rows; NULL and 0 when there is none (made on first use,
// never while a step is recorded): the angles are then computed.
const float *lq_cuda_rope_cos_sin(struct lq_cuda *cuda, float theta, int head_dim, int *positions);
// rope_qk_device on q and k_new, then attention_batch_device, in one launch where the
// one-token attention kernel runs and head_dim = 32·M (M >= 2): the same bits as the two ops.
int lq_cuda_rope_attention_batch_device(struct lq_backend *backend, float *q, float *k_new,
                                        const float *v_new, float *const *k_caches,
                                        float *const *v_caches, const int *positions, int n,
                                        int heads, int kv_heads, int head_dim, int keys_bound,
                                        float theta, float *out);
// x += y, out = rmsnorm(x), one launch (add then rmsnorm's bits).
int lq_cuda_add_rmsnorm(struct lq_backend *backend, float *x, const float *y, const float *weight,
                        int n, int dim, float eps, float *out);
int lq_cuda_swiglu(struct lq_backend *backend, float *gate, const float *up, size_t count);
int lq_cuda_add(struct lq_backend *backend, float *x, const float *y, size_t count);

// attention_cuda.cu
int lq_cuda_attention(struct lq_backend *backend, const float *q, const float *k_cache,
                      const float *v_cache, int n, int start, int heads, int kv_heads, int head_dim,
                      float *out);
int lq_cuda_attention_batch(struct lq_backend *backend, const float *q, const float *k_new,
                            const float *v_new, float *const *k_caches, float *const *v_caches,
                            const int *positions, int n, int heads, int kv_heads, int head_dim,
                            float *out);
int lq_cuda_attention_batch_device(struct lq_backend *backend, const float *q, const float *k_new,
                                   const float *v_new, float *const *k_caches,
                                   float *const *v_caches, const int *positions, int n, int heads,
                                   int kv_heads, int head_dim, int keys_bound, float *out);

// decompose_cuda.cu: run WITHOUT cuda->lock (own stream and handles per call).
int lq_cuda_decompose(struct lq_backend *backend, const float *w, size_t rows, size_t cols,
                      const struct lq_nf_config *config, const struct lq_decompose_options *options,
                      struct lq_decomposition *out, struct lq_error *err);
int lq_cuda_decompose_errors(struct lq_backend *backend, const float *w, size_t rows, size_t cols,
                             const struct lq_nf_config *configs, const uint64_t *seeds,
                             size_t n_configs, const struct lq_decompose_options *options,
                             double *errors, struct lq_error *err);

// lowrank_cuda.cu: the adapter ops (the layer without its own pair; y += (x · L2ᵀ) · L1ᵀ), and
// their ops-table entries, which take cuda->lock themselves.
int lq_cuda_linear_base(struct lq_backend *backend, const struct lq_linear *w, const float *x,
                        int n, float *y);
int lq_cuda_lowrank_add(struct lq_backend *backend, const float *L1, const float *L2, int rows,
                        int cols, int rank, const float *x, int n, float *y);
int lq_cuda_op_linear_base(struct lq_backend *backend, const struct lq_linear *w, const float *x,
                           int n, float *y);
int lq_cuda_op_lowrank_add(struct lq_backend *backend, const float *L1, const float *L2, int rows,
                           int cols, int rank, const float *x, int n, float *y);

// train_cuda.cu: the training ops but attention_backward (kernels/backend.h, "training ops"),
// as ops-table entries that take cuda->lock themselves.
int lq_cuda_op_zero(struct lq_backend *backend, float *x, size_t count);
int lq_cuda_op_copy(struct lq_backend *backend, void *to, const void *from, size_t bytes);
int lq_cuda_op_linear_lora(struct lq_backend *backend, const struct lq_linear *w, const float *L1,
                           const float *L2, int rank, const float *x, int n, float *y);
int lq_cuda_op_linear_backward(struct lq_backend *backend, const struct lq_linear *w,
                               const float *L1, const float *L2, int rank, const float *x,
                               const float *dy, int n, float *dx, int accumulate_dx, float *dL1,
                               float *dL2, float *dW);
int lq_cuda_op_matmul_backward(struct lq_backend *backend, const float *w, int rows, int cols,
                               const float *dy, int n, float *dx, int accumulate);
int lq_cuda_op_rmsnorm_backward(struct lq_backend *backend, const float *x, const float *weight,
                                const float *dy, int n, int dim, float eps, float *dx);
int lq_cuda_op_rope_backward(struct lq_backend *backend, float *dx, int n, int heads, int head_dim,
                             const int *positions, float theta);
int lq_cuda_op_swiglu_backward(struct lq_backend *backend, const float *gate, const float *up,
                               const float *dout, size_t count, float *dgate, float *dup);
int lq_cuda_op_cross_entropy(struct lq_backend *backend, const float *logits, const int *targets,
                             const unsigned char *mask, int n, int vocab, float grad_scale,
                             double *loss_sum, float *dlogits);
int lq_cuda_op_sum_squares(struct lq_backend *backend, const float *x, size_t count, double *out);
int lq_cuda_op_accumulate_squares(struct lq_backend *backend, float *acc, const float *x,
                                  size_t count, float scale);
int lq_cuda_op_adamw(struct lq_backend *backend, float *params, const float *grads, float *m,
                     float *v, size_t count, const struct lq_adamw_params *hyper);

// attention_backward_cuda.cu: the backward of causal grouped-query attention (training), and
// its ops-table entry, which takes cuda->lock itself.
int lq_cuda_attention_backward(struct lq_backend *backend, const float *q, const float *k,
                               const float *v, const float *dout, int batch, int n, int heads,
                               int kv_heads, int head_dim, float *dq, float *dk, float *dv);
int lq_cuda_op_attention_backward(struct lq_backend *backend, const float *q, const float *k,
                                  const float *v, const float *dout, int batch, int n, int heads,
                                  int kv_heads, int head_dim, float *dq, float *dk, float *dv);

// attention_backward_tiled_cuda.cu: the tiled kernels behind lq_cuda_attention_backward (which
// has checked the arguments), head_dim up to this many. LQ_EUNSUPPORTED, with nothing queued,
// on a device with too little shared memory per block.
#define LQ_CUDA_ATTENTION_BACKWARD_TILED_MAX_HEAD_DIM 256
int lq_cuda_attention_backward_tiled(struct lq_cuda *cuda, const float *q, const float *k,
                                     const float *v, const float *dout, int batch, int n, int heads,
                                     int kv_heads, int head_dim, float *dq, float *dk, float *dv);

// nll_cuda.cu: token_nll (evaluation), one CTA per row, double sums in a fixed order.
int lq_cuda_token_nll(struct lq_backend *backend, const float *logits, const int *targets, int n,
                      int vocab, double *nll);

// sample_cuda.cu: the sample op (core/sampler.c's rules, one CTA per row, no sort), as an
// ops-table entry that takes cuda->lock itself.
int lq_cuda_op_sample(struct lq_backend *backend, const float *logits, int n, int vocab, int stride,
                      const struct lq_sample_row *rows, int *tokens, float *logprobs);

#endif
