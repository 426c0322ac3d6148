// The one-token tensor-core decode kernel (LQ_CUDA_DECODE=v6, kernels/cuda/linear_cuda.cu):
// y = Q·x + L1·t for one token, Q packed (b0 = 2, 3 or 4; B0 a multiple of 32, or 16),
// dequantized by shared-memory pair lookups straight into mma.sync m16n8k16 A fragments.
//
// Why: the shuffle-lookup kernel v1 spends 6.5 instructions per code (3 for the lookup:
// shift, shuffle, FMA; the rest its share of the setup), and Nsight Compute showed it bound by
// those chains, not by HBM. Here a lookup in a per-lane pair table yields two codes as a half2 in
// one LDS (plus a shift and a mask to form its address), and the tensor core does the
// multiply-adds, so the lookups cost about 1.5 instructions a code, besides the loads, block
// scales and loop around them. At one token most of the mma's N = 8
// columns are free; they are used to keep blocks apart instead of multiplying each value by
// its block scale:
//   - a quad (lanes 4g .. 4g+3) shares rows g and g+8 of a 16-row group; lane t of the quad
//     decodes chunk 4·kt + t (32 codes) of both rows in k-tile kt, codes 4s .. 4s+3 at mma
//     step s (s = 0..7) in its k slots 2t, 2t+1, 2t+8, 2t+9 (the dot product does not care
//     how k is ordered as long as A and B agree);
//   - B column n holds x only in the slots of one lane: column 2t the slots of lane t for its
//     chunk's first block, column 2t+1 those of its second block (B0 = 16), zeros elsewhere.
//     B's column n lives in the lanes with g = n, so lane (g, t) loads x only where g = 2t
//     (or 2t + 1), and zeros (a 64-byte zero area) otherwise;
//   - so D[row][2t + b] is exactly the block-b partial sum of lane t's chunk, and it lands in
//     lane t's own accumulators (d[b] for row g, d[2 + b] for row g+8): lane t multiplies it
//     by the block scale it decoded itself, in fp32.
// Precision: the NF values and x are rounded to fp16 (as the batched tensor-core path does),
// the products and sums are fp32, the block scales and the low-rank term fp32.
//
// Work: a CTA of 8 warps takes RG row groups of 16 rows (RG = 1, 2, 4 or 8, chosen on the
// host so that the grid is one wave where it can be) and splits the columns into KS = 8 / RG
// slices, one warp per (row group, slice); each warp streams its k-tiles with the next tile's
// words in flight while one is decoded, and (prefetch_tiles) a later tile's asked into L2. The
// warps' sums meet in shared memory and are added in slice order: no partials in global memory, no
// second kernel, the same bits on every run. The low-rank term: lane t of warp slice ks adds
// L1[row][k]·t[k] for k = 4·ks + t + 4·KS·m, its L1 values loaded before the main loop; t (the
// projection kernel's column-slice sums, added in slice order) is read after griddepcontrol.wait,
// which every thread passes (or, projected in the kernel, once every CTA has published its
// pieces).
//
// Staged codes (a->stage, a template argument on the GPU; the host's LQ_CUDA_MMA1_STAGE=1,
// off by default until it has run on a GPU): each warp copies its tiles' codes
// into a ring of LQ_M1_RING tiles in shared memory with asynchronous 16-byte copies (cp.async),
// the first LQ_M1_RING of them before anything else, and each later one as soon as the tile
// LQ_M1_RING before it has been read; the loop reads the words from there. Why: a warp has only
// a few tiles (4 for a 4096-column layer), and with the words in registers one tile ahead
// every tile waited out a trip to L2 or HBM, and the first one the whole staging; a kernel that
// streams bytes with all of its loads in flight before the first use runs a step of the same
// bytes at 81-102% of the copy bandwidth against v6's 31% (tests/bench/bench_stream_ceiling.cu,
// H100). A tile's rows sit 4·b0 words apart in its slot, which makes the lanes' loads of their
// chunk's words conflict-free (b0 = 2: 64-bit loads, 4: 128-bit, 3: three 32-bit). The scale
// codes and group scales are still loaded into registers a tile ahead: a row's fit in one
// sector for many tiles, so after the first they come from L1.
//
// The projection in the kernel (a->t_pieces > 0, a template argument on the GPU as well; the
// host's LQ_CUDA_MMA1_INLINE_T=1, off by default until it has run on a GPU): t = x·L2ᵀ is no
// longer a kernel of its own before this one. The CTAs split its rank · t_slices slice sums
// (the projection kernel's, bit for bit: the same products, in the same order) among
// themselves: each copies its pieces' L2 quads into
// shared memory first thing, takes the products while it stages x (which it reads anyway), adds
// them up after the staging's barrier and publishes them (a release add on a counter of the
// layer's), and every warp waits for all the CTAs' pieces (an acquire poll of that counter)
// only before its epilogue reads t; the last CTA out sets the counter back to 0. Why: with the
// projection between them, a decode kernel could launch only once the projection had waited for
// the kernel before, so its weights' loads never overlapped that kernel's last wave (a kernel
// that streams a step's bytes did 84% of the copy bandwidth that way, 102% with its loads out
// before its wait: tests/bench/bench_stream_ceiling.cu, H100), and every layer paid a launch
// more. The poll is fast only where every CTA of the grid is resident at once: the host takes
// this path only where the grid is one wave of what the SMs hold (registers and shared memory).
// Still, other work on the GPU (a compress job's kernels) can keep a CTA out for a while, and a
// warp whose poll runs past a->spin_limit takes the sums it reads itself (lq_m1_low_rank_here:
// the same products in the same order, the same bits) rather than wait on or stop the launch:
// every CTA still publishes its pieces and counts itself out, so the counter ends at 0. x is then
// the kernel before's output where the layer is the first of its group (a->wait_before_x: the
// staging waits for it); the other layers of a group read an x written two or more kernels back.
//
// This file is C as well as CUDA: tests/unit/test_gemv_mma1_kernel.c runs this very code on
// the CPU with a thread per CUDA thread and the warp primitives emulated. The includer
// defines LQ_M1_FN (device function qualifiers), LQ_M1_HD (host and device), LQ_M1_UNROLL (a
// loop-unroll pragma or nothing) and these primitives:
//   uint32_t lq_m1_ldg_u32(const uint32_t *p);
//   float lq_m1_ldg_f32(const float *p); float lq_m1_ldcg_f32(const float *p);
//   void lq_m1_ldg_f32x4(const float *p, float v[4]);   (p 16-byte aligned)
//   void lq_m1_lds_u32x8(uint32_t address, uint32_t v[8]);   (32 bytes at a 16-byte aligned
//       shared-window address)
//   uint32_t lq_m1_window(const void *p);   (the shared-window address of shared memory at p)
//   uint32_t lq_m1_lds_pair(uint32_t address);   (the shared word at that window address)
//   void lq_m1_misaligned(void);   (stops the launch with an error: __trap)
//   uint32_t lq_m1_funnel(uint32_t lo, uint32_t hi, uint32_t shift);   (__funnelshift_r)
//   uint32_t lq_m1_half2_bits(float lo, float hi);   (round to nearest, lo in the low half;
//       host and device)
//   void lq_m1_copy16_window(uint32_t address, const uint32_t *global);   (16 bytes to a
//       shared-window address, both 16-byte aligned, asynchronously: cp.async),
//       void lq_m1_copy_commit(void) (this thread's copies since the last commit form a group:
//       cp.async.commit_group) and void lq_m1_copy_wait_groups(int n) (all but this thread's n
//       most recent groups have landed: cp.async.wait_group n, n a constant)
//   void lq_m1_sts_u32x4(uint32_t *shared, uint32_t v);   (v into 4 words, 16-byte aligned)
//   int lq_m1_cluster_rank(void); void lq_m1_cluster_sync(void);   (the CTA's rank in its
//       cluster; a barrier of all the cluster's threads, release and acquire)
//   void lq_m1_st_cluster_u32x2(uint32_t address, int rank, uint32_t lo, uint32_t hi) and
//   double lq_m1_ld_cluster_f64(uint32_t address, int rank);   (8 bytes at a shared-window
//       address, 8-byte aligned, in the shared memory of the cluster's CTA `rank`)
//   void lq_m1_lds_words(uint32_t address, int bits, uint32_t w[4]);   (bits words from a
//       shared-window address aligned for them: 8 bytes for 2, 16 for 4; w[bits..3] = 0)
//   float lq_m1_u2f(uint32_t v);   (RN)
//   float lq_m1_fmul(float, float); float lq_m1_fadd(float, float);
//   float lq_m1_fma(float, float, float);   (single rounding each)
//   void lq_m1_mma(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1);   (d += A·B)
//   float lq_m1_shfl_xor(float v, int offset); void lq_m1_sync(void);
//   void lq_m1_wait_prerequisite(void); void lq_m1_prefetch_l2(const void *p);
//   void lq_m1_tile_fence(void);   (a scheduling boundary between the next tile's loads and
//       this tile's decode, and with staged codes the warp's barrier between its lanes' copies
//       and reads of a slot: __syncwarp on the GPU)
//   double lq_m1_shfl_xor_f64(double v, int offset);
//   float lq_m1_silu_times(float gate, float up);   (the backend's swiglu of one value)
//   uint32_t lq_m1_ld_acquire_u32(const uint32_t *p);   (ld.acquire.gpu)
//   uint32_t lq_m1_add_release_u32(uint32_t *p, uint32_t v);   (atom.release.gpu add: the
//       thread's writes before it are seen by whoever acquires the sum; returns the old value)
//   uint32_t lq_m1_add_acq_rel_u32(uint32_t *p, uint32_t v);   (atom.acq_rel.gpu add)
//   void lq_m1_st_relaxed_u32(uint32_t *p, uint32_t v);   (st.relaxed.gpu)
//   void lq_m1_backoff(void);   (a short sleep between polls: __nanosleep)
//
// Fused ops (kernels/backend.h linear_fused). x may be rmsnorm's input instead of its output:
// the kernel takes the norm into its staging of x, which reads all of x anyway (a pass for the
// sum of squares, then x·s·w as the rmsnorm op computes it); the projection kernel took t from
// w·x (it cannot know s, which needs all of x), so t is scaled by s here. The result may be
// added to y (the residual add) or, for up's kernel after gate's, put through SwiGLU with the
// gate value y holds (y = silu(y)·result, as the swiglu op leaves its gate); each row is read
// and written by one thread, the gate's after this grid has waited for gate's (the kernel
// before it). Why: at one token each of those ops was a launch of its own that every kernel
// after it waited for, a few microseconds of a layer's ~30 without doing anything the decode
// kernels could not do on the way.
#ifndef LQ_GEMV_MMA1_KERNEL_H
#define LQ_GEMV_MMA1_KERNEL_H

#include <math.h>
#include <stdint.h>

#include "kernels/cuda/divisor.h"

#define LQ_M1_WARPS 8
#define LQ_M1_THREADS (LQ_M1_WARPS * 32)
#define LQ_M1_TILE_CHUNKS 4 // a k-tile: 128 columns, one 32-code chunk per lane of a quad
#define LQ_M1_STEPS 8       // mma steps (16 k each) per k-tile
#define LQ_M1_RANK_REGS 2   // L1 values per row loaded before the main loop
#define LQ_M1_MAX_BITS 4
#define LQ_M1_RING 4 // staged codes: the tiles a warp has copied ahead (a power of 2, >= 2)
// The projection in the kernel: a slice of t's sums is 1024 columns (linear_cuda_kernels.cuh's
// LQ_PROJECT_SLICE), a quad of x per thread; a CTA takes at most LQ_M1_MAX_T_PIECES of them.
#define LQ_M1_SLICE_QUADS LQ_M1_THREADS
#define LQ_M1_MAX_T_PIECES 4

// What x holds and what becomes of the result (kernels/backend.h's enum lq_linear_input_kind
// and enum lq_linear_output, repeated so that this file needs no project header;
// linear_cuda.cu checks that they agree).
#define LQ_M1_INPUT_PLAIN 0
#define LQ_M1_INPUT_RMSNORM 1
#define LQ_M1_OUTPUT_WRITE 0
#define LQ_M1_OUTPUT_ADD 1
#define LQ_M1_OUTPUT_SWIGLU 2

struct lq_m1_args {
    const uint32_t *codes, *scale_codes; // as core/nf.h packs them, + lq_m1_padding's zeros
    const float *group_scales; // in fp32 whatever b2 is (the host widens bf16 and fp16 ones
                               // exactly on upload: no branch on b2 in the loop), + padding
    const float *x;            // the token, cols values, 16-byte aligned
    const float *lora_B;       // L1 [rows][rank]
    const float *t;            // [t_slices][rank]: x·L2ᵀ per column slice (t_slices >= 1)
    float *y;                  // [rows]
    int rows, cols, b1, rank, t_slices;
    float offset, inv_levels;      // inv_levels = RN(1 / (2^b1 − 1))
    struct lq_divisor chunk_block; // chunk → block when B0 % 32 == 0 (B0 / 32)
    struct lq_divisor group;       // block → group (B1)
    int chunks_per_row;            // cols / 32
    int rg_log;                    // log2 of the row groups per CTA (0..3)
    int prefetch_tiles;    // > 0: the words of tile kt + prefetch_tiles are asked into L2 at kt
    int share_scales;      // bpc = 1, B0 % 64 == 0 and cols % B0 == 0: see lq_m1_tile_scales (the
                           // GPU takes it as a template argument: lq_m1_body's share)
    int stage;             // the codes go through shared memory (lq_m1_can_stage; a template
                           // argument on the GPU: lq_m1_body's stage)
    uint32_t table_offset; // lq_m1_table_offset(bits, chunks_per_row, window base)
    int input;             // LQ_M1_INPUT_*: the token is x, or rmsnorm(x)
    const float *norm_weight; // LQ_M1_INPUT_RMSNORM: [cols], 16-byte aligned
    float eps;                // LQ_M1_INPUT_RMSNORM
    int output;               // LQ_M1_OUTPUT_*: y = result, y += result, y = silu(y)·result
    float nf_table[1 << LQ_M1_MAX_BITS]; // the NF table of b0 bits (lq_nf_code_table: 2^b0 values)
    int cluster_log; // > 0: launched in clusters of 2^cluster_log CTAs, which share x's staging
    // The projection in the kernel (cluster_log = 0 and rank > 0 only)
    int t_pieces;        // > 0: a CTA's most pieces of t (lq_m1_piece); 0: t is the projection
                         // kernel's
    int wait_before_x;   // x is the kernel before's output: the staging waits for it
    const float *lora_A; // L2 [rank][cols], 16-byte aligned (t_pieces > 0)
    float *t_out;        // = t: where the pieces' sums go (t_pieces > 0)
    uint32_t *barrier;   // [2]: pieces published, CTAs done with them; 0 before and after
    uint32_t spin_limit; // polls of barrier[0] before a warp takes the sums itself (0: at once)
};

// Shared memory, in this order: x in fp16 (16 words per chunk, for every chunk of the padded
// k-tiles), 4 words of padding and 16 of zeros (in banks 4-7 and 12-15: an x read in the same
// LDS.128 phase, in banks 0-3, 8-11, 16-19 or 24-27, does not conflict with them), the warps'
// row sums (8 x 16 floats), then the pair table (4^bits entries x 32 lanes) at the first
// shared-window address that is a multiple of 2^(7 + 2·bits): a lookup's address is then the
// pair's bits OR the lane's address in the table, one LOP3 (with the table's base added, each
// lookup took another IADD). window_base is the window address where the kernel's dynamic
// shared memory starts: the driver's reserved bytes (cudaDevAttrReservedSharedMemoryPerBlock;
// the kernel has no static shared memory); the kernel checks the table's alignment.
LQ_M1_HD uint32_t lq_m1_pair_words(int bits) {
    return (1u << (2 * bits)) * 32u;
}
LQ_M1_HD uint32_t lq_m1_x_words(int chunks_per_row) {
    const uint32_t tiles = ((uint32_t)chunks_per_row + LQ_M1_TILE_CHUNKS - 1) / LQ_M1_TILE_CHUNKS;
    return tiles * LQ_M1_TILE_CHUNKS * 16u;
}
LQ_M1_HD uint32_t lq_m1_table_align(int bits) {
    return 1u << (7 + 2 * bits);
}
LQ_M1_HD uint32_t lq_m1_table_offset(int bits, int chunks_per_row, uint32_t window_base) {
    const uint32_t align = lq_m1_table_align(bits);
    const uint32_t front = window_base + 4u * (lq_m1_x_words(chunks_per_row) + 20u + 8u * 16u);
    return ((front + align - 1u) & ~(align - 1u)) - window_base;
}
LQ_M1_HD uint32_t lq_m1_shared_bytes(int bits, int chunks_per_row, uint32_t window_base) {
    return lq_m1_table_offset(bits, chunks_per_row, window_base) + 4u * lq_m1_pair_words(bits);
}

// Staged codes: the warps' rings follow the pair table (16-byte aligned there), warp w's at
// ring bytes w·LQ_M1_RING·lq_m1_slot_bytes; a slot holds one tile of 16 rows, row r's 4·bits
// words at word r·4·bits.
LQ_M1_HD uint32_t lq_m1_slot_bytes(int bits) {
    return 16u * 4u * (uint32_t)bits * 4u;
}
LQ_M1_HD uint32_t lq_m1_staged_shared_bytes(int bits, int chunks_per_row, uint32_t window_base) {
    return lq_m1_shared_bytes(bits, chunks_per_row, window_base) +
           LQ_M1_WARPS * LQ_M1_RING * lq_m1_slot_bytes(bits);
}
// The projection in the kernel: its area follows the pair table (or the rings, staged), piece j's
// L2 quads at byte j·16·LQ_M1_SLICE_QUADS (a thread's at 16·thread of it), then the warps'
// sums of each piece (LQ_M1_WARPS x LQ_M1_MAX_T_PIECES floats). table_offset: the args'.
LQ_M1_HD uint32_t lq_m1_t_area(int bits, uint32_t table_offset, int stage) {
    return table_offset + 4u * lq_m1_pair_words(bits) +
           (stage ? LQ_M1_WARPS * LQ_M1_RING * lq_m1_slot_bytes(bits) : 0u);
}
LQ_M1_HD uint32_t lq_m1_t_area_bytes(int pieces) {
    return pieces > 0
               ? (uint32_t)pieces * 16u * LQ_M1_SLICE_QUADS + 4u * LQ_M1_WARPS * LQ_M1_MAX_T_PIECES
               : 0u;
}
// The grid: CTAs of 2^rg_log row groups of 16 rows, as many as the rows take, rounded up to
// whole clusters of 2^cluster_log CTAs (a CTA past the rows only helps stage x).
LQ_M1_HD int lq_m1_grid(int rows, int rg_log, int cluster_log) {
    const int ctas = ((rows + 15) / 16 + (1 << rg_log) - 1) >> rg_log;
    return (ctas + (1 << cluster_log) - 1) >> cluster_log << cluster_log;
}
// Piece j of CTA `block`'s share of the projection: piece p = block + j·(the grid's CTAs) of
// the rank · t_slices sums, rank row k = p mod rank of column slice s = p / rank; 0 past them.
LQ_M1_FN int lq_m1_piece(const struct lq_m1_args *a, int block, int j, int *k, int *s) {
    const int p = block + j * lq_m1_grid(a->rows, a->rg_log, 0);
    if (j >= a->t_pieces || p >= a->rank * a->t_slices) return 0;
    *k = p % a->rank, *s = p / a->rank;
    return 1;
}

// Whether the codes can be staged: every row's tiles start 16-byte aligned (the copies are
// 16-byte cp.async; the host also checks the codes' address).
LQ_M1_HD int lq_m1_can_stage(int bits, int chunks_per_row) {
    return (chunks_per_row * bits) % 4 == 0;
}

// How far a launch may read past the end of each packed buffer: rows of a last, partial row
// group are read as if the matrix went on (15 rows at most), and so are a row's chunks past its
// end (a partial last tile, and the tile after a warp's last, which is loaded but never
// decoded: 7 chunks at most). The host pads each buffer with zeros for that (lq_m1_padding):
// zero codes and scales give finite values, which meet x's zero padding or a row that is never
// written. Why: clamping the rows and chunks into the matrix took about 0.1 to 0.16
// instructions per code in the loop (the compiler recomputed the clamped rows every tile).
LQ_M1_HD uint64_t lq_m1_overrun_chunks(int chunks_per_row) {
    return 15u * (uint64_t)chunks_per_row + 8u;
}

// The padding bytes after codes (b0 bits a code), scale codes (b1 bits a block of B0 codes)
// and the fp32 group scales (one per B1 blocks): out[0], out[1], out[2].
LQ_M1_HD void lq_m1_padding(int chunks_per_row, int bits, int b1, int B0, int B1, uint64_t out[3]) {
    const uint64_t chunks = lq_m1_overrun_chunks(chunks_per_row);
    const uint64_t blocks = B0 < 32 ? chunks * (32u / (uint64_t)B0) : chunks; // B0 >= 16 here
    out[0] = chunks * (uint64_t)bits * 4u + 16u;
    out[1] = (blocks * (uint64_t)b1 + 7u) / 8u + 16u;
    out[2] = (blocks / (uint64_t)B1 + 2u) * 4u + 16u;
}

// What a lane loads for one row and one chunk: the chunk's words, the two words of scale codes
// that hold its blocks' (the 32-bit window at bit `shift` of them, formed when the tile is
// decoded), and its group scale's bits.
// Why the window waits: formed at the load, its funnel shift stalled the warp a whole trip to
// HBM right there, once in the prologue and once a tile (8% of v6's stall samples each,
// tests/bench/sass_stalls.py on the H100).
struct lq_m1_raw {
    uint32_t w[LQ_M1_MAX_BITS];
    uint32_t scale_lo, scale_hi, shift;
    float group_scale;
};

// Chunk ci's words (ci may run into the padding: lq_m1_padding).
LQ_M1_FN void lq_m1_load_words(const struct lq_m1_args *a, int bits, uint32_t ci,
                               struct lq_m1_raw *r) {
    const uint32_t *p = a->codes + (uint64_t)ci * (uint32_t)bits;
    LQ_M1_UNROLL
    for (int i = 0; i < LQ_M1_MAX_BITS; i++) r->w[i] = i < bits ? lq_m1_ldg_u32(p + i) : 0u;
}

// Chunk ci's scale codes and group scale.
LQ_M1_FN void lq_m1_load_scale(const struct lq_m1_args *a, int bpc, uint32_t ci,
                               struct lq_m1_raw *r) {
    // blocks < 2^26 and b1 <= 8 (rows·cols < 2^31, B0 >= 16): the bit index fits 32 bits
    const uint32_t block0 = bpc == 1 ? lq_div(ci, a->chunk_block) : ci * (uint32_t)bpc;
    const uint32_t group = lq_div(block0, a->group), bit = block0 * (uint32_t)a->b1;
    const uint32_t *s = a->scale_codes + (bit >> 5);
    r->scale_lo = lq_m1_ldg_u32(s), r->scale_hi = lq_m1_ldg_u32(s + 1), r->shift = bit & 31u;
    r->group_scale = lq_m1_ldg_f32(a->group_scales + group);
}

// ŝ = offset + code·(gs / levels), the division as a product by inv_levels = RN(1/levels):
// within a few fp32 ulps of core/nf.c's RN(code·gs / levels) + offset, where its exact
// rounding (two more FMAs and a FADD for every block scale, 0.05 to 0.19 instructions per
// code) bought nothing: the values it scales are fp16 here.
LQ_M1_FN float lq_m1_block_scale(const struct lq_m1_args *a, uint32_t code, float group_scale) {
    return lq_m1_fma(lq_m1_u2f(code), lq_m1_fmul(group_scale, a->inv_levels), a->offset);
}

// The chunk's block scales (bpc of them; 0 for the second when bpc = 1).
LQ_M1_FN void lq_m1_scales(const struct lq_m1_args *a, int bpc, const struct lq_m1_raw *r,
                           float scale[2]) {
    const float group_scale = r->group_scale;
    const uint32_t mask = (1u << a->b1) - 1u,
                   window = lq_m1_funnel(r->scale_lo, r->scale_hi, r->shift);
    LQ_M1_UNROLL
    for (int b = 0; b < 2; b++)
        scale[b] =
            b < bpc ? lq_m1_block_scale(a, (window >> (b * a->b1)) & mask, group_scale) : 0.0f;
}

// Pair p's entry for this lane in the pair table: the pair's 2·bits bits (codes 2p and 2p+1 of
// the chunk) moved to bit 7, OR lane_bytes: the lane's 4·lane (a byte offset from the table),
// or its whole address where the table's address has no bits in the field (lq_m1_table_offset).
// Entry e of lane l is word e·32 + l, so every lane reads its own bank whatever the codes.
LQ_M1_FN uint32_t lq_m1_pair_offset(const uint32_t *w, int bits, int p, uint32_t lane_bytes) {
    const uint32_t field = ((1u << (2 * bits)) - 1u) << 7;
    const int start = p * 2 * bits, word = start >> 5, off = start & 31;
    uint32_t moved;
    if (off < 7)
        moved = w[word] << (7 - off); // the pair starts near the word's bottom: inside it
    else if (off + 2 * bits <= 32 || word + 1 >= bits)
        moved = w[word] >> (off - 7);
    else
        moved = lq_m1_funnel(w[word], w[word + 1], (uint32_t)(off - 7)); // spans two words
    return (moved & field) | lane_bytes;
}

// t[k]: the projection's column-slice sums, in slice order.
LQ_M1_FN float lq_m1_t_at(const struct lq_m1_args *a, int k) {
    float tk = lq_m1_ldcg_f32(a->t + k);
    for (int s = 1; s < a->t_slices; s++)
        tk = lq_m1_fadd(tk, lq_m1_ldcg_f32(a->t + (uint64_t)s * (uint32_t)a->rank + k));
    return tk;
}

// Entry e = lo | hi << bits of the pair table of the NF table `table` (2^bits values):
// half2(table[lo], table[hi]), which the table holds in each of the 32 lanes' words (e·32 + lane).
LQ_M1_HD uint32_t lq_m1_pair_entry(const float *table, int bits, uint32_t e) {
    return lq_m1_half2_bits(table[e & ((1u << bits) - 1u)], table[e >> bits]);
}

// The quads of x (and of the norm's weights) a thread holds through the staging: cols / 4 /
// LQ_M1_THREADS of them, all asked for before the first is used (4: up to 4096 columns; wider
// rows read the rest again). Why: the norm's pass and the staging each read x and waited for
// it, two trips to L2 in a row before the main loop (ncu on the H100: a third of the stall
// samples of a normed layer were in that prologue).
#define LQ_M1_HELD_QUADS 4

// The token's values at columns 4i .. 4i + 3 (i < cols / 4) as the unfused op would have
// written them, from x's values v and the norm's weights w there: x, or (x·s)·w (two roundings,
// as rmsnorm).
LQ_M1_FN void lq_m1_normed_quad(const struct lq_m1_args *a, float scale, const float w[4],
                                float v[4]) {
    if (a->input == LQ_M1_INPUT_RMSNORM)
        for (int j = 0; j < 4; j++) v[j] = lq_m1_fmul(lq_m1_fmul(v[j], scale), w[j]);
}

// Quad i of x into v, and of the norm's weights into w (a normed input only).
LQ_M1_FN void lq_m1_load_quad(const struct lq_m1_args *a, int i, float v[4], float w[4]) {
    lq_m1_ldg_f32x4(a->x + 4 * i, v);
    if (a->input == LQ_M1_INPUT_RMSNORM) lq_m1_ldg_f32x4(a->norm_weight + 4 * i, w);
}

// The quads of x (and of the norm's weights) the CTA stages, [*begin, *end) of the padded
// lq_m1_x_words / 2: all of them, or in a cluster (a->cluster_log > 0) its rank's share, whole
// 128-byte lines, which it writes into every CTA of the cluster. Why a cluster: each SM's CTAs
// read x and the norm's weights from L2 (32 KB at 4096 columns, shared by the SM's CTAs
// through L1) besides a 4096 x 4096 layer's 66 KB of codes from HBM, and ncu on the H100 put
// L2 at twice DRAM's share of its peak: a cluster of C CTAs on C SMs reads them once.
LQ_M1_FN void lq_m1_x_span(const struct lq_m1_args *a, int rank, int *begin, int *end) {
    const int padded = (int)lq_m1_x_words(a->chunks_per_row) / 2;
    const int count = 1 << a->cluster_log;
    const int share = ((padded + count - 1) / count + 7) / 8 * 8;
    *begin = rank * share < padded ? rank * share : padded;
    *end = *begin + share < padded ? *begin + share : padded;
}

// rmsnorm's scale s = 1 / sqrt(mean(x²) + eps) for the CTA, every thread's, from the quads it
// holds (and the rest of its quads [begin, end), read again): the sum of squares in double as
// the rmsnorm op takes it (its order of terms is its own: s may differ from the op's in the
// last bit); in a cluster, the CTAs' sums of their shares added in rank order, the same s in
// every CTA. warp_sums: 9 doubles of shared memory, free until the barrier after the staging
// (the ninth, the CTA's sum, is read by the cluster's other CTAs).
LQ_M1_FN float lq_m1_norm_scale(const struct lq_m1_args *a, int thread, int begin, int end,
                                float held[LQ_M1_HELD_QUADS][4], double *warp_sums) {
    const int quads = a->cols / 4, last = end < quads ? end : quads;
    double sum = 0.0;
    LQ_M1_UNROLL
    for (int k = 0; k < LQ_M1_HELD_QUADS; k++) {
        const float *v = held[k];
        if (begin + thread + k * LQ_M1_THREADS < last)
            sum += (double)v[0] * v[0] + (double)v[1] * v[1] + (double)v[2] * v[2] +
                   (double)v[3] * v[3];
    }
    for (int i = begin + thread + LQ_M1_HELD_QUADS * LQ_M1_THREADS; i < last; i += LQ_M1_THREADS) {
        float v[4];
        lq_m1_ldg_f32x4(a->x + 4 * i, v);
        sum +=
            (double)v[0] * v[0] + (double)v[1] * v[1] + (double)v[2] * v[2] + (double)v[3] * v[3];
    }
    for (int offset = 16; offset > 0; offset >>= 1) sum += lq_m1_shfl_xor_f64(sum, offset);
    if ((thread & 31) == 0) warp_sums[thread >> 5] = sum;
    lq_m1_sync();
    double total = 0.0;
    for (int w = 0; w < LQ_M1_WARPS; w++) total += warp_sums[w];
    if (a->cluster_log > 0) {
        if (thread == 0) warp_sums[LQ_M1_WARPS] = total;
        lq_m1_cluster_sync();
        total = 0.0;
        for (int r = 0; r < 1 << a->cluster_log; r++)
            total += lq_m1_ld_cluster_f64(lq_m1_window(warp_sums + LQ_M1_WARPS), r);
    }
    return (float)(1.0 / sqrt(total / a->cols + a->eps)); // the CPU's formula
}

// Quad i of the staged x, its two words of fp16: into this CTA's shared memory, or in a
// cluster into every CTA's.
LQ_M1_FN void lq_m1_put_x(const struct lq_m1_args *a, uint32_t *xs, int i, uint32_t lo,
                          uint32_t hi) {
    if (a->cluster_log == 0) {
        xs[2 * i] = lo, xs[2 * i + 1] = hi;
        return;
    }
    for (int r = 0; r < 1 << a->cluster_log; r++)
        lq_m1_st_cluster_u32x2(lq_m1_window(xs + 2 * i), r, lo, hi);
}

// The pair table (2 to 32 KB) built into shared memory from the NF table, by all threads of the
// CTA, four words (one entry's, for four lanes) a store; read after the barrier. Why not a
// copy of a table built once on the host: every CTA read it from L2 (cp.async bypasses L1),
// 24 KB a SM at b0 = 3 and 3 CTAs a SM beside a 4096 x 4096 layer's 66 KB of codes, where x
// and the norm's weights, shared through L1, took 32 KB (ncu on the H100: L2 at 31% of its
// peak beside DRAM's 15%, so L2 would have saturated near half of HBM's bandwidth).
LQ_M1_FN void lq_m1_build_pair_table(const struct lq_m1_args *a, int bits, int thread,
                                     uint32_t *pairs) {
    const int quads = (int)lq_m1_pair_words(bits) / 4;
    for (int q = thread; q < quads; q += LQ_M1_THREADS)
        lq_m1_sts_u32x4(pairs + 4 * q, lq_m1_pair_entry(a->nf_table, bits, (uint32_t)q >> 3));
}

// The CTA's pieces' L2 quads into its shared area (l2: lq_m1_t_area), this thread's (quad
// s·LQ_M1_SLICE_QUADS + thread of rank row k), as one group of copies: the first of the launch.
LQ_M1_FN void lq_m1_copy_pieces(const struct lq_m1_args *a, int block, int thread, float *l2) {
    LQ_M1_UNROLL
    for (int j = 0; j < LQ_M1_MAX_T_PIECES; j++) {
        int k, s;
        if (!lq_m1_piece(a, block, j, &k, &s)) break;
        const int i = s * LQ_M1_SLICE_QUADS + thread;
        if (i < a->cols / 4)
            lq_m1_copy16_window(
                lq_m1_window(l2 + 4 * (j * LQ_M1_SLICE_QUADS + thread)),
                (const uint32_t *)(a->lora_A + (uint64_t)k * (uint32_t)a->cols + 4u * (uint32_t)i));
    }
    lq_m1_copy_commit();
}

// Quad i of x (raw values v, the norm's weights w) into this thread's products of the CTA's
// pieces of its slice, as lq_lowrank_project_split_kernel takes them: w·x for a normed input
// (rounded), then four FMAs from 0.
LQ_M1_FN void lq_m1_project_quad(const struct lq_m1_args *a, int block, int thread, int i,
                                 const float v[4], const float w[4], const float *l2,
                                 float acc[LQ_M1_MAX_T_PIECES]) {
    float u[4];
    for (int c = 0; c < 4; c++)
        u[c] = a->input == LQ_M1_INPUT_RMSNORM ? lq_m1_fmul(v[c], w[c]) : v[c];
    LQ_M1_UNROLL
    for (int j = 0; j < LQ_M1_MAX_T_PIECES; j++) {
        int k, s;
        if (!lq_m1_piece(a, block, j, &k, &s)) break;
        if (s != i / LQ_M1_SLICE_QUADS) continue;
        const float *l = l2 + 4 * (j * LQ_M1_SLICE_QUADS + thread);
        for (int c = 0; c < 4; c++) acc[j] = lq_m1_fma(l[c], u[c], acc[j]);
    }
}

// v summed over the warp's lanes, every lane's the same (lq_warp_sum's order: xor 16 to 1).
LQ_M1_FN float lq_m1_warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = lq_m1_fadd(v, lq_m1_shfl_xor(v, offset));
    return v;
}

// The pieces' sums of the warp's threads, into the warp's row of the area's sums (lane 0),
// added as lq_warp_sum adds them.
LQ_M1_FN void lq_m1_pieces_warp_sums(const struct lq_m1_args *a, int block, int thread,
                                     float acc[LQ_M1_MAX_T_PIECES], float *piece_sums) {
    LQ_M1_UNROLL
    for (int j = 0; j < LQ_M1_MAX_T_PIECES; j++) {
        int k, s;
        if (!lq_m1_piece(a, block, j, &k, &s)) break;
        const float v = lq_m1_warp_sum(acc[j]);
        if ((thread & 31) == 0) piece_sums[(thread >> 5) * LQ_M1_MAX_T_PIECES + j] = v;
    }
}

// After the barrier that follows the staging, by one thread: the pieces' sums (the warps' in
// warp order, from 0) into t, then the CTA's arrival on the counter (release: whoever sees the
// count sees the sums).
LQ_M1_FN void lq_m1_publish_pieces(const struct lq_m1_args *a, int block, const float *piece_sums) {
    for (int j = 0; j < LQ_M1_MAX_T_PIECES; j++) {
        int k, s;
        if (!lq_m1_piece(a, block, j, &k, &s)) break;
        float sum = 0.0f;
        for (int w = 0; w < LQ_M1_WARPS; w++)
            sum = lq_m1_fadd(sum, piece_sums[w * LQ_M1_MAX_T_PIECES + j]);
        a->t_out[(uint64_t)s * (uint32_t)a->rank + (uint32_t)k] = sum;
    }
    lq_m1_add_release_u32(&a->barrier[0], 1u);
}

// Whether every CTA of the grid has published its pieces (acquire), by a->spin_limit polls.
LQ_M1_FN int lq_m1_await_pieces(const struct lq_m1_args *a) {
    const uint32_t ctas = (uint32_t)lq_m1_grid(a->rows, a->rg_log, 0);
    for (uint32_t polls = 0; polls < a->spin_limit; polls++) {
        if (lq_m1_ld_acquire_u32(&a->barrier[0]) >= ctas) return 1;
        lq_m1_backoff();
    }
    return 0;
}

// After the CTA is done with t, by one thread: the CTA's departure; the last CTA out sets both
// counts back to 0 for the layer's next launch (every CTA has passed its poll by then).
LQ_M1_FN void lq_m1_depart_pieces(const struct lq_m1_args *a) {
    const uint32_t ctas = (uint32_t)lq_m1_grid(a->rows, a->rg_log, 0);
    if (lq_m1_add_acq_rel_u32(&a->barrier[1], 1u) == ctas - 1u) {
        lq_m1_st_relaxed_u32(&a->barrier[0], 0u);
        lq_m1_st_relaxed_u32(&a->barrier[1], 0u);
    }
}

// x in fp16 and the zero area, by all threads of the CTA (in a cluster, the CTA's share of x
// into every CTA's, then the cluster's barrier); with a normed input, also its scale into
// *norm_scale (read after the barrier). With the projection in the kernel (project; t_area: the
// CTA's pieces' L2 quads, their copies the group `older` groups before the newest), the products of
// each quad of x with them on the way, and the warps' sums into the area's (read after the
// barrier).
LQ_M1_FN void lq_m1_stage(const struct lq_m1_args *a, int project, int block, int thread, int older,
                          uint32_t *xs, uint32_t *zeros, float *norm_scale, float *t_area) {
    const int quads = a->cols / 4;
    int begin, end;
    lq_m1_x_span(a, a->cluster_log > 0 ? lq_m1_cluster_rank() : 0, &begin, &end);
    float acc[LQ_M1_MAX_T_PIECES] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (project && a->wait_before_x) lq_m1_wait_prerequisite();
    float held[LQ_M1_HELD_QUADS][4], held_w[LQ_M1_HELD_QUADS][4];
    LQ_M1_UNROLL
    for (int k = 0; k < LQ_M1_HELD_QUADS; k++) {
        const int i = begin + thread + k * LQ_M1_THREADS;
        for (int j = 0; j < 4; j++) held[k][j] = 0.0f, held_w[k][j] = 0.0f;
        if (i < end && i < quads) lq_m1_load_quad(a, i, held[k], held_w[k]);
    }
    float scale = 1.0f;
    if (a->input == LQ_M1_INPUT_RMSNORM) {
        // the row-sum area (zeros + 16) holds 9 doubles here: it is 8-byte aligned, and written
        // only after the main loop
        scale = lq_m1_norm_scale(a, thread, begin, end, held, (double *)(zeros + 16));
        if (thread == 0) *norm_scale = scale;
    }
    if (project) lq_m1_copy_wait_groups(older); // this thread's L2 quads have landed
    LQ_M1_UNROLL
    for (int k = 0; k < LQ_M1_HELD_QUADS; k++) { // (held quads past x are zeros)
        const int i = begin + thread + k * LQ_M1_THREADS;
        if (i >= end) break;
        if (project && i < quads)
            lq_m1_project_quad(a, block, thread, i, held[k], held_w[k], t_area, acc);
        if (i < quads) lq_m1_normed_quad(a, scale, held_w[k], held[k]);
        lq_m1_put_x(a, xs, i, lq_m1_half2_bits(held[k][0], held[k][1]),
                    lq_m1_half2_bits(held[k][2], held[k][3]));
    }
    for (int i = begin + thread + LQ_M1_HELD_QUADS * LQ_M1_THREADS; i < end; i += LQ_M1_THREADS) {
        float v[4] = {0.0f, 0.0f, 0.0f, 0.0f}, w[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (i < quads) {
            lq_m1_load_quad(a, i, v, w);
            if (project) lq_m1_project_quad(a, block, thread, i, v, w, t_area, acc);
            lq_m1_normed_quad(a, scale, w, v);
        }
        lq_m1_put_x(a, xs, i, lq_m1_half2_bits(v[0], v[1]), lq_m1_half2_bits(v[2], v[3]));
    }
    if (project)
        lq_m1_pieces_warp_sums(a, block, thread, acc, t_area + 4 * a->t_pieces * LQ_M1_SLICE_QUADS);
    if (thread < 16) zeros[thread] = 0u;
    if (a->cluster_log > 0) lq_m1_cluster_sync(); // every CTA's share is in
}

// What a lane keeps through the main loop. Its loads run past the matrix and its rows into the
// buffers' padding (lq_m1_padding): a chunk past the row meets x's zero padding (its products
// are 0), and a row past the matrix is never written. Prefetches stay inside the matrix (the
// clamped rows' first chunks, and last_chunk).
struct lq_m1_lane {
    int t, real_first, real_second, row[2], kt_end;
    uint32_t row_ci[2]; // the first chunk of the lane's rows, clamped into the matrix
    uint32_t last_chunk;
    uint32_t lane_address;   // the window address of the lane's column of the pair table
    uint32_t x_step[2];      // what the cursor's x addresses advance by per tile (0: zeros)
    uint32_t prefetch_ci;    // the row (g or g+8, by t / 2) this lane prefetches: its first chunk
    uint32_t prefetch_ahead; // from the lane's chunk to the one it prefetches
    // Staged codes: the window address of the warp's ring; where in a slot the lane's words of
    // row g start (bytes; row g+8's are 32·bits words on); the lane's share of a tile's copies,
    // pieces j = lane and lane + 32 of its 16·bits 16-byte pieces (row j / bits, piece j mod
    // bits): their first words in codes at tile 0 (tile kt's are 4·bits·kt words on) and their
    // places in a slot (bytes), and whether the second exists.
    uint32_t ring, words_at;
    uint32_t copy_src[2], copy_dst[2];
    int second_copy;
};

LQ_M1_FN void lq_m1_lane_init(const struct lq_m1_args *a, int bits, int bpc, int stage, int thread,
                              int row0, int kt_end, const uint32_t *pairs, uint32_t ring,
                              struct lq_m1_lane *l) {
    const int lane = thread & 31, g = lane >> 2, t = lane & 3;
    l->t = t;
    if (stage) {
        l->ring = ring;
        l->words_at = (uint32_t)(g * 4 * bits + t * bits) * 4u;
        LQ_M1_UNROLL
        for (int c = 0; c < 2; c++) {
            const int j = lane + 32 * c, r = j / bits, piece = j % bits;
            l->copy_src[c] = (uint32_t)(row0 + r) * (uint32_t)a->chunks_per_row * (uint32_t)bits +
                             4u * (uint32_t)piece;
            l->copy_dst[c] = (uint32_t)(r * 4 * bits + 4 * piece) * 4u;
        }
        l->second_copy = lane + 32 < 16 * bits;
    } else {
        l->ring = l->words_at = 0u, l->second_copy = 0;
        l->copy_src[0] = l->copy_src[1] = l->copy_dst[0] = l->copy_dst[1] = 0u;
    }
    LQ_M1_UNROLL
    for (int h = 0; h < 2; h++) {
        l->row[h] = row0 + g + 8 * h;
        const int clamped = l->row[h] < a->rows ? l->row[h] : a->rows - 1;
        l->row_ci[h] = (uint32_t)clamped * (uint32_t)a->chunks_per_row;
    }
    l->last_chunk = (uint32_t)a->chunks_per_row - 1u;
    l->kt_end = kt_end;
    // B: lane (g, t) holds column g, so x only where g = 2t + b for the block b that its mma
    // steps belong to (b = 0 throughout when bpc = 1).
    l->real_first = g == 2 * t, l->real_second = bpc == 1 ? g == 2 * t : g == 2 * t + 1;
    l->lane_address = lq_m1_window(pairs) + (uint32_t)lane * 4u;
    // A quad's four prefetches cover a tile P ahead of both rows: lanes 0 and 1 row g at its
    // chunks 0 and 2, lanes 2 and 3 row g+8 (a tile of a row is 4·b0 words: two prefetches
    // 8·b0 bytes apart reach every 32-byte sector it touches in most cases; it is a hint).
    // Indexed, not a select: the compiler then keeps row_ci in local memory for this one read
    // in the prologue, and the main loop has the registers (a select measured 0.27
    // instructions per code more in the loop: tests/bench/sass_loop.py, sass_budget).
    l->prefetch_ci = l->row_ci[t >> 1];
    l->prefetch_ahead = (uint32_t)(LQ_M1_TILE_CHUNKS * a->prefetch_tiles + 2 * (t & 1) - t);
    l->x_step[0] = l->real_first ? 16u * 4u * LQ_M1_TILE_CHUNKS : 0u;
    l->x_step[1] = l->real_second ? 16u * 4u * LQ_M1_TILE_CHUNKS : 0u;
}

// Where a lane is: tile kt and its chunk there (kt·4 + t; past the row in a last, partial tile
// or past the lane's tiles), and the window addresses of its B fragments' x words there (x's
// words of that chunk, or the zeros: the first 8 words for block 0's steps, the last 8 for
// block 1's).
struct lq_m1_cursor {
    int kt;
    uint32_t chunk;
    uint32_t ci; // row g's chunk there, counted from the matrix's first: (row0 + g)·cpr + chunk
    uint32_t x[2];
};

// The window address of tile kt's slot in the warp's ring.
LQ_M1_FN uint32_t lq_m1_slot(int bits, const struct lq_m1_lane *l, int kt) {
    return l->ring + (uint32_t)(kt & (LQ_M1_RING - 1)) * lq_m1_slot_bytes(bits);
}

// Staged codes: tile kt's copies into its slot, this lane's share, as one group (an empty one
// past the warp's tiles: each tile is then the same number of groups back).
LQ_M1_FN void lq_m1_ring_fill(const struct lq_m1_args *a, int bits, const struct lq_m1_lane *l,
                              int kt) {
    if (kt < l->kt_end) {
        const uint32_t slot = lq_m1_slot(bits, l, kt), tile = (uint32_t)kt * 4u * (uint32_t)bits;
        lq_m1_copy16_window(slot + l->copy_dst[0], a->codes + l->copy_src[0] + tile);
        if (l->second_copy)
            lq_m1_copy16_window(slot + l->copy_dst[1], a->codes + l->copy_src[1] + tile);
    }
    lq_m1_copy_commit();
}

// The chunk of each of the cursor's rows, counted from the matrix's first.
LQ_M1_FN void lq_m1_tile_chunks(const struct lq_m1_args *a, const struct lq_m1_cursor *c,
                                uint32_t ci[2]) {
    ci[0] = c->ci, ci[1] = c->ci + 8u * (uint32_t)a->chunks_per_row;
}

// The cursor's tile's words for both rows (at chunks ci): from its slot (staged), or from the
// codes.
LQ_M1_FN void lq_m1_load_tile_words(const struct lq_m1_args *a, int bits, int stage,
                                    const struct lq_m1_lane *l, const struct lq_m1_cursor *c,
                                    const uint32_t ci[2], struct lq_m1_raw raw[2]) {
    if (stage) {
        const uint32_t at = lq_m1_slot(bits, l, c->kt) + l->words_at;
        LQ_M1_UNROLL
        for (int h = 0; h < 2; h++)
            lq_m1_lds_words(at + (uint32_t)(h * 32 * bits * 4), bits, raw[h].w);
        return;
    }
    LQ_M1_UNROLL
    for (int h = 0; h < 2; h++) lq_m1_load_words(a, bits, ci[h], &raw[h]);
}

// The scale codes and group scales of both rows' chunks ci. With shared scales (share) a lane
// loads those of row t mod 2 only, into raw[0].
LQ_M1_FN void lq_m1_load_tile_scales(const struct lq_m1_args *a, int bpc, int share,
                                     const struct lq_m1_lane *l, const uint32_t ci[2],
                                     struct lq_m1_raw raw[2]) {
    if (share) {
        lq_m1_load_scale(a, 1, (l->t & 1) ? ci[1] : ci[0], &raw[0]);
        return;
    }
    LQ_M1_UNROLL
    for (int h = 0; h < 2; h++) lq_m1_load_scale(a, bpc, ci[h], &raw[h]);
}

// The cursor's tile for both rows.
LQ_M1_FN void lq_m1_load_tile(const struct lq_m1_args *a, int bits, int bpc, int share, int stage,
                              const struct lq_m1_lane *l, const struct lq_m1_cursor *c,
                              struct lq_m1_raw raw[2]) {
    uint32_t ci[2];
    lq_m1_tile_chunks(a, c, ci);
    lq_m1_load_tile_words(a, bits, stage, l, c, ci, raw);
    lq_m1_load_tile_scales(a, bpc, share, l, ci, raw);
}

// The block scales of the tile at c for both rows. Shared: lanes t and t ^ 1 decode chunks of
// one block (B0 >= 64, rows that start on a block), so each rebuilds the scale of row t mod 2
// and takes the other row's from its partner.
LQ_M1_FN void lq_m1_tile_scales(const struct lq_m1_args *a, int bpc, int share,
                                const struct lq_m1_lane *l, const struct lq_m1_raw raw[2],
                                float scale[2][2]) {
    if (share) {
        float own[2];
        lq_m1_scales(a, 1, &raw[0], own);
        const float other = lq_m1_shfl_xor(own[0], 1);
        const int mine = l->t & 1;
        scale[0][0] = mine == 0 ? own[0] : other, scale[1][0] = mine == 0 ? other : own[0];
        scale[0][1] = scale[1][1] = 0.0f;
        return;
    }
    LQ_M1_UNROLL
    for (int h = 0; h < 2; h++) lq_m1_scales(a, bpc, &raw[h], scale[h]);
}

// An L2 prefetch of the lane's prefetch row at chunk `ahead` (clamped into the row).
LQ_M1_FN void lq_m1_prefetch(const struct lq_m1_args *a, int bits, const struct lq_m1_lane *l,
                             uint32_t ahead) {
    const uint32_t chunk = ahead < l->last_chunk ? ahead : l->last_chunk;
    lq_m1_prefetch_l2(a->codes + (uint64_t)(l->prefetch_ci + chunk) * (uint32_t)bits);
}

// One tile: the next tile's loads go out (and a later one's L2 prefetch), then cur is decoded
// into the mma fragments, multiplied with x and scaled into acc; the cursor moves on.
LQ_M1_FN void lq_m1_tile(const struct lq_m1_args *a, int bits, int bpc, int share, int stage,
                         const struct lq_m1_lane *l, struct lq_m1_cursor *c,
                         const struct lq_m1_raw cur[2], struct lq_m1_raw next[2], float acc[2]) {
    struct lq_m1_cursor n = *c;
    n.kt++, n.chunk += LQ_M1_TILE_CHUNKS, n.ci += LQ_M1_TILE_CHUNKS;
    n.x[0] += l->x_step[0], n.x[1] += l->x_step[1];
    if (stage) {
        // The next tile's copies have landed, every lane's (the barrier), and every lane has
        // read this tile's slot (its words are in cur): the tile LQ_M1_RING on goes there.
        lq_m1_copy_wait_groups(LQ_M1_RING - 2);
        lq_m1_tile_fence();
        lq_m1_ring_fill(a, bits, l, c->kt + LQ_M1_RING);
        lq_m1_load_tile(a, bits, bpc, share, stage, l, &n, next);
    } else {
        // Two tiles of words in registers are too few to cover HBM's latency with 24 warps
        // per SM; a tile further ahead waits in L2 without taking registers. Past the warp's
        // last tile it asks for the next slice's (or the row's last chunk): a hint, in the
        // matrix, cheaper than the test (0.05 instructions per code).
        if (a->prefetch_tiles > 0) lq_m1_prefetch(a, bits, l, c->chunk + l->prefetch_ahead);
        lq_m1_load_tile(a, bits, bpc, share, stage, l, &n, next);
        // (what keeps the loads a tile ahead is the loop of one tile a pass; with this boundary
        // the loop also compiles to 0.03-0.1 fewer instructions a code, and it is what ran on
        // the H100)
        lq_m1_tile_fence();
    }
    float scale[2][2];
    lq_m1_tile_scales(a, bpc, share, l, cur, scale);
    // x's words for steps 0-3 now, for steps 4-7 half way: 8 registers fewer held through
    // the steps (the kernel is at its 80-register cap: each one freed is rematerialization
    // the compiler does not need)
    uint32_t xw[16];
    lq_m1_lds_u32x8(c->x[0], xw);

    // Two accumulator sets (even and odd steps): two mma chains of 4 instead of one of 8.
    float d[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    LQ_M1_UNROLL
    for (int s = 0; s < LQ_M1_STEPS; s++) {
        if (s == LQ_M1_STEPS / 2) lq_m1_lds_u32x8(c->x[1], xw + 8);
        uint32_t frag[4];
        LQ_M1_UNROLL
        for (int h = 0; h < 2; h++) {
            frag[h] = lq_m1_lds_pair(lq_m1_pair_offset(cur[h].w, bits, 2 * s, l->lane_address));
            frag[2 + h] =
                lq_m1_lds_pair(lq_m1_pair_offset(cur[h].w, bits, 2 * s + 1, l->lane_address));
        }
        lq_m1_mma(d[s & 1], frag, xw[2 * s], xw[2 * s + 1]);
    }
    LQ_M1_UNROLL
    for (int h = 0; h < 2; h++) {
        acc[h] = lq_m1_fma(scale[h][0], lq_m1_fadd(d[0][2 * h], d[1][2 * h]), acc[h]);
        if (bpc == 2)
            acc[h] = lq_m1_fma(scale[h][1], lq_m1_fadd(d[0][2 * h + 1], d[1][2 * h + 1]), acc[h]);
    }
    *c = n;
}

// L1[row][k] of the lane's row h (clamped like its codes: a row past the matrix is not written).
LQ_M1_FN uint64_t lq_m1_l1_index(const struct lq_m1_args *a, const struct lq_m1_lane *l, int h,
                                 int k) {
    const int row = l->row[h] < a->rows ? l->row[h] : a->rows - 1;
    return (uint64_t)row * (uint32_t)a->rank + (uint32_t)k;
}

// Slice s's sum of t's row k as the CTA that owns the piece publishes it, by the whole warp
// (lane `lane` stands for thread w·32 + lane of each warp w in turn): its quads' products
// (lq_m1_project_quad: four FMAs from 0), the warp's sum (lq_m1_pieces_warp_sums), the warps'
// in order from 0 (lq_m1_publish_pieces). x is whole: the caller has waited for the kernel
// before.
LQ_M1_FN float lq_m1_piece_here(const struct lq_m1_args *a, int k, int s, int lane) {
    float sum = 0.0f;
    for (int w = 0; w < LQ_M1_WARPS; w++) {
        const int i = s * LQ_M1_SLICE_QUADS + w * 32 + lane;
        float v = 0.0f;
        if (i < a->cols / 4) {
            float x[4], wt[4], l[4];
            lq_m1_load_quad(a, i, x, wt);
            lq_m1_ldg_f32x4(a->lora_A + (uint64_t)k * (uint32_t)a->cols + 4u * (uint32_t)i, l);
            for (int c = 0; c < 4; c++)
                v = lq_m1_fma(l[c],
                              a->input == LQ_M1_INPUT_RMSNORM ? lq_m1_fmul(x[c], wt[c]) : x[c], v);
        }
        sum = lq_m1_fadd(sum, lq_m1_warp_sum(v));
    }
    return sum;
}

// The low-rank term of a warp whose poll ran out (a CTA of the grid has yet to publish): acc as
// the epilogue adds it from t (the same k a lane, in the same order, each t as lq_m1_t_at sums
// its slices), with every t the warp reads taken here (lq_m1_piece_here). The warp's loops are
// uniform (the pieces are taken by all its lanes together); a lane keeps its own k's.
LQ_M1_FN void lq_m1_low_rank_here(const struct lq_m1_args *a, const struct lq_m1_lane *l, int ks,
                                  int rank_stride, int lane, float t_scale,
                                  const float l1[2][LQ_M1_RANK_REGS], float acc[2]) {
    const int t = lane & 3;
    for (int base = ks * 4, m = 0; base < a->rank; base += rank_stride, m++) {
        float mine = 0.0f;
        for (int q = 0; q < 4 && base + q < a->rank; q++) {
            float tk = lq_m1_piece_here(a, base + q, 0, lane);
            for (int s = 1; s < a->t_slices; s++)
                tk = lq_m1_fadd(tk, lq_m1_piece_here(a, base + q, s, lane));
            if (q == t) mine = tk;
        }
        const int k = base + t;
        if (k >= a->rank) continue;
        const float tk = lq_m1_fmul(mine, t_scale);
        LQ_M1_UNROLL
        for (int h = 0; h < 2; h++) {
            float held = 0.0f;
            LQ_M1_UNROLL
            for (int r = 0; r < LQ_M1_RANK_REGS; r++)
                if (m == r) held = l1[h][r];
            acc[h] = lq_m1_fma(
                m < LQ_M1_RANK_REGS ? held : lq_m1_ldg_f32(a->lora_B + lq_m1_l1_index(a, l, h, k)),
                tk, acc[h]);
        }
    }
}

// The kernel: CTA `block` of the grid, thread `thread` of the CTA; `shared` holds
// lq_m1_shared_bytes(bits, chunks_per_row) bytes, 16-byte aligned. bits, bpc (1, or 2 for
// B0 = 16), share (a->share_scales), stage (a->stage) and project (a->t_pieces > 0) are
// compile-time constants on the GPU; with stage, `shared` holds lq_m1_staged_shared_bytes, and
// with project lq_m1_t_area_bytes(a->t_pieces) more. Why project is one: as a run-time test,
// its few instructions outside the main loop changed the compiler's choices at the 80-register
// cap enough to lengthen every instance's loop, by up to 0.5 instructions a code (b0 = 3 staged
// at 3 CTAs a SM); as a template argument the instances without it compile as before, and
// those with it take up to 0.25 more (tests/kernels/check_sass_budget.py, BUDGET_PROJECT).
LQ_M1_FN void lq_m1_body(const struct lq_m1_args *a, int bits, int bpc, int share, int stage,
                         int project, int block, int thread, uint32_t *shared) {
    uint32_t *xs = shared, *zeros = xs + lq_m1_x_words(a->chunks_per_row) + 4;
    float *sums = (float *)(zeros + 16);
    float *norm_scale = (float *)(xs + lq_m1_x_words(a->chunks_per_row)); // a padding word
    uint32_t *pairs = (uint32_t *)((char *)shared + a->table_offset);
    if (lq_m1_window(pairs) & (lq_m1_table_align(bits) - 1u)) {
        lq_m1_misaligned(); // the host's window base was wrong: no wrong sums, a loud failure
        return;
    }

    const int lane = thread & 31, warp = thread >> 5, g = lane >> 2, t = lane & 3;
    const int ks_log = 3 - a->rg_log, ks_count = 1 << ks_log;
    const int group_in_cta = warp >> ks_log, ks = warp & (ks_count - 1);
    const int row0 = ((block << a->rg_log) + group_in_cta) * 16;
    const int ktiles = (a->chunks_per_row + LQ_M1_TILE_CHUNKS - 1) / LQ_M1_TILE_CHUNKS;
    const int per_slice = (ktiles + ks_count - 1) / ks_count;
    const int kt_begin = ks * per_slice;
    // (a row group wholly past the matrix, in a last CTA of several, has no tiles: its rows
    // would run past the buffers' padding)
    const int kt_end = row0 >= a->rows                 ? kt_begin
                       : kt_begin + per_slice < ktiles ? kt_begin + per_slice
                                                       : ktiles;

    // The first tile's loads and the L1 values go out before the staging: HBM latency
    // overlaps it.
    struct lq_m1_lane lane_state;
    const uint32_t ring = lq_m1_window(pairs) + 4u * lq_m1_pair_words(bits) +
                          (uint32_t)warp * LQ_M1_RING * lq_m1_slot_bytes(bits);
    lq_m1_lane_init(a, bits, bpc, stage, thread, row0, kt_end, pairs, ring, &lane_state);
    struct lq_m1_cursor cursor;
    cursor.kt = kt_begin, cursor.chunk = (uint32_t)(kt_begin * LQ_M1_TILE_CHUNKS + t);
    cursor.ci = (uint32_t)(row0 + g) * (uint32_t)a->chunks_per_row + cursor.chunk;
    cursor.x[0] =
        lane_state.real_first ? lq_m1_window(xs + cursor.chunk * 16) : lq_m1_window(zeros);
    cursor.x[1] =
        lane_state.real_second ? lq_m1_window(xs + cursor.chunk * 16 + 8) : lq_m1_window(zeros + 8);
    struct lq_m1_raw buffer_a[2], buffer_b[2];
    // The projection in the kernel: the pieces' L2 quads, the launch's first group of copies.
    float *t_area = (float *)((char *)shared + lq_m1_t_area(bits, a->table_offset, stage));
    if (project) lq_m1_copy_pieces(a, block, thread, t_area);
    // Staged: the first LQ_M1_RING tiles' copies (a group each), then the first tile's scales;
    // its words are read after the barrier.
    if (stage) {
        for (int p = 0; p < LQ_M1_RING; p++) lq_m1_ring_fill(a, bits, &lane_state, kt_begin + p);
        if (kt_begin < kt_end) {
            uint32_t ci[2];
            lq_m1_tile_chunks(a, &cursor, ci);
            lq_m1_load_tile_scales(a, bpc, share, &lane_state, ci, buffer_a);
        }
    }
    // (a warp with no tiles, where there are fewer than slices, loads nothing: its cursor may be
    // far past the row)
    if (!stage && kt_begin < kt_end)
        lq_m1_load_tile(a, bits, bpc, share, stage, &lane_state, &cursor, buffer_a);
    // So do the prefetches of the tiles the loop's never reach (1 .. prefetch_tiles − 1 after
    // the first) and of its first one's (prefetch_tiles after; asked for again there): with a
    // few tiles per warp (4 for a 4096-column layer) the staging, and a fused input's norm pass,
    // would otherwise overlap one tile's trip to HBM.
    for (int p = 1; !stage && p <= a->prefetch_tiles && kt_begin + p < kt_end; p++)
        lq_m1_prefetch(a, bits, &lane_state,
                       cursor.chunk + lane_state.prefetch_ahead -
                           (uint32_t)(LQ_M1_TILE_CHUNKS * (a->prefetch_tiles - p)));
    // The residual a row's sum is added to (y +=), read now, by the thread that writes the row:
    // the kernel's last write then waits for no trip to L2. It was written before the kernel
    // that launched this one waited (a residual is never the previous kernel's output; SwiGLU's
    // gate values are, and are read after the wait).
    const int out_row = (block << a->rg_log) * 16 + thread;
    const int writes = thread < (16 << a->rg_log) && out_row < a->rows;
    const float residual = writes && a->output == LQ_M1_OUTPUT_ADD ? a->y[out_row] : 0.0f;
    const int rank_pos = ks * 4 + t, rank_stride = 4 * ks_count;
    float l1[2][LQ_M1_RANK_REGS];
    LQ_M1_UNROLL
    for (int h = 0; h < 2; h++) LQ_M1_UNROLL
    for (int m = 0; m < LQ_M1_RANK_REGS; m++) {
        const int k = rank_pos + rank_stride * m;
        l1[h][m] =
            k < a->rank ? lq_m1_ldg_f32(a->lora_B + lq_m1_l1_index(a, &lane_state, h, k)) : 0.0f;
    }
    // The pair table: staged, before x's staging; with the codes in registers, after it (there
    // the compiler's choices at the 80-register cap otherwise left the loop 0.1 instructions a
    // code longer and 12-44 bytes of spills at 3 CTAs a SM; staged, after it, a pass's scale
    // load came after its first lookup at b0 = 2: tests/kernels/check_sass_budget.py, ptxas -v)
    if (stage) lq_m1_build_pair_table(a, bits, thread, pairs);
    lq_m1_stage(a, project, block, thread, stage ? LQ_M1_RING : 0, xs, zeros, norm_scale, t_area);
    if (!stage) lq_m1_build_pair_table(a, bits, thread, pairs);
    // (staged) the first tile has landed, every thread's copies (the barrier)
    if (stage) lq_m1_copy_wait_groups(LQ_M1_RING - 1);
    lq_m1_sync();
    if (project && thread == 0)
        lq_m1_publish_pieces(a, block, t_area + 4 * a->t_pieces * LQ_M1_SLICE_QUADS);
    if (stage && kt_begin < kt_end) {
        uint32_t ci[2];
        lq_m1_tile_chunks(a, &cursor, ci);
        lq_m1_load_tile_words(a, bits, stage, &lane_state, &cursor, ci, buffer_a);
    }

    // A tile a pass, the words loaded for the next one copied over at its end. Why not two
    // tiles a pass with the register sets swapped (no copies): the test between the two let
    // the compiler move the first tile's loads past it, down to their use in the second, and
    // every other tile then waited out HBM's latency (ncu on the H100: the loop's largest
    // stall).
    float acc[2] = {0.0f, 0.0f};
    while (cursor.kt < kt_end) {
        lq_m1_tile(a, bits, bpc, share, stage, &lane_state, &cursor, buffer_a, buffer_b, acc);
        buffer_a[0] = buffer_b[0], buffer_a[1] = buffer_b[1];
    }

    // The low-rank term: every thread waits for the projection kernel (so that none is still
    // writing t when this grid ends), then adds its share. A normed input's t is w·x's: s here.
    // SwiGLU's gate values are read after the wait too (the kernel before wrote them).
    if (a->rank > 0 || a->output == LQ_M1_OUTPUT_SWIGLU) lq_m1_wait_prerequisite();
    // With the projection in the kernel, t is whole once every CTA has published its pieces:
    // one lane of each warp polls, the warp's barrier passes it on; its answer goes to every
    // lane as a sum of lane 0's 1 or 0 (the warp's branch must be uniform).
    int whole = 1;
    if (project) {
        const float polled = lane == 0 && lq_m1_await_pieces(a) ? 1.0f : 0.0f;
        whole = lq_m1_warp_sum(polled) != 0.0f;
        lq_m1_tile_fence();
    }
    if (a->rank > 0 && project && !whole) {
        lq_m1_low_rank_here(a, &lane_state, ks, rank_stride, lane,
                            a->input == LQ_M1_INPUT_RMSNORM ? *norm_scale : 1.0f, l1, acc);
    } else if (a->rank > 0) {
        const float t_scale = a->input == LQ_M1_INPUT_RMSNORM ? *norm_scale : 1.0f;
        LQ_M1_UNROLL
        for (int m = 0; m < LQ_M1_RANK_REGS; m++) {
            const int k = rank_pos + rank_stride * m;
            if (k >= a->rank) break;
            const float tk = lq_m1_fmul(lq_m1_t_at(a, k), t_scale);
            LQ_M1_UNROLL
            for (int h = 0; h < 2; h++) acc[h] = lq_m1_fma(l1[h][m], tk, acc[h]);
        }
        for (int k = rank_pos + rank_stride * LQ_M1_RANK_REGS; k < a->rank; k += rank_stride) {
            const float tk = lq_m1_fmul(lq_m1_t_at(a, k), t_scale);
            LQ_M1_UNROLL
            for (int h = 0; h < 2; h++)
                acc[h] = lq_m1_fma(lq_m1_ldg_f32(a->lora_B + lq_m1_l1_index(a, &lane_state, h, k)),
                                   tk, acc[h]);
        }
    }

    // The quad's sum, then the slices' in slice order.
    LQ_M1_UNROLL
    for (int h = 0; h < 2; h++) {
        acc[h] = lq_m1_fadd(acc[h], lq_m1_shfl_xor(acc[h], 1));
        acc[h] = lq_m1_fadd(acc[h], lq_m1_shfl_xor(acc[h], 2));
    }
    if (t == 0) {
        float *mine = sums + (group_in_cta * ks_count + ks) * 16;
        mine[g] = acc[0], mine[g + 8] = acc[1];
    }
    lq_m1_sync();
    if (project && thread == 0) lq_m1_depart_pieces(a); // (every warp has read t)
    if (writes) {
        const int in_cta = thread >> 4, r = thread & 15;
        const float *slices = sums + in_cta * ks_count * 16 + r;
        float total = slices[0];
        for (int s = 1; s < ks_count; s++) total = lq_m1_fadd(total, slices[s * 16]);
        a->y[out_row] = a->output == LQ_M1_OUTPUT_ADD      ? lq_m1_fadd(residual, total)
                        : a->output == LQ_M1_OUTPUT_SWIGLU ? lq_m1_silu_times(a->y[out_row], total)
                                                           : total;
    }
}

#endif
