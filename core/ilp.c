/* Mixed-configuration allocation (LQ-LoRA §3.2, Algorithm 3) as a multiple-choice knapsack.
 *
 * Pipeline: validate -> drop dominated configurations -> trivial budgets -> LP relaxation (the
 * greedy over convex-hull segments, which gives the Lagrange multiplier and a lower bound) ->
 * greedy incumbent -> reduced-cost fixing -> GLPK branch-and-bound on what is left, seeded with
 * the incumbent -> exact budget check in the caller's units.
 *
 * Units: GLPK sees costs shifted by each matrix's smallest error and divided by the largest
 * per-matrix error range (so coefficients lie in [0, 1]), and storage as bits/param above each
 * matrix's cheapest configuration. Everything reported is recomputed from the caller's tables. */
#include "core/ilp.h"
#include "core/ilp_internal.h"

#include <float.h>
#include <glpk.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void format_exact(char *buffer, size_t size, double value, int min_decimals) {
    for (int decimals = min_decimals; decimals <= 20; decimals++) {
        snprintf(buffer, size, "%.*f", decimals, value);
        if (strtod(buffer, NULL) == value) return;
    }
}

/* ---- validation ------------------------------------------------------------------------ */

static int validate(const struct lq_ilp_problem *p, const struct lq_ilp_options *o,
                    struct lq_error *err) {
    if (!p) return lq_error_set(err, LQ_EINVAL, "ilp: problem is NULL");
    if (!p->cost || !p->storage_bits || !p->numel)
        return lq_error_set(err, LQ_EINVAL, "ilp: %s table is NULL",
                            !p->cost          ? "cost"
                            : p->storage_bits ? "numel"
                                              : "storage_bits");
    if (p->n_matrices == 0 || p->n_configs == 0)
        return lq_error_set(err, LQ_EINVAL, "ilp: %zu matrices and %zu configurations; need >= 1",
                            p->n_matrices, p->n_configs);
    /* GLPK indexes columns with int; choices are int. */
    if (p->n_configs > INT_MAX / 2 || p->n_matrices > (size_t)(INT_MAX / 2) / p->n_configs)
        return lq_error_set(err, LQ_EINVAL, "ilp: %zu matrices x %zu configurations is too large",
                            p->n_matrices, p->n_configs);
    size_t total_numel = 0;
    double max_cost_sum = 0.0, max_bits_sum = 0.0;
    for (size_t i = 0; i < p->n_matrices; i++) {
        if (p->numel[i] == 0) return lq_error_set(err, LQ_EINVAL, "ilp: numel[%zu] is 0", i);
        if (p->numel[i] > SIZE_MAX - total_numel)
            return lq_error_set(err, LQ_EINVAL, "ilp: sum of numel overflows");
        total_numel += p->numel[i];
        double max_cost = 0.0, max_bits = 0.0;
        for (size_t c = 0; c < p->n_configs; c++) {
            double cost = p->cost[i * p->n_configs + c];
            double bits = p->storage_bits[i * p->n_configs + c];
            if (!isfinite(cost) || cost < 0.0)
                return lq_error_set(err, LQ_EINVAL, "ilp: cost[%zu][%zu] = %g, not finite >= 0", i,
                                    c, cost);
            if (!isfinite(bits) || bits <= 0.0)
                return lq_error_set(err, LQ_EINVAL,
                                    "ilp: storage_bits[%zu][%zu] = %g, not finite > 0", i, c, bits);
            if (cost > max_cost) max_cost = cost;
            if (bits > max_bits) max_bits = bits;
        }
        max_cost_sum += max_cost;
        max_bits_sum += max_bits;
    }
    if (!isfinite(max_cost_sum) || !isfinite(max_bits_sum))
        return lq_error_set(err, LQ_ENUMERIC, "ilp: summed %s overflow a double",
                            isfinite(max_cost_sum) ? "storage bits" : "costs");
    if (!isfinite(p->budget_bits_per_param) || p->budget_bits_per_param <= 0.0)
        return lq_error_set(err, LQ_EINVAL, "ilp: budget %g bits/param must be finite and > 0",
                            p->budget_bits_per_param);
    if (o->node_limit < 0)
        return lq_error_set(err, LQ_EINVAL, "ilp: node_limit %d is negative", o->node_limit);
    if (!isfinite(o->time_limit_seconds) || o->time_limit_seconds < 0.0 ||
        o->time_limit_seconds > INT_MAX / 1000.0)
        return lq_error_set(err, LQ_EINVAL, "ilp: time_limit_seconds %g must be in [0, %d]",
                            o->time_limit_seconds, INT_MAX / 1000);
    if (!isfinite(o->mip_gap) || o->mip_gap < 0.0)
        return lq_error_set(err, LQ_EINVAL, "ilp: mip_gap %g must be finite and >= 0", o->mip_gap);
    return LQ_OK;
}

/* ---- dominance pruning ------------------------------------------------------------------- */

struct config_entry {
    double bits, cost;
    int config;
};

static int compare_entries(const void *a, const void *b) {
    const struct config_entry *x = a, *y = b;
    if (x->bits != y->bits) return x->bits < y->bits ? -1 : 1;
    if (x->cost != y->cost) return x->cost < y->cost ? -1 : 1;
    return (x->config > y->config) - (x->config < y->config);
}

/* After sorting by (bits, cost, index), a configuration survives only if it is strictly more
 * accurate than everything before it: anything earlier has no more bits, so an earlier one with
 * no more error dominates it (an exact duplicate loses to the earlier, lower index). */
static int prune_dominated(struct ilp_work *w, struct lq_error *err) {
    const struct lq_ilp_problem *p = w->problem;
    size_t total = p->n_matrices * p->n_configs;
    struct config_entry *entries = malloc(p->n_configs * sizeof *entries);
    w->start = malloc((w->n + 1) * sizeof *w->start);
    w->config = malloc(total * sizeof *w->config);
    if (!entries || !w->start || !w->config) {
        free(entries);
        return lq_error_set(err, LQ_ENOMEM, "ilp: out of memory for %zu candidates", total);
    }
    size_t kept = 0;
    for (size_t i = 0; i < w->n; i++) {
        w->start[i] = kept;
        for (size_t c = 0; c < p->n_configs; c++) {
            entries[c].bits = p->storage_bits[i * p->n_configs + c];
            entries[c].cost = p->cost[i * p->n_configs + c];
            entries[c].config = (int)c;
        }
        qsort(entries, p->n_configs, sizeof *entries, compare_entries);
        double best_cost = INFINITY;
        for (size_t k = 0; k < p->n_configs; k++) {
            if (entries[k].cost < best_cost) {
                best_cost = entries[k].cost;
                w->config[kept++] = entries[k].config;
            }
        }
    }
    w->start[w->n] = kept;
    free(entries);
    return LQ_OK;
}

/* Fills the scaled tables GLPK and the bounds work with (see the file comment). */
static int scale_candidates(struct ilp_work *w, struct lq_error *err) {
    const struct lq_ilp_problem *p = w->problem;
    size_t kept = w->start[w->n];
    w->storage = malloc(kept * sizeof *w->storage);
    w->cost = malloc(kept * sizeof *w->cost);
    w->position = calloc(w->n, sizeof *w->position);
    if (!w->storage || !w->cost || !w->position)
        return lq_error_set(err, LQ_ENOMEM, "ilp: out of memory for %zu candidates", kept);
    double max_range = 0.0, offset = 0.0, cheapest_bits = 0.0;
    for (size_t i = 0; i < w->n; i++) {
        int last = (int)matrix_size(w, i) - 1;
        double range = table_at(p->cost, w, i, 0) - table_at(p->cost, w, i, last);
        if (range > max_range) max_range = range;
    }
    w->cost_scale = max_range > 0.0 ? max_range : 1.0;
    for (size_t i = 0; i < w->n; i++) {
        int m = (int)matrix_size(w, i);
        double low_cost = table_at(p->cost, w, i, m - 1),
               low_bits = table_at(p->storage_bits, w, i, 0);
        for (int k = 0; k < m; k++) {
            size_t j = w->start[i] + (size_t)k;
            w->cost[j] = (table_at(p->cost, w, i, k) - low_cost) / w->cost_scale;
            w->storage[j] = (table_at(p->storage_bits, w, i, k) - low_bits) / w->total_numel;
        }
        offset += low_cost / w->cost_scale;
        cheapest_bits += low_bits;
    }
    w->cost_offset = offset;
    w->capacity = (p->budget_bits_per_param * w->total_numel - cheapest_bits) / w->total_numel;
    /* All-cheapest passed the exact check, so a negative value is rounding. */
    if (!(w->capacity > 0.0)) w->capacity = 0.0;
    return LQ_OK;
}

/* ---- GLPK --------------------------------------------------------------------------------- */

struct mip_search {
    const double *incumbent; /* x[1..columns] of the greedy solution */
    int incumbent_given;
    int node_limit;  /* 0: none */
    double deadline; /* now_seconds() at which to stop; 0: none */
    double mip_gap;  /* 0: exact */
    int stopped;     /* a limit or the gap tolerance ended the search */
    int nodes;
    int have_bound;
    double bound; /* global lower bound when stopped (scaled, with the offset) */
};

/* Ends the search, recording the global lower bound first (the best active subproblem's).
 * Finding it scans GLPK's active list, so it happens here only: doing it at every callback
 * tripled the time of searches with many open subproblems. */
static void search_stop(glp_tree *tree, struct mip_search *search) {
    int best = glp_ios_best_node(tree);
    if (best != 0) {
        search->bound = glp_ios_node_bound(tree, best);
        search->have_bound = 1;
    }
    search->stopped = 1;
    glp_ios_terminate(tree);
}

/* All stops go through here rather than GLPK's tm_lim/mip_gap, so the bound is known. */
static void mip_callback(glp_tree *tree, void *info) {
    struct mip_search *search = info;
    if (search->stopped) return;
    int active, current, total, reason = glp_ios_reason(tree);
    glp_ios_tree_size(tree, &active, &current, &total);
    search->nodes = total;
    /* Seed the search once with the greedy solution: with a near-optimal incumbent from the
     * first node on, the best-bound search prunes almost everything. */
    if (reason == GLP_IHEUR && !search->incumbent_given) {
        search->incumbent_given = 1;
        glp_ios_heur_sol(tree, search->incumbent);
    }
    /* GLPK's own count of subproblems: deterministic, unlike the clock. */
    if (search->node_limit > 0 && total > search->node_limit) {
        search_stop(tree, search);
    } else if (search->deadline > 0.0 && now_seconds() > search->deadline) {
        search_stop(tree, search);
    } else if (search->mip_gap > 0.0 && reason == GLP_IPREPRO &&
               glp_mip_status(glp_ios_get_prob(tree)) == GLP_FEAS &&
               glp_ios_mip_gap(tree) <= search->mip_gap) {
        search_stop(tree, search);
    }
}

struct mip_outcome {
    int proven_optimal;
    int have_bound; /* bound below is a valid lower bound for the caller's problem */
    double bound;   /* scaled, with the offset */
    int nodes;
    size_t columns;
};

/* The model GLPK solves: one binary per kept candidate of every matrix left with two or more,
 * an equality row per such matrix, and the budget row. Storage in the budget row is measured
 * from the matrix's first kept candidate (the "base", whose coefficient is then 0): the same
 * problem, since each matrix takes exactly one candidate, but sparser and better conditioned.
 * Matrices left with one candidate are constants. */
struct mip_model {
    glp_prob *lp;
    int n_columns, budget_row;
    size_t *candidate; /* column -> candidate index (1-based columns) */
    size_t *matrix;    /* column -> matrix */
    int *base;         /* matrix -> position of its base candidate */
    double *incumbent; /* column values of the greedy solution, for glp_ios_heur_sol */
    double capacity;   /* right-hand side of the budget row */
};

static void model_free(struct mip_model *m) {
    if (m->lp) glp_delete_prob(m->lp);
    free(m->candidate);
    free(m->matrix);
    free(m->base);
    free(m->incumbent);
}

static int model_build(const struct ilp_work *w, const unsigned char *keep, struct mip_model *m) {
    size_t kept = w->start[w->n];
    m->candidate = malloc((kept + 1) * sizeof *m->candidate);
    m->matrix = malloc((kept + 1) * sizeof *m->matrix);
    m->base = malloc(w->n * sizeof *m->base);
    m->incumbent = calloc(kept + 1, sizeof *m->incumbent);
    int *ia = malloc((2 * kept + 1) * sizeof *ia), *ja = malloc((2 * kept + 1) * sizeof *ja);
    double *ar = malloc((2 * kept + 1) * sizeof *ar);
    int rc = LQ_ENOMEM;
    if (!m->candidate || !m->matrix || !m->base || !m->incumbent || !ia || !ja || !ar) goto done;
    m->lp = glp_create_prob();
    int n_rows = 0, n_entries = 0;
    double offset = w->cost_offset;
    m->capacity = w->capacity;
    for (size_t i = 0; i < w->n; i++) {
        size_t first = w->start[i], count = 0;
        while (!keep[first]) first++; /* the incumbent's candidate is always kept */
        for (size_t j = first; j < w->start[i + 1]; j++) count += keep[j];
        m->base[i] = (int)(first - w->start[i]);
        m->capacity -= w->storage[first];
        if (count == 1) {
            offset += w->cost[first];
            continue;
        }
        n_rows++;
        for (size_t j = first; j < w->start[i + 1]; j++) {
            if (!keep[j]) continue;
            int col = ++m->n_columns;
            m->candidate[col] = j;
            m->matrix[col] = i;
            m->incumbent[col] = (int)(j - w->start[i]) == w->position[i] ? 1.0 : 0.0;
            n_entries++;
            ia[n_entries] = n_rows, ja[n_entries] = col, ar[n_entries] = 1.0;
        }
    }
    m->budget_row = n_rows + 1;
    for (int col = 1; col <= m->n_columns; col++) {
        size_t j = m->candidate[col];
        double extra =
            w->storage[j] - w->storage[w->start[m->matrix[col]] + (size_t)m->base[m->matrix[col]]];
        if (extra == 0.0) continue;
        n_entries++;
        ia[n_entries] = m->budget_row, ja[n_entries] = col, ar[n_entries] = extra;
    }
    glp_set_obj_dir(m->lp, GLP_MIN);
    glp_add_rows(m->lp, m->budget_row);
    for (int r = 1; r < m->budget_row; r++) glp_set_row_bnds(m->lp, r, GLP_FX, 1.0, 1.0);
    glp_set_row_bnds(m->lp, m->budget_row, GLP_UP, 0.0, m->capacity);
    glp_add_cols(m->lp, m->n_columns);
    for (int col = 1; col <= m->n_columns; col++) {
        glp_set_col_kind(m->lp, col, GLP_BV);
        glp_set_obj_coef(m->lp, col, w->cost[m->candidate[col]]);
    }
    /* The constant makes GLPK's relative gap and tolerances relative to the total error. */
    glp_set_obj_coef(m->lp, 0, offset);
    glp_load_matrix(m->lp, n_entries, ia, ja, ar);
    /* Equilibrate the 0/1 assignment rows against the budget row's small coefficients. */
    glp_scale_prob(m->lp, GLP_SF_AUTO);
    rc = LQ_OK;
done:
    free(ia);
    free(ja);
    free(ar);
    return rc;
}

/* The root LP must be optimal before glp_intopt (its presolver is off). Nearly parallel columns
 * (configurations a few bits apart) can make a basis numerically singular; retry once from the
 * slack basis with the dual simplex. */
static int model_solve_lp(struct mip_model *m, const struct lq_ilp_options *o) {
    glp_smcp parm;
    glp_init_smcp(&parm);
    parm.msg_lev = o->verbose ? GLP_MSG_ON : GLP_MSG_OFF;
    if (glp_simplex(m->lp, &parm) == 0 && glp_get_status(m->lp) == GLP_OPT) return 1;
    glp_std_basis(m->lp);
    parm.meth = GLP_DUALP;
    return glp_simplex(m->lp, &parm) == 0 && glp_get_status(m->lp) == GLP_OPT;
}

/* Solves the reduced problem (candidates with keep[j] set) with GLPK and moves w->position to
 * GLPK's solution when that passes the exact budget check and costs no more than the
 * incumbent. If GLPK fails numerically the incumbent stays, not proven optimal. */
static int solve_with_glpk(struct ilp_work *w, const unsigned char *keep,
                           const struct lq_ilp_options *o, double started,
                           struct mip_outcome *outcome) {
    struct mip_model m = {0};
    int *trial = malloc(w->n * sizeof *trial);
    int rc = trial ? model_build(w, keep, &m) : LQ_ENOMEM;
    if (rc != LQ_OK) goto done;
    outcome->columns = (size_t)m.n_columns;

    glp_iocp parm;
    glp_init_iocp(&parm);
    parm.msg_lev = o->verbose ? GLP_MSG_ON : GLP_MSG_OFF;
    parm.presolve = GLP_OFF; /* keep our column numbering for glp_ios_heur_sol */
    /* Measured on the 224 x 243 benchmark: Driebeck-Tomlin branching with best-local-bound
     * backtracking beat the other choices; GLPK's cuts (MIR, cover, clique) only slowed it. */
    parm.br_tech = GLP_BR_DTH;
    parm.bt_tech = GLP_BT_BLB;
    parm.tol_obj = 1e-12; /* prune only subproblems that cannot beat the incumbent at all */
    parm.cb_func = mip_callback;

    /* GLPK's feasibility tolerance may accept a solution a hair over the budget row. Then
     * tighten the row by at least twice the overshoot and solve again. The optimum of the
     * first, untightened round (the caller's budget plus GLPK's tolerance) still bounds the
     * true optimum from below, which is what the reported gap uses; a tightened result is
     * not claimed optimal, since solutions in the sliver cut off were never searched. */
    int tightened = 0, have_relaxed_bound = 0;
    double relaxed_bound = 0.0;
    for (int round = 0; round < 4; round++) {
        struct mip_search search = {.incumbent = m.incumbent, .mip_gap = o->mip_gap};
        if (o->node_limit > 0) /* the limit spans all rounds */
            search.node_limit = o->node_limit > outcome->nodes ? o->node_limit - outcome->nodes : 1;
        if (o->time_limit_seconds > 0.0) search.deadline = started + o->time_limit_seconds;
        parm.cb_info = &search;
        if (!model_solve_lp(&m, o)) break;
        int status = glp_intopt(m.lp, &parm);
        outcome->nodes += search.nodes;
        int mip_status = glp_mip_status(m.lp);
        if (mip_status != GLP_OPT && mip_status != GLP_FEAS) break;
        memcpy(trial, m.base, w->n * sizeof *trial);
        for (int col = 1; col <= m.n_columns; col++)
            if (glp_mip_col_val(m.lp, col) > 0.5)
                trial[m.matrix[col]] = (int)(m.candidate[col] - w->start[m.matrix[col]]);
        double overshoot =
            assignment_bits(w, trial) / w->total_numel - w->problem->budget_bits_per_param;
        if (overshoot > 0.0) {
            if (round == 0 && status == 0 && mip_status == GLP_OPT) {
                relaxed_bound = glp_mip_obj_val(m.lp);
                have_relaxed_bound = 1;
            }
            tightened = 1;
            m.capacity -= fmax(2.0 * overshoot, 1e-9 * (1.0 + fabs(m.capacity)));
            glp_set_row_bnds(m.lp, m.budget_row, GLP_UP, 0.0, m.capacity);
            continue;
        }
        if (assignment_cost(w, trial) <= assignment_cost(w, w->position))
            memcpy(w->position, trial, w->n * sizeof *trial);
        outcome->proven_optimal = status == 0 && mip_status == GLP_OPT && !tightened;
        outcome->have_bound = tightened ? have_relaxed_bound : search.have_bound;
        outcome->bound = tightened ? relaxed_bound : search.bound;
        break;
    }
done:
    model_free(&m);
    free(trial);
    return rc;
}

/* ---- public API --------------------------------------------------------------------------- */

void lq_ilp_options_default(struct lq_ilp_options *options) {
    if (options) memset(options, 0, sizeof *options);
}

double lq_ilp_min_budget(const struct lq_ilp_problem *p) {
    if (!p || !p->storage_bits || !p->numel || p->n_matrices == 0 || p->n_configs == 0) return NAN;
    double bits = 0.0, numel = 0.0;
    for (size_t i = 0; i < p->n_matrices; i++) {
        double cheapest = INFINITY;
        for (size_t c = 0; c < p->n_configs; c++)
            if (p->storage_bits[i * p->n_configs + c] < cheapest)
                cheapest = p->storage_bits[i * p->n_configs + c];
        bits += cheapest;
    }
    size_t total = 0;
    for (size_t i = 0; i < p->n_matrices; i++) total += p->numel[i];
    numel = (double)total;
    return bits / numel;
}

void lq_ilp_result_free(struct lq_ilp_result *result) {
    if (!result) return;
    free(result->choice);
    memset(result, 0, sizeof *result);
}

static void free_work(struct ilp_work *w) {
    free(w->start);
    free(w->config);
    free(w->storage);
    free(w->cost);
    free(w->position);
}

/* Fills out from w->position, all figures from the caller's tables. */
static int finish_result(const struct ilp_work *w, struct lq_ilp_result *out, double scaled_bound,
                         int proven_optimal, struct lq_error *err) {
    out->choice = malloc(w->n * sizeof *out->choice);
    if (!out->choice) return lq_error_set(err, LQ_ENOMEM, "ilp: out of memory for the result");
    for (size_t i = 0; i < w->n; i++)
        out->choice[i] = w->config[w->start[i] + (size_t)w->position[i]];
    out->n_matrices = w->n;
    out->total_cost = assignment_cost(w, w->position);
    out->total_bits = assignment_bits(w, w->position);
    out->bits_per_param = out->total_bits / w->total_numel;
    out->configs_kept = w->start[w->n];
    out->gap = 0.0;
    if (!proven_optimal && out->total_cost > 0.0) {
        double bound = scaled_bound * w->cost_scale;
        if (bound > out->total_cost) bound = out->total_cost;
        out->gap = (out->total_cost - bound) / out->total_cost;
    }
    /* A bound that reaches the cost proves optimality, whoever found it. */
    out->proven_optimal = out->gap == 0.0;
    return LQ_OK;
}

int lq_ilp_allocate(const struct lq_ilp_problem *problem, const struct lq_ilp_options *options,
                    struct lq_ilp_result *out, struct lq_error *err) {
    double started = now_seconds();
    if (!out) return lq_error_set(err, LQ_EINVAL, "ilp: out is NULL");
    memset(out, 0, sizeof *out);
    struct lq_ilp_options defaults;
    lq_ilp_options_default(&defaults);
    const struct lq_ilp_options *o = options ? options : &defaults;
    int rc = validate(problem, o, err);
    if (rc != LQ_OK) return rc;

    struct ilp_work w = {.problem = problem, .n = problem->n_matrices};
    size_t total_numel = 0;
    for (size_t i = 0; i < w.n; i++) total_numel += problem->numel[i];
    w.total_numel = (double)total_numel;
    unsigned char *keep = NULL;
    double *reduced = NULL;
    if ((rc = prune_dominated(&w, err)) != LQ_OK || (rc = scale_candidates(&w, err)) != LQ_OK)
        goto done;

    /* All-cheapest is the assignment with the fewest bits; if it fails nothing fits. */
    if (!assignment_fits(&w, w.position)) {
        char budget[64], minimum[64];
        format_exact(budget, sizeof budget, problem->budget_bits_per_param, 2);
        format_exact(minimum, sizeof minimum, assignment_bits(&w, w.position) / w.total_numel, 6);
        rc = lq_error_set(err, LQ_EINFEASIBLE,
                          "ilp: budget %s bits/param is below the smallest feasible %s bits/param",
                          budget, minimum);
        goto done;
    }
    /* Every matrix at its most accurate fits: nothing to trade off. */
    for (size_t i = 0; i < w.n; i++) w.position[i] = (int)matrix_size(&w, i) - 1;
    if (assignment_fits(&w, w.position)) {
        rc = finish_result(&w, out, 0.0, 1, err);
        goto done;
    }
    memset(w.position, 0, w.n * sizeof *w.position);

    double lambda = 0.0;
    if ((rc = lq_ilp_greedy_incumbent(&w, &lambda, err)) != LQ_OK) goto done;
    size_t kept = w.start[w.n];
    keep = malloc(kept);
    reduced = malloc(kept * sizeof *reduced);
    if (!keep || !reduced) {
        rc = lq_error_set(err, LQ_ENOMEM, "ilp: out of memory for %zu candidates", kept);
        goto done;
    }
    double lower = lq_ilp_lagrangian_bound(&w, lambda, reduced);
    double upper = scaled_cost(&w, w.position);
    /* Reduced-cost fixing: an assignment using candidate j costs at least lower + reduced[j],
     * so candidates with reduced[j] > upper - lower cannot beat the incumbent and are dropped.
     * The slack keeps every candidate that could tie with it despite rounding of the costs
     * and of the scaled storage (which lambda turns into cost). */
    double storage_rounding =
        16.0 * DBL_EPSILON * (double)(w.n + 2) * problem->budget_bits_per_param;
    double slack = (upper - lower) + 1e-9 * (1.0 + fabs(upper)) + lambda * storage_rounding;
    int free_matrices = 0;
    for (size_t i = 0; i < w.n; i++) {
        int count = 0;
        for (size_t j = w.start[i]; j < w.start[i + 1]; j++) {
            keep[j] = o->keep_all_candidates || reduced[j] <= slack ||
                      (int)(j - w.start[i]) == w.position[i];
            count += keep[j];
        }
        free_matrices += count > 1;
    }
    if (free_matrices == 0) { /* the bounds alone prove the greedy solution optimal */
        rc = finish_result(&w, out, lower, 1, err);
        goto done;
    }
    struct mip_outcome outcome = {0};
    int previous_output = glp_term_out(o->verbose ? GLP_ON : GLP_OFF);
    rc = solve_with_glpk(&w, keep, o, started, &outcome);
    glp_term_out(previous_output);
    if (rc != LQ_OK) {
        rc = lq_error_set(err, rc, "ilp: out of memory for the GLPK model");
        goto done;
    }
    double bound = lower;
    if (outcome.have_bound && outcome.bound > bound) bound = outcome.bound;
    rc = finish_result(&w, out, bound, outcome.proven_optimal, err);
    out->mip_columns = outcome.columns;
    out->nodes = outcome.nodes;
done:
    free(keep);
    free(reduced);
    free_work(&w);
    if (rc != LQ_OK)
        lq_ilp_result_free(out);
    else
        out->seconds = now_seconds() - started;
    /* GLPK keeps an environment per thread until told otherwise: free it, so that callers on
     * long-lived worker threads (the daemon's jobs) do not carry it. No GLPK object outlives
     * this call. */
    glp_free_env();
    return rc;
}
