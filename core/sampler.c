#include "sampler.h"

#include "rng.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* One token in the sorted order: descending logit, ties by lower id. weight is
 * exp((logit - max) / temperature), the unnormalised probability. */
struct lq_sampler_candidate {
    float logit;
    float weight;
    int32_t id;
};

/* Without top-k the sorted order is needed only where the top-p limit and the draw fall, so the
 * tokens are binned by the tempered distance (max - logit) / T in 1/32-nat slices and only the
 * slice holding a boundary is sorted. 1024 slices reach weights of e^-32 (1e-14) relative to the
 * max; the last bucket holds everything further down. */
enum { LQ_SAMPLER_BUCKETS = 1024, LQ_SAMPLER_DROPPED = LQ_SAMPLER_BUCKETS };
#define LQ_SAMPLER_BUCKETS_PER_NAT 32.0

struct lq_sampler {
    struct lq_sampler_params params;
    int vocab_size;
    struct lq_rng rng;
    struct lq_sampler_candidate *candidates; /* [vocab_size] */
    float *raw_logits;                       /* [vocab_size]: pre-penalty value where penalised */
    unsigned char *penalised;                /* [vocab_size]: 1 while a call has penalised it */
    uint16_t *bucket;                        /* [vocab_size]: bucket of each token */
    double bucket_weight[LQ_SAMPLER_BUCKETS + 1]; /* the extra one: tokens min-p drops, and -inf */
};

void lq_sampler_params_default(struct lq_sampler_params *params) {
    memset(params, 0, sizeof *params);
    params->temperature = 1.0f;
    params->top_p = 1.0f;
    params->repetition_penalty = 1.0f;
}

int lq_sampler_params_validate(const struct lq_sampler_params *params, struct lq_error *err) {
    if (!params) return lq_error_set(err, LQ_EINVAL, "sampler parameters are NULL");
    /* Written as !(in range) so that NaN fails too. */
    if (!(params->temperature >= 0.0f && isfinite(params->temperature)))
        return lq_error_set(err, LQ_EINVAL, "temperature = %g: must be finite and >= 0",
                            (double)params->temperature);
    if (params->top_k < 0)
        return lq_error_set(err, LQ_EINVAL, "top_k = %d: must be >= 0 (0 = off)", params->top_k);
    if (!(params->top_p > 0.0f && params->top_p <= 1.0f))
        return lq_error_set(err, LQ_EINVAL, "top_p = %g: must be in (0, 1] (1 = off)",
                            (double)params->top_p);
    if (!(params->min_p >= 0.0f && params->min_p <= 1.0f))
        return lq_error_set(err, LQ_EINVAL, "min_p = %g: must be in [0, 1] (0 = off)",
                            (double)params->min_p);
    if (!(params->repetition_penalty > 0.0f && isfinite(params->repetition_penalty)))
        return lq_error_set(err, LQ_EINVAL, "repetition_penalty = %g: must be finite and > 0",
                            (double)params->repetition_penalty);
    if (params->repetition_window < 0)
        return lq_error_set(err, LQ_EINVAL, "repetition_window = %d: must be >= 0 (0 = all)",
                            params->repetition_window);
    return LQ_OK;
}

int lq_sampler_create(const struct lq_sampler_params *params, int vocab_size,
                      struct lq_sampler **out, struct lq_error *err) {
    if (!out) return lq_error_set(err, LQ_EINVAL, "sampler output pointer is NULL");
    *out = NULL;
    int rc = lq_sampler_params_validate(params, err);
    if (rc) return rc;
    if (vocab_size <= 0)
        return lq_error_set(err, LQ_EINVAL, "vocab_size = %d: must be > 0", vocab_size);
    struct lq_sampler *sampler = calloc(1, sizeof *sampler);
    if (!sampler) return lq_error_set(err, LQ_ENOMEM, "sampler: out of memory");
    sampler->params = *params;
    sampler->vocab_size = vocab_size;
    sampler->candidates = malloc((size_t)vocab_size * sizeof *sampler->candidates);
    sampler->raw_logits = malloc((size_t)vocab_size * sizeof *sampler->raw_logits);
    sampler->penalised = calloc((size_t)vocab_size, 1);
    sampler->bucket = malloc((size_t)vocab_size * sizeof *sampler->bucket);
    if (!sampler->candidates || !sampler->raw_logits || !sampler->penalised || !sampler->bucket) {
        lq_sampler_free(sampler);
        return lq_error_set(err, LQ_ENOMEM, "sampler: out of memory for a vocabulary of %d",
                            vocab_size);
    }
    lq_rng_seed(&sampler->rng, params->seed);
    *out = sampler;
    return LQ_OK;
}

void lq_sampler_free(struct lq_sampler *sampler) {
    if (!sampler) return;
    free(sampler->candidates);
    free(sampler->raw_logits);
    free(sampler->penalised);
    free(sampler->bucket);
    free(sampler);
}

/* First index of history inside the repetition window. */
static size_t window_start(const struct lq_sampler *sampler, size_t count) {
    size_t window = (size_t)sampler->params.repetition_window;
    return window == 0 || window >= count ? 0 : count - window;
}

/* HF's RepetitionPenaltyLogitsProcessor (CTRL, Keskar et al. 2019): once per distinct token, so a
 * token seen ten times is penalised like one seen once. The pre-penalty value is kept for the
 * logprob, which reports the raw distribution. */
static void penalty_apply(struct lq_sampler *sampler, float *logits, const int *history,
                          size_t count) {
    float penalty = sampler->params.repetition_penalty;
    for (size_t i = window_start(sampler, count); i < count; i++) {
        int token = history[i];
        if (token < 0 || token >= sampler->vocab_size || sampler->penalised[token]) continue;
        sampler->penalised[token] = 1;
        sampler->raw_logits[token] = logits[token];
        logits[token] = logits[token] > 0.0f ? logits[token] / penalty : logits[token] * penalty;
    }
}

/* Clears the marks in O(window) rather than O(vocab). */
static void penalty_clear(struct lq_sampler *sampler, const int *history, size_t count) {
    for (size_t i = window_start(sampler, count); i < count; i++) {
        int token = history[i];
        if (token >= 0 && token < sampler->vocab_size) sampler->penalised[token] = 0;
    }
}

/* log(sum exp(x)) over the finite logits, split into max and log(sum exp(x - max)) so that the
 * logprob (x - max) - log_sum keeps its precision for large logits. max = -inf if none. */
static void log_sum_exp(const float *logits, int vocab_size, double *max_out, double *log_sum_out) {
    float max = -INFINITY;
    for (int i = 0; i < vocab_size; i++)
        if (isfinite(logits[i]) && logits[i] > max) max = logits[i];
    double sum = 0.0;
    if (max > -INFINITY)
        for (int i = 0; i < vocab_size; i++)
            if (isfinite(logits[i])) sum += expf(logits[i] - max);
    *max_out = max;
    *log_sum_out = max > -INFINITY ? log(sum) : 0.0;
}

/* Replaces non-finite logits by -inf and returns the largest; *argmax gets its lowest id (0 when
 * every logit is -inf). */
static float sanitize_max(float *logits, int vocab_size, int *argmax) {
    float max = -INFINITY;
    int best = 0;
    for (int i = 0; i < vocab_size; i++) {
        if (!isfinite(logits[i]))
            logits[i] = -INFINITY;
        else if (logits[i] > max) { /* strict: the first (lowest) id wins ties */
            max = logits[i];
            best = i;
        }
    }
    *argmax = best;
    return max;
}

/* Unnormalised softmax weight; 1 for the max, 0 for -inf. Always this expression, so that the
 * normaliser and the per-candidate weights agree to the last bit. */
static inline float weight_of(float logit, float max, float temperature) {
    return expf((logit - max) / temperature);
}

static inline int comes_before(const struct lq_sampler_candidate *a,
                               const struct lq_sampler_candidate *b) {
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static int compare_candidates(const void *a, const void *b) {
    return comes_before(a, b) ? -1 : comes_before(b, a) ? 1 : 0;
}

static inline void swap_candidates(struct lq_sampler_candidate *c, size_t i, size_t j) {
    struct lq_sampler_candidate t = c[i];
    c[i] = c[j];
    c[j] = t;
}

/* Restores the heap below i; the root of c[0..n) is the candidate that comes last. */
static void heap_sift_down(struct lq_sampler_candidate *c, size_t n, size_t i) {
    for (;;) {
        size_t latest = i, left = 2 * i + 1, right = left + 1;
        if (left < n && comes_before(&c[latest], &c[left])) latest = left;
        if (right < n && comes_before(&c[latest], &c[right])) latest = right;
        if (latest == i) return;
        swap_candidates(c, i, latest);
        i = latest;
    }
}

/* Gathers the first k finite tokens in sorted order into c[0..k), sorted: a heap of the best k
 * so far whose root, the k-th, rejects nearly every other token with one comparison (O(n) for
 * k << n, O(n log k) at worst). Returns the count, < k when fewer tokens are finite. */
static size_t top_k_collect(struct lq_sampler *sampler, const float *logits, size_t k) {
    struct lq_sampler_candidate *c = sampler->candidates;
    size_t count = 0;
    int i = 0, vocab_size = sampler->vocab_size;
    for (; i < vocab_size && count < k; i++)
        if (logits[i] > -INFINITY) c[count++] = (struct lq_sampler_candidate){logits[i], 0.0f, i};
    if (count < k) return count;
    for (size_t j = k / 2; j-- > 0;) heap_sift_down(c, k, j);
    /* Scanning in id order, a logit equal to the root's comes after it: only larger ones enter. */
    for (; i < vocab_size; i++) {
        if (logits[i] > c[0].logit) {
            c[0] = (struct lq_sampler_candidate){logits[i], 0.0f, i};
            heap_sift_down(c, k, 0);
        }
    }
    qsort(c, k, sizeof *c, compare_candidates);
    return k;
}

/* Top-p, min-p and the draw over the sorted candidates c[0..count), which hold every token that
 * can be kept (after top-k). */
static int top_k_choose(const struct lq_sampler *sampler, size_t count, float min_logit, double u) {
    const struct lq_sampler_candidate *c = sampler->candidates;
    double z = 0.0; /* top-p sees the distribution renormalised over the k */
    for (size_t i = 0; i < count; i++) z += c[i].weight;
    size_t kept = count;
    if (sampler->params.top_p < 1.0f) {
        double limit = (double)sampler->params.top_p * z, cumulative = 0.0;
        for (size_t i = 0; i < count; i++) {
            cumulative += c[i].weight;
            if (cumulative >= limit) {
                kept = i + 1;
                break;
            }
        }
    }
    /* min-p keeps a sorted prefix; the first token is the max, which passes as min_p <= 1. */
    size_t k = 1;
    while (k < kept && c[k].logit >= min_logit) k++;
    kept = k;
    double total = 0.0, cumulative = 0.0;
    for (size_t i = 0; i < kept; i++) total += c[i].weight;
    double target = u * total;
    for (size_t i = 0; i < kept; i++) {
        cumulative += c[i].weight;
        if (cumulative > target) return c[i].id;
    }
    /* u * total rounded up to total: the last token with any weight. */
    for (size_t i = kept; i-- > 0;)
        if (c[i].weight > 0.0f) return c[i].id;
    return c[0].id;
}

/* Bucket of a finite logit. (max - logit) and the product are monotone in logit, so each bucket
 * is a contiguous run of the sorted order and ties share a bucket. In double: a tiny temperature
 * makes the scale overflow a float. */
static inline int bucket_of(float logit, float max, double scale) {
    double distance = (double)(max - logit) * scale;
    return distance < (double)(LQ_SAMPLER_BUCKETS - 1) ? (int)distance : LQ_SAMPLER_BUCKETS - 1;
}

/* Gathers the tokens of one bucket into the candidates, sorted, with their weights; returns how
 * many. */
static size_t bucket_collect(struct lq_sampler *sampler, const float *logits, float max,
                             int bucket) {
    struct lq_sampler_candidate *c = sampler->candidates;
    const uint16_t *bucket_of_token = sampler->bucket;
    float temperature = sampler->params.temperature;
    size_t count = 0;
    for (int i = 0; i < sampler->vocab_size; i++)
        if (bucket_of_token[i] == bucket)
            c[count++] =
                (struct lq_sampler_candidate){logits[i], weight_of(logits[i], max, temperature), i};
    qsort(c, count, sizeof *c, compare_candidates);
    return count;
}

/* Top-p, min-p and the draw without top-k, sorting only the buckets where the top-p limit and
 * the draw fall. The cumulative sums add whole buckets (each summed in id order) and then the
 * sorted members of the boundary bucket: the same tokens as a full sort, up to rounding. */
static int bucket_choose(struct lq_sampler *sampler, const float *logits, float max,
                         float min_logit, double u, double *z_out) {
    struct lq_sampler_candidate *c = sampler->candidates;
    double *bucket_weight = sampler->bucket_weight;
    float temperature = sampler->params.temperature;
    double scale = LQ_SAMPLER_BUCKETS_PER_NAT / (double)temperature;
    memset(bucket_weight, 0, sizeof sampler->bucket_weight);
    for (int i = 0; i < sampler->vocab_size; i++) {
        float x = logits[i];
        int b = x >= min_logit ? bucket_of(x, max, scale) : LQ_SAMPLER_DROPPED;
        bucket_weight[b] += weight_of(x, max, temperature);
        sampler->bucket[i] = (uint16_t)b;
    }
    /* top-p's normaliser counts the tokens min-p drops. Summed from the buckets rather than in
     * the loop: one long chain of dependent double additions would set the loop's pace. */
    double z = 0.0;
    for (int b = 0; b <= LQ_SAMPLER_DROPPED; b++) z += bucket_weight[b];
    *z_out = z;

    /* The kept tokens: buckets before `last` whole, then the first last_count sorted members
     * of `last`. Bucket 0 holds the max (weight 1), so some bucket has weight. */
    int last = LQ_SAMPLER_BUCKETS - 1;
    while (last > 0 && bucket_weight[last] == 0.0) last--;
    size_t last_count = (size_t)sampler->vocab_size, collected = 0;
    int collected_bucket = -1;
    double total = 0.0;
    if (sampler->params.top_p < 1.0f) {
        double limit = (double)sampler->params.top_p * z;
        int b = 0;
        for (; b <= last && total + bucket_weight[b] < limit; b++) total += bucket_weight[b];
        if (b <= last) { /* the limit falls in bucket b, which has weight */
            collected = bucket_collect(sampler, logits, max, b);
            collected_bucket = b;
            size_t j = 0;
            for (; j < collected; j++) {
                total += c[j].weight;
                if (total >= limit) break;
            }
            if (j == collected) j--; /* sorted sum fell short by rounding: the whole bucket */
            last = b;
            last_count = j + 1;
        } /* else the limit lies beyond what min-p keeps: keep all of that */
    } else {
        for (int b = 0; b <= last; b++) total += bucket_weight[b];
    }

    double target = u * total, cumulative = 0.0;
    int b = 0;
    for (; b < last && cumulative + bucket_weight[b] <= target; b++) cumulative += bucket_weight[b];
    if (b != collected_bucket) collected = bucket_collect(sampler, logits, max, b);
    size_t end = b == last && last_count < collected ? last_count : collected;
    for (size_t j = 0; j < end; j++) {
        cumulative += c[j].weight;
        if (cumulative > target) return c[j].id;
    }
    /* Rounding (sorted sum short of the bucket sum, or u * total rounded up to total): the last
     * token with weight; bucket b has weight, so one exists. */
    for (size_t j = end; j-- > 0;)
        if (c[j].weight > 0.0f) return c[j].id;
    return c[0].id;
}

/* The smallest logit min-p keeps: p_i >= min_p * p_max <=> (x_i - max) / T >= log(min_p). Rounded
 * up to a float so that the test is one float comparison, exactly equivalent to the one in double;
 * never below -FLT_MAX, so that -inf is never kept. */
static float min_p_threshold(float max, float temperature, float min_p) {
    if (min_p <= 0.0f) return -FLT_MAX;
    double threshold = (double)max + (double)temperature * log((double)min_p);
    if (threshold <= -FLT_MAX) return -FLT_MAX;
    float rounded = (float)threshold;
    return (double)rounded < threshold ? nextafterf(rounded, INFINITY) : rounded;
}

/* Temperature > 0 and at least one finite logit; logits already sanitised, max their largest.
 * *z_out gets sum(exp((x - max) / T)) over the vocabulary when it was computed, else -1. */
static int sample_tempered(struct lq_sampler *sampler, const float *logits, float max, double u,
                           double *z_out) {
    const struct lq_sampler_params *p = &sampler->params;
    float min_logit = min_p_threshold(max, p->temperature, p->min_p);
    *z_out = -1.0;
    if (p->top_k > 0 && p->top_k < sampler->vocab_size) {
        size_t k = (size_t)p->top_k;
        if (top_k_collect(sampler, logits, k) == k) {
            for (size_t i = 0; i < k; i++)
                sampler->candidates[i].weight =
                    weight_of(sampler->candidates[i].logit, max, p->temperature);
            return top_k_choose(sampler, k, min_logit, u);
        }
        /* fewer finite tokens than k: top-k keeps them all, same as off */
    }
    return bucket_choose(sampler, logits, max, min_logit, u, z_out);
}

/* Everything lq_sampler_sample does after its draw u. */
static int sample_given(struct lq_sampler *sampler, float *logits, const int *history, size_t count,
                        double u, float *logprob) {
    int vocab_size = sampler->vocab_size;

    double raw_max = 0.0, raw_log_sum = 0.0;
    int penalise = sampler->params.repetition_penalty != 1.0f && count > 0;
    if (logprob && penalise) log_sum_exp(logits, vocab_size, &raw_max, &raw_log_sum);
    if (penalise) penalty_apply(sampler, logits, history, count);

    int token;
    float max = sanitize_max(logits, vocab_size, &token);
    double z = -1.0;
    if (max > -INFINITY && sampler->params.temperature > 0.0f)
        token = sample_tempered(sampler, logits, max, u, &z);

    if (logprob) {
        if (!penalise && sampler->params.temperature == 1.0f && z > 0.0) {
            /* Unpenalised at T = 1 the sampling weights are exp(x - max): reuse their sum. */
            raw_max = max;
            raw_log_sum = log(z);
        } else if (!penalise) { /* sanitising changed nothing log_sum_exp cares about */
            log_sum_exp(logits, vocab_size, &raw_max, &raw_log_sum);
        }
        /* Unpenalised tokens still hold the raw value (non-finite ones now -inf). */
        float raw =
            penalise && sampler->penalised[token] ? sampler->raw_logits[token] : logits[token];
        *logprob = isfinite(raw) && raw_max > -INFINITY
                       ? (float)(((double)raw - raw_max) - raw_log_sum)
                       : -INFINITY;
    }
    if (penalise) penalty_clear(sampler, history, count);
    return token;
}

int lq_sampler_sample(struct lq_sampler *sampler, float *logits, const int *history, size_t count,
                      float *logprob) {
    if (!sampler || !logits || (!history && count > 0)) return LQ_EINVAL;
    /* Exactly one draw per call, whatever the path, so the stream position is the token count. */
    double u = lq_rng_uniform(&sampler->rng);
    return sample_given(sampler, logits, history, count, u, logprob);
}

double lq_sampler_draw(struct lq_sampler *sampler) {
    return lq_rng_uniform(&sampler->rng);
}

const struct lq_sampler_params *lq_sampler_get_params(const struct lq_sampler *sampler) {
    return &sampler->params;
}

int lq_sampler_vocab_size(const struct lq_sampler *sampler) {
    return sampler->vocab_size;
}

int lq_sampler_sample_with(struct lq_sampler *sampler, const struct lq_sampler_params *params,
                           float *logits, const int *history, size_t count, double u,
                           float *logprob) {
    if (!sampler || !logits || (!history && count > 0) || !(u >= 0.0 && u < 1.0)) return LQ_EINVAL;
    if (params && lq_sampler_params_validate(params, NULL)) return LQ_EINVAL;
    /* The sampler's own settings stand aside for the call; its generator is not touched. */
    struct lq_sampler_params own = sampler->params;
    if (params) sampler->params = *params;
    int token = sample_given(sampler, logits, history, count, u, logprob);
    sampler->params = own;
    return token;
}
