/* Dense bit packing of small unsigned codes: `bits`-wide codes are laid out back to back,
 * least significant bit first, with no padding between codes. So 3-bit codes take 8 to
 * 3 bytes and a stream of n codes takes ceil(n * bits / 8) bytes. */
#ifndef LQ_BITPACK_H
#define LQ_BITPACK_H

#include <stddef.h>
#include <stdint.h>

/* Bytes a stream of `count` codes of `bits` (1..8) bits occupies. */
size_t lq_bitpack_bytes(size_t count, int bits);

/* Packs codes[0..count) (each < 2^bits) into out (lq_bitpack_bytes(count, bits) bytes,
 * fully written, trailing bits of the last byte zero). */
void lq_bitpack_pack(const uint8_t *codes, size_t count, int bits, uint8_t *out);

/* Unpacks `count` codes starting at code index `first` of the packed stream. */
void lq_bitpack_unpack(const uint8_t *packed, size_t first, size_t count, int bits, uint8_t *codes);

/* Reads code `index` of the packed stream. */
static inline unsigned lq_bitpack_get(const uint8_t *packed, size_t index, int bits) {
    size_t bit = index * (size_t)bits;
    size_t byte = bit >> 3;
    unsigned shift = (unsigned)(bit & 7);
    unsigned window = packed[byte];
    if (shift + (unsigned)bits > 8) window |= (unsigned)packed[byte + 1] << 8;
    return (window >> shift) & ((1u << bits) - 1u);
}

#endif
