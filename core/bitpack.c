#include "bitpack.h"

#include <string.h>

size_t lq_bitpack_bytes(size_t count, int bits) {
    return (count * (size_t)bits + 7) / 8;
}

void lq_bitpack_pack(const uint8_t *codes, size_t count, int bits, uint8_t *out) {
    size_t bytes = lq_bitpack_bytes(count, bits);
    if (bits == 8) {
        memcpy(out, codes, count);
        return;
    }
    memset(out, 0, bytes);
    /* A 64-bit accumulator flushes whole bytes as they fill: one pass, no read-modify-write. */
    uint64_t accumulator = 0;
    unsigned filled = 0;
    size_t written = 0;
    uint64_t mask = (1u << bits) - 1u;
    for (size_t i = 0; i < count; i++) {
        accumulator |= ((uint64_t)codes[i] & mask) << filled;
        filled += (unsigned)bits;
        while (filled >= 8) {
            out[written++] = (uint8_t)accumulator;
            accumulator >>= 8;
            filled -= 8;
        }
    }
    if (filled > 0) out[written] = (uint8_t)accumulator;
}

void lq_bitpack_unpack(const uint8_t *packed, size_t first, size_t count, int bits,
                       uint8_t *codes) {
    if (bits == 8) {
        memcpy(codes, packed + first, count);
        return;
    }
    size_t bit = first * (size_t)bits;
    size_t byte = bit >> 3;
    unsigned available = 0;
    uint64_t accumulator = 0;
    unsigned skip = (unsigned)(bit & 7);
    uint64_t mask = (1u << bits) - 1u;
    size_t end_byte = lq_bitpack_bytes(first + count, bits);
    for (size_t i = 0; i < count; i++) {
        while (available < (unsigned)bits + skip && byte < end_byte) {
            accumulator |= (uint64_t)packed[byte++] << available;
            available += 8;
        }
        if (skip) {
            accumulator >>= skip;
            available -= skip;
            skip = 0;
        }
        codes[i] = (uint8_t)(accumulator & mask);
        accumulator >>= bits;
        available -= (unsigned)bits;
    }
}
