// n / d for n < 2^31 and d <= 2^16 as one 32x32-bit multiply and a shift: with 2^s >= d and
// m = ceil(2^(31+s) / d) < 2^32, floor(n·m / 2^(31+s)) is exact for every such n. The decode
// kernels divide chunk and block indices by B0/32, B0 and B1 this way (an integer division is
// a long instruction sequence on the GPU). C as well as CUDA (tests/unit runs kernels that use
// it on the CPU).
#ifndef LQ_DIVISOR_H
#define LQ_DIVISOR_H

#include <stdint.h>

#ifdef __CUDACC__
#define LQ_DIVISOR_FN __host__ __device__ __forceinline__ static
#else
#define LQ_DIVISOR_FN static inline
#endif

struct lq_divisor {
    uint32_t multiplier, shift;
};

LQ_DIVISOR_FN struct lq_divisor lq_make_divisor(uint32_t d) {
    uint32_t s = 0;
    while (((uint64_t)1 << s) < d) s++;
    const uint64_t scale = (uint64_t)1 << (31 + s);
    struct lq_divisor out;
    out.multiplier = (uint32_t)((scale + d - 1) / d);
    out.shift = 31 + s;
    return out;
}

LQ_DIVISOR_FN uint32_t lq_div(uint32_t n, struct lq_divisor d) {
    uint32_t q = (uint32_t)(((uint64_t)n * d.multiplier) >> d.shift);
#ifdef __CUDA_ARCH__
    // Opaque to the compiler: seeing a 64-bit value cut to 32 bits, it built an address from
    // the quotient in 64 bits (shift, mask and carry: 6 instructions where a 32-bit quotient
    // takes one wide multiply-add; tests/bench/sass_loop.py on the one-token kernel).
    asm("" : "+r"(q));
#endif
    return q;
}

#endif
