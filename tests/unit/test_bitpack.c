#include "core/bitpack.h"
#include "core/rng.h"
#include "tests/unit/lq_test.h"

#include <stdint.h>

static void test_sizes(void) {
    CHECK(lq_bitpack_bytes(8, 3) == 3); /* 3-bit codes pack 8 to 3 bytes */
    CHECK(lq_bitpack_bytes(9, 3) == 4);
    CHECK(lq_bitpack_bytes(16, 4) == 8);
    CHECK(lq_bitpack_bytes(4, 2) == 1);
    CHECK(lq_bitpack_bytes(5, 8) == 5);
    CHECK(lq_bitpack_bytes(0, 3) == 0);
}

static void test_known_layout(void) {
    /* codes 1..8 at 3 bits, LSB first: bits 001 010 011 100 101 110 111 000 */
    uint8_t codes[8] = {1, 2, 3, 4, 5, 6, 7, 0};
    uint8_t packed[3];
    lq_bitpack_pack(codes, 8, 3, packed);
    /* byte0 = 1 | 2<<3 | (3&3)<<6 = 0xd1; byte1 = 3>>2 | 4<<1 | 5<<4 | (6&1)<<7 = 0x58;
     * byte2 = 6>>1 | 7<<2 | 0<<5 = 0x1f */
    CHECK(packed[0] == 0xd1);
    CHECK(packed[1] == 0x58);
    CHECK(packed[2] == 0x1f);
}

static void test_round_trip_every_width(void) {
    struct lq_rng rng;
    lq_rng_seed(&rng, 7);
    for (int bits = 1; bits <= 8; bits++) {
        for (size_t count = 0; count < 200; count += 13) {
            uint8_t codes[200], back[200], packed[200];
            for (size_t i = 0; i < count; i++)
                codes[i] = (uint8_t)(lq_rng_next(&rng) & ((1u << bits) - 1u));
            lq_bitpack_pack(codes, count, bits, packed);
            lq_bitpack_unpack(packed, 0, count, bits, back);
            int same = 1;
            for (size_t i = 0; i < count; i++) same &= codes[i] == back[i];
            CHECK_MSG(same, "bits %d count %zu", bits, count);
            for (size_t i = 0; i < count; i++)
                if (lq_bitpack_get(packed, i, bits) != codes[i]) same = 0;
            CHECK_MSG(same, "get: bits %d count %zu", bits, count);
            /* unused high bits of the last byte stay zero: packing wastes nothing */
            size_t used_bits = count * (size_t)bits;
            if (used_bits % 8) CHECK(packed[used_bits / 8] >> (used_bits % 8) == 0);
            /* a window from the middle of the stream */
            if (count > 20) {
                lq_bitpack_unpack(packed, 7, count - 9, bits, back);
                for (size_t i = 0; i < count - 9; i++) same &= back[i] == codes[i + 7];
                CHECK_MSG(same, "window: bits %d count %zu", bits, count);
            }
        }
    }
}

LQ_TEST_MAIN(LQ_TEST(test_sizes), LQ_TEST(test_known_layout), LQ_TEST(test_round_trip_every_width))
