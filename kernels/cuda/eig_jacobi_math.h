// The arithmetic of the one-block Jacobi eigensolver (eig_jacobi_cuda.cu), shared with its
// host transcription in tests/unit/test_jacobi_order.c so that the unit test checks the very
// schedule and rotation the kernel runs. Plain C; __host__ __device__ under nvcc.
#ifndef LQ_EIG_JACOBI_MATH_H
#define LQ_EIG_JACOBI_MATH_H

#include <math.h>

#ifdef __CUDACC__
#define LQ_EIG_JACOBI_FN static __host__ __device__ __forceinline__
#else
#define LQ_EIG_JACOBI_FN static inline
#endif

// Sweeps before the solver gives up: random 74 x 74 matrices take 8, clustered spectra (many
// equal or near-zero eigenvalues, a Gram matrix of condition 1e12) 16 to 18, and 21 or 22 at
// 128 x 128 (tests/unit/test_jacobi_order.c).
#define LQ_EIG_JACOBI_MAX_SWEEPS 40
// Stop once the off-diagonal Frobenius norm is below this fraction of the whole norm.
#define LQ_EIG_JACOBI_TOLERANCE 1e-15
// Below this |a_pq| relative to √|a_pp|·√|a_qq| a rotation would change the diagonal by less
// than its rounding: skipped (a sweep that skips every pair has converged).
#define LQ_EIG_JACOBI_SKIP 2.220446049250313e-16

// Players of the round-robin: n rounded up to even (an odd n gets a dummy index n).
LQ_EIG_JACOBI_FN int lq_eig_jacobi_players(int n) {
    return n + (n & 1);
}

// Pair i (0 <= i < players/2) of round `round` (0 <= round < players − 1) of the circle
// method: the last player meets `round`, and for i >= 1 the players round ± i (mod players −
// 1) meet. Every unordered pair meets exactly once in players − 1 rounds, and a round's pairs
// are disjoint. *p < *q.
LQ_EIG_JACOBI_FN void lq_eig_jacobi_pair(int round, int i, int players, int *p, int *q) {
    const int m = players - 1;
    int x = round, y = m;
    if (i > 0) {
        x = round + i;
        if (x >= m) x -= m;
        y = round - i;
        if (y < 0) y += m;
    }
    *p = x < y ? x : y;
    *q = x < y ? y : x;
}

// Where a[i][j] (either triangle) lives in the packed lower triangle, row by row.
LQ_EIG_JACOBI_FN int lq_eig_jacobi_packed(int i, int j) {
    return i >= j ? ((i * (i + 1)) >> 1) + j : ((j * (j + 1)) >> 1) + i;
}

// The rotation J (J_pp = J_qq = c, J_pq = s, J_qp = −s) that zeroes a_pq in Jᵀ·A·J, computed
// stably (Golub and Van Loan, Algorithm 8.5.1: t is the smaller root of t² + 2τt − 1, so
// |θ| <= π/4). Returns 0 (c = 1, s = t = 0) when the rotation is skipped; then a_pp' =
// a_pp − t·a_pq, a_qq' = a_qq + t·a_pq and a_pq' = 0.
LQ_EIG_JACOBI_FN int lq_eig_jacobi_rotation(double app, double aqq, double apq, double *c,
                                            double *s, double *t) {
    *c = 1.0, *s = 0.0, *t = 0.0;
    if (apq == 0.0 || fabs(apq) <= LQ_EIG_JACOBI_SKIP * sqrt(fabs(app)) * sqrt(fabs(aqq))) return 0;
    const double tau = (aqq - app) / (2.0 * apq);
    double tangent;
    if (fabs(tau) > 1e150) // τ² would overflow; t = 1/(2τ) to double precision there
        tangent = 0.5 / tau;
    else
        tangent = (tau >= 0.0 ? 1.0 : -1.0) / (fabs(tau) + sqrt(1.0 + tau * tau));
    const double cosine = 1.0 / sqrt(1.0 + tangent * tangent);
    *t = tangent, *c = cosine, *s = tangent * cosine;
    return 1;
}

// Jᵀ·A·J on the off-diagonal 2 x 2 block of pairs (p, q) and (r, s) of the packed lower
// triangle A of order n: columns r, s times J_y = (cy, sy), then rows p, q times J_xᵀ =
// (cx, sx). q or s >= n is the dummy index of an odd order (its row and column are absent).
LQ_EIG_JACOBI_FN void lq_eig_jacobi_rotate_block(double *A, int n, int p, int q, int r, int s,
                                                 double cx, double sx, double cy, double sy) {
    const int q_real = q < n, s_real = s < n;
    const int pr = lq_eig_jacobi_packed(p, r);
    const int ps = s_real ? lq_eig_jacobi_packed(p, s) : 0;
    const int qr = q_real ? lq_eig_jacobi_packed(q, r) : 0;
    const int qs = q_real && s_real ? lq_eig_jacobi_packed(q, s) : 0;
    const double xpr = A[pr], xps = s_real ? A[ps] : 0.0;
    const double xqr = q_real ? A[qr] : 0.0;
    const double xqs = q_real && s_real ? A[qs] : 0.0;
    const double ypr = cy * xpr - sy * xps, yps = sy * xpr + cy * xps;
    const double yqr = cy * xqr - sy * xqs, yqs = sy * xqr + cy * xqs;
    A[pr] = cx * ypr - sx * yqr;
    if (s_real) A[ps] = cx * yps - sx * yqs;
    if (q_real) A[qr] = sx * ypr + cx * yqr;
    if (q_real && s_real) A[qs] = sx * yps + cx * yqs;
}

#endif
