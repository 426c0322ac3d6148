/* IEEE binary16 (fp16) and bfloat16 conversions, round-to-nearest-even, as torch and
 * safetensors use them. Header-only because they sit in inner loops. */
#ifndef LQ_HALF_H
#define LQ_HALF_H

#include <stdint.h>
#include <string.h>

static inline uint32_t lq_float_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static inline float lq_bits_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline float lq_bf16_to_float(uint16_t bf16) {
    return lq_bits_float((uint32_t)bf16 << 16);
}

static inline uint16_t lq_float_to_bf16(float value) {
    uint32_t bits = lq_float_bits(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)((bits + rounding) >> 16);
}

static inline float lq_fp16_to_float(uint16_t half) {
    uint32_t sign = (uint32_t)(half & 0x8000u) << 16;
    uint32_t exponent = (half >> 10) & 0x1fu;
    uint32_t mantissa = half & 0x3ffu;
    if (exponent == 0x1f) return lq_bits_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
        /* zero or subnormal: mantissa * 2^-24 is exact in float */
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return lq_bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

static inline uint16_t lq_float_to_fp16(float value) {
    uint32_t bits = lq_float_bits(value);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return sign | 0x7e00u;  /* NaN */
    if (magnitude >= 0x477ff000u) return sign | 0x7c00u; /* rounds to >= 65520: inf */
    if (magnitude < 0x38800000u) {                       /* below 2^-14: subnormal */
        /* Adding 0.5 makes the FPU round the mantissa to a multiple of 2^-24 (nearest even). */
        float shifted = lq_bits_float(magnitude) + 0.5f;
        return sign | (uint16_t)(lq_float_bits(shifted) - lq_float_bits(0.5f));
    }
    uint32_t odd = (magnitude >> 13) & 1u;
    magnitude += 0xc8000fffu + odd; /* rebias exponent (-112 << 23) and round to nearest even */
    return sign | (uint16_t)(magnitude >> 13);
}

#endif
