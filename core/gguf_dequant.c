/* ggml tensor types: their block geometry, and dequantization of the common ones to float.
 *
 * The block layouts follow ggml's format definitions (ggml-common.h): a block of `block_size`
 * values takes `block_bytes` bytes, little-endian, fp16 scales stored as IEEE binary16.
 * Each formula is computed with the operations ggml's reference dequantization uses, in the
 * same order and with each product rounded to float before the next operation (separate
 * statements, so that no compiler may contract them into a fused multiply-add): the results
 * are then the same floats ggml (and gguf-py, which mirrors it) produce, bit for bit. */
#include <stdint.h>
#include <string.h>

#include "core/gguf.h"
#include "core/gguf_internal.h"
#include "core/half.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "GGUF data is little-endian and is copied here as host-order numbers"
#endif

#define QK_K 256 /* values per K-quant super-block */

static const struct {
    const char *name;
    uint32_t block_size, block_bytes;
} type_table[] = {
    [LQ_GGML_F32] = {"F32", 1, 4},
    [LQ_GGML_F16] = {"F16", 1, 2},
    [LQ_GGML_Q4_0] = {"Q4_0", 32, 18},
    [LQ_GGML_Q4_1] = {"Q4_1", 32, 20},
    [LQ_GGML_Q5_0] = {"Q5_0", 32, 22},
    [LQ_GGML_Q5_1] = {"Q5_1", 32, 24},
    [LQ_GGML_Q8_0] = {"Q8_0", 32, 34},
    /* ggml's block_q8_1 is two fp16 (d, s) and 32 int8; it is a compute type, never seen in
     * model files, so its size only matters for refusing it cleanly. */
    [LQ_GGML_Q8_1] = {"Q8_1", 32, 36},
    [LQ_GGML_Q2_K] = {"Q2_K", QK_K, 84},
    [LQ_GGML_Q3_K] = {"Q3_K", QK_K, 110},
    [LQ_GGML_Q4_K] = {"Q4_K", QK_K, 144},
    [LQ_GGML_Q5_K] = {"Q5_K", QK_K, 176},
    [LQ_GGML_Q6_K] = {"Q6_K", QK_K, 210},
    [LQ_GGML_Q8_K] = {"Q8_K", QK_K, 292},
    [16] = {"IQ2_XXS", QK_K, 66},
    [17] = {"IQ2_XS", QK_K, 74},
    [18] = {"IQ3_XXS", QK_K, 98},
    [19] = {"IQ1_S", QK_K, 50},
    [20] = {"IQ4_NL", 32, 18},
    [21] = {"IQ3_S", QK_K, 110},
    [22] = {"IQ2_S", QK_K, 82},
    [23] = {"IQ4_XS", QK_K, 136},
    [24] = {"I8", 1, 1},
    [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},
    [27] = {"I64", 1, 8},
    [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", QK_K, 56},
    [LQ_GGML_BF16] = {"BF16", 1, 2},
    [34] = {"TQ1_0", QK_K, 54},
    [35] = {"TQ2_0", QK_K, 66},
    [39] = {"MXFP4", 32, 17},
    [40] = {"NVFP4", 64, 36},
    [41] = {"Q1_0", 128, 18},
};
#define TYPE_COUNT (sizeof type_table / sizeof type_table[0])

const char *lq_ggml_type_name(uint32_t type) {
    return type < TYPE_COUNT && type_table[type].name ? type_table[type].name : "?";
}

uint32_t lq_ggml_type_block_size(uint32_t type) {
    return type < TYPE_COUNT ? type_table[type].block_size : 0;
}

uint32_t lq_ggml_type_block_bytes(uint32_t type) {
    return type < TYPE_COUNT ? type_table[type].block_bytes : 0;
}

bool lq_ggml_type_is_readable(uint32_t type) {
    switch (type) {
    case LQ_GGML_F32:
    case LQ_GGML_F16:
    case LQ_GGML_BF16:
    case LQ_GGML_Q8_0:
    case LQ_GGML_Q4_0:
    case LQ_GGML_Q4_1:
    case LQ_GGML_Q4_K:
    case LQ_GGML_Q5_K:
    case LQ_GGML_Q6_K:
        return true;
    default:
        return false;
    }
}

static inline float half_at(const uint8_t *p) {
    return lq_fp16_to_float((uint16_t)(p[0] | (p[1] << 8)));
}

/* Q8_0: d (fp16), 32 int8 codes; value = code * d. */
static void dequant_q8_0(const uint8_t *block, float *y) {
    float d = half_at(block);
    for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)block[2 + j] * d;
}

/* Q4_0: d (fp16), 16 bytes of nibbles; low nibbles are values 0..15, high ones 16..31;
 * value = (nibble - 8) * d. */
static void dequant_q4_0(const uint8_t *block, float *y) {
    float d = half_at(block);
    const uint8_t *qs = block + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = (float)((qs[j] & 0x0f) - 8) * d;
        y[j + 16] = (float)((qs[j] >> 4) - 8) * d;
    }
}

/* Q4_1: d, m (fp16), 16 bytes of nibbles laid out as in Q4_0; value = nibble * d + m. */
static void dequant_q4_1(const uint8_t *block, float *y) {
    float d = half_at(block), m = half_at(block + 2);
    const uint8_t *qs = block + 4;
    for (int j = 0; j < 16; j++) {
        float low = (float)(qs[j] & 0x0f) * d;
        float high = (float)(qs[j] >> 4) * d;
        y[j] = low + m;
        y[j + 16] = high + m;
    }
}

/* The 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes of Q4_K/Q5_K:
 * sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scale) and 4-7 (min);
 * sub-blocks 4-7 combine a nibble of bytes 8-11 with the top 2 bits of bytes 0-7. */
static void k_scale_min(int j, const uint8_t *packed, uint8_t *scale, uint8_t *min) {
    if (j < 4) {
        *scale = packed[j] & 63;
        *min = packed[j + 4] & 63;
    } else {
        *scale = (uint8_t)((packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4));
        *min = (uint8_t)((packed[j + 4] >> 4) | ((packed[j] >> 6) << 4));
    }
}

/* Q4_K: d, dmin (fp16), 12 bytes of packed 6-bit scales/mins for 8 sub-blocks of 32, then
 * 128 bytes of nibbles: each 32-byte run holds two sub-blocks (low nibbles, then high).
 * value = (d * scale) * nibble - (dmin * min). */
static void dequant_q4_k(const uint8_t *block, float *y) {
    float d = half_at(block), dmin = half_at(block + 2);
    const uint8_t *packed = block + 4, *qs = block + 16;
    for (int pair = 0; pair < 4; pair++) {
        uint8_t scale_low, min_low, scale_high, min_high;
        k_scale_min(2 * pair, packed, &scale_low, &min_low);
        k_scale_min(2 * pair + 1, packed, &scale_high, &min_high);
        float d_low = d * (float)scale_low, m_low = dmin * (float)min_low;
        float d_high = d * (float)scale_high, m_high = dmin * (float)min_high;
        for (int l = 0; l < 32; l++) {
            float scaled = d_low * (float)(qs[l] & 0x0f);
            y[l] = scaled - m_low;
        }
        for (int l = 0; l < 32; l++) {
            float scaled = d_high * (float)(qs[l] >> 4);
            y[32 + l] = scaled - m_high;
        }
        qs += 32;
        y += 64;
    }
}

/* Q5_K: as Q4_K with a fifth bit per value from 32 bytes of qh (bit 2*pair for the low
 * sub-block of pair, bit 2*pair+1 for the high one) that adds 16. Layout: d, dmin, 12 bytes
 * of scales, qh[32], qs[128]. */
static void dequant_q5_k(const uint8_t *block, float *y) {
    float d = half_at(block), dmin = half_at(block + 2);
    const uint8_t *packed = block + 4, *qh = block + 16, *qs = block + 48;
    for (int pair = 0; pair < 4; pair++) {
        uint8_t scale_low, min_low, scale_high, min_high;
        k_scale_min(2 * pair, packed, &scale_low, &min_low);
        k_scale_min(2 * pair + 1, packed, &scale_high, &min_high);
        float d_low = d * (float)scale_low, m_low = dmin * (float)min_low;
        float d_high = d * (float)scale_high, m_high = dmin * (float)min_high;
        uint8_t bit_low = (uint8_t)(1u << (2 * pair)), bit_high = (uint8_t)(2u << (2 * pair));
        for (int l = 0; l < 32; l++) {
            int q = (qs[l] & 0x0f) + ((qh[l] & bit_low) ? 16 : 0);
            float scaled = d_low * (float)q;
            y[l] = scaled - m_low;
        }
        for (int l = 0; l < 32; l++) {
            int q = (qs[l] >> 4) + ((qh[l] & bit_high) ? 16 : 0);
            float scaled = d_high * (float)q;
            y[32 + l] = scaled - m_high;
        }
        qs += 32;
        y += 64;
    }
}

/* Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), 16 int8 scales (one per 16 values), d
 * (fp16). Each half of 128 values takes 64 bytes of ql and 32 of qh; within a half, value
 * l + 32*k (k = 0..3) takes the low or high nibble of ql[l] or ql[l+32] and bits 2k..2k+1 of
 * qh[l]; value = (d * scale) * (q - 32). */
static void dequant_q6_k(const uint8_t *block, float *y) {
    const uint8_t *ql = block, *qh = block + 128;
    const int8_t *scales = (const int8_t *)(block + 192);
    float d = half_at(block + 208);
    for (int half = 0; half < 2; half++) {
        for (int l = 0; l < 32; l++) {
            int s = l / 16;
            int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
            int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            float d1 = d * (float)scales[s], d2 = d * (float)scales[s + 2];
            float d3 = d * (float)scales[s + 4], d4 = d * (float)scales[s + 6];
            y[l] = d1 * (float)q1;
            y[l + 32] = d2 * (float)q2;
            y[l + 64] = d3 * (float)q3;
            y[l + 96] = d4 * (float)q4;
        }
        y += 128;
        ql += 64;
        qh += 32;
        scales += 8;
    }
}

void lq_gguf_dequantize(uint32_t type, const uint8_t *source, uint64_t numel, float *out) {
    switch (type) {
    case LQ_GGML_F32:
        memcpy(out, source, (size_t)numel * sizeof(float));
        return;
    case LQ_GGML_F16:
    case LQ_GGML_BF16:
        for (uint64_t i = 0; i < numel; i++) {
            uint16_t bits = (uint16_t)(source[2 * i] | (source[2 * i + 1] << 8));
            out[i] = type == LQ_GGML_BF16 ? lq_bf16_to_float(bits) : lq_fp16_to_float(bits);
        }
        return;
    default:
        break;
    }
    void (*block_function)(const uint8_t *, float *) = NULL;
    switch (type) {
    case LQ_GGML_Q8_0:
        block_function = dequant_q8_0;
        break;
    case LQ_GGML_Q4_0:
        block_function = dequant_q4_0;
        break;
    case LQ_GGML_Q4_1:
        block_function = dequant_q4_1;
        break;
    case LQ_GGML_Q4_K:
        block_function = dequant_q4_k;
        break;
    case LQ_GGML_Q5_K:
        block_function = dequant_q5_k;
        break;
    case LQ_GGML_Q6_K:
        block_function = dequant_q6_k;
        break;
    default:
        return; /* the caller checked lq_ggml_type_is_readable */
    }
    uint32_t block_size = type_table[type].block_size, block_bytes = type_table[type].block_bytes;
    uint64_t blocks = numel / block_size;
    for (uint64_t b = 0; b < blocks; b++)
        block_function(source + b * block_bytes, out + b * block_size);
}
