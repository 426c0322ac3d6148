/* Next-token sampling: greedy, temperature, top-k, top-p (nucleus), min-p, repetition penalty,
 * with a seeded generator so that the same seed gives the same text.
 *
 * One call of lq_sampler_sample applies, in this order (the order of HF transformers and vLLM):
 *   1. repetition penalty (HF/CTRL): each distinct token of the window, logit > 0 -> logit / r,
 *      else logit * r;
 *   2. temperature 0: greedy argmax (ties -> lowest id), nothing else below applies;
 *   3. softmax of logits / temperature (max subtracted, sums in double);
 *   4. top-k: keep the k largest logits;
 *   5. top-p: keep the smallest prefix whose cumulative probability, renormalised after top-k,
 *      is >= p (at least one token);
 *   6. min-p: keep tokens with probability >= min_p * the largest probability;
 *   7. renormalise and draw by inverse CDF with one lq_rng_uniform, walking the kept tokens in
 *      descending logit order (= descending probability), ties by lower id.
 * llama.cpp's default chain applies temperature last, so its top-p and min-p see the T = 1
 * distribution; here they see the tempered one, as in HF and vLLM.
 * "Sorted order" below always means descending logit after the penalty, ties by lower id. */
#ifndef LQ_SAMPLER_H
#define LQ_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

struct lq_sampler_params {
    float temperature;        /* >= 0 and finite; 0 = greedy (argmax; ties take the lowest id) */
    int top_k;                /* keep the k largest logits, ties by lower id (0 = off) */
    float top_p;              /* in (0, 1]: keep the smallest sorted prefix whose probability
                                 reaches p (1 = off) */
    float min_p;              /* in [0, 1]: drop tokens below min_p * max probability (0 = off) */
    float repetition_penalty; /* > 0, CTRL-style: logits of distinct tokens already seen divided
                                 (if > 0) or multiplied (if <= 0) by it; 1 = off, < 1 rewards */
    int repetition_window;    /* >= 0: how many recent tokens count as seen (0 = all) */
    uint64_t seed;
};

/* temperature 1, top_k 0, top_p 1, min_p 0, repetition_penalty 1, window 0, seed 0. */
void lq_sampler_params_default(struct lq_sampler_params *params);
/* 0, or LQ_EINVAL with a message naming the first parameter out of range. */
int lq_sampler_params_validate(const struct lq_sampler_params *params, struct lq_error *err);

struct lq_sampler; /* per sequence: holds the random state and scratch space */

/* Validates params, copies them and seeds the generator; all scratch space (about 19 bytes per
 * vocabulary entry) is allocated here, none per call. */
int lq_sampler_create(const struct lq_sampler_params *params, int vocab_size,
                      struct lq_sampler **out, struct lq_error *err);
void lq_sampler_free(struct lq_sampler *sampler);

/* Returns the next token id (>= 0), or LQ_EINVAL for a NULL sampler or logits or a NULL history
 * with count > 0.
 * logits[vocab_size] is modified in place: on return it holds the penalised logits, with
 * non-finite values (NaN, +-inf) replaced by -inf, which is how they are treated; if every logit
 * is -inf the lowest id (0) is returned.
 * history[0..count) are the tokens so far (may be NULL when count is 0); pass the prompt too to
 * match HF's repetition penalty. Ids outside [0, vocab_size) are ignored.
 * Each call consumes exactly one lq_rng_uniform, greedy or not, so the same seed and the same
 * logits sequence give the same tokens.
 * If logprob is non-NULL it receives the chosen token's log-softmax under the logits as given
 * (before penalty, temperature and filters), which is what OpenAI's logprobs report; -inf when
 * that token had a non-finite logit. */
int lq_sampler_sample(struct lq_sampler *sampler, float *logits, const int *history, size_t count,
                      float *logprob);

/* For sampling outside lq_sampler_sample (the backends' sample op, kernels/backend.h): the next
 * uniform of the sampler's generator, consumed exactly as one lq_sampler_sample call consumes
 * it, so that drawing here and sampling elsewhere gives the same tokens for the same seed. */
double lq_sampler_draw(struct lq_sampler *sampler);
/* The settings the sampler was created with (borrowed) and its vocabulary size. */
const struct lq_sampler_params *lq_sampler_get_params(const struct lq_sampler *sampler);
int lq_sampler_vocab_size(const struct lq_sampler *sampler);

/* lq_sampler_sample with the uniform u in [0, 1) given instead of drawn (the generator is not
 * touched) and, when params is not NULL, params (validated; seed ignored) in place of the
 * sampler's own for this call only; the sampler then lends only its scratch space. Same
 * results and in-place changes to logits as lq_sampler_sample after a draw of u. LQ_EINVAL
 * for u outside [0, 1) or invalid params, as well as lq_sampler_sample's cases. */
int lq_sampler_sample_with(struct lq_sampler *sampler, const struct lq_sampler_params *params,
                           float *logits, const int *history, size_t count, double u,
                           float *logprob);

#endif
