// The one-token attention kernel (kernels/cuda/attention_cuda.cu): one query token per sequence
// (a decode step, batched or not) against its KV cache, in fp32 as the tile kernel computes it.
//
// Why: the tile kernel gives a (kv head, sequence, key split) block 8 query rows by 64 keys,
// 128 threads each walking 4 keys x head_dim and 8 dimensions x 64 keys in dependent chains.
// At one token with few kv heads that is a few dozen blocks on a GPU of 132 SMs, each a long
// chain, and 7 of its 8 rows empty when there is no GQA (Nsight Compute: ~17 us a layer for
// 32 heads at 65 keys on the H100). Here the keys are spread over the lanes instead:
//   - a CTA of 8 warps takes one (kv head, sequence, key split); a warp scores 4 keys at a
//     time, 8 lanes per key, lane j of the 8 holding dimensions 4·(j + 8m) .. +3 of q (every q
//     row of the kv head's group, in registers) and of the key; 3 shuffles add a dot product;
//   - pass 1 writes the scores (times 1/sqrt(head_dim), as the CPU) to shared memory and keeps
//     each row's maximum; pass 2 walks the same keys again, weights each value row by
//     exp(score − max) and sums, so nothing is rescaled on the way;
//   - the 4 key slots of a warp and the 8 warps are added in a fixed order (the same bits on
//     every run); the output is normalized, or with several splits the split's unnormalized
//     sum and its (max, sum) go to the workspace that attention_combine merges, as the tile
//     kernel's do.
// The new key and value of a batched step are read from k_new/v_new and stored into the cache
// row by the one block whose split holds the position, as in the tile kernel.
// With a->rope.on (a batched step, head_dim = 32·M with M >= 2) the kernel also does the step's
// rotary embedding, which was a kernel of its own before it: q and the new key arrive
// unrotated, and each is rotated where it is read, the new key also where it is stored, with
// the rope kernel's arithmetic (kernels/cuda/ops_cuda.cu rope_rows: cos and sin from the cached
// table or computed in double, each product rounded on its own), so the cache and the output
// get the bits that the rope kernel followed by this one gives. A lane's chunk j + 8m and
// chunk j + 8(m + M/2) are a dimension k < head_dim/2 and its partner k + head_dim/2: the
// rotation needs no shuffle.
//
// This file is C as well as CUDA: tests/unit/test_attention_decode_kernel.c runs this very code
// on the CPU with a thread per CUDA thread. The includer defines LQ_AD_FN (function
// qualifiers) and LQ_AD_UNROLL (an unroll pragma or nothing) and these primitives:
//   void lq_ad_load4(const float *p, float v[4]);   (16-byte aligned)
//   float lq_ad_shfl_xor(float v, int offset); void lq_ad_sync(void); float lq_ad_exp(float);
//   float lq_ad_fmul(float, float), lq_ad_fadd(float, float), lq_ad_fsub(float, float);
//       (each rounded on its own: never contracted into an FMA)
//   void lq_ad_rope_angle(int position, int k, int head_dim, float theta, float *c, float *s);
//       (cos and sin of angle k of a position, as the rope kernel computes them)
#ifndef LQ_ATTENTION_DECODE_KERNEL_H
#define LQ_ATTENTION_DECODE_KERNEL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/cuda/rope_args.h"

#define LQ_AD_WARPS 8
#define LQ_AD_THREADS (LQ_AD_WARPS * 32)
#define LQ_AD_STEP_KEYS (LQ_AD_WARPS * 4) // keys a CTA scores at once: 4 per warp
#define LQ_AD_MAX_ROWS_CHUNKS 16          // q rows x float4 chunks per lane (registers)
#define LQ_AD_MAX_SCORES 4096             // q rows x keys of one split in shared memory

struct lq_ad_args {
    const float *q; // [sequences][heads][head_dim]
    float *out;     // like q
    // one sequence (k_caches == NULL): its caches and the position of its token
    const float *k_cache, *v_cache;
    int start;
    // a batch: per-sequence caches and positions (device), and the new rows
    float *const *k_caches, *const *v_caches;
    const int *positions;
    const float *k_new, *v_new; // [sequences][kv_heads * head_dim]
    int heads, kv_heads, head_dim, group;
    int splits, split_len; // split_len: a multiple of LQ_AD_STEP_KEYS
    float scale;
    float *part_out;   // splits > 1: [rows][splits][head_dim], unnormalized
    float *part_stats; // splits > 1: [rows][splits][2], (max, sum)
    // rotary embedding of q and the new keys (batch only; lq_ad_rope_fits)
    struct lq_rope_args rope;
};

// Float4 chunks of head_dim per lane (1, 2, 4, 8) and q rows per CTA (the group, up to a
// power of two: 1, 2, 4, 8): the kernel's compile-time shape, or 0 when it does not apply.
static inline int lq_ad_chunks(int head_dim) {
    return head_dim <= 32 ? 1 : head_dim <= 64 ? 2 : head_dim <= 128 ? 4 : head_dim <= 256 ? 8 : 0;
}
static inline int lq_ad_rows(int group) {
    return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : group <= 8 ? 8 : 0;
}

// Whether the kernel can rotate in its registers: a lane's chunk j + 8m pairs with its chunk
// j + 8(m + M/2), which needs head_dim = 32·M with M = lq_ad_chunks(head_dim) >= 2.
static inline int lq_ad_rope_fits(int head_dim) {
    const int M = lq_ad_chunks(head_dim);
    return M >= 2 && head_dim == 32 * M;
}

// How the kernel splits the keys 0 .. keys − 1 of the longest sequence, given the number of
// splits wanted (the launcher's rule for filling the GPU; at most max_splits and 65535 /
// sequences, the grid's height): *split_len keys each (a multiple of LQ_AD_STEP_KEYS; rows ·
// split_len scores fit LQ_AD_MAX_SCORES), as many splits as that takes and no empty one. 0, or
// −1 where the shared memory alone needs more splits than those caps allow: the tile kernel
// runs then.
static inline int lq_ad_plan(int keys, int rows, int wanted, int sequences, int max_splits,
                             int *splits, int *split_len) {
    if (keys < 1 || rows < 1 || sequences < 1 || max_splits < 1) return -1;
    if (wanted > max_splits) wanted = max_splits;
    if (wanted > 65535 / sequences) wanted = 65535 / sequences;
    if (wanted < 1) wanted = 1;
    const int per_split = (keys + wanted - 1) / wanted;
    int len = (per_split + LQ_AD_STEP_KEYS - 1) / LQ_AD_STEP_KEYS * LQ_AD_STEP_KEYS;
    const int longest = LQ_AD_MAX_SCORES / rows / LQ_AD_STEP_KEYS * LQ_AD_STEP_KEYS;
    if (len > longest) len = longest;
    const int count = (keys + len - 1) / len;
    if (count > max_splits || (long long)sequences * count > 65535) return -1;
    *splits = count, *split_len = len;
    return 0;
}

// Shared memory in floats: the scores, the warps' sums, their maxima and totals, and the
// token's cos/sin (rope).
static inline size_t lq_ad_shared_floats(int rows, int head_dim, int split_len) {
    return (size_t)rows * split_len + (size_t)LQ_AD_WARPS * rows * head_dim +
           2u * LQ_AD_WARPS * (size_t)rows + (size_t)head_dim;
}

// Chunks j + 8m (m < M) of a row of head_dim floats (`chunks` float4 of them) into out[m],
// zeros past the row or where !valid.
LQ_AD_FN void lq_ad_load_row(const float *row, int valid, int M, int j, int chunks,
                             float (*out)[4]) {
    LQ_AD_UNROLL
    for (int m = 0; m < M; m++) {
        const int c = j + 8 * m;
        out[m][0] = out[m][1] = out[m][2] = out[m][3] = 0.0f;
        if (valid && c < chunks) lq_ad_load4(row + 4 * c, out[m]);
    }
}

// cos and sin of angle k (< head_dim/2) of `position`: the table's, or computed.
LQ_AD_FN void lq_ad_cos_sin(const struct lq_ad_args *a, int position, int k, float *c, float *s) {
    if (a->rope.table && position >= 0 && position < a->rope.positions) {
        const float *row = a->rope.table + (size_t)position * a->head_dim;
        *c = row[k], *s = row[a->head_dim / 2 + k];
    } else {
        lq_ad_rope_angle(position, k, a->head_dim, a->rope.theta, c, s);
    }
}

// The rotation of a pair (x0 at dimension k, x1 at k + head_dim/2), as the rope kernel does it.
LQ_AD_FN void lq_ad_rotate_pair(float c, float s, float *x0, float *x1) {
    const float a0 = *x0, a1 = *x1;
    *x0 = lq_ad_fsub(lq_ad_fmul(a0, c), lq_ad_fmul(a1, s));
    *x1 = lq_ad_fadd(lq_ad_fmul(a0, s), lq_ad_fmul(a1, c));
}

// Rotates a row held as this lane's chunks (chunk j + 8m in v[m], m < M; lq_ad_rope_fits)
// with the position's cos[half] and sin[half] at cs.
LQ_AD_FN void lq_ad_rotate(const float *cs, int half, int M, int j, float (*v)[4]) {
    LQ_AD_UNROLL
    for (int m = 0; m < M / 2; m++) {
        LQ_AD_UNROLL
        for (int e = 0; e < 4; e++) {
            const int k = 4 * (j + 8 * m) + e;
            lq_ad_rotate_pair(cs[k], cs[half + k], &v[m][e], &v[m + M / 2][e]);
        }
    }
}

// Key `key`'s row of a cache (base: the kv head's column of row 0), or `fresh` for the new key
// of a batch (fresh_key: its position, −1 for none).
LQ_AD_FN const float *lq_ad_key_row(const float *base, const float *fresh, int fresh_key, int key,
                                    int kv_dim) {
    return key == fresh_key ? fresh : base + (size_t)key * kv_dim;
}

// CTA (kv_head, z = sequence · splits + split), thread `thread`; `shared` holds
// lq_ad_shared_floats(G, head_dim, split_len) floats. M = lq_ad_chunks(head_dim) and
// G = lq_ad_rows(group) are compile-time constants on the GPU, with G·M <= 16.
LQ_AD_FN void lq_ad_body(const struct lq_ad_args *a, int M, int G, int kv_head, int z, int thread,
                         float *shared) {
    const int lane = thread & 31, warp = thread >> 5, slot = lane >> 3, j = lane & 7;
    const int seq = z / a->splits, split = z % a->splits;
    const int hd = a->head_dim, kv_dim = a->kv_heads * hd, chunks = hd / 4;
    const int batch = a->k_caches != NULL;
    const int start = batch ? a->positions[seq] : a->start;
    const int begin = split * a->split_len;
    if (begin > start) return; // no key of this split is the token's: the combine skips it
    const int key_hi = begin + a->split_len < start + 1 ? begin + a->split_len : start + 1;
    const int count = key_hi - begin;

    const float *k_base = (batch ? a->k_caches[seq] : a->k_cache) + (size_t)kv_head * hd;
    const float *v_base = (batch ? a->v_caches[seq] : a->v_cache) + (size_t)kv_head * hd;
    // a batch's new key (at `start`) comes from k_new/v_new, never from the cache row that this
    // launch writes
    const int fresh_key = batch ? start : -1;
    const float *k_fresh =
        batch ? a->k_new + (size_t)seq * kv_dim + (size_t)kv_head * hd : (const float *)NULL;
    const float *v_fresh =
        batch ? a->v_new + (size_t)seq * kv_dim + (size_t)kv_head * hd : (const float *)NULL;
    float *scores = shared;                      // [G][split_len]
    float *sums = scores + G * a->split_len;     // [warps][G][head_dim]
    float *maxima = sums + LQ_AD_WARPS * G * hd; // [warps][G]
    float *totals = maxima + LQ_AD_WARPS * G;    // [warps][G]
    float *cs = totals + LQ_AD_WARPS * G;        // [head_dim]: cos[half], sin[half] (rope)

    // The token's cos and sin, once per CTA (past the cached rows each is a double-precision
    // pow and sincos: not once per q row and lane).
    const int half = hd / 2;
    if (a->rope.on) {
        for (int k = thread; k < half; k += LQ_AD_THREADS)
            lq_ad_cos_sin(a, start, k, &cs[k], &cs[half + k]);
        lq_ad_sync();
    }
    if (batch && start < key_hi) {
        float *k_row = a->k_caches[seq] + (size_t)start * kv_dim + (size_t)kv_head * hd;
        float *v_row = a->v_caches[seq] + (size_t)start * kv_dim + (size_t)kv_head * hd;
        for (int d = thread; d < hd; d += LQ_AD_THREADS) {
            float key = k_fresh[d];
            if (a->rope.on) { // the rotated key: this dimension's side of its pair
                const int k = d < half ? d : d - half;
                float x0 = k_fresh[k], x1 = k_fresh[k + half];
                lq_ad_rotate_pair(cs[k], cs[half + k], &x0, &x1);
                key = d < half ? x0 : x1;
            }
            k_row[d] = key, v_row[d] = v_fresh[d];
        }
    }

    // q: row g of the group (zeros past it), chunk j + 8m of the head dimension
    float q[LQ_AD_MAX_ROWS_CHUNKS][4];
    LQ_AD_UNROLL
    for (int g = 0; g < G; g++) {
        const size_t row = (size_t)seq * a->heads + (size_t)kv_head * a->group + g;
        lq_ad_load_row(a->q + row * hd, g < a->group, M, j, chunks, q + g * M);
        if (a->rope.on) lq_ad_rotate(cs, half, M, j, q + g * M);
    }

    // pass 1: the scores and each row's maximum
    float row_max[8];
    LQ_AD_UNROLL
    for (int g = 0; g < G; g++) row_max[g] = -INFINITY;
    for (int base = warp * 4; base < count; base += LQ_AD_STEP_KEYS) {
        const int index = base + slot, key = begin + index, valid = index < count;
        float k[8][4];
        lq_ad_load_row(lq_ad_key_row(k_base, k_fresh, fresh_key, key, kv_dim), valid, M, j, chunks,
                       k);
        if (a->rope.on && key == fresh_key) lq_ad_rotate(cs, half, M, j, k); // as it was stored
        LQ_AD_UNROLL
        for (int g = 0; g < G; g++) {
            float s = 0.0f;
            LQ_AD_UNROLL
            for (int m = 0; m < M; m++) {
                const float *qv = q[g * M + m];
                s = fmaf(qv[0], k[m][0], s);
                s = fmaf(qv[1], k[m][1], s);
                s = fmaf(qv[2], k[m][2], s);
                s = fmaf(qv[3], k[m][3], s);
            }
            s += lq_ad_shfl_xor(s, 1);
            s += lq_ad_shfl_xor(s, 2);
            s += lq_ad_shfl_xor(s, 4);
            s *= a->scale;
            if (valid) {
                if (j == 0) scores[g * a->split_len + index] = s;
                row_max[g] = fmaxf(row_max[g], s);
            }
        }
    }
    LQ_AD_UNROLL
    for (int g = 0; g < G; g++) {
        row_max[g] = fmaxf(row_max[g], lq_ad_shfl_xor(row_max[g], 8));
        row_max[g] = fmaxf(row_max[g], lq_ad_shfl_xor(row_max[g], 16));
        if (lane == 0) maxima[warp * G + g] = row_max[g];
    }
    lq_ad_sync(); // the scores and the warps' maxima
    LQ_AD_UNROLL
    for (int g = 0; g < G; g++) {
        float m = maxima[g];
        for (int w = 1; w < LQ_AD_WARPS; w++) m = fmaxf(m, maxima[w * G + g]);
        row_max[g] = m; // finite: the split holds at least one key
    }

    // pass 2: Σ exp(score − max)·v over the same keys, and Σ exp(score − max)
    float acc[LQ_AD_MAX_ROWS_CHUNKS][4], total[8];
    LQ_AD_UNROLL
    for (int g = 0; g < G; g++) {
        total[g] = 0.0f;
        LQ_AD_UNROLL
        for (int m = 0; m < M; m++)
            acc[g * M + m][0] = acc[g * M + m][1] = acc[g * M + m][2] = acc[g * M + m][3] = 0.0f;
    }
    for (int base = warp * 4; base < count; base += LQ_AD_STEP_KEYS) {
        const int index = base + slot, key = begin + index, valid = index < count;
        float v[8][4];
        lq_ad_load_row(lq_ad_key_row(v_base, v_fresh, fresh_key, key, kv_dim), valid, M, j, chunks,
                       v);
        LQ_AD_UNROLL
        for (int g = 0; g < G; g++) {
            const float p = valid ? lq_ad_exp(scores[g * a->split_len + index] - row_max[g]) : 0.0f;
            total[g] += p;
            LQ_AD_UNROLL
            for (int m = 0; m < M; m++) {
                float *o = acc[g * M + m];
                o[0] = fmaf(p, v[m][0], o[0]);
                o[1] = fmaf(p, v[m][1], o[1]);
                o[2] = fmaf(p, v[m][2], o[2]);
                o[3] = fmaf(p, v[m][3], o[3]);
            }
        }
    }

    // the warp's 4 key slots (lanes j, j + 8, j + 16, j + 24), then the warps in order
    LQ_AD_UNROLL
    for (int g = 0; g < G; g++) {
        total[g] += lq_ad_shfl_xor(total[g], 8);
        total[g] += lq_ad_shfl_xor(total[g], 16);
        if (lane == 0) totals[warp * G + g] = total[g];
        LQ_AD_UNROLL
        for (int m = 0; m < M; m++) {
            const int c = j + 8 * m;
            LQ_AD_UNROLL
            for (int e = 0; e < 4; e++) {
                float s = acc[g * M + m][e];
                s += lq_ad_shfl_xor(s, 8);
                s += lq_ad_shfl_xor(s, 16);
                if (slot == 0 && c < chunks) sums[(warp * G + g) * hd + 4 * c + e] = s;
            }
        }
    }
    lq_ad_sync();
    for (int i = thread; i < G * hd; i += LQ_AD_THREADS) {
        const int g = i / hd, d = i - g * hd;
        if (g >= a->group) continue;
        float out = sums[g * hd + d], sum = totals[g], max = maxima[g];
        for (int w = 1; w < LQ_AD_WARPS; w++) {
            out += sums[(w * G + g) * hd + d];
            sum += totals[w * G + g];
            max = fmaxf(max, maxima[w * G + g]);
        }
        const size_t row = (size_t)seq * a->heads + (size_t)kv_head * a->group + g;
        if (a->splits == 1) {
            a->out[row * hd + d] = out * (1.0f / sum);
        } else {
            const size_t part = row * a->splits + split;
            a->part_out[part * hd + d] = out;
            if (d == 0) a->part_stats[2 * part] = max, a->part_stats[2 * part + 1] = sum;
        }
    }
}

#endif
