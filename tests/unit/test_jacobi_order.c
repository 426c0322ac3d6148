/* The one-launch Jacobi eigensolver of the GPU decomposition (kernels/cuda/eig_jacobi_cuda.cu),
 * checked on the CPU: its round-robin schedule meets every pair exactly once a sweep, and a
 * host transcription of the kernel (the same schedule and rotation from eig_jacobi_math.h, the
 * same phases of a round, stopping rules, scaling and sort) converges on random and awkward
 * symmetric matrices to LAPACKE_dsyevd's eigenvalues, with small residuals and orthonormal
 * vectors. The kernel itself is checked against cuSOLVER on a GPU by test_cuda_eig. */
#include <stdint.h>
#include <stdlib.h>

#include "core/rng.h"
#include "kernels/cuda/eig_jacobi_math.h"
#include "tests/unit/lq_test.h"

#include "tests/unit/eig_check.h"

#define MAX_N 160

/* ---------- the schedule ---------- */

static void test_schedule_meets_every_pair_once(void) {
    static unsigned char met[MAX_N + 1][MAX_N + 1];
    for (int n = 1; n <= MAX_N; n++) {
        const int players = lq_eig_jacobi_players(n), half = players / 2;
        CHECK(players % 2 == 0 && players >= n && players <= n + 1);
        memset(met, 0, sizeof met);
        int bad = 0;
        for (int round = 0; round < players - 1; round++) {
            unsigned char seen[MAX_N + 1] = {0};
            for (int i = 0; i < half; i++) {
                int p = -1, q = -1;
                lq_eig_jacobi_pair(round, i, players, &p, &q);
                if (!(0 <= p && p < q && q < players) || seen[p] || seen[q]) {
                    bad++;
                    continue;
                }
                seen[p] = seen[q] = 1; /* a round's pairs are disjoint */
                met[p][q]++;
            }
        }
        for (int p = 0; p < players; p++)
            for (int q = p + 1; q < players; q++) bad += met[p][q] != 1;
        CHECK_MSG(bad == 0, "n = %d: %d pairs met other than once, or rounds not disjoint", n, bad);
    }
}

/* ---------- the host transcription ---------- */

/* The kernel's shared memory, on the heap. */
struct jacobi {
    int n, players, half;
    double *packed;  /* lower triangle, lq_eig_jacobi_packed */
    double *vectors; /* n x n column-major */
    int pair_p[MAX_N / 2 + 1], pair_q[MAX_N / 2 + 1];
    double pair_c[MAX_N / 2 + 1], pair_s[MAX_N / 2 + 1];
};

/* One round: every pair's rotation and diagonal block (the kernel's one-thread-per-pair
 * phase), then Jᵀ·A·J on the off-diagonal blocks (its second phase), then V·J (which the
 * kernel runs during the next round's first phase: nothing there reads V, and V sees the
 * same rotations in the same order). The pairs are disjoint, so the order of the loops within
 * a phase does not change a bit. s = 0 is J = I, skipped as the kernel skips it. Returns
 * whether a pair rotated. */
static int jacobi_round(struct jacobi *j, int round) {
    const int n = j->n;
    double *A = j->packed;
    int rotated = 0;
    for (int i = 0; i < j->half; i++) {
        int p, q, on = 0;
        double c = 1.0, s = 0.0, t = 0.0;
        lq_eig_jacobi_pair(round, i, j->players, &p, &q);
        if (q < n) {
            const int pp = lq_eig_jacobi_packed(p, p), qq = lq_eig_jacobi_packed(q, q);
            const int qp = lq_eig_jacobi_packed(q, p);
            const double app = A[pp], aqq = A[qq], apq = A[qp];
            on = lq_eig_jacobi_rotation(app, aqq, apq, &c, &s, &t);
            if (on) {
                A[pp] = app - t * apq;
                A[qq] = aqq + t * apq;
                A[qp] = 0.0;
                rotated = 1;
            }
        }
        j->pair_p[i] = p, j->pair_q[i] = q;
        j->pair_c[i] = c, j->pair_s[i] = s;
    }
    for (int x = 1; x < j->half; x++) {
        const int p = j->pair_p[x], q = j->pair_q[x];
        const double cx = j->pair_c[x], sx = j->pair_s[x];
        for (int y = 0; y < x; y++) {
            if (j->pair_s[x] == 0.0 && j->pair_s[y] == 0.0) continue;
            lq_eig_jacobi_rotate_block(A, n, p, q, j->pair_p[y], j->pair_q[y], cx, sx, j->pair_c[y],
                                       j->pair_s[y]);
        }
    }
    for (int y = 0; y < j->half; y++) {
        if (j->pair_s[y] == 0.0) continue;
        const double cy = j->pair_c[y], sy = j->pair_s[y];
        double *vr = j->vectors + (size_t)j->pair_p[y] * n;
        double *vs = j->vectors + (size_t)j->pair_q[y] * n;
        for (int i = 0; i < n; i++) {
            const double u = vr[i], w = vs[i];
            vr[i] = cy * u - sy * w;
            vs[i] = sy * u + cy * w;
        }
    }
    return rotated;
}

#define JACOBI_UNCONVERGED 1 /* the kernel's LQ_EIG_JACOBI_UNCONVERGED */
#define JACOBI_NOT_FINITE 2  /* LQ_EIG_JACOBI_NOT_FINITE */

/* The kernel on the host: a (n x n column-major, lower triangle read) becomes the vectors,
 * lambda the eigenvalues ascending; returns the kernel's info, *sweeps the sweeps run. */
static int jacobi_solve(double *a, int n, double *lambda, int *sweeps) {
    struct jacobi j = {.n = n, .players = lq_eig_jacobi_players(n)};
    j.half = j.players / 2;
    j.packed = malloc((size_t)n * (n + 1) / 2 * sizeof(double));
    j.vectors = malloc((size_t)n * n * sizeof(double));
    int *rank = malloc((size_t)n * sizeof(int));
    if (!j.packed || !j.vectors || !rank) abort();
    double largest = 0.0;
    for (int c = 0; c < n; c++)
        for (int r = c; r < n; r++) {
            const double v = a[r + (size_t)c * n];
            j.packed[lq_eig_jacobi_packed(r, c)] = v;
            largest = isnan(largest) || isnan(v) ? NAN : fmax(largest, fabs(v));
        }
    for (int c = 0; c < n; c++)
        for (int r = 0; r < n; r++) j.vectors[(size_t)c * n + r] = r == c ? 1.0 : 0.0;
    const int packed_count = n * (n + 1) / 2;
    int status = 0, exponent = 0, last_rotated_sweep = -1;
    if (!isfinite(largest)) {
        status = JACOBI_NOT_FINITE;
    } else if (largest > 0.0) {
        exponent = ilogb(largest);
        for (int k = 0; k < packed_count; k++) j.packed[k] = ldexp(j.packed[k], -exponent);
    }
    *sweeps = 0;
    for (int sweep = 0; status == 0; sweep++) {
        const int rotated_sweep = last_rotated_sweep;
        double off = 0.0, diagonal = 0.0;
        for (int r = 0; r < n; r++) {
            const double *row = j.packed + r * (r + 1) / 2;
            for (int c = 0; c < r; c++) off += row[c] * row[c];
            diagonal += row[r] * row[r];
        }
        off *= 2.0;
        if (off <= LQ_EIG_JACOBI_TOLERANCE * LQ_EIG_JACOBI_TOLERANCE * (off + diagonal)) break;
        if (sweep > 0 && rotated_sweep != sweep - 1) break;
        if (sweep == LQ_EIG_JACOBI_MAX_SWEEPS) {
            status = JACOBI_UNCONVERGED;
            break;
        }
        for (int round = 0; round < j.players - 1; round++)
            if (jacobi_round(&j, round)) last_rotated_sweep = sweep;
        *sweeps = sweep + 1;
    }
    if (status == JACOBI_NOT_FINITE) {
        for (int i = 0; i < n; i++) lambda[i] = NAN;
        for (size_t k = 0; k < (size_t)n * n; k++) a[k] = NAN;
    } else {
        for (int i = 0; i < n; i++) {
            const double value = j.packed[lq_eig_jacobi_packed(i, i)];
            int below = 0;
            for (int k = 0; k < n; k++) {
                const double other = j.packed[lq_eig_jacobi_packed(k, k)];
                below += other < value || (other == value && k < i);
            }
            rank[i] = below;
        }
        for (int i = 0; i < n; i++)
            lambda[rank[i]] = ldexp(j.packed[lq_eig_jacobi_packed(i, i)], exponent);
        for (int c = 0; c < n; c++)
            memcpy(a + (size_t)rank[c] * n, j.vectors + (size_t)c * n, (size_t)n * sizeof(double));
    }
    free(j.packed), free(j.vectors), free(rank);
    return status;
}

/* ---------- checks against LAPACK ---------- */

static struct lq_rng rng;

/* Solves a with the transcription (the upper triangle poisoned: only the lower may be read)
 * and checks the result against LAPACKE_dsyevd (eig_check.h's bounds, the GPU test's).
 * Returns the sweeps. */
static int check_solve(const char *what, const double *a, int n) {
    double *v = malloc((size_t)n * n * sizeof(double));
    double *ref = malloc((size_t)n * n * sizeof(double));
    double *lambda = malloc((size_t)n * sizeof(double));
    double *ref_lambda = malloc((size_t)n * sizeof(double));
    if (!v || !ref || !lambda || !ref_lambda) abort();
    memcpy(ref, a, (size_t)n * n * sizeof(double));
    for (int c = 0; c < n; c++)
        for (int r = 0; r < n; r++) v[r + (size_t)c * n] = r >= c ? a[r + (size_t)c * n] : NAN;
    int sweeps = -1;
    const int info = jacobi_solve(v, n, lambda, &sweeps);
    CHECK_MSG(info == 0, "%s n = %d: info %d after %d sweeps", what, n, info, sweeps);
    CHECK(LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'V', 'L', n, ref, n, ref_lambda) == 0);
    char note[32];
    snprintf(note, sizeof note, "%2d sweeps", sweeps);
    eig_check_solution(what, a, n, lambda, v, ref_lambda, note);
    free(v), free(ref), free(lambda), free(ref_lambda);
    return sweeps;
}

static void test_random_matrices(void) {
    lq_rng_seed(&rng, 74);
    int most = 0;
    for (int i = 0; i < EIG_CHECK_SIZE_COUNT; i++)
        for (int trial = 0; trial < 3; trial++) {
            double *a = eig_check_random(&rng, eig_check_sizes[i]);
            const int sweeps = check_solve("random", a, eig_check_sizes[i]);
            most = sweeps > most ? sweeps : most;
            free(a);
        }
    /* The sweep limit must leave room: cyclic Jacobi converges quadratically. */
    CHECK_MSG(most <= LQ_EIG_JACOBI_MAX_SWEEPS / 2, "random matrices took up to %d sweeps", most);
}

static void check_awkward(const char *what, const double *a, int n) {
    const int sweeps = check_solve(what, a, n);
    /* a diagonal matrix needs no rotation, only the sort */
    if (strcmp(what, "diagonal") == 0)
        CHECK_MSG(sweeps == 0, "diagonal n = %d: %d sweeps", n, sweeps);
}

static void test_awkward_matrices(void) {
    lq_rng_seed(&rng, 75);
    eig_check_awkward(&rng, check_awkward);
    /* the zero matrix: no sweep, zero eigenvalues, V = I */
    double zero[9] = {0}, lambda[3];
    int sweeps = -1;
    CHECK(jacobi_solve(zero, 3, lambda, &sweeps) == 0 && sweeps == 0);
    for (int k = 0; k < 3; k++) CHECK(lambda[k] == 0.0 && zero[k + 3 * k] == 1.0);
}

static void test_not_finite(void) {
    double a[4] = {1.0, NAN, 0.0, 2.0}, lambda[2] = {0.0, 0.0};
    int sweeps = -1;
    CHECK(jacobi_solve(a, 2, lambda, &sweeps) == JACOBI_NOT_FINITE);
    for (int k = 0; k < 4; k++) CHECK(isnan(a[k]));
    CHECK(isnan(lambda[0]) && isnan(lambda[1]));
    double b[4] = {INFINITY, 1.0, 0.0, 2.0};
    CHECK(jacobi_solve(b, 2, lambda, &sweeps) == JACOBI_NOT_FINITE);
    /* the upper triangle is never read, whatever it holds */
    double c[4] = {2.0, 1.0, NAN, 2.0};
    CHECK(jacobi_solve(c, 2, lambda, &sweeps) == 0);
    CHECK_NEAR(lambda[0], 1.0, 1e-15);
    CHECK_NEAR(lambda[1], 3.0, 1e-15);
}

/* The rotation itself: Jᵀ·[app apq; apq aqq]·J is diagonal, |θ| <= π/4, and the far-from-1
 * branches (huge τ, skipped a_pq) stay finite. */
static void test_rotation(void) {
    const double cases[][3] = {{1.0, 2.0, 0.5},   {2.0, 1.0, -0.5}, {1.0, 1.0, 0.3},
                               {1.0, 1.0, -0.3},  {0.0, 0.0, 1.0},  {1e200, -1e200, 1e-200},
                               {0.0, 1.0, 1e-300}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const double app = cases[i][0], aqq = cases[i][1], apq = cases[i][2];
        double c, s, t;
        const int on = lq_eig_jacobi_rotation(app, aqq, apq, &c, &s, &t);
        CHECK(isfinite(c) && isfinite(s) && isfinite(t) && fabs(t) <= 1.0);
        CHECK_NEAR(c * c + s * s, 1.0, 4e-16);
        if (!on) continue;
        /* (JᵀAJ)_pq = c·s·(app − aqq) + (c² − s²)·apq */
        const double off = c * s * (app - aqq) + (c * c - s * s) * apq;
        CHECK_MSG(fabs(off) <= 4e-16 * (fabs(app) + fabs(aqq) + fabs(apq)), "case %zu: %g", i, off);
    }
    double c, s, t;
    CHECK(lq_eig_jacobi_rotation(1.0, 1.0, 1e-17, &c, &s, &t) == 0 && c == 1.0 && s == 0.0);
    CHECK(lq_eig_jacobi_rotation(1.0, 1.0, 0.0, &c, &s, &t) == 0);
}

LQ_TEST_MAIN(LQ_TEST(test_schedule_meets_every_pair_once), LQ_TEST(test_rotation),
             LQ_TEST(test_random_matrices), LQ_TEST(test_awkward_matrices),
             LQ_TEST(test_not_finite))
