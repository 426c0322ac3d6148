/* The LP relaxation of the allocation and a greedy incumbent from it (see ilp.c). */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/ilp_internal.h"

/* ---- LP relaxation and greedy incumbent -------------------------------------------------- */

struct hull_segment {
    double efficiency; /* scaled error removed per scaled bit added */
    double extra_storage;
    size_t matrix;
    int from, to;
};

static int compare_segments(const void *a, const void *b) {
    const struct hull_segment *x = a, *y = b;
    if (x->efficiency != y->efficiency) return x->efficiency > y->efficiency ? -1 : 1;
    if (x->matrix != y->matrix) return x->matrix < y->matrix ? -1 : 1;
    return (x->from > y->from) - (x->from < y->from);
}

/* Lower convex hull of each matrix's (storage, cost) points, as segments. The LP relaxation of a
 * multiple-choice knapsack takes these segments in decreasing efficiency until one does not fit
 * (Dantzig / Sinha-Zoltners); that segment's efficiency is the optimal Lagrange multiplier. */
static struct hull_segment *build_hull_segments(const struct ilp_work *w, size_t *count) {
    struct hull_segment *segments = malloc((w->start[w->n] + 1) * sizeof *segments);
    int *stack = malloc((w->start[w->n] + 1) * sizeof *stack);
    if (!segments || !stack) {
        free(segments);
        free(stack);
        return NULL;
    }
    size_t n_segments = 0;
    for (size_t i = 0; i < w->n; i++) {
        const double *a = w->storage + w->start[i], *c = w->cost + w->start[i];
        int m = (int)matrix_size(w, i), top = 0;
        for (int k = 0; k < m; k++) {
            /* Pop the last hull point while it is not strictly below the chord to point k. */
            while (top >= 2) {
                int u = stack[top - 2], v = stack[top - 1];
                if ((c[v] - c[u]) * (a[k] - a[u]) < (c[k] - c[u]) * (a[v] - a[u])) break;
                top--;
            }
            stack[top++] = k;
        }
        double previous = INFINITY;
        for (int s = 0; s + 1 < top; s++) {
            int from = stack[s], to = stack[s + 1];
            double extra = a[to] - a[from];
            double efficiency = extra > 0.0 ? (c[from] - c[to]) / extra : INFINITY;
            /* Exact hull efficiencies fall along a matrix; keep them so despite rounding, so
             * that the sort (ties by matrix, then position) takes a matrix's steps in order. */
            if (efficiency > previous) efficiency = previous;
            previous = efficiency;
            segments[n_segments++] = (struct hull_segment){.efficiency = efficiency,
                                                           .extra_storage = extra,
                                                           .matrix = i,
                                                           .from = from,
                                                           .to = to};
        }
    }
    free(stack);
    qsort(segments, n_segments, sizeof *segments, compare_segments);
    *count = n_segments;
    return segments;
}

struct move {
    size_t matrix;
    int previous;
};

struct move_log {
    struct move *moves;
    size_t count, capacity;
};

static int move_apply(struct ilp_work *w, struct move_log *log, size_t matrix, int position) {
    if (log->count == log->capacity) {
        size_t capacity = log->capacity ? 2 * log->capacity : 256;
        struct move *grown = realloc(log->moves, capacity * sizeof *grown);
        if (!grown) return LQ_ENOMEM;
        log->moves = grown;
        log->capacity = capacity;
    }
    log->moves[log->count++] = (struct move){matrix, w->position[matrix]};
    w->position[matrix] = position;
    return LQ_OK;
}

struct upgrade {
    double extra, gain; /* scaled storage added, scaled error removed */
    size_t matrix;
    int to;
};

static int compare_upgrades(const void *a, const void *b) {
    const struct upgrade *x = a, *y = b;
    if (x->extra != y->extra) return x->extra < y->extra ? -1 : 1;
    if (x->matrix != y->matrix) return x->matrix < y->matrix ? -1 : 1;
    return (x->to > y->to) - (x->to < y->to);
}

/* Local search over single upgrades and swaps (one matrix down, another up with the bits
 * freed): repeatedly applies the most improving move. Upgrades sorted by added storage with
 * running maxima of the gain (best, and best on another matrix) answer "best upgrade within
 * x bits, not on matrix i" by binary search, so a round costs O(K log K) for K candidates. */
static int improve_by_swaps(struct ilp_work *w, double *residual, struct move_log *log) {
    size_t kept = w->start[w->n];
    struct upgrade *ups = malloc(kept * sizeof *ups);
    size_t *best = malloc(kept * sizeof *best), *other = malloc(kept * sizeof *other);
    int rc = ups && best && other ? LQ_OK : LQ_ENOMEM;
    /* Each round strictly lowers the cost; the cap only bounds pathological inputs. */
    for (size_t round = 0; rc == LQ_OK && round < 4 * kept; round++) {
        size_t n_ups = 0;
        for (size_t i = 0; i < w->n; i++) {
            size_t now = w->start[i] + (size_t)w->position[i];
            for (size_t j = now + 1; j < w->start[i + 1]; j++)
                ups[n_ups++] =
                    (struct upgrade){w->storage[j] - w->storage[now], w->cost[now] - w->cost[j], i,
                                     (int)(j - w->start[i])};
        }
        if (n_ups == 0) break;
        qsort(ups, n_ups, sizeof *ups, compare_upgrades);
        const size_t none = SIZE_MAX;
        for (size_t u = 0; u < n_ups; u++) {
            size_t b = u == 0 ? none : best[u - 1], o = u == 0 ? none : other[u - 1];
            if (b == none || ups[u].gain > ups[b].gain) {
                if (b != none && ups[b].matrix != ups[u].matrix) o = b;
                b = u;
            } else if (ups[u].matrix != ups[b].matrix && (o == none || ups[u].gain > ups[o].gain)) {
                o = u;
            }
            best[u] = b, other[u] = o;
        }
        double best_improvement = 1e-13; /* below this, rounding noise could cycle */
        size_t down_matrix = none, up = none;
        int down_to = -1;
        /* d == w->n stands for "no downgrade": a plain upgrade into the residual. */
        for (size_t d = 0; d <= w->n; d++) {
            size_t now = d < w->n ? w->start[d] + (size_t)w->position[d] : 0;
            size_t first = d < w->n ? w->start[d] : 0, last = d < w->n ? now : 1;
            for (size_t j = first; j < last; j++) {
                double freed = d < w->n ? w->storage[now] - w->storage[j] : 0.0;
                double loss = d < w->n ? w->cost[j] - w->cost[now] : 0.0;
                double room = *residual + freed;
                size_t lo = 0, hi = n_ups; /* count of upgrades with extra <= room */
                while (lo < hi) {
                    size_t mid = lo + (hi - lo) / 2;
                    if (ups[mid].extra <= room)
                        lo = mid + 1;
                    else
                        hi = mid;
                }
                if (lo == 0) continue;
                size_t pick = best[lo - 1];
                if (ups[pick].matrix == d) pick = other[lo - 1];
                if (pick == none || ups[pick].gain - loss <= best_improvement) continue;
                best_improvement = ups[pick].gain - loss;
                down_matrix = d, down_to = (int)(j - first), up = pick;
            }
        }
        if (up == none) break;
        if (down_matrix < w->n) {
            size_t now = w->start[down_matrix] + (size_t)w->position[down_matrix];
            *residual += w->storage[now] - w->storage[w->start[down_matrix] + (size_t)down_to];
            rc = move_apply(w, log, down_matrix, down_to);
        }
        if (rc == LQ_OK) {
            *residual -= ups[up].extra;
            rc = move_apply(w, log, ups[up].matrix, ups[up].to);
        }
    }
    free(ups);
    free(best);
    free(other);
    return rc;
}

/* Number of LP-rounding starts tried for the incumbent besides plain rounding down. */
#define ILP_FORCED_STARTS 4

/* Greedy incumbents from the LP relaxation. The LP takes hull segments in decreasing
 * efficiency while they fit; the first that does not is the critical one (its efficiency is
 * the optimal Lagrange multiplier, returned in lambda). Starts tried: that solution rounded
 * down, and, for each of the first ILP_FORCED_STARTS segments that did not fit, the segment
 * forced in and the least efficient segments taken undone until the budget holds again
 * (rounding up, which often beats rounding down when the critical step is a big matrix).
 * Each start is improved by the local search and made to pass the exact budget check by
 * undoing its latest moves (all-cheapest fits, checked before); the cheapest is kept in
 * w->position. */
int lq_ilp_greedy_incumbent(struct ilp_work *w, double *lambda, struct lq_error *err) {
    size_t n_segments = 0, n_taken = 0, n_blocked = 0;
    struct hull_segment *segments = build_hull_segments(w, &n_segments);
    size_t *taken = malloc((n_segments + 1) * sizeof *taken);
    size_t *blocked = malloc((w->n + 1) * sizeof *blocked);
    int *best_position = malloc(w->n * sizeof *best_position);
    unsigned char *is_blocked = calloc(w->n, 1);
    struct move_log log = {0};
    int rc = segments && taken && blocked && best_position && is_blocked ? LQ_OK : LQ_ENOMEM;
    double residual = w->capacity, best_cost = INFINITY;
    *lambda = 0.0;
    for (size_t s = 0; rc == LQ_OK && s < n_segments; s++) {
        const struct hull_segment *seg = &segments[s];
        if (is_blocked[seg->matrix]) continue;
        if (seg->extra_storage <= residual) {
            residual -= seg->extra_storage;
            taken[n_taken++] = s;
        } else {
            is_blocked[seg->matrix] = 1;
            if (n_blocked == 0) *lambda = seg->efficiency;
            blocked[n_blocked++] = s;
        }
    }
    /* Any lambda >= 0 gives a valid bound; an infinite one (storage steps lost to rounding)
     * would only poison it. */
    if (!isfinite(*lambda)) *lambda = 0.0;
    size_t n_starts = 1 + (n_blocked < ILP_FORCED_STARTS ? n_blocked : ILP_FORCED_STARTS);
    for (size_t start = 0; rc == LQ_OK && start < n_starts; start++) {
        memset(w->position, 0, w->n * sizeof *w->position);
        log.count = 0;
        residual = w->capacity;
        for (size_t t = 0; rc == LQ_OK && t < n_taken; t++) {
            residual -= segments[taken[t]].extra_storage;
            rc = move_apply(w, &log, segments[taken[t]].matrix, segments[taken[t]].to);
        }
        if (rc == LQ_OK && start > 0) {
            const struct hull_segment *forced = &segments[blocked[start - 1]];
            residual -= forced->extra_storage;
            rc = move_apply(w, &log, forced->matrix, forced->to);
            /* Taken segments in reverse are each the last one of their matrix. */
            for (size_t t = n_taken; rc == LQ_OK && t-- > 0 && residual < 0.0;) {
                const struct hull_segment *undo = &segments[taken[t]];
                if (undo->matrix == forced->matrix) continue;
                residual += undo->extra_storage;
                rc = move_apply(w, &log, undo->matrix, undo->from);
            }
            if (residual < 0.0) continue; /* cannot make room: skip this start */
        }
        if (rc == LQ_OK) rc = improve_by_swaps(w, &residual, &log);
        while (rc == LQ_OK && log.count > 0 && !assignment_fits(w, w->position)) {
            log.count--;
            w->position[log.moves[log.count].matrix] = log.moves[log.count].previous;
        }
        double cost = scaled_cost(w, w->position);
        if (rc == LQ_OK && cost < best_cost) {
            best_cost = cost;
            memcpy(best_position, w->position, w->n * sizeof *best_position);
        }
    }
    if (rc == LQ_OK) memcpy(w->position, best_position, w->n * sizeof *best_position);
    free(segments);
    free(taken);
    free(blocked);
    free(best_position);
    free(is_blocked);
    free(log.moves);
    if (rc != LQ_OK) return lq_error_set(err, rc, "ilp: out of memory for the greedy solution");
    return LQ_OK;
}

/* Lagrangian bound: for any lambda >= 0, every feasible assignment costs at least
 * offset + sum_i min_k (c_ik + lambda a_ik) - lambda * capacity. With the LP's lambda this is
 * the LP relaxation's value. reduced[j] receives c_j + lambda a_j - min over its matrix. */
double lq_ilp_lagrangian_bound(const struct ilp_work *w, double lambda, double *reduced) {
    double bound = w->cost_offset - lambda * w->capacity;
    for (size_t i = 0; i < w->n; i++) {
        double best = INFINITY;
        for (size_t j = w->start[i]; j < w->start[i + 1]; j++) {
            reduced[j] = w->cost[j] + lambda * w->storage[j];
            if (reduced[j] < best) best = reduced[j];
        }
        for (size_t j = w->start[i]; j < w->start[i + 1]; j++) reduced[j] -= best;
        bound += best;
    }
    return bound;
}
