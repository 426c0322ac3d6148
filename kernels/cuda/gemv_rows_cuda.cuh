// The whole-row one-token decode kernel (LQ_CUDA_DECODE=v5, kernels/cuda/linear_cuda.cu):
// lq_decode_kernel's fused dequantize + GEMV for one token, b0 = 2, 3 or 4, with every row
// finished by one warp. Included by linear_cuda.cu alone, after linear_cuda_kernels.cuh.
//
// Why (ncu on an H100, 4096 x 4096 NF3 at one token, tests/kernels/gpu_check.sh diag and sass):
// lq_decode_kernel splits each row over 1024-column slices, so a row's sum needs partials in
// global memory, a fence, an atomic ticket and a last CTA that adds the slices: a chain of
// global round trips after the decoding. Its one wave loads everything at once and then
// decodes, and half of its 6.5 instructions per code are that epilogue, the row setup and the
// partials, not the lookups (3 per code). The kernel ran 13 us where the bytes take ~2.5.
//
// Here a warp walks whole rows: R rows at a time, lane l decoding 32-value chunk l, l + 32,
// ... of each (the same chunk layout, loads and shuffle lookups as lq_decode_kernel), so it
// holds the full dot products at the end of a row group, adds the low-rank term, reduces
// across lanes and writes y itself: no partials, no ticket, no second pass. A warp's work is
// a flat sequence of items (row group, chunk column j) decoded from three register sets: the
// next two items' words and block scales are in flight while one is decoded, across row
// groups too. The L1 row values come with a group's last item (which is when they are used)
// and t = x·L2ᵀ is waited for (griddepcontrol.wait) at the first group's end, so the
// projection overlaps the decoding as before; v5's projection is lq_lowrank_project_split_kernel
// (one CTA per rank row and 1024-column slice, one load per thread: it ends early), whose
// slice sums each warp adds once, in slice order. x is staged once per CTA for all
// columns (swizzled as lq_stage_x does: conflict-free LDS.128), zeros past the last chunk.
// The grid is one wave (3 CTAs per SM where 85 registers do without spilling, else 2), warps
// taking row groups round robin.
//
// Arithmetic: per row and lane each block's sum in four interleaved partial sums (four FMA
// chains instead of one 32 long: the chain, not the issue rate, bounded a warp with few
// rows), scaled into the lane's sum in chunk order, then the lane's low-rank products, then
// the lanes' sum (lq_reduce_scatter). The order differs from lq_decode_kernel's, so the bits
// can differ from v1's in the last places; the same inputs give the same bits on every run.
#ifndef LQ_GEMV_ROWS_CUDA_CUH
#define LQ_GEMV_ROWS_CUDA_CUH

#include "kernels/cuda/linear_cuda_kernels.cuh"

#define LQ_ROWS_WARPS 8
#define LQ_ROWS_THREADS (LQ_ROWS_WARPS * 32)
#define LQ_ROWS_RANK_REGS 2 // rank values per lane held in registers: ranks up to 64
// CTAs per SM (__launch_bounds__): 3 (<= 85 registers) where that does not spill, else 2.
__host__ __device__ constexpr int lq_rows_ctas_per_sm(int bits, int bpc, int r) {
    return r == 2 && (bpc == 1 || (bpc == 2 && bits <= 3)) ? 3 : 2;
}

// x of at most this many 32-value chunks (rounded up to 32) in shared memory: 96 KiB
#define LQ_ROWS_MAX_CHUNKS (96 * 1024 / 128)

// The first cols/4 float4 of x at chunk·8 + (q ^ (chunk & 7)), zeros up to padded_chunks·8.
__device__ __forceinline__ void lq_rows_stage_x(const float *x, int cols, int padded_chunks,
                                                float4 *xs) {
    const int quads = cols >> 2, total = padded_chunks * 8;
    for (int i = threadIdx.x; i < total; i += LQ_ROWS_THREADS) {
        const int chunk = i >> 3, q = i & 7;
        const float4 v =
            i < quads ? __ldg((const float4 *)x + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        xs[chunk * 8 + (q ^ (chunk & 7))] = v;
    }
}

// One item's loads: rows row0 .. row0 + R − 1 at this lane's chunk (zeros past the rows or the
// chunks), and with the group's last item the lane's L1 values (k = lane + 32·m).
template <int BITS, int BPC, int R>
__device__ __forceinline__ void
lq_rows_load(const lq_decode_args &a, int row0, int chunk, bool last, int lane,
             uint32_t (&w)[R][BITS], float (&scale)[R][BPC], float (&l1)[R][LQ_ROWS_RANK_REGS]) {
    const bool active = chunk < a.chunks_per_row;
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int row = row0 + r;
        lq_load_row_chunk<BITS, BPC>(a, row, chunk, active, w[r], scale[r]);
        if (last) {
#pragma unroll
            for (int m = 0; m < LQ_ROWS_RANK_REGS; m++) {
                const int k = lane + 32 * m;
                l1[r][m] = k < a.rank && row < a.q.rows ? __ldg(a.lora_B + (size_t)row * a.rank + k)
                                                        : 0.0f;
            }
        }
    }
}

// A warp's position in its item sequence: row group `group` (absolute), chunk column j.
struct lq_rows_cursor {
    int group, j;
};

__device__ __forceinline__ void lq_rows_advance(lq_rows_cursor &c, int columns, int stride) {
    if (++c.j == columns) c.j = 0, c.group += stride;
}

// The end of a row group: the low-rank term, the lanes' sum, y.
template <int R>
__device__ __forceinline__ void
lq_rows_finish(const lq_decode_args &a, int row0, int lane, const float (&l1)[R][LQ_ROWS_RANK_REGS],
               float (&t)[LQ_ROWS_RANK_REGS], bool &t_ready, float (&acc)[R][1]) {
    if (a.rank > 0) {
        if (!t_ready) { // the projection kernel's output: waited for once
            lq_pdl_wait();
#pragma unroll
            for (int m = 0; m < LQ_ROWS_RANK_REGS; m++) {
                const int k = lane + 32 * m;
                t[m] = 0.0f;
                if (k < a.rank) {
                    if (a.t_slices == 0) t[m] = __ldcg(a.t + k);
                    for (int s = 0; s < a.t_slices; s++)
                        t[m] += __ldcg(a.t + (size_t)s * a.rank + k);
                }
            }
            t_ready = true;
        }
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int m = 0; m < LQ_ROWS_RANK_REGS; m++) acc[r][0] = fmaf(l1[r][m], t[m], acc[r][0]);
        for (int k = lane + 32 * LQ_ROWS_RANK_REGS; k < a.rank; k += 32) { // ranks over 64
            float tk = a.t_slices == 0 ? __ldcg(a.t + k) : 0.0f;
            for (int s = 0; s < a.t_slices; s++) tk += __ldcg(a.t + (size_t)s * a.rank + k);
#pragma unroll
            for (int r = 0; r < R; r++)
                if (row0 + r < a.q.rows)
                    acc[r][0] =
                        fmaf(__ldg(a.lora_B + (size_t)(row0 + r) * a.rank + k), tk, acc[r][0]);
        }
    }
    float v[R];
#pragma unroll
    for (int r = 0; r < R; r++) v[r] = acc[r][0], acc[r][0] = 0.0f;
    const float total = lq_reduce_scatter<R>(v, lane);
    const int row = row0 + lane / (32 / R);
    if (lane % (32 / R) == 0 && row < a.q.rows) a.y[row] = total;
}

// One item's chunk per row: table[code]·x summed per block in four interleaved partial sums
// (codes i mod 4), so that a row is four independent FMA chains rather than one 32 long,
// then each block's sum scaled into acc.
template <int BITS, int BPC, int R>
__device__ __forceinline__ void lq_rows_decode(const uint32_t (&w)[R][BITS],
                                               const float (&scale)[R][BPC], const float4 *xs,
                                               int lane, float lane_value, float (&acc)[R][1]) {
    constexpr int CODES_PER_BLOCK = 32 / BPC;
    const int x_base = lane * 8, swizzle = lane & 7;
    float part[R][4];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int e = 0; e < 4; e++) part[r][e] = 0.0f;
#pragma unroll
    for (int q = 0; q < 8; q++) {
        const float4 xv = xs[x_base + (q ^ swizzle)];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int i = 4 * q + e;
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float v = lq_lookup<BITS>(lq_code_bits<BITS>(w[r], i), lane_value, nullptr);
                part[r][e] = fmaf(v, lq_component(xv, e), part[r][e]);
                if ((i + 1) % CODES_PER_BLOCK == 0) {
                    const float sum = (part[r][0] + part[r][1]) + (part[r][2] + part[r][3]);
                    acc[r][0] = fmaf(sum, scale[r][i / CODES_PER_BLOCK], acc[r][0]);
#pragma unroll
                    for (int k = 0; k < 4; k++) part[r][k] = 0.0f;
                }
            }
        }
    }
}

// Decodes one item; a group's last item also finishes the group.
template <int BITS, int BPC, int R>
__device__ __forceinline__ void
lq_rows_item(const lq_decode_args &a, const lq_rows_cursor &c, int columns, int lane,
             const uint32_t (&w)[R][BITS], const float (&scale)[R][BPC],
             const float (&l1)[R][LQ_ROWS_RANK_REGS], const float4 *xs, float lane_value,
             float (&t)[LQ_ROWS_RANK_REGS], bool &t_ready, float (&acc)[R][1]) {
    lq_rows_decode<BITS, BPC, R>(w, scale, xs + c.j * 256, lane, lane_value, acc);
    if (c.j == columns - 1) lq_rows_finish<R>(a, c.group * R, lane, l1, t, t_ready, acc);
}

template <int BITS, int BPC, int R>
__global__ void __launch_bounds__(LQ_ROWS_THREADS, lq_rows_ctas_per_sm(BITS, BPC, R))
    lq_gemv_rows_kernel(const __grid_constant__ lq_decode_args a) {
    lq_pdl_trigger(); // the next kernel waits for this one before it reads (pdl_cuda.cuh)
    static_assert(BITS >= 2 && BITS <= 4, "shuffle lookups");
    static_assert(R == 2 || R == 4, "rows per warp");
    extern __shared__ float4 lq_rows_xs[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int columns = (a.chunks_per_row + 31) / 32; // items per row group
    const int groups = (a.q.rows + R - 1) / R;
    const int stride = (int)gridDim.x * LQ_ROWS_WARPS;
    const int first = (int)blockIdx.x * LQ_ROWS_WARPS + warp;
    const int count = first < groups ? (groups - 1 - first) / stride + 1 : 0;
    const int items = count * columns;

    // The first three items' loads go out before x is staged: HBM latency overlaps it.
    uint32_t w0[R][BITS], w1[R][BITS], w2[R][BITS];
    float scale0[R][BPC], scale1[R][BPC], scale2[R][BPC];
    float l1_0[R][LQ_ROWS_RANK_REGS], l1_1[R][LQ_ROWS_RANK_REGS], l1_2[R][LQ_ROWS_RANK_REGS];
    lq_rows_cursor load = {first, 0};
#define LQ_ROWS_LOAD(W, SCALE, L1)                                                                 \
    do {                                                                                           \
        lq_rows_load<BITS, BPC, R>(a, load.group * R, load.j * 32 + lane, load.j == columns - 1,   \
                                   lane, W, SCALE, L1);                                            \
        lq_rows_advance(load, columns, stride);                                                    \
    } while (0)
    if (items > 0) LQ_ROWS_LOAD(w0, scale0, l1_0);
    if (items > 1) LQ_ROWS_LOAD(w1, scale1, l1_1);
    if (items > 2) LQ_ROWS_LOAD(w2, scale2, l1_2);
    lq_prefetch_issue(a.prefetch);
    lq_rows_stage_x(a.x, a.q.cols, columns * 32, lq_rows_xs);
    const float lane_value = __ldg(a.q.table + (lane & ((1 << BITS) - 1)));
    __syncthreads();

    float acc[R][1];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r][0] = 0.0f;
    float t[LQ_ROWS_RANK_REGS];
    bool t_ready = false;
    lq_rows_cursor decode = {first, 0};
    // Items in threes so that the register sets have static indices: while one is decoded,
    // the next two items' loads are in flight.
#define LQ_ROWS_STEP(K, W, SCALE, L1)                                                              \
    if (i + K >= items) break;                                                                     \
    lq_rows_item<BITS, BPC, R>(a, decode, columns, lane, W, SCALE, L1, lq_rows_xs, lane_value, t,  \
                               t_ready, acc);                                                      \
    lq_rows_advance(decode, columns, stride);                                                      \
    if (i + K + 3 < items) LQ_ROWS_LOAD(W, SCALE, L1);
    for (int i = 0; i < items; i += 3) {
        LQ_ROWS_STEP(0, w0, scale0, l1_0)
        LQ_ROWS_STEP(1, w1, scale1, l1_1)
        LQ_ROWS_STEP(2, w2, scale2, l1_2)
    }
#undef LQ_ROWS_STEP
#undef LQ_ROWS_LOAD
    // A warp with no rows still waits for the projection (its t reads are all someone
    // else's), so nothing is left reading when the next kernel is released.
    if (a.rank > 0 && !t_ready) lq_pdl_wait();
}

#endif
