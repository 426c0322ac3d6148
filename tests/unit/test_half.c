/* core/half.h: fp16 and bf16 conversions against IEEE round-to-nearest-even, checked
 * exhaustively over every 16-bit pattern, every midpoint between neighbours, and random
 * floats against an independent nearest-value search (and the compiler's _Float16 where
 * it has one). */
#include "core/half.h"

#include <float.h>
#include <stdint.h>

#include "tests/unit/lq_test.h"

static uint32_t bits_of(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static float float_of(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* fp16 decoded from its definition, in double, without core/half.h. */
static double fp16_reference(uint16_t half) {
    int exponent = (half >> 10) & 0x1f, mantissa = half & 0x3ff;
    double magnitude = exponent == 0    ? ldexp(mantissa, -24)
                       : exponent == 31 ? (mantissa ? NAN : INFINITY)
                                        : ldexp(1024 + mantissa, exponent - 25);
    return (half & 0x8000) ? -magnitude : magnitude;
}

static int fp16_is_nan(uint16_t half) {
    return (half & 0x7c00) == 0x7c00 && (half & 0x3ff) != 0;
}

static int bf16_is_nan(uint16_t bf16) {
    return (bf16 & 0x7f80) == 0x7f80 && (bf16 & 0x7f) != 0;
}

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Every non-NaN pattern decodes to its defined value and encodes back to itself; NaNs stay
 * NaN (quiet) through both directions. */
static void test_fp16_all_patterns(void) {
    int failures = 0;
    for (uint32_t h = 0; h < 65536 && failures < 10; h++) {
        uint16_t half = (uint16_t)h;
        float value = lq_fp16_to_float(half);
        if (fp16_is_nan(half)) {
            if (!isnan(value) || !fp16_is_nan(lq_float_to_fp16(value))) failures++;
            continue;
        }
        double expected = fp16_reference(half);
        if (bits_of(value) != bits_of((float)expected) || lq_float_to_fp16(value) != half) {
            fprintf(stderr, "fp16 %04x -> %.9g (expected %.9g) -> %04x\n", half, value, expected,
                    lq_float_to_fp16(value));
            failures++;
        }
    }
    CHECK(failures == 0);
}

static void test_bf16_all_patterns(void) {
    int failures = 0;
    for (uint32_t b = 0; b < 65536 && failures < 10; b++) {
        uint16_t bf16 = (uint16_t)b;
        float value = lq_bf16_to_float(bf16);
        if (bits_of(value) != b << 16) failures++; /* bf16 is the top half of a float */
        uint16_t back = lq_float_to_bf16(value);
        if (bf16_is_nan(bf16) ? !bf16_is_nan(back) || !(back & 0x40) : back != bf16) {
            fprintf(stderr, "bf16 %04x -> %.9g -> %04x\n", bf16, value, back);
            failures++;
        }
    }
    CHECK(failures == 0);
}

/* Midpoints between neighbours are exact floats; they must go to the even neighbour, and
 * one float ulp either side to the nearer one. With monotonicity this pins down rounding
 * everywhere. Covers subnormals (0x0000..0x03ff) and the subnormal/normal seam. */
static void test_fp16_round_to_nearest_even(void) {
    int failures = 0;
    for (uint16_t low = 0; low < 0x7bff && failures < 10; low++) {
        uint16_t high = (uint16_t)(low + 1), even = (low & 1) ? high : low;
        float middle = (float)((fp16_reference(low) + fp16_reference(high)) / 2);
        CHECK((double)middle == (fp16_reference(low) + fp16_reference(high)) / 2);
        for (int sign = 0; sign < 2; sign++) {
            float m = sign ? -middle : middle;
            uint16_t s = sign ? 0x8000 : 0;
            if (lq_float_to_fp16(m) != (s | even) ||
                lq_float_to_fp16(nextafterf(m, 0.0f)) != (s | low) ||
                lq_float_to_fp16(nextafterf(m, sign ? -INFINITY : INFINITY)) != (s | high)) {
                fprintf(stderr, "fp16 midpoint %.9g between %04x and %04x -> %04x\n", m, low, high,
                        lq_float_to_fp16(m));
                failures++;
            }
        }
    }
    CHECK(failures == 0);
    /* Hand-checked cases: 1 + 2^-11 is halfway between 1 and 1 + 2^-10. */
    CHECK(lq_float_to_fp16(1.0f + 0x1p-11f) == 0x3c00);
    CHECK(lq_float_to_fp16(1.0f + 3 * 0x1p-11f) == 0x3c02);
    CHECK(lq_float_to_fp16(nextafterf(1.0f + 0x1p-11f, 2.0f)) == 0x3c01);
    CHECK(lq_float_to_fp16(2049.0f) == 0x6800); /* 2048 and 2050 are neighbours: even 2048 */
    CHECK(lq_float_to_fp16(2051.0f) == 0x6802); /* between 2050 and 2052: even 2052 */
}

static void test_bf16_round_to_nearest_even(void) {
    int failures = 0;
    for (uint32_t low = 0; low < 0x7f7f && failures < 10; low++) {
        uint32_t high = low + 1, even = (low & 1) ? high : low;
        /* Within a binade floats are evenly spaced, so the midpoint is the bit pattern
         * halfway; across a binade edge it lies in the lower, finer binade: same bits. */
        uint32_t middle = (low << 16) | 0x8000;
        for (int negative = 0; negative < 2; negative++) {
            uint32_t sign = negative ? 0x80000000u : 0;
            uint16_t s = (uint16_t)(sign >> 16);
            if (lq_float_to_bf16(float_of(sign | middle)) != (s | even) ||
                lq_float_to_bf16(float_of(sign | (middle - 1))) != (s | low) ||
                lq_float_to_bf16(float_of(sign | (middle + 1))) != (s | high)) {
                fprintf(stderr, "bf16 midpoint %08x -> %04x\n", sign | middle,
                        lq_float_to_bf16(float_of(sign | middle)));
                failures++;
            }
        }
    }
    CHECK(failures == 0);
    CHECK(lq_float_to_bf16(1.0f + 0x1p-8f) == 0x3f80);     /* halfway to 1 + 2^-7: even 1 */
    CHECK(lq_float_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82); /* halfway, odd below: up */
    /* The largest finite bf16 is odd, so the halfway point above it rounds to inf. */
    CHECK(lq_float_to_bf16(float_of(0x7f7f7fffu)) == 0x7f7f);
    CHECK(lq_float_to_bf16(float_of(0x7f7f8000u)) == 0x7f80);
    CHECK(lq_float_to_bf16(FLT_MAX) == 0x7f80);
    CHECK(lq_float_to_bf16(-INFINITY) == 0xff80);
}

/* fp16's largest finite value is 65504; halfway to the next (65536, not representable)
 * is 65520, which rounds to even, i.e. overflows to inf. */
static void test_fp16_overflow(void) {
    CHECK(lq_float_to_fp16(65504.0f) == 0x7bff);
    CHECK(lq_float_to_fp16(65519.0f) == 0x7bff);
    CHECK(lq_float_to_fp16(nextafterf(65520.0f, 0.0f)) == 0x7bff);
    CHECK(lq_float_to_fp16(65520.0f) == 0x7c00);
    CHECK(lq_float_to_fp16(65536.0f) == 0x7c00);
    CHECK(lq_float_to_fp16(1e10f) == 0x7c00);
    CHECK(lq_float_to_fp16(FLT_MAX) == 0x7c00);
    CHECK(lq_float_to_fp16(INFINITY) == 0x7c00);
    CHECK(lq_float_to_fp16(-65520.0f) == 0xfc00);
    CHECK(lq_float_to_fp16(-nextafterf(65520.0f, 0.0f)) == 0xfbff);
    CHECK(lq_float_to_fp16(-INFINITY) == 0xfc00);
    CHECK(fp16_is_nan(lq_float_to_fp16(NAN)));
    CHECK(isinf(lq_fp16_to_float(0x7c00)) && lq_fp16_to_float(0xfc00) < 0);
}

static void test_fp16_subnormals(void) {
    for (uint16_t m = 0; m < 0x400; m++) { /* every subnormal is m * 2^-24 exactly */
        CHECK(lq_fp16_to_float(m) == ldexpf((float)m, -24));
        CHECK(lq_fp16_to_float((uint16_t)(0x8000 | m)) == -ldexpf((float)m, -24));
    }
    CHECK(lq_float_to_fp16(0x1p-24f) == 0x0001);                   /* smallest */
    CHECK(lq_float_to_fp16(0x1p-25f) == 0x0000);                   /* tie: even 0 */
    CHECK(lq_float_to_fp16(nextafterf(0x1p-25f, 1.0f)) == 0x0001); /* just above tie */
    CHECK(lq_float_to_fp16(3 * 0x1p-25f) == 0x0002);               /* tie: even 2 */
    CHECK(lq_float_to_fp16(0x1p-26f) == 0x0000);                   /* underflow */
    CHECK(lq_float_to_fp16(-0x1p-25f) == 0x8000);                  /* keeps the sign */
    CHECK(lq_float_to_fp16(-0x1p-24f) == 0x8001);
    CHECK(lq_float_to_fp16(1023 * 0x1p-24f) == 0x03ff);    /* largest subnormal */
    CHECK(lq_float_to_fp16(1023.5f * 0x1p-24f) == 0x0400); /* tie: even, normal */
    CHECK(lq_float_to_fp16(0x1p-14f) == 0x0400);           /* smallest normal */
    CHECK(lq_float_to_fp16(FLT_TRUE_MIN) == 0x0000);       /* float subnormal */
    CHECK(lq_float_to_fp16(-0.0f) == 0x8000);
    /* bf16 shares float's exponent: float subnormals round in its top 16 bits. */
    CHECK(lq_float_to_bf16(float_of(0x00008000u)) == 0x0000); /* tie: even 0 */
    CHECK(lq_float_to_bf16(float_of(0x00008001u)) == 0x0001);
    CHECK(lq_float_to_bf16(float_of(0x00018000u)) == 0x0002); /* tie: even 2 */
    CHECK(lq_bf16_to_float(0x0001) == 0x1p-133f);
}

/* Random floats: the result must be a nearest representable value, ties to even, checked
 * by comparing distances to the result's neighbours in double. */
static void test_random_against_nearest(void) {
    uint64_t state = 20240611;
    int failures = 0;
    for (int i = 0; i < 2000000 && failures < 10; i++) {
        uint32_t bits = (uint32_t)splitmix64(&state);
        /* Half the samples in [2^-31, 2^21), around fp16's range, where its rounding happens. */
        if (i & 1) bits = (bits & 0x807fffffu) | ((uint32_t)(0x60 + (bits >> 24) % 0x34) << 23);
        float x = float_of(bits);
        if (isnan(x)) continue;
        double magnitude = fabs((double)x);

        uint16_t half = lq_float_to_fp16(x);
        int ok = (half & 0x8000) == ((bits >> 16) & 0x8000);
        uint16_t h = half & 0x7fff;
        if (magnitude >= 65520.0) {
            ok = ok && h == 0x7c00;
        } else if (h > 0x7bff) {
            ok = 0;
        } else {
            double distance = fabs(magnitude - fp16_reference(h));
            if (h > 0) ok = ok && distance <= fabs(magnitude - fp16_reference(h - 1));
            if (h < 0x7bff) ok = ok && distance <= fabs(magnitude - fp16_reference(h + 1));
            int tie = (h > 0 && distance == fabs(magnitude - fp16_reference(h - 1))) ||
                      (h < 0x7bff && distance == fabs(magnitude - fp16_reference(h + 1)));
            if (tie) ok = ok && (h & 1) == 0;
        }
#ifdef __FLT16_MAX__
        /* The compiler's own conversion (libgcc soft-float or F16C) as a second opinion. */
        __extension__ _Float16 compiler = (_Float16)x;
        uint16_t compiler_bits;
        memcpy(&compiler_bits, &compiler, sizeof compiler_bits);
        ok = ok && compiler_bits == half;
#endif
        uint16_t bf16 = lq_float_to_bf16(x);
        uint32_t b = bf16 & 0x7fffu;
        double bf16_value = fabs((double)float_of((uint32_t)bf16 << 16));
        if (b < 0x7f80) {
            double distance = fabs(magnitude - bf16_value);
            double below = b ? fabs(magnitude - float_of((b - 1) << 16)) : INFINITY;
            double above = b < 0x7f7f ? fabs(magnitude - float_of((b + 1) << 16)) : INFINITY;
            ok = ok && distance <= below && distance <= above;
            if (distance == below || distance == above) ok = ok && (b & 1) == 0;
        } else {
            ok = ok && b == 0x7f80 && (isinf(x) || (bits & 0x7fffffffu) >= 0x7f7f8000u);
        }
        if (!ok) {
            fprintf(stderr, "x = %.9g (%08x): fp16 %04x, bf16 %04x\n", x, bits, half, bf16);
            failures++;
        }
    }
    CHECK(failures == 0);
}

LQ_TEST_MAIN(LQ_TEST(test_fp16_all_patterns), LQ_TEST(test_bf16_all_patterns),
             LQ_TEST(test_fp16_round_to_nearest_even), LQ_TEST(test_bf16_round_to_nearest_even),
             LQ_TEST(test_fp16_overflow), LQ_TEST(test_fp16_subnormals),
             LQ_TEST(test_random_against_nearest))
