/* Mixed-configuration allocation (LQ-LoRA paper §3.2, Algorithm 3): choose one NF
 * configuration per matrix minimising the summed decomposition error under an average
 * bits-per-parameter budget, as a multiple-choice knapsack solved exactly by GLPK's MIP solver. */
#ifndef LQ_ILP_H
#define LQ_ILP_H

#include <stddef.h>

#include "core/error.h"

struct lq_ilp_problem {
    size_t n_matrices;
    size_t n_configs;
    /* cost[i * n_configs + c]: error of matrix i under configuration c (the paper uses the
     * squared Frobenius error of the LQ decomposition). Finite and >= 0. Borrowed. */
    const double *cost;
    /* storage_bits[i * n_configs + c]: bits matrix i takes under configuration c (Eq. 3).
     * Finite and > 0. Borrowed. */
    const double *storage_bits;
    /* numel[i]: parameters of matrix i; the budget is averaged over their sum. Borrowed. */
    const size_t *numel;
    /* Average bits per quantized parameter allowed. The check is exact in double arithmetic:
     * (sum of storage_bits over matrices in index order) / (sum numel) <= budget. */
    double budget_bits_per_param;
};

struct lq_ilp_options {
    /* Deterministic work limit: branch-and-bound subproblems GLPK may create (its own count)
     * before the best solution found so far is returned (0 = no limit). The default, 0,
     * solves to proven optimality. */
    int node_limit;
    /* Wall-clock limit in seconds for the whole call (0 = none). A run stopped by it may
     * differ between machines; prefer node_limit where results must repeat. */
    double time_limit_seconds;
    /* Stop once (cost - lower bound) / cost <= mip_gap, relative to the total error
     * (0 = exact). */
    double mip_gap;
    int verbose; /* GLPK's own progress output on stdout (else GLPK prints nothing) */
    /* 1: hand GLPK every non-dominated candidate, skipping the bound-based fixing and the early
     * exit when the bounds alone prove the greedy solution optimal. Same answers, slower; for
     * tests and diagnosis. */
    int keep_all_candidates;
};

/* Fills options with the defaults (exact solve, no limits, quiet). */
void lq_ilp_options_default(struct lq_ilp_options *options);

struct lq_ilp_result {
    size_t n_matrices;
    int *choice;           /* choice[i]: chosen configuration index of matrix i; owned */
    double total_cost;     /* sum of cost[i][choice[i]] */
    double total_bits;     /* sum of storage_bits[i][choice[i]] */
    double bits_per_param; /* total_bits / sum numel: never above the budget */
    /* 1 when optimality was proved (by GLPK or by the bounds alone), within GLPK's relative
     * tolerance of 1e-12 on the cost. 0 when a limit or mip_gap stopped the search, or in
     * the rare case where GLPK's feasibility tolerance (1e-7) forced the budget row to be
     * tightened (an optimum within that tolerance of the budget). */
    int proven_optimal;
    double gap;          /* (total_cost - lower bound) / total_cost; 0 iff proven_optimal */
    size_t configs_kept; /* candidate (matrix, configuration) pairs left after pruning */
    size_t mip_columns;  /* candidates GLPK searched after bound-based fixing (0: not needed) */
    int nodes;           /* branch-and-bound subproblems GLPK created (0: GLPK not run) */
    double seconds;      /* wall time of the whole call */
};

/* Solves the allocation. options may be NULL (defaults). Dominated configurations (no less
 * storage and no less error than another of the same matrix) are dropped first; exact
 * duplicates keep the lowest index.
 * Among solutions of equal cost the one found first in the deterministic search is kept, so
 * equal inputs give equal choices. A budget below the cheapest assignment returns
 * LQ_EINFEASIBLE with the smallest feasible budget in the message; a bad argument LQ_EINVAL;
 * tables whose sums overflow a double LQ_ENUMERIC. The returned assignment always passes the
 * exact budget check, even when GLPK fails numerically (then the greedy solution is returned,
 * not proven optimal). GLPK keeps its state per thread (Debian builds it with thread-local
 * storage), so calls from different threads may run at once.
 * On success the caller frees out with lq_ilp_result_free; on failure out is zeroed. */
int lq_ilp_allocate(const struct lq_ilp_problem *problem, const struct lq_ilp_options *options,
                    struct lq_ilp_result *out, struct lq_error *err);

/* Smallest average bits/param any assignment reaches (every matrix at its cheapest), computed
 * exactly as the budget check does, so this very value is a feasible budget. NAN when the
 * problem is NULL, empty or has NULL tables (values are not otherwise validated). */
double lq_ilp_min_budget(const struct lq_ilp_problem *problem);

/* Frees result->choice and zeroes result; safe on NULL and on a zeroed or failed result. */
void lq_ilp_result_free(struct lq_ilp_result *result);

#endif
