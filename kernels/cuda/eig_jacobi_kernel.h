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
    return (size_t)n * (n + 1) / 2 + (size_t)n * n + 2 * half + EIG_ROWS;
}
EIG_HOST_DEVICE static size_t eig_ints(int n) {
    const size_t half = (size_t)lq_eig_jacobi_players(n) / 2;
    return 3 * half + (size_t)n + 1;
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

// One thread block of EIG_WARP x EIG_ROWS threads; lq_eig_jacobi_shared_bytes(n) bytes of
// dynamic shared memory. Every branch around a barrier depends only on values every thread
// computed alike (block sums, shared flags read after a barrier).
__global__ static void __launch_bounds__(EIG_THREADS)
    eig_jacobi_kernel(double *a, int n, double *lambda, int *info) {
    EIG_DECLARE_SHARED;
    const int players = lq_eig_jacobi_players(n), half = players >> 1;
    const int packed_count = (n * (n + 1)) >> 1;
    double *A = eig_shared;             // packed lower triangle (lq_eig_jacobi_packed)
    double *V = A + packed_count;       // n x n column-major: column j goes with a_jj
    double *pair_c = V + (size_t)n * n; // the round's rotations, one per pair
    double *pair_s = pair_c + half;
    double *scratch = pair_s + half; // EIG_ROWS partial sums
    int *pair_p = (int *)(scratch + EIG_ROWS), *pair_q = pair_p + half;
    int *pair_on = pair_q + half;       // whether the pair rotates this round
    int *rank = pair_on + half;         // n: where each eigenpair goes when sorted
    int *last_rotated_sweep = rank + n; // the last sweep with a rotation
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
            // One thread per pair: its rotation, and its own 2 x 2 diagonal block, which no
            // other thread reads or writes this round.
            if (tid < half) {
                int p, q, on = 0;
                double c = 1.0, s = 0.0, t = 0.0;
                lq_eig_jacobi_pair(round, tid, players, &p, &q);
                if (q < n) { // else q is the dummy index: p sits out
                    const int pp = lq_eig_jacobi_packed(p, p), qq = lq_eig_jacobi_packed(q, q);
                    const int qp = lq_eig_jacobi_packed(q, p);
                    const double app = A[pp], aqq = A[qq], apq = A[qp];
                    on = lq_eig_jacobi_rotation(app, aqq, apq, &c, &s, &t);
                    if (on) {
                        A[pp] = app - t * apq;
                        A[qq] = aqq + t * apq;
                        A[qp] = 0.0;
                        *last_rotated_sweep = sweep; // every writer writes the same value
                    }
                }
                pair_p[tid] = p, pair_q[tid] = q, pair_on[tid] = on;
                pair_c[tid] = c, pair_s[tid] = s;
            }
            __syncthreads();
            // Jᵀ·A·J on the off-diagonal blocks: rows (p, q) of pair x, columns (r, s) of
            // pair y < x; each of the four entries belongs to this block alone. A dummy index
            // (an unrotated pair's q) reads as 0 and is not written: its pair's J is I.
            for (int x = ty + 1; x < half; x += EIG_ROWS) {
                const int p = pair_p[x], q = pair_q[x], on_x = pair_on[x];
                const double cx = pair_c[x], sx = pair_s[x];
                const bool q_real = q < n;
                for (int y = tx; y < x; y += EIG_WARP) {
                    const int on_y = pair_on[y];
                    if (!on_x && !on_y) continue; // both J are I: nothing changes
                    const int r = pair_p[y], s = pair_q[y];
                    const double cy = pair_c[y], sy = pair_s[y];
                    const bool s_real = s < n;
                    const int pr = lq_eig_jacobi_packed(p, r);
                    const int ps = s_real ? lq_eig_jacobi_packed(p, s) : 0;
                    const int qr = q_real ? lq_eig_jacobi_packed(q, r) : 0;
                    const int qs = q_real && s_real ? lq_eig_jacobi_packed(q, s) : 0;
                    const double xpr = A[pr], xps = s_real ? A[ps] : 0.0;
                    const double xqr = q_real ? A[qr] : 0.0;
                    const double xqs = q_real && s_real ? A[qs] : 0.0;
                    // columns r, s times J_y
                    const double ypr = cy * xpr - sy * xps, yps = sy * xpr + cy * xps;
                    const double yqr = cy * xqr - sy * xqs, yqs = sy * xqr + cy * xqs;
                    // rows p, q times J_xᵀ
                    A[pr] = cx * ypr - sx * yqr;
                    if (s_real) A[ps] = cx * yps - sx * yqs;
                    if (q_real) A[qr] = sx * ypr + cx * yqr;
                    if (q_real && s_real) A[qs] = sx * yps + cx * yqs;
                }
            }
            // V·J: columns r, s of each rotated pair (consecutive lanes, consecutive rows).
            for (int y = ty; y < half; y += EIG_ROWS) {
                if (!pair_on[y]) continue;
                const double cy = pair_c[y], sy = pair_s[y];
                double *vr = V + (size_t)pair_p[y] * n, *vs = V + (size_t)pair_q[y] * n;
                for (int i = tx; i < n; i += EIG_WARP) {
                    const double u = vr[i], w = vs[i];
                    vr[i] = cy * u - sy * w;
                    vs[i] = sy * u + cy * w;
                }
            }
            __syncthreads(); // the next round reads A and rewrites the pair table
        }
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
