// The sample op's default device implementation (LQ_CUDA_SAMPLE=bisect picks sample_cuda.cu's
// bisection instead), cut for cut the same rules and the same results.
//
// The same cuts, found digit by digit: four passes per cut, each a shared-memory histogram of
// one 8-bit digit of the key over the tokens whose higher digits are the ones chosen so far
// (a count, or for the mass cuts the weights summed in 64-bit fixed point, whose integer sums
// are exact and so the same whatever order the atomics land in). The prefix sums over the 256
// buckets pick the digit. A fixed-point sum is not the bisection's double sum, so a mass cut
// found this way is then confirmed by one pass that computes mass_from(K) and mass_from(K + 1)
// exactly as the bisection does (same terms, same order, same reductions): the bisection's
// answer is the one K where they straddle the limit (mass_from only falls as K grows, each
// per-thread sum being a sum of non-negative terms in a fixed order), so when they do, K is
// its answer to the bit; when rounding puts them on one side (a limit within ~1e-12 of a step)
// the bisection itself runs on the half that holds the answer. The same pass gives
// mass_from(K + 1) and the count at K, which the cut inside the tie group needs. So the tokens
// and logprobs are the bisection's exactly, in about 15 passes instead of about 100; the row is
// copied once into shared memory when it fits (vocab 49152 does on an H100, 151936 does not:
// then the passes read it from L2).

#include "kernels/cuda/sample_cuda.cuh"

using namespace lq_sample_device;

namespace {

constexpr int kBuckets = 256; // one 8-bit digit of the key
constexpr int kUnroll = 4;    // loads in flight per thread in a histogram pass

struct radix_shared {
    unsigned long long mass[kBuckets];
    int count[kBuckets];
    unsigned long long above; // the picked bucket's result, for every thread
    int bucket;
};

// What a cut needs of F(K) (the count or fixed-point mass of the tokens with key >= K).
struct cut_rule {
    double limit, unit; // mass: passes(F · unit, limit, inclusive)
    long long k;        // count: F >= k
    bool inclusive;
};

template <bool kMass>
__device__ __forceinline__ bool rule_holds(unsigned long long f, const cut_rule &rule) {
    return kMass ? passes((double)f * rule.unit, rule.limit, rule.inclusive)
                 : (long long)f >= rule.k;
}

__device__ __forceinline__ unsigned long long warp_sum_ull(unsigned long long v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// Adds one token (bucket kBuckets: none) to the histogram. Every lane of the warp calls it.
// Lanes of one bucket add once where that is cheap: counts always; masses when the warp holds
// at most kGroupedBuckets buckets (typical of the first digits, where a few exponents hold most
// tokens), each summed over the warp. A 64-bit add to shared memory is a compare-and-swap
// loop on sm_90, so fewer of them on the same few addresses is what matters.
constexpr int kGroupedBuckets = 4;

template <bool kMass>
__device__ __forceinline__ void histogram_add(int bucket, unsigned long long value, int lane,
                                              radix_shared &r) {
    if (!__any_sync(0xffffffffu, bucket != kBuckets)) return; // the later digits, mostly
    unsigned peers = __match_any_sync(0xffffffffu, bucket);
    bool leader = bucket != kBuckets && lane == __ffs(peers) - 1;
    if (!kMass) {
        if (leader) atomicAdd(&r.count[bucket], __popc(peers));
        return;
    }
    unsigned leaders = __ballot_sync(0xffffffffu, leader);
    if (__popc(leaders) > kGroupedBuckets) {
        if (bucket != kBuckets) atomicAdd(&r.mass[bucket], value);
        return;
    }
    while (leaders) { // the same on every lane: one warp sum per bucket present
        int first = __ffs(leaders) - 1;
        leaders &= leaders - 1;
        int group = __shfl_sync(0xffffffffu, bucket, first);
        unsigned long long sum = warp_sum_ull(bucket == group ? value : 0ull);
        if (lane == 0) atomicAdd(&r.mass[group], sum);
    }
}

// Warp 0: the largest bucket b whose F (above + the buckets >= b) satisfies the rule (bucket 0
// always, below the first digit: the parent bucket satisfied it), into r.bucket and r.above
// (F of bucket b + 1); none: r.bucket = -1 and r.above = above + every bucket.
template <bool kMass>
__device__ void pick_bucket(radix_shared &r, unsigned long long above, bool first_digit,
                            const cut_rule &rule) {
    constexpr int kPerLane = kBuckets / 32;
    int lane = threadIdx.x;
    unsigned long long v[kPerLane], total = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; j++) {
        int b = lane * kPerLane + j;
        v[j] = kMass ? r.mass[b] : (unsigned long long)r.count[b];
        total += v[j];
    }
    unsigned long long suffix = total; // this lane's buckets and every later lane's
    for (int offset = 1; offset < 32; offset <<= 1) {
        unsigned long long other = __shfl_down_sync(0xffffffffu, suffix, offset);
        if (lane + offset < 32) suffix += other;
    }
    unsigned long long running = above + (suffix - total);
    int found = -1;
    unsigned long long found_above = 0;
#pragma unroll
    for (int j = kPerLane - 1; j >= 0; j--) {
        unsigned long long next = running;
        running += v[j];
        int b = lane * kPerLane + j;
        if (found < 0 && (rule_holds<kMass>(running, rule) || (!first_digit && b == 0)))
            found = b, found_above = next;
    }
    unsigned ballot = __ballot_sync(0xffffffffu, found >= 0);
    if (ballot == 0) {
        if (lane == 0) r.bucket = -1, r.above = above + suffix;
    } else if (lane == 31 - __clz(ballot)) {
        r.bucket = found, r.above = found_above;
    }
}

struct radix_cut {
    unsigned long long key;   // the largest K > low whose F satisfies the rule, or low
    unsigned long long above; // F(key + 1), counting only tokens with key > low
};

// The largest key K > low whose F(K) satisfies the rule (F monotone: falls as K grows), or
// low when none does; only tokens with key > low are looked at (F of keys <= low is moot).
template <bool kMass>
__device__ radix_cut radix_select(const float *row, int vocab, unsigned long long low,
                                  const cut_rule &rule, float max, float temperature,
                                  radix_shared &r) {
    const int lane = threadIdx.x & 31;
    const double scale = 1.0 / rule.unit;
    unsigned long long prefix = 0, above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < kBuckets; b += kThreads) {
            if (kMass)
                r.mass[b] = 0;
            else
                r.count[b] = 0;
        }
        __syncthreads(); // cleared; the previous digit's r.bucket has been read
        const unsigned long long high_digits = prefix >> (shift + 8);
        // base is the same for the whole warp, so every lane calls histogram_add together
        for (int base = threadIdx.x & ~31; base < vocab; base += kUnroll * kThreads) {
            float x[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; u++) {
                int i = base + u * kThreads + lane;
                x[u] = i < vocab ? row[i] : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < kUnroll; u++) {
                int bucket = kBuckets;
                unsigned long long value = 0;
                if (base + u * kThreads + lane < vocab) {
                    float clean_x = clean(x[u]);
                    unsigned key = key_of(clean_x);
                    if (key > low && ((unsigned long long)key >> (shift + 8)) == high_digits) {
                        bucket = (int)((key >> shift) & (kBuckets - 1));
                        if (kMass)
                            value = __double2ull_rn((double)weight_of(clean_x, max, temperature) *
                                                    scale);
                    }
                }
                histogram_add<kMass>(bucket, value, lane, r);
            }
        }
        __syncthreads();
        if (threadIdx.x < 32) pick_bucket<kMass>(r, above, shift == 24, rule);
        __syncthreads();
        int bucket = r.bucket;
        above = r.above;
        if (bucket < 0) return radix_cut{low, above}; // only at the first digit
        prefix |= (unsigned long long)bucket << shift;
    }
    return radix_cut{prefix, above};
}

// A mass cut as search_mass finds it, with what cut_in_group needs from the same pass.
struct mass_cut {
    unsigned long long key;
    double above;    // mass_from(key + 1)
    long long count; // count_at(key)
};

// search_mass(low, high, limit) to the bit: radix select, then the confirming pass (above).
__device__ mass_cut search_mass_radix(const float *row, int vocab, unsigned long long low,
                                      unsigned long long high, double limit, bool inclusive,
                                      float max, float temperature, block_shared &s,
                                      radix_shared &r) {
    int bits = 32 - __clz(vocab); // F < vocab · 2^(62 - bits) < 2^62: no overflow
    cut_rule rule = {limit, ldexp(1.0, bits - 62), 0, inclusive};
    unsigned long long key = radix_select<true>(row, vocab, low, rule, max, temperature, r).key;
    double from_key = 0.0, after_key = 0.0; // mass_from(key), mass_from(key + 1): same order
    int at_key = 0;
#pragma unroll 4
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        float x = clean(row[i]);
        unsigned long long k = key_of(x);
        if (k >= key) {
            double w = (double)weight_of(x, max, temperature);
            from_key += w;
            if (k > key) after_key += w;
        }
        at_key += k == key;
    }
    from_key = block_sum(from_key, s);
    after_key = block_sum(after_key, s);
    at_key = block_sum_int(at_key, s);
    bool from_passes = passes(from_key, limit, inclusive);
    bool after_passes = key + 1 < high && passes(after_key, limit, inclusive);
    if ((key == low || from_passes) && !after_passes) return mass_cut{key, after_key, at_key};
    // rounding put the fixed-point answer one side of the exact one: bisect the right half
    if (key > low && !from_passes)
        key = search_mass(row, vocab, low, key, limit, inclusive, max, temperature, s);
    else
        key = search_mass(row, vocab, key + 1, high, limit, inclusive, max, temperature, s);
    return mass_cut{key, mass_from(row, vocab, key + 1, max, temperature, s),
                    count_at(row, vocab, key, s)};
}

// cut_in_group from a mass_cut's sums (no pass).
__device__ prefix cut_from(const mass_cut &c, long long max_ties, double limit, bool inclusive,
                           float max, float temperature) {
    long long count = c.count > max_ties ? max_ties : c.count;
    double w = count > 0 ? (double)weight_of(value_of((unsigned)c.key), max, temperature) : 0.0;
    return prefix{c.key, tie_needed(c.above, w, count, limit, inclusive)};
}

// prefix_mass in one pass (the same two sums, the same order).
__device__ double prefix_mass_fused(const float *row, int vocab, prefix p, float max,
                                    float temperature, block_shared &s) {
    double mass = 0.0;
    int at_key = 0;
#pragma unroll 4
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        float x = clean(row[i]);
        unsigned long long k = key_of(x);
        if (k >= p.key + 1) mass += (double)weight_of(x, max, temperature);
        at_key += k == p.key;
    }
    mass = block_sum(mass, s);
    long long count = block_sum_int(at_key, s);
    if (count > p.ties) count = p.ties;
    if (count > 0)
        mass += (double)count * (double)weight_of(value_of((unsigned)p.key), max, temperature);
    return mass;
}

// select_tie with the search spread over the block: each warp counts a contiguous span of ids
// (lanes reading neighbours: coalesced, and free of the bank conflicts a span per thread would
// hit in shared memory), and the one warp whose span holds the j-th walks it 32 ids at a time.
// Same answer (-1 when j < 1 or past the group).
__device__ int select_tie_scan(const float *row, int vocab, unsigned long long key, long long j,
                               block_shared &s) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int span = ((vocab + kWarps - 1) / kWarps + 31) & ~31;
    int begin = warp * span, end = min(begin + span, vocab);
    int count = 0;
    for (int i = begin + lane; i < end; i += 32)
        count += (unsigned long long)key_of(clean(row[i])) == key;
    count = warp_sum(count);
    __syncthreads(); // the previous select's `found` has been read
    if (lane == 0) s.chunk_counts[warp] = count;
    if (threadIdx.x == 0) s.found = -1;
    __syncthreads();
    long long before = 0;
    for (int w = 0; w < warp; w++) before += s.chunk_counts[w];
    int in_span = s.chunk_counts[warp];
    if (j > before && j <= before + in_span) { // one warp, all its lanes
        for (int base = begin; base < end; base += 32) {
            int i = base + lane;
            bool hit = i < end && (unsigned long long)key_of(clean(row[i])) == key;
            unsigned hits = __ballot_sync(0xffffffffu, hit);
            if (before + __popc(hits) >= j) { // the (j - before)-th hit of these 32
                if (hit && __popc(hits & ((1u << lane) - 1u)) == (int)(j - before) - 1) s.found = i;
                break;
            }
            before += __popc(hits);
        }
    }
    __syncthreads();
    return s.found;
}

// sample_tempered with the radix cuts; every branch as there. finite_count: count_from(-FLT_MAX).
__device__ int sample_tempered_radix(const float *row, int vocab, const device_row &p,
                                     unsigned max_key, int argmax, int finite_count,
                                     block_shared &s, radix_shared &r) {
    float max = value_of(max_key), t = p.temperature;
    unsigned long long past_max = (unsigned long long)max_key + 1;
    prefix candidates = {0, kAllTies};
    unsigned long long finite_key = key_of(-FLT_MAX);
    if (p.top_k > 0 && p.top_k < vocab && finite_count >= p.top_k) {
        cut_rule rule = {0.0, 0.0, p.top_k, false};
        radix_cut c = radix_select<false>(row, vocab, finite_key, rule, max, t, r);
        candidates = prefix{c.key, (long long)p.top_k - (long long)c.above};
    }
    prefix nucleus = candidates;
    if (p.top_p < 1.0f) {
        double limit = (double)p.top_p * prefix_mass_fused(row, vocab, candidates, max, t, s);
        mass_cut c =
            search_mass_radix(row, vocab, candidates.key, past_max, limit, true, max, t, s, r);
        if (c.key > candidates.key) {
            nucleus = cut_from(c, kAllTies, limit, true, max, t);
            if (nucleus.ties == 0) nucleus.ties = kAllTies;
        } else {
            nucleus = cut_from(c, candidates.ties, limit, true, max, t);
            if (nucleus.ties == 0) nucleus = candidates;
        }
    }
    prefix kept = prefix{key_of(min_p_threshold(max, p)), kAllTies};
    if (shorter(nucleus, kept)) kept = nucleus;

    double target = p.u * prefix_mass_fused(row, vocab, kept, max, t, s);
    mass_cut c = search_mass_radix(row, vocab, kept.key, past_max, target, false, max, t, s, r);
    if (c.key > kept.key) {
        prefix cut = cut_from(c, kAllTies, target, false, max, t);
        long long j = cut.ties > 0 ? cut.ties : c.count;
        int token = select_tie_scan(row, vocab, c.key, j, s);
        return token >= 0 ? token : argmax;
    }
    prefix cut = cut_from(c, kept.ties, target, false, max, t);
    if (cut.ties > 0) {
        int token = select_tie_scan(row, vocab, kept.key, cut.ties, s);
        return token >= 0 ? token : argmax;
    }
    // u · total rounded up to total (rare): as sample_tempered (c.count: count_at(kept.key))
    return last_weighted_token(row, vocab, kept, c.count, max, t, argmax, s,
                               [&](unsigned long long key, long long j) {
                                   return select_tie_scan(row, vocab, key, j, s);
                               });
}

// sample_kernel with the radix cuts. row_in_shared: the dynamic shared memory holds vocab
// floats, and the row is copied there (cleaned) by the first pass.
__global__ void __launch_bounds__(kThreads)
    sample_radix_kernel(const float *logits, int vocab, long long stride, const device_row *rows,
                        int *tokens, float *logprobs, int row_in_shared) {
    __shared__ block_shared s;
    __shared__ radix_shared r;
    extern __shared__ float shared_row[];
    const float *global_row = logits + (long long)blockIdx.x * stride;
    const device_row p = rows[blockIdx.x];
    const unsigned finite_key = key_of(-FLT_MAX);
    unsigned long long best = 0;
    int finite = 0;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        float x = clean(global_row[i]);
        if (row_in_shared) shared_row[i] = x;
        unsigned key = key_of(x);
        finite += key >= finite_key;
        unsigned long long packed = ((unsigned long long)key << 32) | (0xffffffffu - (unsigned)i);
        best = packed > best ? packed : best;
    }
    best = block_max(best, s); // its barriers also publish shared_row
    int finite_count = block_sum_int(finite, s);
    const float *row = row_in_shared ? shared_row : global_row;
    unsigned max_key = (unsigned)(best >> 32);
    int argmax = (int)(0xffffffffu - (unsigned)(best & 0xffffffffu));
    float max = value_of(max_key);
    int token = argmax;
    if (max > -INFINITY && p.temperature > 0.0f)
        token = sample_tempered_radix(row, vocab, p, max_key, argmax, finite_count, s, r);
    if (logprobs) store_logprob(row, vocab, max, token, s, logprobs);
    if (threadIdx.x == 0) tokens[blockIdx.x] = token;
}

} // namespace

// The row goes to shared memory when it fits beside the static shared memory within the
// device's opt-in limit (vocab 49152: 192 KiB of an H100's 227 KiB).
cudaError_t lq_cuda_sample_radix_launch(struct lq_cuda *cuda, const float *logits, int n, int vocab,
                                        int stride, const device_row *rows, int *tokens,
                                        float *logprobs) {
    int optin = 0;
    cudaFuncAttributes attributes;
    cudaError_t status =
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cuda->device);
    if (status == cudaSuccess) status = cudaFuncGetAttributes(&attributes, sample_radix_kernel);
    if (status != cudaSuccess) return status;
    size_t row_bytes = (size_t)vocab * sizeof(float);
    int in_shared = attributes.sharedSizeBytes + row_bytes <= (size_t)optin;
    size_t dynamic = in_shared ? row_bytes : 0;
    if (in_shared)
        status = cudaFuncSetAttribute(sample_radix_kernel,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dynamic);
    if (status != cudaSuccess) return status;
    sample_radix_kernel<<<n, kThreads, dynamic, cuda->stream>>>(logits, vocab, stride, rows, tokens,
                                                                logprobs, in_shared);
    return cudaGetLastError();
}
