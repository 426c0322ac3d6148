/* Deterministic pseudo-random numbers (xoshiro256**, seeded through splitmix64).
 * Same seed, same stream on every machine: decompositions and tests repeat exactly. */
#ifndef LQ_RNG_H
#define LQ_RNG_H

#include <stddef.h>
#include <stdint.h>

struct lq_rng {
    uint64_t state[4];
    int has_spare;
    double spare;
};

void lq_rng_seed(struct lq_rng *rng, uint64_t seed);
uint64_t lq_rng_next(struct lq_rng *rng);
/* Uniform in [0, 1) with 53 random bits. */
double lq_rng_uniform(struct lq_rng *rng);
/* Standard normal (Box-Muller, both values used). */
double lq_rng_normal(struct lq_rng *rng);
/* Fills out[0..count) with independent standard normal floats. */
void lq_rng_fill_normal(struct lq_rng *rng, float *out, size_t count);

#endif
