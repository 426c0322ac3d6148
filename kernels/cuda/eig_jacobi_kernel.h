// The device code of the one-launch Jacobi eigensolver (eig_jacobi_cuda.cuh says what and
// why), kept apart from the launcher so that it also compiles as C: tests/unit/
// test_jacobi_kernel.c runs this very kernel on the CPU, one thread per CUDA thread, with
// barriers and shuffles emulated. The includer defines EIG_HOST_DEVICE and
// EIG_DECLARE_SHARED (and, in C, the CUDA keywords and intrinsics the kernel uses).
#ifndef LQ_EIG_JACOBI_KERNEL_H
#define LQ_EIG_JACOBI_KERNEL_H

#include <math.h>
#include <stddef.h>
#ifndef __cplusplus
#include <stdbool.h>
#endif

#include "kernels/cuda/eig_jacobi_math.h"

// *info values (eig_jacobi_cuda.cuh documents them).
#define LQ_EIG_JACOBI_UNCONVERGED 1
#define LQ_EIG_JACOBI_NOT_FINITE 2

// The block is EIG_ROWS warps: the 2-D loops below give each warp a row (of pairs, of the
// matrix) and its lanes the columns, so no index needs a division.
#define EIG_WARP 32
#define EIG_ROWS 16
#define EIG_THREADS (EIG_WARP * EIG_ROWS)
// Above this the packed index (an int) could overflow; shared memory ends far below it.
#define EIG_MAX_N 2048

// The shared-memory layout of one solve, in the order carved below.
EIG_HOST_DEVICE static size_t eig_doubles(int n) {
    const size_t half = (size_t)lq_eig_jacobi_players(n) / 2;
    return (size_t)n * (n + 1) / 2 + (size_t)n * n + 4 * half + EIG_ROWS;
}
EIG_HOST_DEVICE static size_t eig_ints(int n) {
    return (size_t)n + 1;
}

// A sum over the block, the same value in every thread (a fixed order: deterministic).
// Contains two barriers; every thread must call it.
__device__ static double eig_block_sum(double v, double *scratch) {
    for (int offset = EIG_WARP / 2; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (threadIdx.x == 0) scratch[threadIdx.y] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < EIG_ROWS; w++) total += scratch[w];
    __syncthreads(); // scratch is free again
    return total;
}

// max that keeps a NaN (fmax drops it), so a non-finite input is seen.
__device__ static double eig_max(double x, double y) {
    return x != x ? x : y != y ? y : fmax(x, y);
}

__device__ static double eig_block_max(double v, double *scratch) {
    for (int offset = EIG_WARP / 2; offset > 0; offset >>= 1)
        v = eig_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if (threadIdx.x == 0) scratch[threadIdx.y] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < EIG_ROWS; w++) total = eig_max(total, scratch[w]);
    __syncthreads();
    return total;
}

// V·J for the rotations of round `round` (c, s: one per pair; s = 0 is J = I), by the warps
// from first_warp on: columns p, q of each rotated pair, consecutive lanes on consecutive rows.
__device__ static void eig_rotate_vectors(double *V, int n, int players, int round, const double *c,
                                          const double *s, int first_warp) {
    const int half = players >> 1, warps = EIG_ROWS - first_warp;
    if ((int)threadIdx.y < first_warp) return;
    for (int y = (int)threadIdx.y - first_warp; y < half; y += warps) {
        const double sy = s[y], cy = c[y];
        if (sy == 0.0) continue;
        int p, q;
        lq_eig_jacobi_pair(round, y, players, &p, &q);
        double *vp = V + (size_t)p * n, *vq = V + (size_t)q * n;
        for (int i = threadIdx.x; i < n; i += EIG_WARP) {
            const double u = vp[i], w = vq[i];
            vp[i] = cy * u - sy * w;
            vq[i] = sy * u + cy * w;
        }
    }
}

// One thread block of EIG_WARP x EIG_ROWS threads; lq_eig_jacobi_shared_bytes(n) bytes of
// dynamic shared memory. Every branch around a barrier depends only on values every thread
// computed alike (block sums, shared flags read after a barrier).
__global__ static void __launch_bounds__(EIG_THREADS)
    eig_jacobi_kernel(double *a, int n, double *lambda, int *info) {
    EIG_DECLARE_SHARED;
    const int players = lq_eig_jacobi_players(n), half = players >> 1;
    const int packed_count = (n * (n + 1)) >> 1;
    double *A = eig_shared;       // packed lower triangle (lq_eig_jacobi_packed)
    double *V = A + packed_count; // n x n column-major: column j goes with a_jj
    // The rotations of two rounds, one per pair (s = 0: J = I): a round's own and the one
    // before it, whose V·J runs while this round's rotations are computed.
    double *pair_c = V + (size_t)n * n;      // 2 x half
    double *pair_s = pair_c + 2 * half;      // 2 x half
    double *scratch = pair_s + 2 * half;     // EIG_ROWS partial sums
    int *rank = (int *)(scratch + EIG_ROWS); // n: where each eigenpair goes when sorted
    int *last_rotated_sweep = rank + n;      // the last sweep with a rotation
    // Warps that compute rotations; the others rotate the vectors meanwhile (at least one).
    int rotation_warps = (half + EIG_WARP - 1) / EIG_WARP;
    if (rotation_warps > EIG_ROWS - 1) rotation_warps = EIG_ROWS - 1;
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * EIG_WARP + tx;

    // Columns of the lower triangle (coalesced reads), V = I, and the largest |a_ij|.
    double largest = 0.0;
    for (int j = ty; j < n; j += EIG_ROWS)
        for (int i = j + tx; i < n; i += EIG_WARP) {
            const double v = a[i + (size_t)j * n];
            A[lq_eig_jacobi_packed(i, j)] = v;
            largest = eig_max(largest, fabs(v));
        }
    for (int j = ty; j < n; j += EIG_ROWS)
        for (int i = tx; i < n; i += EIG_WARP) V[(size_t)j * n + i] = i == j ? 1.0 : 0.0;
    if (tid == 0) *last_rotated_sweep = -1;
    largest = eig_block_max(largest, scratch); // its barrier also publishes A, V, the flag

    int status = 0, exponent = 0;
    if (!isfinite(largest)) {
        status = LQ_EIG_JACOBI_NOT_FINITE;
    } else if (largest > 0.0) {
        // Scale by 2^-exponent (exact): the largest entry in [1, 2).
        exponent = ilogb(largest);
        for (int k = tid; k < packed_count; k += EIG_THREADS) A[k] = ldexp(A[k], -exponent);
        __syncthreads();
    }

    // The round whose V·J is still to run (-1: none), and the buffer of the next round.
    int pending_round = -1, buffer = 0;
    for (int sweep = 0; status == 0; sweep++) {
        // Read before the barriers below: once past them, a fast thread's first rotation of
        // this sweep rewrites the flag while a slow one might still be about to read it.
        const int rotated_sweep = *last_rotated_sweep;
        double off = 0.0, diagonal = 0.0;
        for (int i = ty; i < n; i += EIG_ROWS) {
            const double *row = A + ((i * (i + 1)) >> 1);
            for (int j = tx; j < i; j += EIG_WARP) off += row[j] * row[j];
            if (tx == 0) diagonal += row[i] * row[i];
        }
        off = 2.0 * eig_block_sum(off, scratch);
        diagonal = eig_block_sum(diagonal, scratch);
        if (off <= LQ_EIG_JACOBI_TOLERANCE * LQ_EIG_JACOBI_TOLERANCE * (off + diagonal)) break;
        if (sweep > 0 && rotated_sweep != sweep - 1) break; // the last sweep did nothing
        if (sweep == LQ_EIG_JACOBI_MAX_SWEEPS) {
            status = LQ_EIG_JACOBI_UNCONVERGED;
            break;
        }
        for (int round = 0; round < players - 1; round++) {
            double *round_c = pair_c + buffer * half, *round_s = pair_s + buffer * half;
            // One thread per pair: its rotation, and its own 2 x 2 diagonal block, which no
            // other thread reads or writes this round. Meanwhile the other warps apply the
            // previous round's rotations to V (the other buffer), which nothing here reads.
            if (tid < half) {
                int p, q;
                double c = 1.0, s = 0.0, t = 0.0;
                lq_eig_jacobi_pair(round, tid, players, &p, &q);
                if (q < n) { // else q is the dummy index: p sits out
                    const int pp = lq_eig_jacobi_packed(p, p), qq = lq_eig_jacobi_packed(q, q);
                    const int qp = lq_eig_jacobi_packed(q, p);
                    const double app = A[pp], aqq = A[qq], apq = A[qp];
                    if (lq_eig_jacobi_rotation(app, aqq, apq, &c, &s, &t)) {
                        A[pp] = app - t * apq;
                        A[qq] = aqq + t * apq;
                        A[qp] = 0.0;
                        *last_rotated_sweep = sweep; // every writer writes the same value
                    }
                }
                round_c[tid] = c, round_s[tid] = s;
            }
            if (pending_round >= 0)
                eig_rotate_vectors(V, n, players, pending_round, pair_c + (buffer ^ 1) * half,
                                   pair_s + (buffer ^ 1) * half, rotation_warps);
            __syncthreads();
            // Jᵀ·A·J on the off-diagonal blocks: rows (p, q) of pair x, columns (r, s) of
            // pair y < x; each of the four entries belongs to this block alone. A dummy index
            // (an unrotated pair's q) reads as 0 and is not written: its pair's J is I.
            for (int x = ty + 1; x < half; x += EIG_ROWS) {
                int p, q;
                lq_eig_jacobi_pair(round, x, players, &p, &q);
                const double cx = round_c[x], sx = round_s[x];
                for (int y = tx; y < x; y += EIG_WARP) {
                    const double cy = round_c[y], sy = round_s[y];
                    if (sx == 0.0 && sy == 0.0) continue; // both J are I: nothing changes
                    int r, s;
                    lq_eig_jacobi_pair(round, y, players, &r, &s);
                    lq_eig_jacobi_rotate_block(A, n, p, q, r, s, cx, sx, cy, sy);
                }
            }
            __syncthreads(); // the next round reads A and rewrites the other buffer
            pending_round = round;
            buffer ^= 1;
        }
    }
    // The last round's V·J (every warp).
    if (pending_round >= 0) {
        eig_rotate_vectors(V, n, players, pending_round, pair_c + (buffer ^ 1) * half,
                           pair_s + (buffer ^ 1) * half, 0);
        __syncthreads();
    }

    if (status == LQ_EIG_JACOBI_NOT_FINITE) {
        for (int i = tid; i < n; i += EIG_THREADS) lambda[i] = nan("");
        for (size_t k = tid; k < (size_t)n * n; k += EIG_THREADS) a[k] = nan("");
    } else {
        // Ascending: eigenpair i goes to the number of eigenvalues below it (ties by index).
        for (int i = tid; i < n; i += EIG_THREADS) {
            const double value = A[lq_eig_jacobi_packed(i, i)];
            int below = 0;
            for (int j = 0; j < n; j++) {
                const double other = A[lq_eig_jacobi_packed(j, j)];
                below += other < value || (other == value && j < i);
            }
            rank[i] = below;
        }
        __syncthreads();
        for (int i = tid; i < n; i += EIG_THREADS)
            lambda[rank[i]] = ldexp(A[lq_eig_jacobi_packed(i, i)], exponent);
        for (int j = ty; j < n; j += EIG_ROWS) {
            double *to = a + (size_t)rank[j] * n;
            const double *from = V + (size_t)j * n;
            for (int i = tx; i < n; i += EIG_WARP) to[i] = from[i];
        }
    }
    if (tid == 0) *info = status;
}

#endif
