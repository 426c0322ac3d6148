/* State shared by the ILP allocation's stages (ilp.c: validation, pruning, GLPK;
 * ilp_greedy.c: LP relaxation and incumbent); not part of the public API. */
#ifndef LQ_ILP_INTERNAL_H
#define LQ_ILP_INTERNAL_H

#include <stddef.h>

#include "core/ilp.h"

/* Candidates of matrix i are cand[start[i] .. start[i + 1]), sorted by storage ascending; after
 * pruning their cost is strictly descending, so position 0 is the cheapest in bits and the last
 * position the most accurate. */
struct ilp_work {
    const struct lq_ilp_problem *problem;
    size_t n;
    double total_numel;
    size_t *start;
    int *config;     /* configuration index of each candidate */
    double *storage; /* scaled: (bits - cheapest bits of the matrix) / total_numel */
    double *cost;    /* scaled: (error - smallest error of the matrix) / cost_scale */
    double cost_scale;
    double cost_offset; /* scaled sum of the smallest errors: GLPK's objective constant */
    double capacity;    /* scaled budget left once every matrix sits at its cheapest */
    int *position;      /* incumbent: chosen position within each matrix's candidates */
};

static inline size_t matrix_size(const struct ilp_work *w, size_t i) {
    return w->start[i + 1] - w->start[i];
}

static inline double table_at(const double *table, const struct ilp_work *w, size_t i,
                              int position) {
    return table[i * w->problem->n_configs + (size_t)w->config[w->start[i] + (size_t)position]];
}

/* The budget check, exactly as documented in ilp.h: matrices summed in index order, then one
 * division. Rounding is monotone, so an assignment with no more bits per matrix never fails
 * where another passes. */
static inline double assignment_bits(const struct ilp_work *w, const int *position) {
    double bits = 0.0;
    for (size_t i = 0; i < w->n; i++) bits += table_at(w->problem->storage_bits, w, i, position[i]);
    return bits;
}

static inline double assignment_cost(const struct ilp_work *w, const int *position) {
    double cost = 0.0;
    for (size_t i = 0; i < w->n; i++) cost += table_at(w->problem->cost, w, i, position[i]);
    return cost;
}

static inline int assignment_fits(const struct ilp_work *w, const int *position) {
    return assignment_bits(w, position) / w->total_numel <= w->problem->budget_bits_per_param;
}

static inline double scaled_cost(const struct ilp_work *w, const int *position) {
    double cost = w->cost_offset;
    for (size_t i = 0; i < w->n; i++) cost += w->cost[w->start[i] + (size_t)position[i]];
    return cost;
}

/* Shortest "%.Nf" (N >= min_decimals) that reads back as exactly value, so a budget copied
 * from a message behaves as the one the message describes. */
/* Solves the LP relaxation (a greedy over the convex-hull segments of each matrix's
 * candidates), stores its Lagrange multiplier in *lambda and leaves a feasible incumbent,
 * improved by local search, in w->position. */
int lq_ilp_greedy_incumbent(struct ilp_work *w, double *lambda, struct lq_error *err);

/* Lagrangian lower bound on the scaled cost at multiplier lambda; reduced[k] receives each
 * candidate's reduced cost (for fixing candidates that cannot beat the incumbent). */
double lq_ilp_lagrangian_bound(const struct ilp_work *w, double lambda, double *reduced);

#endif
