// Backward of causal grouped-query attention on the CUDA backend (kernels/backend.h,
// attention_backward), in fp32: the op's entry point, which runs the tiled kernels
// (attention_backward_tiled_cuda.cu) unless LQ_CUDA_ATTENTION_BACKWARD=untiled, and the
// untiled kernels below, kept for comparison. Matches kernels/cpu/train_cpu.c to fp32 rounding:
// scores q·k times 1/sqrt(head_dim), the softmax with the row maximum and expf, recomputed from the
// saved q and k. With P = softmax(S), dP = dO·Vᵀ, D_i = Σ_t P_it dP_it (= dO_i · O_i):
//   dS = P ⊙ (dP − D),  dQ = scale · dS · K,  dK = scale · dSᵀ · Q,  dV = Pᵀ · dO,
// dK and dV summed over the heads of each GQA group. dq, dk and dv are overwritten.
//
// Deterministic: two passes, no atomics, every sum in a fixed order, so the same inputs give
// the same bits on every run (not the CPU's bits: the summation orders differ).
//   - Pass 1, rows_kernel: one block per (sequence, query row i, head h), rows launched
//     longest first. It walks keys 0..i twice. First an online softmax that also carries
//     a = Σ exp(s − m) dP, giving the row's maximum M, 1/Σ and D without storing the scores;
//     then again with those, dS_it = P_it (dP_it − D) and dq_i = scale Σ_t dS_it k_t. M, 1/Σ
//     and D go to workspace LQ_CUDA_ATTENTION (one float4 per (row, head)) for pass 2.
//   - Pass 2, keys_kernel: one block per (sequence, key t, kv head g), keys launched longest
//     first. It walks the (query i ≥ t, head h of the group) pairs, recomputing P_it and
//     dS_it from the stats of pass 1: dv_t = Σ P_it dO_i, dk_t = scale Σ dS_it q_i.
//   - Inside a block (128 threads): the 32 lanes of a warp form 4 subgroups of 8 lanes, 16
//     subgroups per block; a subgroup takes one key (pass 1) or one (query, head) pair
//     (pass 2) per round, 16 per round across the block. A lane holds head dimensions
//     VEC*sub + 8*VEC*j + e (sub = lane % 8, j < J, e < VEC) of its vectors in registers:
//     VEC = 4 (float4 loads, a subgroup reads 128 contiguous bytes per j) when head_dim is
//     a multiple of 4, at least 32, and the inputs are 16-byte aligned, else VEC = 1. Dot
//     products end in a 3-step xor butterfly inside the subgroup (every lane gets the same
//     sum). Rounds are warp-uniform, so every shuffle has all 32 lanes; the lanes of a round
//     past the end load zeros and contribute nothing. At the end the 16 subgroups' partial
//     vectors meet in shared memory and are summed in subgroup order.
// Cost: pass 1 reads k_t and v_t twice per (row, key) pair, pass 2 reads q_i and dO_i once;
// these rows come from L2 (no shared-memory tiling across rows), which bounds the speed. The
// workspace is batch * n * heads * 16 bytes. head_dim up to 256 (as the forward).
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_internal.h"

namespace {

constexpr int THREADS = 128;
constexpr int SUB = 8;                   // lanes per subgroup
constexpr int SUBGROUPS = THREADS / SUB; // 16 per block
constexpr int MAX_HEAD_DIM = 256;

struct backward_params {
    const float *q, *k, *v, *dout;
    float *dq, *dk, *dv;
    float4 *stats; // per (sequence * n + row) * heads + head: {max, 1/sum, D, unused}
    int n, heads, kv_heads, head_dim, group;
    size_t q_ld, kv_ld;
    float scale;
};

// Head dimension of element (j, e) of lane `sub`.
template <int VEC> __device__ __forceinline__ int dim_of(int sub, int j, int e) {
    return VEC * sub + SUB * VEC * j + e;
}

// x = the lane's slice of row (zeros past head_dim, or everywhere when !valid).
template <int VEC, int J>
__device__ __forceinline__ void load_slice(const float *__restrict__ row, int sub, int hd,
                                           bool valid, float (&x)[VEC * J]) {
#pragma unroll
    for (int j = 0; j < J; j++) {
        const int d = dim_of<VEC>(sub, j, 0);
        if constexpr (VEC == 4) {
            float4 f = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (valid && d < hd) f = __ldg(reinterpret_cast<const float4 *>(row + d));
            x[4 * j] = f.x, x[4 * j + 1] = f.y, x[4 * j + 2] = f.z, x[4 * j + 3] = f.w;
        } else {
            x[j] = valid && d < hd ? __ldg(row + d) : 0.0f;
        }
    }
}

// Σ a·b over the subgroup's 8 lanes; every lane of the subgroup gets the same value.
template <int E>
__device__ __forceinline__ float subgroup_dot(const float (&a)[E], const float (&b)[E]) {
    float sum = 0.0f;
#pragma unroll
    for (int e = 0; e < E; e++) sum = fmaf(a[e], b[e], sum);
#pragma unroll
    for (int offset = 1; offset < SUB; offset <<= 1)
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    return sum;
}

// Writes the lane's slice x into partial[s][·] (row stride HDP), once per subgroup lane.
template <int VEC, int J>
__device__ __forceinline__ void store_partial(float *partial, int s, int sub, int hd,
                                              const float (&x)[VEC * J]) {
    constexpr int HDP = SUB * VEC * J;
#pragma unroll
    for (int j = 0; j < J; j++)
#pragma unroll
        for (int e = 0; e < VEC; e++) {
            const int d = dim_of<VEC>(sub, j, e);
            if (d < hd) partial[s * HDP + d] = x[VEC * j + e];
        }
}

// Pass 1: grid (n, heads, sequences).
template <int VEC, int J>
__global__ void __launch_bounds__(THREADS) rows_kernel(backward_params p) {
    constexpr int E = VEC * J, HDP = SUB * VEC * J;
    __shared__ float partial[SUBGROUPS * HDP];
    __shared__ float sm_m[SUBGROUPS], sm_l[SUBGROUPS], sm_a[SUBGROUPS];
    __shared__ float row_stats[3];

    const int i = p.n - 1 - (int)blockIdx.x, h = (int)blockIdx.y, b = (int)blockIdx.z;
    const int hd = p.head_dim, g = h / p.group;
    const int lane = (int)threadIdx.x & 31, sub = lane & (SUB - 1);
    const int s = (int)threadIdx.x / SUB; // subgroup 0..15
    const size_t row = (size_t)b * p.n + (size_t)i;
    const float *q_row = p.q + row * p.q_ld + (size_t)h * hd;
    const float *do_row = p.dout + row * p.q_ld + (size_t)h * hd;
    const float *k0 = p.k + (size_t)b * p.n * p.kv_ld + (size_t)g * hd;
    const float *v0 = p.v + (size_t)b * p.n * p.kv_ld + (size_t)g * hd;

    float qx[E], dox[E], kx[E], vx[E];
    load_slice<VEC, J>(q_row, sub, hd, true, qx);
    load_slice<VEC, J>(do_row, sub, hd, true, dox);

    // Online softmax over this subgroup's keys, with a = Σ exp(s − m) dP.
    const int count = i + 1;
    float m = -INFINITY, l = 0.0f, a = 0.0f;
    for (int base = 0; base < count; base += SUBGROUPS) { // warp-uniform
        const int t = base + s;
        const bool valid = t < count;
        load_slice<VEC, J>(k0 + (size_t)t * p.kv_ld, sub, hd, valid, kx);
        load_slice<VEC, J>(v0 + (size_t)t * p.kv_ld, sub, hd, valid, vx);
        const float score = subgroup_dot<E>(qx, kx) * p.scale;
        const float dp = subgroup_dot<E>(dox, vx);
        if (valid) {
            if (score > m) {
                const float c = expf(m - score); // 0 on the first key (m = −∞)
                l *= c, a *= c, m = score;
            }
            const float e = expf(score - m);
            l += e, a = fmaf(e, dp, a);
        }
    }
    if (sub == 0) sm_m[s] = m, sm_l[s] = l, sm_a[s] = a;
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = -INFINITY;
        for (int r = 0; r < SUBGROUPS; r++) M = fmaxf(M, sm_m[r]);
        float L = 0.0f, A = 0.0f;
        for (int r = 0; r < SUBGROUPS; r++) {
            if (sm_l[r] == 0.0f) continue; // no keys in that subgroup
            const float c = expf(sm_m[r] - M);
            L = fmaf(sm_l[r], c, L), A = fmaf(sm_a[r], c, A);
        }
        const float inverse = 1.0f / L, D = A * inverse;
        row_stats[0] = M, row_stats[1] = inverse, row_stats[2] = D;
        p.stats[row * p.heads + h] = make_float4(M, inverse, D, 0.0f);
    }
    __syncthreads();
    const float M = row_stats[0], inverse = row_stats[1], D = row_stats[2];

    // dq_i = scale Σ_t P_it (dP_it − D) k_t.
    float dqx[E];
#pragma unroll
    for (int e = 0; e < E; e++) dqx[e] = 0.0f;
    for (int base = 0; base < count; base += SUBGROUPS) {
        const int t = base + s;
        const bool valid = t < count;
        load_slice<VEC, J>(k0 + (size_t)t * p.kv_ld, sub, hd, valid, kx);
        load_slice<VEC, J>(v0 + (size_t)t * p.kv_ld, sub, hd, valid, vx);
        const float score = subgroup_dot<E>(qx, kx) * p.scale;
        const float dp = subgroup_dot<E>(dox, vx);
        const float ds = valid ? expf(score - M) * inverse * (dp - D) : 0.0f;
#pragma unroll
        for (int e = 0; e < E; e++) dqx[e] = fmaf(ds, kx[e], dqx[e]);
    }
    store_partial<VEC, J>(partial, s, sub, hd, dqx);
    __syncthreads();
    float *dq_row = p.dq + row * p.q_ld + (size_t)h * hd;
    for (int d = (int)threadIdx.x; d < hd; d += THREADS) {
        float sum = 0.0f;
        for (int r = 0; r < SUBGROUPS; r++) sum += partial[r * HDP + d];
        dq_row[d] = p.scale * sum;
    }
}

// Pass 2: grid (n, kv_heads, sequences).
template <int VEC, int J>
__global__ void __launch_bounds__(THREADS) keys_kernel(backward_params p) {
    constexpr int E = VEC * J, HDP = SUB * VEC * J;
    __shared__ float partial_k[SUBGROUPS * HDP], partial_v[SUBGROUPS * HDP];

    const int t = (int)blockIdx.x, g = (int)blockIdx.y, b = (int)blockIdx.z;
    const int hd = p.head_dim, group = p.group;
    const int lane = (int)threadIdx.x & 31, sub = lane & (SUB - 1);
    const int s = (int)threadIdx.x / SUB;
    const size_t first_row = (size_t)b * p.n; // the sequence's row 0
    const size_t key_offset = (first_row + (size_t)t) * p.kv_ld + (size_t)g * hd;

    float kx[E], vx[E], qx[E], dox[E], dkx[E], dvx[E];
    load_slice<VEC, J>(p.k + key_offset, sub, hd, true, kx);
    load_slice<VEC, J>(p.v + key_offset, sub, hd, true, vx);
#pragma unroll
    for (int e = 0; e < E; e++) dkx[e] = 0.0f, dvx[e] = 0.0f;

    // Pairs w = (i − t) * group + (h − g * group), for queries i = t..n−1.
    const int pairs = (p.n - t) * group;
    for (int base = 0; base < pairs; base += SUBGROUPS) { // warp-uniform
        const int w = base + s;
        const bool valid = w < pairs;
        const int i = t + (valid ? w / group : 0), h = g * group + (valid ? w % group : 0);
        const size_t row = first_row + (size_t)i;
        const size_t q_offset = row * p.q_ld + (size_t)h * hd;
        load_slice<VEC, J>(p.q + q_offset, sub, hd, valid, qx);
        load_slice<VEC, J>(p.dout + q_offset, sub, hd, valid, dox);
        const float score = subgroup_dot<E>(qx, kx) * p.scale;
        const float dp = subgroup_dot<E>(dox, vx);
        float prob = 0.0f, ds = 0.0f;
        if (valid) {
            const float4 st = p.stats[row * p.heads + h];
            prob = expf(score - st.x) * st.y;
            ds = prob * (dp - st.z);
        }
#pragma unroll
        for (int e = 0; e < E; e++) {
            dvx[e] = fmaf(prob, dox[e], dvx[e]);
            dkx[e] = fmaf(ds, qx[e], dkx[e]);
        }
    }
    store_partial<VEC, J>(partial_k, s, sub, hd, dkx);
    store_partial<VEC, J>(partial_v, s, sub, hd, dvx);
    __syncthreads();
    float *dk_row = p.dk + key_offset, *dv_row = p.dv + key_offset;
    for (int d = (int)threadIdx.x; d < hd; d += THREADS) {
        float sum_k = 0.0f, sum_v = 0.0f;
        for (int r = 0; r < SUBGROUPS; r++) {
            sum_k += partial_k[r * HDP + d];
            sum_v += partial_v[r * HDP + d];
        }
        dk_row[d] = p.scale * sum_k;
        dv_row[d] = sum_v;
    }
}

template <int VEC, int J> int launch(struct lq_cuda *cuda, const backward_params &p, int batch) {
    rows_kernel<VEC, J>
        <<<dim3((unsigned)p.n, (unsigned)p.heads, (unsigned)batch), THREADS, 0, cuda->stream>>>(p);
    LQ_CUDA_LAUNCHED("attention backward (rows)");
    keys_kernel<VEC, J>
        <<<dim3((unsigned)p.n, (unsigned)p.kv_heads, (unsigned)batch), THREADS, 0, cuda->stream>>>(
            p);
    LQ_CUDA_LAUNCHED("attention backward (keys)");
    return LQ_OK;
}

bool aligned16(const void *pointer) {
    return ((uintptr_t)pointer & 15u) == 0;
}

} // namespace

// LQ_CUDA_ATTENTION_BACKWARD=untiled picks these kernels, tiled (or unset) the tiled ones
// (attention_backward_tiled_cuda.cu); another value is reported once and taken as tiled. Read
// on every call, so a benchmark can time both in one process.
static bool untiled_requested(void) {
    const char *value = getenv("LQ_CUDA_ATTENTION_BACKWARD");
    if (!value || !*value || strcmp(value, "tiled") == 0) return false;
    if (strcmp(value, "untiled") == 0) return true;
    static int reported;
    if (!__atomic_exchange_n(&reported, 1, __ATOMIC_RELAXED))
        fprintf(stderr,
                "lqd: LQ_CUDA_ATTENTION_BACKWARD=%s: expected tiled or untiled; using tiled\n",
                value);
    return false;
}

int lq_cuda_attention_backward(struct lq_backend *backend, const float *q, const float *k,
                               const float *v, const float *dout, int batch, int n, int heads,
                               int kv_heads, int head_dim, float *dq, float *dk, float *dv) {
    if (batch < 0 || n < 0 || heads <= 0 || kv_heads <= 0 || head_dim <= 0 || heads % kv_heads != 0)
        return LQ_EINVAL;
    if (batch == 0 || n == 0) return LQ_OK;
    if (!q || !k || !v || !dout || !dq || !dk || !dv) return LQ_EINVAL;
    if (head_dim > MAX_HEAD_DIM || heads > 65535 || batch > 65535) return LQ_EUNSUPPORTED;
    struct lq_cuda *cuda = lq_cuda_of(backend);
    if (!untiled_requested() && head_dim <= LQ_CUDA_ATTENTION_BACKWARD_TILED_MAX_HEAD_DIM) {
        int rc = lq_cuda_attention_backward_tiled(cuda, q, k, v, dout, batch, n, heads, kv_heads,
                                                  head_dim, dq, dk, dv);
        if (rc != LQ_EUNSUPPORTED) return rc; // else nothing was queued: the untiled kernels
    }

    backward_params p;
    p.q = q, p.k = k, p.v = v, p.dout = dout;
    p.dq = dq, p.dk = dk, p.dv = dv;
    p.n = n, p.heads = heads, p.kv_heads = kv_heads, p.head_dim = head_dim;
    p.group = heads / kv_heads;
    p.q_ld = (size_t)heads * head_dim, p.kv_ld = (size_t)kv_heads * head_dim;
    p.scale = 1.0f / sqrtf((float)head_dim); // the CPU's scale, to the bit
    void *workspace = NULL;
    int rc = lq_cuda_slot(cuda, LQ_CUDA_ATTENTION, (size_t)batch * n * heads * sizeof(float4),
                          &workspace);
    if (rc) return rc;
    p.stats = (float4 *)workspace;

    const bool vec4 = head_dim % 4 == 0 && head_dim >= 32 && aligned16(q) && aligned16(k) &&
                      aligned16(v) && aligned16(dout);
    if (vec4) {
        if (head_dim <= 32) return launch<4, 1>(cuda, p, batch);
        if (head_dim <= 64) return launch<4, 2>(cuda, p, batch);
        if (head_dim <= 128) return launch<4, 4>(cuda, p, batch);
        return launch<4, 8>(cuda, p, batch);
    }
    if (head_dim <= 8) return launch<1, 1>(cuda, p, batch);
    if (head_dim <= 16) return launch<1, 2>(cuda, p, batch);
    if (head_dim <= 32) return launch<1, 4>(cuda, p, batch);
    if (head_dim <= 64) return launch<1, 8>(cuda, p, batch);
    if (head_dim <= 128) return launch<1, 16>(cuda, p, batch);
    return launch<1, 32>(cuda, p, batch);
}

// The ops-table entry: under the op lock, on the backend's device, like every other op.
int lq_cuda_op_attention_backward(struct lq_backend *backend, const float *q, const float *k,
                                  const float *v, const float *dout, int batch, int n, int heads,
                                  int kv_heads, int head_dim, float *dq, float *dk, float *dv) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    pthread_mutex_lock(&cuda->lock);
    cudaSetDevice(cuda->device);
    int rc = lq_cuda_attention_backward(backend, q, k, v, dout, batch, n, heads, kv_heads, head_dim,
                                        dq, dk, dv);
    pthread_mutex_unlock(&cuda->lock);
    return rc;
}
