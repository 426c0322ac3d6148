// The LQ decomposition W ≈ Q + L1·L2 (LQ-LoRA Algorithm 2, core/lq.c) on the GPU.
//
// Design
//   * One decomposition runs on one worker context (struct dec): its own non-blocking stream,
//     cuBLAS handle (with a counted workspace of its own, which keeps cuBLAS's results
//     reproducible with several streams active) and cuSOLVER handle, and its device buffers,
//     carved from one allocation counted under LQ_CUDA_JOBS. What every worker only reads (W,
//     the Fisher data and weights, the sketch's jump matrices) is uploaded once per call into
//     a shared context (struct dec_shared). Nothing is shared with the backend's ops, so no
//     lock is taken.
//   * lq_cuda_decompose_errors runs K workers at once: the calling thread and K − 1 pthreads,
//     each pulling the next configuration index from a shared counter and writing its error
//     by index, so the results are those of running the configurations one after another
//     (each is independent and deterministic). The first failure stops the others between
//     steps and is returned with its message. K = min(8, configurations, what fits in half
//     of the free device memory — and in the backend's limit — at the measured size of a
//     worker); the environment variable LQ_CUDA_DECOMPOSE_STREAMS=N sets K = min(N, 64,
//     configurations) instead. A worker beyond the first that cannot be set up (memory) is
//     dropped and the others go on. With several workers a step's wait blocks the thread
//     (cudaEventBlockingSync) instead of spinning, so the host threads leave the CPU free.
//     lq_cuda_decompose is one worker on the calling thread.
//   * Matrices stay row-major on the device. cuBLAS is column-major, so a row-major m x n
//     matrix is used as the column-major n x m matrix (its transpose); the thin sketch
//     matrices (Y, Z, ...) are kept column-major because cuSOLVER's QR wants them so.
//   * One step is queued without a host wait: the randomized SVD of R = W − Q (weighted),
//     L1, L2, L1·L2, then one pass that sums the half-step error ||W − Q_old − L1L2|| and,
//     when B0 divides 256, also takes the quantizer's block absmax of W − L1L2 (formed in
//     registers, never stored), then the NF pipeline (nf_cuda.cuh) whose last kernel reads
//     W and L1L2 again, writes Q, sums the full-step error and writes the next step's
//     residual R = W − Q (weighted). The half-step pass and that last kernel move 4 values a
//     thread with 16-byte loads and stores (dec_half_step_vec4_kernel,
//     lq_nf_values_vec4_kernel) where the shape allows, or, with
//     LQ_CUDA_DECOMPOSE_NF_VALUES=team, one value a thread as before (the same Q bit for
//     bit; the errors are summed in another fixed order). Errors and ||W|| are sums of double terms
//     per thread, reduced per thread block and then in one block in a fixed order, so a step is
//     deterministic (the CPU also sums in double; only the order differs). The step ends
//     with one copy of a small status (the sums, solver infos, the first bad value, the
//     first overflowing group, the sketch's fix-ups) and one wait: the stopping rule needs
//     the error, and the candidate bookkeeping runs on the host as in lq.c.
//   * The Gaussian sketch is drawn on the device, equal bit for bit to what core's rng gives
//     svd.c (lq_rng_fill_normal with the step's seed): each thread starts at its place in
//     the xoshiro256** stream by GF(2) jump matrices (computed once from core's lq_rng_next)
//     and does Box-Muller in double as rng.c does. The block kernel (the default) lets one
//     warp per 2048 values jump (by lookup tables built from the matrices: 32 independent
//     loads a jump) and walk the integer stream into shared memory, then the whole block
//     does the Box-Muller pairs, consecutive threads on consecutive pairs; the old kernel,
//     one thread per 64 values with a column-by-column jump (0.35 ms a sketch on the H100:
//     a few thousand threads, each waiting on hundreds of dependent loads and 32 serial
//     pairs), stays selectable with LQ_CUDA_DECOMPOSE_SKETCH_KERNEL=thread. The device's log/sincos
//     may differ from the host's libm in the last bits (a few ulps are documented on both sides),
//     which changes the float only when the double lies within 2^-46 (relative) of a float rounding
//     boundary; those rare pairs (about one in 10^6) are listed in the status with their xoshiro
//     state, redrawn on the host with core's lq_rng_normal, and patched in before the step that
//     uses the sketch. The next step's sketch is queued behind the current step, so the fix-ups
//     come with its status. LQ_CUDA_DECOMPOSE_SKETCH=host draws every sketch on the host instead
//     (core's rng, uploaded); =check draws on the device and compares every sketch with the host's,
//     failing on the first differing value.
//   * Randomized SVD (Halko et al., as svd.c): Y = A·Ω, QR, power iterations Z = Aᵀ·Y, QR,
//     Y = A·Z, QR; Bᵀ = Aᵀ·Y. The QR is CholeskyQR2 in double (cholesky_qr_cuda.cuh: a few
//     launches, where cuSOLVER's geqrf + orgqr of a 4096 x 74 matrix is a long chain of small
//     ones and was most of a step's time); LQ_CUDA_DECOMPOSE_QR=householder takes geqrf +
//     orgqr as before. Both give the same span, which is all the SVD uses. The range
//     finder's products and Bᵀ run on TF32 tensor cores for the error table
//     (lq_cuda_decompose_errors) and in fp32 for the decompositions kept
//     (lq_cuda_decompose); LQ_CUDA_DECOMPOSE_TF32=0 (all fp32), =1 (range products TF32,
//     Bᵀ fp32) or =all sets both. On the H100 TF32 range products halved the products and
//     moved the mean error of a 243-configuration row by less than 1e-4 relative (19.1747 vs
//     19.1729 on 4096², 32.1333 vs 32.1325 on 4096 x 11008); Bᵀ on TF32 as well took the
//     whole 7B table from 15.7 to 14.3 minutes and moved the mean errors of 81-configuration
//     rows by 1.1e-4 and 1.7e-4 relative (19.1329 → 19.1351, 32.0587 → 32.0641).
//     The small SVD of B (q x n) comes from
//     the eigendecomposition of the q x q Gram matrix B·Bᵀ, formed and solved in double
//     (Dsyrk, then for an error table one launch of our own one-block Jacobi solver,
//     eig_jacobi_cuda.cuh, where Dsyevd is ~170 launches, and for a decomposition kept Dsyevd;
//     LQ_CUDA_DECOMPOSE_EIG=syevd, jacobi or batched (cusolverDnXsyevBatched on one matrix)
//     sets both; a sketch too wide for Jacobi's shared memory, q > 138 on an H100, takes
//     Dsyevd, decided when a worker opens): squaring the
//     condition number in double costs σ_i a relative error of about 1e-16·(σ_1/σ_i)², below float
//     rounding for every σ_i > 1e-4·σ_1, and it is one small solver call where cuSOLVER's gesvd on
//     a 4096 x 74 matrix is slow. Then L1 = Y·Ub·Σ^½ (float: Y and Ub are orthonormal, nothing
//     cancels) and L2 = Σ^-½·Ubᵀ·B (double, then float: rows for small σ cancel heavily).
//     Eigenvalues below 4·q·ε_double·λ_max are rounding noise: their σ is 0 and their factor
//     columns and rows are 0.
//   * The exact SVD (AUTO on small matrices, or asked for) runs core's lq_svd_truncated on a
//     downloaded copy of R, as the CPU does: those steps wait for the host.
//   * The best candidate's factors are kept on the device by stream-ordered copies; at the
//     end lq_cuda_decompose downloads L1, L2 and the kept step's W − L1·L2 and packs Q with
//     core's lq_nf_quantize: the same input gives the same packed Q, equal bit for bit to
//     the dense Q the device used.
//   * lq_cuda_decompose_errors reuses every worker's buffers for all its configurations;
//     nothing but the status comes back (the exact SVD path aside).
//   * LQ_CUDA_DECOMPOSE_PROFILE=1 records an event at the start of each phase of a step
//     (products, QR, small SVD, ...) and prints, when a worker closes, each phase's device
//     time per step (phase_timer_cuda.cuh).
//
// Differences from core's lq_decompose (same seed):
//   * L1·L2 agrees to float rounding (cuBLAS vs OpenBLAS summation order, Gram
//     eigendecomposition vs gesdd), so W − L1L2 does too; the quantizer is bit-exact, but a
//     value that rounding moves across a code midpoint gets the neighbouring code. Errors
//     then agree to float rounding (L1·L2 agreed to 6e-7 relative in a host transcription
//     of these calls), and a stop decided by a near tie (error >= previous) can fall one
//     step apart.
//   * Each randomized component's sign (a column of L1 with the matching row of L2) is
//     the eigensolver's choice, not gesdd's: it can be flipped relative to the CPU's.
//   * Components below the noise threshold above are 0 where the CPU keeps tiny values.
//   * The exact path gives the CPU's factors bit for bit from the same residual.
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/cuda/cholesky_qr_cuda.cuh"
#include "kernels/cuda/cuda_internal.h"
#include "kernels/cuda/eig_jacobi_cuda.cuh"
#include "kernels/cuda/nf_cuda.cuh"
#include "kernels/cuda/phase_timer_cuda.cuh"

extern "C" {
#include "core/parallel.h"
#include "core/rng.h"
}

// Error checks that fill err (the ops' macros pass NULL: decompositions report reasons).
#define DEC_CUDA(call, what)                                                                       \
    do {                                                                                           \
        cudaError_t dec_status_ = (call);                                                          \
        if (dec_status_ != cudaSuccess) return lq_cuda_fail(dec_status_, (what), err);             \
    } while (0)
#define DEC_LAUNCHED(what) DEC_CUDA(cudaGetLastError(), (what))
#define DEC_BLAS(call, what)                                                                       \
    do {                                                                                           \
        cublasStatus_t dec_status_ = (call);                                                       \
        if (dec_status_ != CUBLAS_STATUS_SUCCESS) return lq_cublas_fail(dec_status_, (what), err); \
    } while (0)
#define DEC_SOLVER(call, what)                                                                     \
    do {                                                                                           \
        cusolverStatus_t dec_status_ = (call);                                                     \
        if (dec_status_ != CUSOLVER_STATUS_SUCCESS)                                                \
            return lq_cusolver_fail(dec_status_, (what), err);                                     \
    } while (0)
#define DEC_MARK(phase) DEC_CUDA(lq_phase_timer_mark(&d->timer, d->stream, (phase)), "profile")
#define DEC_TRY(call)                                                                              \
    do {                                                                                           \
        int dec_rc_ = (call);                                                                      \
        if (dec_rc_) return dec_rc_;                                                               \
    } while (0)

#define DEC_THREADS 256                       // threads per block of the element-wise kernels
#define DEC_ALIGN 256                         // bytes: where each carved buffer starts
#define DEC_SKETCH_CHUNK 16384                // host-drawn sketch values per parallel chunk (even)
#define DEC_BLAS_WORKSPACE ((size_t)32 << 20) // cuBLAS's recommended size on Hopper
#define DEC_NO_INDEX 0xffffffffffffffffull    // status: nothing recorded
#define DEC_STEP_SEED_MIX 0x9e3779b97f4a7c15ull // lq.c mixes the step into the seed
// The device sketch: each thread draws 2^DEC_SKETCH_LOG2 values (an even number: whole
// Box-Muller pairs), starting DEC_SKETCH_PER_THREAD·t draws into the stream.
#define DEC_SKETCH_LOG2 6
#define DEC_SKETCH_PER_THREAD (1u << DEC_SKETCH_LOG2)
#define DEC_SKETCH_BLOCK 128 // threads per block of the one-thread-per-chunk kernel (the old one)
// The block sketch kernel: one warp jumps to and walks DEC_SKETCH_CHUNKS chunks of
// DEC_SKETCH_PER_THREAD draws, then the whole block turns their pairs into normals.
#define DEC_SKETCH_CHUNKS 32
#define DEC_SKETCH_THREADS 256
#define DEC_SKETCH_PAIRS_PER_CHUNK (DEC_SKETCH_PER_THREAD / 2)
#define DEC_SKETCH_BLOCK_PAIRS (DEC_SKETCH_CHUNKS * DEC_SKETCH_PAIRS_PER_CHUNK)
// A jump matrix as lookup tables (the "four Russians" way): for each byte g of the state (32)
// and each value of that byte (256), the XOR of the matrix columns the byte's set bits pick.
#define DEC_JUMP_TABLE_WORDS (32 * 256 * 4)
#define DEC_JUMP_LEVELS 40          // jump matrices T^(64·2^k), k < 40: sketches below 2^46 values
#define DEC_JUMP_WORDS (256 * 4)    // one 256 x 256 GF(2) matrix: 256 columns of 4 words
#define DEC_SKETCH_MARGIN 0x1.0p-46 // relative: far above both libms' documented errors
#define DEC_FIXUP_MAX 128           // fix-ups one status holds (about one is expected)
// Workers of lq_cuda_decompose_errors.
#define DEC_DEFAULT_WORKERS 16
#define DEC_MAX_WORKERS 64
#define DEC_WORKER_OVERHEAD ((size_t)64 << 20) // a worker's handles' own device memory, roughly
#define DEC_STOPPED 1 // run(): another worker failed, so this one stopped (not an LQ code)

enum dec_sketch_mode { DEC_SKETCH_DEVICE, DEC_SKETCH_HOST, DEC_SKETCH_CHECK };
// Which kernel writes the quantized values (LQ_CUDA_DECOMPOSE_NF_VALUES).
enum dec_nf_values { DEC_NF_VALUES_VEC4, DEC_NF_VALUES_TEAM };
// Which kernel draws the device sketch (LQ_CUDA_DECOMPOSE_SKETCH_KERNEL).
enum dec_sketch_kernel_kind { DEC_SKETCH_KERNEL_BLOCK, DEC_SKETCH_KERNEL_THREAD };
// How the randomized SVD orthonormalizes its sketches (LQ_CUDA_DECOMPOSE_QR).
enum dec_qr_mode { DEC_QR_CHOLESKY, DEC_QR_CHOLESKY_TRSM, DEC_QR_HOUSEHOLDER };
// Which cuSOLVER routine solves the small eigenproblem (LQ_CUDA_DECOMPOSE_EIG).
enum dec_eig_mode { DEC_EIG_SYEVD, DEC_EIG_BATCHED, DEC_EIG_JACOBI };
// The eigensolver when LQ_CUDA_DECOMPOSE_EIG is not set: for an error table our one-launch
// Jacobi solver (with many decompositions in flight Dsyevd's ~170 launches per step were the
// limit: 19.0 → 16.6 min for the 7B table on an H100), for a decomposition kept Dsyevd, whose
// one call is faster alone (1.0 against 2.7 ms at 74 x 74).
#define DEC_EIG_DEFAULT_TABLE DEC_EIG_JACOBI
#define DEC_EIG_DEFAULT_KEPT DEC_EIG_SYEVD
// What LQ_CUDA_DECOMPOSE_PROFILE=1 times, per step (phase_timer_cuda.cuh).
enum dec_phase {
    DEC_PHASE_SETUP,      // the residual W − Q when not fused, ||W||, the quantized start
    DEC_PHASE_PRODUCTS,   // the sketch products with A (m x n times n x q, six at T = 2)
    DEC_PHASE_QR,         // orthonormalizing the sketches
    DEC_PHASE_SMALL_SVD,  // B·Bᵀ and its eigendecomposition (or the exact SVD on the host)
    DEC_PHASE_FACTORS,    // L1, L2 from the small SVD
    DEC_PHASE_LOWRANK,    // L1·L2
    DEC_PHASE_QUANTIZE,   // the half-step error and the NF pipeline
    DEC_PHASE_SKETCH,     // the next step's Gaussian sketch
    DEC_PHASE_ROUND_TRIP, // the status copy, the host's wait and its bookkeeping
    DEC_PHASE_COUNT
};

// A Box-Muller pair whose float values the device could not settle: the xoshiro state
// before its two draws, so the host redraws it with core's rng.
struct dec_fixup {
    unsigned long long pair; // values 2·pair and 2·pair + 1
    unsigned long long state[4];
};

// What one step reports to the host: one copy, one wait.
enum { DEC_SUM_HALF, DEC_SUM_FULL, DEC_SUM_NORM, DEC_SUM_COUNT };
struct dec_status {
    double sums[DEC_SUM_COUNT];   // Σ F·d²: half step, full step (or init), and Σ F·W²
    unsigned long long first_bad; // first non-finite quantizer input, or DEC_NO_INDEX
    unsigned long long bad_group; // first group whose range overflows b2, or DEC_NO_INDEX
    unsigned offset_bits;         // the quantizer's offset (min block absmax) as bits
    int qr_info, eig_info;        // cuSOLVER's devInfo
    unsigned qr_fallbacks;        // CholeskyQR fallbacks so far (a running count)
    unsigned fixup_count;         // sketch pairs to redraw on the host (may exceed the list)
    struct dec_fixup fixups[DEC_FIXUP_MAX];
};

// The fixed sizes of one call.
struct dec_shape {
    size_t rows, cols, numel;
    int rank;
    int sketch;     // q: columns of the randomized sketch (0 unless randomized)
    int randomized; // rank > 0 and the SVD resolves to the randomized method
    int exact;      // rank > 0 and the SVD resolves to the exact method (on the host)
    int keep;       // factors and Q come back (decompose), else only errors
    int weighted;   // Fisher weights given
    size_t max_blocks, max_groups; // NF plan sizes, the largest over the configurations
};

// What every worker of a call reads: uploaded once.
struct dec_shared {
    struct lq_cuda *cuda;
    struct dec_shape shape;
    int sketch_mode; // enum dec_sketch_mode
    int qr_mode;     // enum dec_qr_mode
    int eig_mode;    // enum dec_eig_mode
    int tf32;        // the range finder's products on TF32 tensor cores (errors-only default)
    int tf32_bt;     // Bᵀ = Aᵀ·Y on them too (errors-only default, LQ_CUDA_DECOMPOSE_TF32=all)
    int profile;     // LQ_CUDA_DECOMPOSE_PROFILE: time each phase
    int jump_levels; // jump matrices the device sketch uses
    int sketch_kernel; // enum dec_sketch_kernel_kind
    int nf_values;     // enum dec_nf_values

    // host
    const float *host_w, *host_fisher;        // borrowed
    float *host_row_weight, *host_col_weight; // owned (malloc)
    float *host_inverse;                      // 1/row weights, then 1/column weights (owned)

    // device: one allocation
    void *slab;
    float *w, *fisher;                                          // rows x cols row-major
    float *row_weight, *col_weight, *inverse_row, *inverse_col; // weighted only
    unsigned long long *jumps;       // jump_levels matrices (device sketch only)
    unsigned long long *jump_tables; // ... as lookup tables (the block kernel only)
};

// One worker: a decomposition at a time.
struct dec {
    const struct dec_shared *shared;
    struct lq_cuda *cuda;
    struct dec_shape shape;
    cudaStream_t stream;
    cudaEvent_t done; // waits block on it when set (several workers); else the stream spins
    cublasHandle_t blas;
    cusolverDnHandle_t solver;

    // device, borrowed from the shared context
    const float *w, *fisher;
    const float *row_weight, *col_weight, *inverse_row, *inverse_col;

    // device, own: one allocation (slab) plus the cuSOLVER workspaces (work)
    void *slab, *work;
    size_t slab_bytes, work_bytes;
    float *q, *r, *lowrank; // rows x cols row-major; r and lowrank only with a rank
    float *absmax, *block_scale, *group_scale;
    double *partials;
    struct dec_status *status;
    void *blas_workspace;
    // the randomized SVD (column-major thin matrices)
    float *omega; // q x n (Ω row-major n x q, as drawn)
    float *y;     // m x q range basis
    float *z;     // n x q co-range basis, then Bᵀ
    float *tau, *solver_work, *ub;
    int cholesky_qr;     // orthonormalize with qr (else cuSOLVER's Householder QR)
    struct lq_cholqr qr; // CholeskyQR2's buffers
    struct lq_phase_timer timer;
    double profile_wall; // host seconds in run(), with the timer
    long profile_steps, profile_runs;
    double *bt, *gram, *lambda, *ubs, *l2t, *eig_work;
    int solver_lwork, eig_lwork;   // eig_lwork: doubles (either routine)
    cusolverDnParams_t eig_params; // DEC_EIG_BATCHED
    int eig_jacobi;                // DEC_EIG_JACOBI, and this sketch fits its shared memory
    size_t eig_device_bytes, eig_host_bytes;
    void *eig_host_work; // DEC_EIG_BATCHED's host workspace, if it asks for one
    // factors (L1 rows x rank, L2 rank x cols, row-major)
    float *L1, *L2, *prev_L1, *prev_L2, *best_q_L1, *best_q_L2, *out_L1, *out_L2;

    // host
    struct dec_status *status_host; // pinned
    float *fixup_host;              // pinned: 2·DEC_FIXUP_MAX redrawn values
    float *omega_host;              // pinned: a host-drawn sketch (host or check mode, fallback)
    float *check_host;              // the device's sketch, downloaded (check mode)
    struct lq_rng *chunk_starts;
    size_t chunk_count;
    float *host_residual, *host_u, *host_s, *host_vt, *host_L1, *host_L2; // exact SVD, final Q
    // The quantizer last read W − last_lowrank (NULL: W itself); for error messages.
    const float *last_lowrank;
    int sketch_pending;   // a sketch was queued: settle it after the next wait
    uint64_t sketch_seed; // ... drawn with this seed
    struct lq_nf_device_config nf;
};

// What one decomposition found.
struct dec_result {
    double best;
    int iters, best_iter, best_is_half_step, best_q_from_w;
};

// ---------- kernels ----------

// r = (W − Q), times row_weight[i]·col_weight[j] when weighted (lq.c: factorize); q NULL is
// the zero start. One thread block per row, so the weights need no division.
__global__ static void dec_residual_kernel(const float *w, const float *q, size_t rows, size_t cols,
                                           const float *row_weight, const float *col_weight,
                                           float *r) {
    for (size_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t base = row * cols;
        const float rw = row_weight ? row_weight[row] : 1.0f;
        for (size_t col = threadIdx.x; col < cols; col += blockDim.x) {
            float v = lq_nf_sub(w[base + col], q ? q[base + col] : 0.0f);
            if (row_weight) v = lq_nf_mul(v, lq_nf_mul(rw, col_weight[col]));
            r[base + col] = v;
        }
    }
}

// r = W − lowrank (collect: the kept step's quantizer input).
__global__ static void dec_difference_kernel(const float *w, const float *lowrank, size_t count,
                                             float *r) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        r[i] = lq_nf_sub(w[i], lowrank[i]);
}

// The maximum of m over each run of `run` threads (a power of two <= DEC_THREADS), valid in
// the run's first thread; exact in any order (NaN never wins). Every thread of the block
// must call it.
__device__ static inline float dec_run_max(float m, unsigned run) {
    if (run <= 32) {
        for (unsigned s = run >> 1; s > 0; s >>= 1) {
            const float other = __shfl_xor_sync(LQ_NF_FULL_MASK, m, s);
            m = other > m ? other : m;
        }
        return m;
    }
    __shared__ float warp_max[DEC_THREADS / 32];
    for (unsigned s = 16; s > 0; s >>= 1) {
        const float other = __shfl_xor_sync(LQ_NF_FULL_MASK, m, s);
        m = other > m ? other : m;
    }
    if ((threadIdx.x & 31u) == 0) warp_max[threadIdx.x >> 5] = m;
    __syncthreads();
    if ((threadIdx.x & (run - 1)) == 0)
        for (unsigned k = 1; k < run / 32; k++) {
            const float other = warp_max[(threadIdx.x >> 5) + k];
            m = other > m ? other : m;
        }
    __syncthreads(); // warp_max is written again next round
    return m;
}

// The absmax of the NF block index / run, from the maxima m of its `run` threads (a power of
// two <= DEC_THREADS; index: the thread's element or quad): the run's first thread stores it
// (for blocks below n_blocks) and returns the smaller of `smallest` and its bits, the others
// return `smallest`. Every thread of the block must call it.
__device__ static inline unsigned dec_store_absmax(float m, unsigned run, unsigned long long index,
                                                   unsigned long long n_blocks, float *absmax,
                                                   unsigned smallest) {
    m = dec_run_max(m, run);
    if ((threadIdx.x & (run - 1)) == 0) {
        const unsigned long long block = index / run;
        if (block < n_blocks) {
            absmax[block] = m;
            smallest = lq_nf_min_bits(smallest, m);
        }
    }
    return smallest;
}

// The half step (lq.c: error_pass with residual_out): Σ F·(W − Q − lowrank)² of the block
// into partials (q NULL: the zero start). Thread i of block b takes elements
// b·256 + i + k·stride, the same split and order as a plain grid-stride loop, so the sums
// do not depend on ABSMAX. With ABSMAX (B0 a power of two <= 256, so every NF block lies in
// one 256-element tile), also the quantizer's first stage for the input W − lowrank (as
// lq_nf_absmax_kernel): block absmax, their minimum into *offset_bits, the first
// non-finite index into *first_bad. Launch with DEC_THREADS threads per block.
template <bool ABSMAX>
__global__ static void dec_half_step_kernel(const float *w, const float *q, const float *lowrank,
                                            const float *fisher, size_t count, double *partials,
                                            unsigned B0, unsigned long long n_blocks, float *absmax,
                                            unsigned *offset_bits, unsigned long long *first_bad) {
    double sum = 0.0;
    unsigned smallest = 0xffffffffu;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    // The loop condition is uniform over the thread block: everyone reaches the shuffles.
    for (size_t base = (size_t)blockIdx.x * blockDim.x; base < count; base += stride) {
        const size_t i = base + threadIdx.x;
        float m = 0.0f;
        if (i < count) {
            const float wi = w[i], li = lowrank[i];
            const float qi = q ? q[i] : 0.0f;
            double d = (double)wi - (double)qi - (double)li;
            sum += (fisher ? (double)fisher[i] : 1.0) * d * d;
            if (ABSMAX) m = lq_nf_absmax_add(m, lq_nf_sub(wi, li), i, first_bad);
        }
        if (ABSMAX) smallest = dec_store_absmax(m, B0, i, n_blocks, absmax, smallest);
    }
    double total = lq_nf_block_sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
    if (ABSMAX) lq_nf_offset_min(smallest, offset_bits);
}

// dec_half_step_kernel with 16-byte loads: thread i of block b takes the quads (4
// consecutive values) b·256 + i + k·stride. With ABSMAX (B0 a power of two, 4 <= B0 <= 256)
// an NF block is a run of B0/4 threads. The same absmax, offset and first bad index; the sum
// runs in another fixed order. Needs count % 4 == 0 and 16-byte-aligned arrays.
template <bool ABSMAX>
__global__ static void
dec_half_step_vec4_kernel(const float *w, const float *q, const float *lowrank, const float *fisher,
                          size_t count, double *partials, unsigned B0, unsigned long long n_blocks,
                          float *absmax, unsigned *offset_bits, unsigned long long *first_bad) {
    double sum = 0.0;
    unsigned smallest = 0xffffffffu;
    const size_t quads = count / 4, stride = (size_t)gridDim.x * blockDim.x;
    const unsigned run = B0 / 4; // threads per NF block (ABSMAX)
    // The loop condition is uniform over the thread block: everyone reaches the shuffles.
    for (size_t base = (size_t)blockIdx.x * blockDim.x; base < quads; base += stride) {
        const size_t quad = base + threadIdx.x;
        float m = 0.0f;
        if (quad < quads) {
            const float4 w4 = ((const float4 *)w)[quad], l4 = ((const float4 *)lowrank)[quad];
            const float4 q4 = q ? ((const float4 *)q)[quad] : make_float4(0, 0, 0, 0);
            const float4 f4 = fisher ? ((const float4 *)fisher)[quad] : make_float4(1, 1, 1, 1);
            const float wv[4] = {w4.x, w4.y, w4.z, w4.w}, lv[4] = {l4.x, l4.y, l4.z, l4.w};
            const float qv[4] = {q4.x, q4.y, q4.z, q4.w}, fv[4] = {f4.x, f4.y, f4.z, f4.w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                double d = (double)wv[k] - (double)qv[k] - (double)lv[k];
                sum += (fisher ? (double)fv[k] : 1.0) * d * d;
                if (ABSMAX)
                    m = lq_nf_absmax_add(m, lq_nf_sub(wv[k], lv[k]), 4 * quad + k, first_bad);
            }
        }
        if (ABSMAX) smallest = dec_store_absmax(m, run, quad, n_blocks, absmax, smallest);
    }
    double total = lq_nf_block_sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
    if (ABSMAX) lq_nf_offset_min(smallest, offset_bits);
}

// Σ F·W² of the block into partials (lq_weighted_distance(W, NULL, F), squared).
__global__ static void dec_norm_kernel(const float *w, const float *fisher, size_t count,
                                       double *partials) {
    double sum = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        double d = (double)w[i];
        sum += fisher ? (double)fisher[i] * d * d : d * d;
    }
    double total = lq_nf_block_sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// *out = Σ partials[0..count), in an order fixed by count.
__global__ static void dec_sum_kernel(const double *partials, unsigned count, double *out) {
    double sum = 0.0;
    for (unsigned i = threadIdx.x; i < count; i += blockDim.x) sum += partials[i];
    double total = lq_nf_block_sum(sum);
    if (threadIdx.x == 0) *out = total;
}

__global__ static void dec_widen_kernel(const float *x, size_t count, double *y) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = (double)x[i];
}

// Component k of the rank-r truncation from the ascending eigenpairs of B·Bᵀ (q x q):
// σ_k = √λ, ub[:, k] = e·σ^½ (float, for L1 = Y·ub) and ubs[:, k] = e·σ^-½ (double, for
// L2 = ubsᵀ·B). One thread block per component.
__global__ static void dec_pick_kernel(const double *lambda, const double *vectors, int q,
                                       float *ub, double *ubs) {
    const int k = blockIdx.x, source = q - 1 - k;
    const double top = lambda[q - 1], value = lambda[source];
    double sigma = 0.0;
    if (!isfinite(top))
        sigma = nan(""); // let the quantizer's finiteness check report it
    else if (value > top * (4.0 * q * 2.220446049250313e-16))
        sigma = sqrt(value);
    const double root = sqrt(sigma);
    for (int c = threadIdx.x; c < q; c += blockDim.x) {
        const double e = vectors[c + (size_t)source * q];
        ub[c + (size_t)k * q] = (float)(e * root);
        ubs[c + (size_t)k * q] = sigma != 0.0 ? e / root : 0.0;
    }
}

// L2 (rank x cols, row-major) from L2ᵀ in double (cols x rank, column-major: the same
// index), times 1/col_weight when weighted.
__global__ static void dec_l2_kernel(const double *l2t, size_t cols, size_t count,
                                     const float *inverse_col, float *L2) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = (float)l2t[i];
        L2[i] = inverse_col ? lq_nf_mul(v, inverse_col[i % cols]) : v;
    }
}

// L1[i, :] *= 1/row_weight[i].
__global__ static void dec_scale_rows_kernel(float *L1, size_t count, int rank,
                                             const float *inverse_row) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        L1[i] = lq_nf_mul(L1[i], inverse_row[i / (size_t)rank]);
}

// ---------- the Gaussian sketch on the device ----------
//
// The per-thread work is __host__ __device__ so that it can be checked against core's rng on
// a machine without a GPU (the host build uses the host's libm and no atomics).

struct dec_rng_state {
    unsigned long long s[4];
};

// rng.c's xoshiro256** step, word for word.
__host__ __device__ static inline unsigned long long dec_rotl(unsigned long long x, int k) {
    return (x << k) | (x >> (64 - k));
}

__host__ __device__ static inline unsigned long long dec_rng_next(unsigned long long *s) {
    const unsigned long long result = dec_rotl(s[1] * 5, 7) * 9;
    const unsigned long long t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = dec_rotl(s[3], 45);
    return result;
}

// One rounded double product, never fused with a neighbour.
__host__ __device__ static inline double dec_mul(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}

__host__ __device__ static inline void dec_sincos(double x, double *sine, double *cosine) {
#ifdef __CUDA_ARCH__
    sincos(x, sine, cosine);
#else
    *sine = sin(x), *cosine = cos(x);
#endif
}

// s = M·s over GF(2): the XOR of the columns of M (256 of 4 words) at s's set bits.
__host__ __device__ static inline void dec_jump(const unsigned long long *matrix,
                                                unsigned long long *s) {
    unsigned long long r0 = 0, r1 = 0, r2 = 0, r3 = 0;
    for (int word = 0; word < 4; word++) {
        unsigned long long bits = s[word];
        while (bits) {
#ifdef __CUDA_ARCH__
            const int bit = __ffsll((long long)bits) - 1;
            const ulonglong2 *column =
                (const ulonglong2 *)(matrix + ((size_t)word * 64 + (size_t)bit) * 4);
            const ulonglong2 low = __ldg(column), high = __ldg(column + 1);
            r0 ^= low.x, r1 ^= low.y, r2 ^= high.x, r3 ^= high.y;
#else
            const int bit = __builtin_ctzll(bits);
            const unsigned long long *column = matrix + ((size_t)word * 64 + (size_t)bit) * 4;
            r0 ^= column[0], r1 ^= column[1], r2 ^= column[2], r3 ^= column[3];
#endif
            bits &= bits - 1;
        }
    }
    s[0] = r0, s[1] = r1, s[2] = r2, s[3] = r3;
}

// Whether the float nearest v could differ for any double within DEC_SKETCH_MARGIN·|v| of
// it: then the host's libm, a few ulps away at most, might round to the other float.
__host__ __device__ static inline bool dec_unsettled(double v) {
    const double e = fabs(v) * DEC_SKETCH_MARGIN;
    return (float)(v - e) != (float)(v + e);
}

// rng.c's lq_rng_normal on the draws a, b (in that order): first r·cos θ, then the spare
// r·sin θ, in double.
__host__ __device__ static inline void dec_box_muller(unsigned long long a, unsigned long long b,
                                                      double *first, double *second) {
    double u1 = (double)(a >> 11) * 0x1.0p-53;
    const double u2 = (double)(b >> 11) * 0x1.0p-53;
    if (u1 < 0x1.0p-60) u1 = 0x1.0p-60; // log(0) guard
    const double radius = sqrt(dec_mul(-2.0, log(u1)));
    const double angle = dec_mul(6.283185307179586476925, u2);
    double sine, cosine;
    dec_sincos(angle, &sine, &cosine);
    *first = dec_mul(radius, cosine), *second = dec_mul(radius, sine);
}

// Records the pair whose xoshiro state before its two draws was `before` for a fix-up.
__host__ __device__ static inline void dec_record_fixup(struct dec_status *status,
                                                        unsigned long long pair,
                                                        const unsigned long long *before) {
#ifdef __CUDA_ARCH__
    const unsigned slot = atomicAdd(&status->fixup_count, 1u);
#else
    const unsigned slot = status->fixup_count++;
#endif
    if (slot < DEC_FIXUP_MAX) {
        status->fixups[slot].pair = pair;
        for (int k = 0; k < 4; k++) status->fixups[slot].state[k] = before[k];
    }
}

// Thread t of the sketch: values [64t, 64t + 64) ∩ [0, count) of what lq_rng_fill_normal
// writes from the state `start` (lq_rng_seed of the step's seed), drawn from T^(64t)·start
// by applying the jump matrix T^(64·2^k) for every set bit k of t. Each pair is Box-Muller as
// rng.c's lq_rng_normal: the first value r·cos θ, the second r·sin θ, rounded to float.
// Pairs that cannot be settled here go to status->fixups.
__host__ __device__ static inline void dec_sketch_thread(const dec_rng_state &start,
                                                         const unsigned long long *jumps,
                                                         int levels, unsigned long long count,
                                                         unsigned long long t, float *omega,
                                                         struct dec_status *status) {
    const unsigned long long begin = t * DEC_SKETCH_PER_THREAD;
    if (begin >= count) return;
    unsigned long long s[4] = {start.s[0], start.s[1], start.s[2], start.s[3]};
    for (int k = 0; k < levels; k++)
        if ((t >> k) & 1ull) dec_jump(jumps + (size_t)k * DEC_JUMP_WORDS, s);
    const unsigned long long end =
        count - begin < DEC_SKETCH_PER_THREAD ? count : begin + DEC_SKETCH_PER_THREAD;
    for (unsigned long long i = begin; i < end; i += 2) {
        const unsigned long long before[4] = {s[0], s[1], s[2], s[3]};
        const unsigned long long a = dec_rng_next(s);
        double first, second;
        dec_box_muller(a, dec_rng_next(s), &first, &second);
        const bool has_second = i + 1 < count; // an odd count drops the last sine
        omega[i] = (float)first;
        if (has_second) omega[i + 1] = (float)second;
        if (dec_unsettled(first) || (has_second && dec_unsettled(second)))
            dec_record_fixup(status, i / 2, before);
    }
}

__global__ static void dec_sketch_kernel(const dec_rng_state start, const unsigned long long *jumps,
                                         int levels, unsigned long long count, float *omega,
                                         struct dec_status *status) {
    const unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    dec_sketch_thread(start, jumps, levels, count, t, omega, status);
}

// Entry `index` of the jump tables (level, byte g, byte value b, as DEC_JUMP_TABLE_WORDS
// lays them out): the XOR of the level's matrix columns 8g + k for the set bits k of b
// (state bit 8g + k is bit 8·(g % 8) + k of word g / 8).
__host__ __device__ static inline void
dec_jump_table_entry(const unsigned long long *jumps, size_t index, unsigned long long *entry) {
    const size_t level = index / (32 * 256), g = index / 256 % 32, b = index % 256;
    const unsigned long long *matrix = jumps + level * DEC_JUMP_WORDS;
    unsigned long long r[4] = {0, 0, 0, 0};
    for (int k = 0; k < 8; k++)
        if ((b >> k) & 1u)
            for (int w = 0; w < 4; w++) r[w] ^= matrix[(8 * g + (size_t)k) * 4 + (size_t)w];
    for (int w = 0; w < 4; w++) entry[w] = r[w];
}

__global__ static void dec_jump_tables_kernel(const unsigned long long *jumps, size_t entries,
                                              unsigned long long *tables) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < entries;
         i += (size_t)gridDim.x * blockDim.x)
        dec_jump_table_entry(jumps, i, tables + i * 4);
}

// s = M·s with M as lookup tables: 32 independent lookups, one per byte of s, with no
// data-dependent loop, so that all of them are in flight at once (dec_jump waits on each
// column it loads, one set bit after another).
__host__ __device__ static inline void dec_jump_by_table(const unsigned long long *table,
                                                         unsigned long long *s) {
    unsigned long long r0 = 0, r1 = 0, r2 = 0, r3 = 0;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int g = 0; g < 32; g++) {
        const unsigned b = (unsigned)(s[g >> 3] >> (8 * (g & 7))) & 0xffu;
        const unsigned long long *entry = table + ((size_t)g * 256 + b) * 4;
#ifdef __CUDA_ARCH__
        const ulonglong2 low = __ldg((const ulonglong2 *)entry),
                         high = __ldg((const ulonglong2 *)entry + 1);
        r0 ^= low.x, r1 ^= low.y, r2 ^= high.x, r3 ^= high.y;
#else
        r0 ^= entry[0], r1 ^= entry[1], r2 ^= entry[2], r3 ^= entry[3];
#endif
    }
    s[0] = r0, s[1] = r1, s[2] = r2, s[3] = r3;
}

// The block sketch: block k covers chunks [32k, 32k + 32) of DEC_SKETCH_PER_THREAD draws
// (values 2048k ...). The first warp takes one chunk a lane (dec_sketch_walk): it jumps to
// the chunk's start (T^(64·chunk)·start, by table) and walks its 64 draws into shared
// memory. Then every thread of the block turns pairs of draws into values
// (dec_sketch_pair), consecutive threads taking consecutive pairs (float2 stores), so the
// costly Box-Muller runs on the whole block instead of one thread per 32 pairs, and only
// 1/8 of the threads jump. A pair that cannot be settled recovers its state from the
// chunk's start (a rare walk of < 64 draws). Equal value for value to dec_sketch_kernel.
// Both phases are __host__ __device__ so that a host loop can check them against core's rng.
struct dec_sketch_shared {
    // +1: a chunk's row starts 4 banks after the previous one (no 16-byte bank conflicts)
    ulonglong2 draws[DEC_SKETCH_CHUNKS][DEC_SKETCH_PAIRS_PER_CHUNK + 1];
    unsigned long long starts[DEC_SKETCH_CHUNKS][4];
};

// Lane `lane` of block `block`: its chunk's start state and draws into sh.
__host__ __device__ static inline void dec_sketch_walk(const dec_rng_state &start,
                                                       const unsigned long long *tables, int levels,
                                                       unsigned long long count,
                                                       unsigned long long block, unsigned lane,
                                                       struct dec_sketch_shared *sh) {
    const unsigned long long chunk = block * DEC_SKETCH_CHUNKS + lane;
    if (chunk * DEC_SKETCH_PER_THREAD >= count) return;
    unsigned long long s[4] = {start.s[0], start.s[1], start.s[2], start.s[3]};
    for (int k = 0; k < levels; k++)
        if ((chunk >> k) & 1ull) dec_jump_by_table(tables + (size_t)k * DEC_JUMP_TABLE_WORDS, s);
    for (int w = 0; w < 4; w++) sh->starts[lane][w] = s[w];
    for (unsigned j = 0; j < DEC_SKETCH_PAIRS_PER_CHUNK; j++) {
        const unsigned long long a = dec_rng_next(s);
        sh->draws[lane][j] = make_ulonglong2(a, dec_rng_next(s));
    }
}

// Pair p (< DEC_SKETCH_BLOCK_PAIRS) of block `block`, from the walked draws in sh. Returns
// false past the end of the sketch.
__host__ __device__ static inline bool dec_sketch_pair(const struct dec_sketch_shared *sh,
                                                       unsigned long long count,
                                                       unsigned long long block, unsigned p,
                                                       float *omega, struct dec_status *status) {
    const unsigned long long pair = block * DEC_SKETCH_BLOCK_PAIRS + p;
    const unsigned long long i = 2 * pair;
    if (i >= count) return false;
    const unsigned local = p / DEC_SKETCH_PAIRS_PER_CHUNK, j = p % DEC_SKETCH_PAIRS_PER_CHUNK;
    const ulonglong2 d = sh->draws[local][j];
    double first, second;
    dec_box_muller(d.x, d.y, &first, &second);
    const bool has_second = i + 1 < count; // an odd count drops the last sine
    if (has_second)
        *(float2 *)(omega + i) = make_float2((float)first, (float)second);
    else
        omega[i] = (float)first;
    if (dec_unsettled(first) || (has_second && dec_unsettled(second))) {
        unsigned long long before[4] = {sh->starts[local][0], sh->starts[local][1],
                                        sh->starts[local][2], sh->starts[local][3]};
        for (unsigned k = 0; k < 2 * j; k++) dec_rng_next(before);
        dec_record_fixup(status, pair, before);
    }
    return true;
}

__global__ static void __launch_bounds__(DEC_SKETCH_THREADS)
    dec_sketch_block_kernel(const dec_rng_state start, const unsigned long long *tables, int levels,
                            unsigned long long count, float *omega, struct dec_status *status) {
    __shared__ struct dec_sketch_shared sh;
    if (threadIdx.x < DEC_SKETCH_CHUNKS)
        dec_sketch_walk(start, tables, levels, count, blockIdx.x, threadIdx.x, &sh);
    __syncthreads();
    for (unsigned p = threadIdx.x; p < DEC_SKETCH_BLOCK_PAIRS; p += DEC_SKETCH_THREADS)
        if (!dec_sketch_pair(&sh, count, blockIdx.x, p, omega, status)) break; // p only grows
}

// ---------- the sketch's jump matrices (host, once per process) ----------

// DEC_JUMP_LEVELS matrices over GF(2): level k advances the xoshiro256** state by
// DEC_SKETCH_PER_THREAD·2^k draws. Column j (4 words) is the image of state bit j
// (word j / 64, bit j % 64). The step matrix comes from core's lq_rng_next itself.
static unsigned long long dec_jump_table[DEC_JUMP_LEVELS][256][4];
static pthread_once_t dec_jump_once = PTHREAD_ONCE_INIT;

static void gf2_apply(const unsigned long long (*m)[4], const unsigned long long *x,
                      unsigned long long *y) {
    unsigned long long r[4] = {0, 0, 0, 0};
    for (int j = 0; j < 256; j++)
        if ((x[j >> 6] >> (j & 63)) & 1ull)
            for (int k = 0; k < 4; k++) r[k] ^= m[j][k];
    memcpy(y, r, sizeof r);
}

// out = a·a (out must not be a).
static void gf2_square(const unsigned long long (*a)[4], unsigned long long (*out)[4]) {
    for (int j = 0; j < 256; j++) gf2_apply(a, a[j], out[j]);
}

static void dec_build_jumps(void) {
    static unsigned long long step[256][4], scratch[256][4];
    for (int j = 0; j < 256; j++) {
        struct lq_rng rng;
        memset(&rng, 0, sizeof rng);
        rng.state[j >> 6] = 1ull << (j & 63);
        lq_rng_next(&rng); // the state update is linear over GF(2)
        memcpy(step[j], rng.state, sizeof step[j]);
    }
    for (int i = 0; i < DEC_SKETCH_LOG2; i++) {
        gf2_square(step, scratch);
        memcpy(step, scratch, sizeof step);
    }
    memcpy(dec_jump_table[0], step, sizeof step);
    for (int k = 1; k < DEC_JUMP_LEVELS; k++) gf2_square(dec_jump_table[k - 1], dec_jump_table[k]);
}

// LQ_CUDA_DECOMPOSE_QR: cholesky (the default: L⁻¹ and a Dgemm), cholesky-trsm (a Dtrsm
// with L) or householder (cuSOLVER geqrf + orgqr).
static int dec_qr_mode(int *mode, struct lq_error *err) {
    const char *text = getenv("LQ_CUDA_DECOMPOSE_QR");
    *mode = DEC_QR_CHOLESKY;
    if (!text || !*text || strcmp(text, "cholesky") == 0) return LQ_OK;
    if (strcmp(text, "cholesky-trsm") == 0) {
        *mode = DEC_QR_CHOLESKY_TRSM;
        return LQ_OK;
    }
    if (strcmp(text, "householder") == 0) {
        *mode = DEC_QR_HOUSEHOLDER;
        return LQ_OK;
    }
    return lq_error_set(err, LQ_EINVAL,
                        "LQ_CUDA_DECOMPOSE_QR=%s: expected cholesky, cholesky-trsm or householder",
                        text);
}

// LQ_CUDA_DECOMPOSE_EIG: syevd, batched (cusolverDnXsyevBatched, one matrix) or jacobi
// (eig_jacobi_cuda.cuh); unset, DEC_EIG_DEFAULT_KEPT or _TABLE.
static int dec_eig_mode(int keep, int *mode, struct lq_error *err) {
    const char *text = getenv("LQ_CUDA_DECOMPOSE_EIG");
    *mode = keep ? DEC_EIG_DEFAULT_KEPT : DEC_EIG_DEFAULT_TABLE;
    if (!text || !*text) return LQ_OK;
    if (strcmp(text, "syevd") == 0)
        *mode = DEC_EIG_SYEVD;
    else if (strcmp(text, "batched") == 0)
        *mode = DEC_EIG_BATCHED;
    else if (strcmp(text, "jacobi") == 0)
        *mode = DEC_EIG_JACOBI;
    else
        return lq_error_set(err, LQ_EINVAL,
                            "LQ_CUDA_DECOMPOSE_EIG=%s: expected syevd, batched or jacobi", text);
    return LQ_OK;
}

static int dec_sketch_mode(void) {
    const char *mode = getenv("LQ_CUDA_DECOMPOSE_SKETCH");
    if (mode && strcmp(mode, "host") == 0) return DEC_SKETCH_HOST;
    if (mode && strcmp(mode, "check") == 0) return DEC_SKETCH_CHECK;
    return DEC_SKETCH_DEVICE;
}

// LQ_CUDA_DECOMPOSE_SKETCH_KERNEL: block (the default: dec_sketch_block_kernel) or thread
// (dec_sketch_kernel, one thread per 64 values, as before; for comparison).
static int dec_sketch_kernel_kind(int *kind, struct lq_error *err) {
    const char *text = getenv("LQ_CUDA_DECOMPOSE_SKETCH_KERNEL");
    *kind = DEC_SKETCH_KERNEL_BLOCK;
    if (!text || !*text || strcmp(text, "block") == 0) return LQ_OK;
    if (strcmp(text, "thread") == 0) {
        *kind = DEC_SKETCH_KERNEL_THREAD;
        return LQ_OK;
    }
    return lq_error_set(err, LQ_EINVAL,
                        "LQ_CUDA_DECOMPOSE_SKETCH_KERNEL=%s: expected block or thread", text);
}

// LQ_CUDA_DECOMPOSE_NF_VALUES: vec4 (the default: dec_half_step_vec4_kernel and
// lq_nf_values_vec4_kernel where the shape allows) or team (dec_half_step_kernel and
// lq_nf_values_kernel always, as before; for comparison).
static int dec_nf_values_kind(int *kind, struct lq_error *err) {
    const char *text = getenv("LQ_CUDA_DECOMPOSE_NF_VALUES");
    *kind = DEC_NF_VALUES_VEC4;
    if (!text || !*text || strcmp(text, "vec4") == 0) return LQ_OK;
    if (strcmp(text, "team") == 0) {
        *kind = DEC_NF_VALUES_TEAM;
        return LQ_OK;
    }
    return lq_error_set(err, LQ_EINVAL, "LQ_CUDA_DECOMPOSE_NF_VALUES=%s: expected vec4 or team",
                        text);
}

// ---------- contexts ----------

// Buffers carved from one allocation: a first pass with base NULL measures.
struct dec_carver {
    char *base;
    size_t offset;
};

template <typename T> static void carve(struct dec_carver *c, size_t count, T **out) {
    c->offset = (c->offset + DEC_ALIGN - 1) / DEC_ALIGN * DEC_ALIGN;
    *out = c->base ? (T *)(c->base + c->offset) : NULL;
    c->offset += (count ? count : 1) * sizeof(T);
}

static size_t dec_shared_layout(struct dec_shared *sh, char *base) {
    const struct dec_shape *s = &sh->shape;
    struct dec_carver c = {base, 0};
    carve(&c, s->numel, &sh->w);
    if (s->weighted) {
        carve(&c, s->numel, &sh->fisher);
        carve(&c, s->rows, &sh->row_weight);
        carve(&c, s->cols, &sh->col_weight);
        carve(&c, s->rows, &sh->inverse_row);
        carve(&c, s->cols, &sh->inverse_col);
    }
    if (sh->jump_levels > 0) carve(&c, (size_t)sh->jump_levels * DEC_JUMP_WORDS, &sh->jumps);
    if (sh->jump_levels > 0 && sh->sketch_kernel == DEC_SKETCH_KERNEL_BLOCK)
        carve(&c, (size_t)sh->jump_levels * DEC_JUMP_TABLE_WORDS, &sh->jump_tables);
    return c.offset;
}

static void dec_shared_close(struct dec_shared *sh) {
    if (sh->slab) lq_cuda_free(sh->cuda, sh->slab);
    free(sh->host_row_weight), free(sh->host_col_weight), free(sh->host_inverse);
    memset(sh, 0, sizeof *sh);
}

// The shared context: the host weights (malloc'ed) become its own, even on failure.
static int dec_shared_open(struct dec_shared *sh, struct lq_cuda *cuda,
                           const struct dec_shape *shape, const float *w, const float *fisher,
                           float *row_weight, float *col_weight, struct lq_error *err) {
    memset(sh, 0, sizeof *sh);
    sh->cuda = cuda;
    sh->shape = *shape;
    sh->host_w = w, sh->host_fisher = fisher;
    sh->host_row_weight = row_weight, sh->host_col_weight = col_weight;
    const struct dec_shape *s = &sh->shape;
    sh->sketch_mode = dec_sketch_mode();
    DEC_TRY(dec_qr_mode(&sh->qr_mode, err));
    DEC_TRY(dec_eig_mode(s->keep, &sh->eig_mode, err));
    DEC_TRY(dec_sketch_kernel_kind(&sh->sketch_kernel, err));
    DEC_TRY(dec_nf_values_kind(&sh->nf_values, err));
    // TF32 range products and Bᵀ: on for the error table (errors only), off for the
    // decompositions kept, unless LQ_CUDA_DECOMPOSE_TF32 says (0: off for both, all: on for
    // both, anything else: the range products on and Bᵀ in fp32, for both).
    const char *tf32 = getenv("LQ_CUDA_DECOMPOSE_TF32");
    sh->tf32 = tf32 && *tf32 ? strcmp(tf32, "0") != 0 : !s->keep;
    sh->tf32_bt = tf32 && *tf32 ? strcmp(tf32, "all") == 0 : !s->keep;
    const char *profile = getenv("LQ_CUDA_DECOMPOSE_PROFILE");
    sh->profile = profile && *profile && strcmp(profile, "0") != 0;
    if (s->randomized && sh->sketch_mode != DEC_SKETCH_HOST) {
        const unsigned long long count =
            (unsigned long long)s->cols * (unsigned long long)s->sketch;
        const unsigned long long threads =
            (count + DEC_SKETCH_PER_THREAD - 1) / DEC_SKETCH_PER_THREAD;
        int levels = 0;
        while (levels < 63 && (1ull << levels) < threads) levels++;
        if (levels > DEC_JUMP_LEVELS) {
            sh->sketch_mode = DEC_SKETCH_HOST; // beyond any matrix that fits a device
        } else {
            sh->jump_levels = levels;
            pthread_once(&dec_jump_once, dec_build_jumps);
        }
    }
    if (s->weighted) {
        sh->host_inverse = (float *)malloc((s->rows + s->cols) * sizeof(float));
        if (!sh->host_inverse)
            return lq_error_set(err, LQ_ENOMEM, "out of memory for Fisher weights");
        for (size_t i = 0; i < s->rows; i++) sh->host_inverse[i] = 1.0f / row_weight[i];
        for (size_t j = 0; j < s->cols; j++) sh->host_inverse[s->rows + j] = 1.0f / col_weight[j];
    }
    const size_t bytes = dec_shared_layout(sh, NULL);
    DEC_TRY(lq_cuda_malloc(cuda, bytes, LQ_CUDA_JOBS, &sh->slab, err));
    dec_shared_layout(sh, (char *)sh->slab);
    return LQ_OK;
}

// W, the Fisher data and weights and the jump matrices, queued on stream.
static int dec_shared_upload(const struct dec_shared *sh, cudaStream_t stream,
                             struct lq_error *err) {
    const struct dec_shape *s = &sh->shape;
    DEC_CUDA(cudaMemcpyAsync(sh->w, sh->host_w, s->numel * sizeof(float), cudaMemcpyHostToDevice,
                             stream),
             "upload W");
    if (s->weighted) {
        const struct {
            float *device;
            const float *host;
            size_t count;
        } uploads[5] = {
            {sh->fisher, sh->host_fisher, s->numel},
            {sh->row_weight, sh->host_row_weight, s->rows},
            {sh->col_weight, sh->host_col_weight, s->cols},
            {sh->inverse_row, sh->host_inverse, s->rows},
            {sh->inverse_col, sh->host_inverse + s->rows, s->cols},
        };
        for (int i = 0; i < 5; i++)
            DEC_CUDA(cudaMemcpyAsync(uploads[i].device, uploads[i].host,
                                     uploads[i].count * sizeof(float), cudaMemcpyHostToDevice,
                                     stream),
                     "upload the Fisher weights");
    }
    if (sh->jump_levels > 0)
        DEC_CUDA(
            cudaMemcpyAsync(sh->jumps, dec_jump_table,
                            (size_t)sh->jump_levels * DEC_JUMP_WORDS * sizeof(unsigned long long),
                            cudaMemcpyHostToDevice, stream),
            "upload the sketch's jump matrices");
    if (sh->jump_tables) {
        const size_t entries = (size_t)sh->jump_levels * (DEC_JUMP_TABLE_WORDS / 4);
        const unsigned blocks = lq_nf_grid(entries, DEC_THREADS);
        dec_jump_tables_kernel<<<blocks, DEC_THREADS, 0, stream>>>(sh->jumps, entries,
                                                                   sh->jump_tables);
        DEC_LAUNCHED("jump tables kernel");
    }
    return LQ_OK;
}

static size_t dec_layout(struct dec *d, char *base) {
    const struct dec_shape *s = &d->shape;
    const size_t n = s->numel, r = (size_t)s->rank;
    struct dec_carver c = {base, 0};
    carve(&c, n, &d->q);
    carve(&c, s->max_blocks, &d->absmax);
    carve(&c, s->max_blocks, &d->block_scale);
    carve(&c, s->max_groups, &d->group_scale);
    carve(&c, LQ_NF_MAX_GRID, &d->partials);
    carve(&c, 1, &d->status);
    char *workspace = NULL;
    carve(&c, DEC_BLAS_WORKSPACE, &workspace);
    d->blas_workspace = workspace;
    if (r > 0) {
        carve(&c, n, &d->r);
        carve(&c, n, &d->lowrank);
        carve(&c, s->rows * r, &d->L1);
        carve(&c, r * s->cols, &d->L2);
    }
    if (r > 0 && s->keep) {
        carve(&c, s->rows * r, &d->prev_L1);
        carve(&c, r * s->cols, &d->prev_L2);
        carve(&c, s->rows * r, &d->best_q_L1);
        carve(&c, r * s->cols, &d->best_q_L2);
        carve(&c, s->rows * r, &d->out_L1);
        carve(&c, r * s->cols, &d->out_L2);
    }
    if (s->randomized) {
        const size_t m = s->rows, cols = s->cols, q = (size_t)s->sketch;
        carve(&c, cols * q, &d->omega);
        carve(&c, m * q, &d->y);
        carve(&c, cols * q, &d->z);
        carve(&c, q, &d->tau);
        carve(&c, q * r, &d->ub);
        carve(&c, cols * q, &d->bt);
        carve(&c, q * q, &d->gram);
        carve(&c, q, &d->lambda);
        carve(&c, q * r, &d->ubs);
        carve(&c, cols * r, &d->l2t);
    }
    return c.offset;
}

// LQ_CUDA_DECOMPOSE_PROFILE: one line per worker, the phases' device time per step.
static void dec_profile_report(const struct dec *d) {
    if (!d->timer.enabled || d->profile_steps == 0) return;
    const struct dec_shape *s = &d->shape;
    const double *ms = d->timer.ms, steps = (double)d->profile_steps;
    double total = 0.0;
    for (int i = 0; i < DEC_PHASE_COUNT; i++) total += ms[i];
    fprintf(
        stderr,
        "lqd: decompose profile %zu x %zu rank %d sketch %d, %s QR, %s: %ld runs, %ld steps; ms "
        "per step: products %.3f, QR %.3f, small SVD %.3f, factors %.3f, L1*L2 %.3f, "
        "quantize %.3f, sketch %.3f, status round trip %.3f, setup %.3f = %.3f on the "
        "stream; %.3f host wall; %u QR fallbacks%s\n",
        s->rows, s->cols, s->rank, s->sketch,
        !s->randomized   ? "no"
        : d->cholesky_qr ? "Cholesky"
                         : "Householder",
        d->eig_jacobi   ? "Jacobi"
        : d->eig_params ? "syevBatched"
                        : "syevd",
        d->profile_runs, d->profile_steps, ms[DEC_PHASE_PRODUCTS] / steps, ms[DEC_PHASE_QR] / steps,
        ms[DEC_PHASE_SMALL_SVD] / steps, ms[DEC_PHASE_FACTORS] / steps,
        ms[DEC_PHASE_LOWRANK] / steps, ms[DEC_PHASE_QUANTIZE] / steps, ms[DEC_PHASE_SKETCH] / steps,
        ms[DEC_PHASE_ROUND_TRIP] / steps, ms[DEC_PHASE_SETUP] / steps, total / steps,
        d->profile_wall * 1e3 / steps, d->status_host ? d->status_host->qr_fallbacks : 0u,
        d->timer.dropped ? " (some marks dropped)" : "");
}

static void dec_close(struct dec *d) {
    if (d->stream) cudaStreamSynchronize(d->stream); // nothing may still use the buffers
    dec_profile_report(d);
    lq_phase_timer_close(&d->timer);
    if (d->qr.slab) lq_cholqr_close(&d->qr);
    // The handles go first: the cuBLAS workspace is ours and must outlive its handle.
    if (d->eig_params) cusolverDnDestroyParams(d->eig_params);
    if (d->solver) cusolverDnDestroy(d->solver);
    if (d->blas) cublasDestroy(d->blas);
    if (d->slab) lq_cuda_free(d->cuda, d->slab);
    if (d->work) lq_cuda_free(d->cuda, d->work);
    if (d->status_host) cudaFreeHost(d->status_host);
    if (d->fixup_host) cudaFreeHost(d->fixup_host);
    if (d->omega_host) cudaFreeHost(d->omega_host);
    if (d->done) cudaEventDestroy(d->done);
    if (d->stream) cudaStreamDestroy(d->stream);
    free(d->check_host), free(d->chunk_starts);
    free(d->host_residual), free(d->host_u), free(d->host_s), free(d->host_vt);
    free(d->host_L1), free(d->host_L2), free(d->eig_host_work);
    memset(d, 0, sizeof *d);
}

static int dec_handles(struct dec *d, int blocking, struct lq_error *err) {
    DEC_CUDA(cudaSetDevice(d->cuda->device), "cudaSetDevice");
    DEC_CUDA(cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking), "cudaStreamCreate");
    if (blocking)
        DEC_CUDA(cudaEventCreateWithFlags(&d->done, cudaEventBlockingSync | cudaEventDisableTiming),
                 "cudaEventCreate");
    DEC_BLAS(cublasCreate(&d->blas), "cublasCreate");
    DEC_BLAS(cublasSetStream(d->blas, d->stream), "cublasSetStream");
    DEC_SOLVER(cusolverDnCreate(&d->solver), "cusolverDnCreate");
    DEC_SOLVER(cusolverDnSetStream(d->solver, d->stream), "cusolverDnSetStream");
    return LQ_OK;
}

// The cuSOLVER workspaces of the randomized SVD (their sizes are asked with the buffers).
static int dec_solver_work(struct dec *d, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const int M = (int)s->rows, N = (int)s->cols, Q = s->sketch;
    int sizes[4] = {0, 0, 0, 0};
    if (!d->cholesky_qr) {
        DEC_SOLVER(cusolverDnSgeqrf_bufferSize(d->solver, M, Q, d->y, M, &sizes[0]),
                   "cusolverDnSgeqrf_bufferSize");
        DEC_SOLVER(cusolverDnSgeqrf_bufferSize(d->solver, N, Q, d->z, N, &sizes[1]),
                   "cusolverDnSgeqrf_bufferSize");
        DEC_SOLVER(cusolverDnSorgqr_bufferSize(d->solver, M, Q, Q, d->y, M, d->tau, &sizes[2]),
                   "cusolverDnSorgqr_bufferSize");
        DEC_SOLVER(cusolverDnSorgqr_bufferSize(d->solver, N, Q, Q, d->z, N, d->tau, &sizes[3]),
                   "cusolverDnSorgqr_bufferSize");
    }
    d->solver_lwork = 1;
    for (int i = 0; i < 4; i++)
        d->solver_lwork = sizes[i] > d->solver_lwork ? sizes[i] : d->solver_lwork;
    // Jacobi needs no workspace; a sketch too wide for its shared memory takes syevd.
    d->eig_jacobi =
        d->shared->eig_mode == DEC_EIG_JACOBI && lq_eig_jacobi_supported(d->cuda->device, Q);
    if (d->eig_jacobi) {
        d->eig_lwork = 1;
    } else if (d->shared->eig_mode == DEC_EIG_BATCHED) {
        DEC_SOLVER(cusolverDnCreateParams(&d->eig_params), "cusolverDnCreateParams");
        DEC_SOLVER(cusolverDnXsyevBatched_bufferSize(
                       d->solver, d->eig_params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER,
                       Q, CUDA_R_64F, d->gram, Q, CUDA_R_64F, d->lambda, CUDA_R_64F,
                       &d->eig_device_bytes, &d->eig_host_bytes, 1),
                   "cusolverDnXsyevBatched_bufferSize");
        d->eig_lwork = (int)((d->eig_device_bytes + sizeof(double) - 1) / sizeof(double));
        if (d->eig_host_bytes) {
            d->eig_host_work = malloc(d->eig_host_bytes);
            if (!d->eig_host_work)
                return lq_error_set(err, LQ_ENOMEM, "out of memory for the eigensolver");
        }
    } else {
        DEC_SOLVER(cusolverDnDsyevd_bufferSize(d->solver, CUSOLVER_EIG_MODE_VECTOR,
                                               CUBLAS_FILL_MODE_LOWER, Q, d->gram, Q, d->lambda,
                                               &d->eig_lwork),
                   "cusolverDnDsyevd_bufferSize");
    }
    if (d->eig_lwork < 1) d->eig_lwork = 1;
    struct dec_carver c = {NULL, 0};
    for (int pass = 0; pass < 2; pass++) {
        c.offset = 0;
        carve(&c, (size_t)d->solver_lwork, &d->solver_work);
        carve(&c, (size_t)d->eig_lwork, &d->eig_work);
        if (pass == 0) {
            d->work_bytes = c.offset;
            DEC_TRY(lq_cuda_malloc(d->cuda, c.offset, LQ_CUDA_JOBS, &d->work, err));
            c.base = (char *)d->work;
        }
    }
    return LQ_OK;
}

// Host buffers of the exact SVD path.
static int dec_exact_buffers(struct dec *d, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const size_t r = (size_t)s->rank;
    d->host_residual = (float *)malloc(s->numel * sizeof(float));
    d->host_u = (float *)malloc(s->rows * r * sizeof(float));
    d->host_s = (float *)malloc(r * sizeof(float));
    d->host_vt = (float *)malloc(r * s->cols * sizeof(float));
    d->host_L1 = (float *)malloc(s->rows * r * sizeof(float));
    d->host_L2 = (float *)malloc(r * s->cols * sizeof(float));
    if (!d->host_residual || !d->host_u || !d->host_s || !d->host_vt || !d->host_L1 || !d->host_L2)
        return lq_error_set(err, LQ_ENOMEM, "out of memory for the SVD of %zu x %zu", s->rows,
                            s->cols);
    return LQ_OK;
}

// Opens a worker on the shared context: handles, its buffers, a clean status. blocking:
// waits sleep on an event (several workers) instead of spinning.
static int dec_open(struct dec *d, const struct dec_shared *sh, int blocking,
                    struct lq_error *err) {
    memset(d, 0, sizeof *d);
    d->shared = sh;
    d->cuda = sh->cuda;
    d->shape = sh->shape;
    d->w = sh->w, d->fisher = sh->fisher;
    d->row_weight = sh->row_weight, d->col_weight = sh->col_weight;
    d->inverse_row = sh->inverse_row, d->inverse_col = sh->inverse_col;
    const struct dec_shape *s = &d->shape;
    DEC_TRY(dec_handles(d, blocking, err));

    d->slab_bytes = dec_layout(d, NULL);
    DEC_TRY(lq_cuda_malloc(d->cuda, d->slab_bytes, LQ_CUDA_JOBS, &d->slab, err));
    dec_layout(d, (char *)d->slab);
    // Our own workspace: counted, and the same for every GEMM of the worker, which keeps
    // cuBLAS's results reproducible.
    DEC_BLAS(cublasSetWorkspace(d->blas, d->blas_workspace, DEC_BLAS_WORKSPACE),
             "cublasSetWorkspace");
    // CholeskyQR where the device can (sketches of up to LQ_CHOLQR_MAX_COLUMNS columns),
    // Householder otherwise or when asked.
    d->cholesky_qr = s->randomized && sh->qr_mode != DEC_QR_HOUSEHOLDER &&
                     lq_cholqr_supported(d->cuda, s->sketch);
    if (s->randomized) DEC_TRY(dec_solver_work(d, err));
    if (d->cholesky_qr) {
        const size_t longest = s->rows > s->cols ? s->rows : s->cols;
        DEC_TRY(lq_cholqr_open(&d->qr, d->cuda, (int)longest, s->sketch,
                               sh->qr_mode == DEC_QR_CHOLESKY_TRSM, err));
        d->work_bytes += d->qr.bytes; // what another worker costs (worker_count)
    }
    if (s->exact) DEC_TRY(dec_exact_buffers(d, err));
    DEC_CUDA(lq_phase_timer_open(&d->timer, sh->profile), "cudaEventCreate (profile)");
    DEC_CUDA(cudaHostAlloc((void **)&d->status_host, sizeof *d->status_host, cudaHostAllocDefault),
             "cudaHostAlloc (status)");
    DEC_CUDA(cudaHostAlloc((void **)&d->fixup_host, 2 * DEC_FIXUP_MAX * sizeof(float),
                           cudaHostAllocDefault),
             "cudaHostAlloc (sketch fix-ups)");
    // Clean status: no bad value, no bad group, solver infos 0, no fix-ups.
    DEC_CUDA(cudaMemsetAsync(d->status, 0, sizeof *d->status, d->stream), "cudaMemset");
    DEC_CUDA(cudaMemsetAsync(&d->status->first_bad, 0xff, sizeof(unsigned long long), d->stream),
             "cudaMemset");
    DEC_CUDA(cudaMemsetAsync(&d->status->bad_group, 0xff, sizeof(unsigned long long), d->stream),
             "cudaMemset");
    return LQ_OK;
}

// Waits for everything queued on the worker's stream.
static int dec_wait(struct dec *d, const char *what, struct lq_error *err) {
    if (d->done) {
        DEC_CUDA(cudaEventRecord(d->done, d->stream), what);
        DEC_CUDA(cudaEventSynchronize(d->done), what);
    } else {
        DEC_CUDA(cudaStreamSynchronize(d->stream), what);
    }
    return LQ_OK;
}

// ---------- the Gaussian sketch ----------

struct sketch_job {
    const struct lq_rng *starts;
    float *out;
    size_t count;
};

static void sketch_body(void *context, size_t begin, size_t end) {
    const struct sketch_job *job = (const struct sketch_job *)context;
    for (size_t chunk = begin; chunk < end; chunk++) {
        struct lq_rng rng = job->starts[chunk];
        size_t first = chunk * DEC_SKETCH_CHUNK;
        size_t count =
            job->count - first < DEC_SKETCH_CHUNK ? job->count - first : DEC_SKETCH_CHUNK;
        lq_rng_fill_normal(&rng, job->out + first, count);
    }
}

static size_t sketch_count(const struct dec *d) {
    return d->shape.cols * (size_t)d->shape.sketch;
}

// The host's buffers for drawing a sketch (host or check mode, or a fix-up overflow).
static int sketch_host_buffers(struct dec *d, struct lq_error *err) {
    const size_t count = sketch_count(d);
    if (!d->omega_host)
        DEC_CUDA(
            cudaHostAlloc((void **)&d->omega_host, count * sizeof(float), cudaHostAllocDefault),
            "cudaHostAlloc (sketch)");
    if (!d->chunk_starts) {
        d->chunk_count = (count + DEC_SKETCH_CHUNK - 1) / DEC_SKETCH_CHUNK;
        d->chunk_starts = (struct lq_rng *)malloc(d->chunk_count * sizeof *d->chunk_starts);
        if (!d->chunk_starts) return lq_error_set(err, LQ_ENOMEM, "out of memory for the sketch");
    }
    if (d->shared->sketch_mode == DEC_SKETCH_CHECK && !d->check_host) {
        d->check_host = (float *)malloc(count * sizeof(float));
        if (!d->check_host) return lq_error_set(err, LQ_ENOMEM, "out of memory for the sketch");
    }
    return LQ_OK;
}

// out[0..n·q) = what lq_rng_fill_normal(seeded with seed) writes, as svd.c draws Ω. Each
// normal pair costs two 64-bit draws, so a chunk of an even number c of values starts c
// draws further along the stream, with no spare value pending: walking the cheap integer
// stream once gives every chunk's start, and the costly Box-Muller runs in parallel.
static void sketch_fill(struct dec *d, uint64_t seed, float *out) {
    const size_t count = sketch_count(d);
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    for (size_t chunk = 0; chunk < d->chunk_count; chunk++) {
        d->chunk_starts[chunk] = rng;
        if (chunk + 1 < d->chunk_count)
            for (size_t k = 0; k < DEC_SKETCH_CHUNK; k++) lq_rng_next(&rng);
    }
    struct sketch_job job = {d->chunk_starts, out, count};
    lq_parallel_for(d->chunk_count, 1, sketch_body, &job);
}

static uint64_t step_seed(uint64_t seed, int step) {
    return seed ^ (DEC_STEP_SEED_MIX * (uint64_t)step);
}

// Queues the sketch Ω for seed into d->omega (the device mode; the host modes draw it when
// it is settled). It must be settled after the next wait and before a step reads it.
static int sketch_queue(struct dec *d, uint64_t seed, struct lq_error *err) {
    d->sketch_seed = seed;
    d->sketch_pending = 1;
    DEC_MARK(DEC_PHASE_SKETCH);
    if (d->shared->sketch_mode == DEC_SKETCH_HOST) return LQ_OK;
    struct lq_rng rng;
    lq_rng_seed(&rng, seed);
    dec_rng_state start;
    memcpy(start.s, rng.state, sizeof start.s);
    const unsigned long long count = sketch_count(d);
    const unsigned long long chunks = (count + DEC_SKETCH_PER_THREAD - 1) / DEC_SKETCH_PER_THREAD;
    DEC_CUDA(cudaMemsetAsync(&d->status->fixup_count, 0, sizeof(unsigned), d->stream),
             "cudaMemset");
    if (d->shared->sketch_kernel == DEC_SKETCH_KERNEL_BLOCK) {
        const unsigned blocks = (unsigned)((chunks + DEC_SKETCH_CHUNKS - 1) / DEC_SKETCH_CHUNKS);
        dec_sketch_block_kernel<<<blocks, DEC_SKETCH_THREADS, 0, d->stream>>>(
            start, d->shared->jump_tables, d->shared->jump_levels, count, d->omega, d->status);
    } else {
        const unsigned blocks = (unsigned)((chunks + DEC_SKETCH_BLOCK - 1) / DEC_SKETCH_BLOCK);
        dec_sketch_kernel<<<blocks, DEC_SKETCH_BLOCK, 0, d->stream>>>(
            start, d->shared->jumps, d->shared->jump_levels, count, d->omega, d->status);
    }
    DEC_LAUNCHED("sketch kernel");
    return LQ_OK;
}

// Check mode: the device's sketch (fixed up) against the host's, value for value.
static int sketch_check(struct dec *d, struct lq_error *err) {
    const size_t count = sketch_count(d);
    DEC_CUDA(cudaMemcpyAsync(d->check_host, d->omega, count * sizeof(float), cudaMemcpyDeviceToHost,
                             d->stream),
             "download the sketch");
    DEC_TRY(dec_wait(d, "download the sketch", err));
    sketch_fill(d, d->sketch_seed, d->omega_host);
    for (size_t i = 0; i < count; i++)
        if (memcmp(&d->check_host[i], &d->omega_host[i], sizeof(float)) != 0)
            return lq_error_set(err, LQ_EIO,
                                "sketch check: value %zu of %zu (seed %#llx) is %.9g on the "
                                "device and %.9g on the host (%u pairs fixed up)",
                                i, count, (unsigned long long)d->sketch_seed,
                                (double)d->check_host[i], (double)d->omega_host[i],
                                d->status_host->fixup_count);
    return LQ_OK;
}

// After the wait that follows sketch_queue: the pairs the device could not settle are
// redrawn with core's lq_rng_normal from their recorded state and patched in (a list that
// overflowed, or the host mode, draws the whole sketch on the host). Queued before the step
// that reads Ω; the pinned values are not touched again before the next wait.
static int sketch_settle(struct dec *d, struct lq_error *err) {
    d->sketch_pending = 0;
    const size_t count = sketch_count(d);
    const int mode = d->shared->sketch_mode;
    const unsigned fixups = mode == DEC_SKETCH_HOST ? 0 : d->status_host->fixup_count;
    if (mode == DEC_SKETCH_HOST || fixups > DEC_FIXUP_MAX) {
        DEC_TRY(sketch_host_buffers(d, err));
        sketch_fill(d, d->sketch_seed, d->omega_host);
        DEC_CUDA(cudaMemcpyAsync(d->omega, d->omega_host, count * sizeof(float),
                                 cudaMemcpyHostToDevice, d->stream),
                 "upload the sketch");
        return LQ_OK;
    }
    for (unsigned k = 0; k < fixups; k++) {
        const struct dec_fixup *f = &d->status_host->fixups[k];
        struct lq_rng rng;
        memset(&rng, 0, sizeof rng);
        memcpy(rng.state, f->state, sizeof rng.state);
        float *pair = d->fixup_host + 2 * (size_t)k;
        pair[0] = (float)lq_rng_normal(&rng); // as lq_rng_fill_normal: r·cos θ, then the spare
        pair[1] = (float)lq_rng_normal(&rng);
        const size_t at = (size_t)f->pair * 2;
        const size_t values = at + 1 < count ? 2 : 1;
        DEC_CUDA(cudaMemcpyAsync(d->omega + at, pair, values * sizeof(float),
                                 cudaMemcpyHostToDevice, d->stream),
                 "upload the sketch fix-ups");
    }
    if (mode == DEC_SKETCH_CHECK) {
        DEC_TRY(sketch_host_buffers(d, err));
        DEC_TRY(sketch_check(d, err));
    }
    return LQ_OK;
}

// ---------- device steps ----------

static int sgemm(struct dec *d, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                 const float *a, int lda, const float *b, int ldb, float *c, int ldc,
                 struct lq_error *err) {
    const float one = 1.0f, zero = 0.0f;
    DEC_BLAS(cublasSgemm(d->blas, ta, tb, m, n, k, &one, a, lda, b, ldb, &zero, c, ldc),
             "cublasSgemm");
    return LQ_OK;
}

// A product of the range finder (Y = A·Ω, the power iterations): fp32, or with
// LQ_CUDA_DECOMPOSE_TF32 on TF32 tensor cores (10-bit mantissas, fp32 sums). Only the
// basis's span comes from these products, and a basis off by 1e-3 relative still captures
// the dominant subspace. Bᵀ = Aᵀ·Y, which L2 is made of, takes it too for the error table
// (tf32_bt), whose errors only rank configurations; a decomposition kept computes it in fp32.
static int range_product(struct dec *d, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                         int k, const float *a, int lda, const float *b, int ldb, float *c, int ldc,
                         struct lq_error *err) {
    if (!d->shared->tf32) return sgemm(d, ta, tb, m, n, k, a, lda, b, ldb, c, ldc, err);
    const float one = 1.0f, zero = 0.0f;
    DEC_BLAS(cublasGemmEx(d->blas, ta, tb, m, n, k, &one, a, CUDA_R_32F, lda, b, CUDA_R_32F, ldb,
                          &zero, c, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F_FAST_TF32,
                          CUBLAS_GEMM_DEFAULT),
             "cublasGemmEx (TF32)");
    return LQ_OK;
}

// Sums partials[0..blocks) into status->sums[slot].
static int reduce_into(struct dec *d, unsigned blocks, int slot, struct lq_error *err) {
    dec_sum_kernel<<<1, DEC_THREADS, 0, d->stream>>>(d->partials, blocks, &d->status->sums[slot]);
    DEC_LAUNCHED("sum kernel");
    return LQ_OK;
}

// The NF pipeline after its first stage (absmax done): scales, then Q = dequantize(
// quantize(input)) with status->sums[DEC_SUM_FULL] = Σ F·(W − Q − lowrank)², input being a,
// or W − lowrank when a is NULL; with residual, also r = (W − Q) weighted for the next step.
static int quantize_rest(struct dec *d, const float *a, const float *lowrank, int residual,
                         struct lq_error *err) {
    const struct lq_nf_device_config *nf = &d->nf;
    const unsigned per_block = LQ_NF_THREADS / (unsigned)nf->team; // teams per thread block
    const unsigned blocks = lq_nf_grid(nf->n_blocks, per_block);
    const unsigned group_blocks = lq_nf_grid(nf->n_groups, LQ_NF_THREADS / 32);
    lq_nf_group_kernel<<<group_blocks, LQ_NF_THREADS, 0, d->stream>>>(
        d->absmax, nf->n_blocks, nf->n_groups, nf->B1, nf->b1, nf->b2, &d->status->offset_bits,
        d->group_scale, d->block_scale, &d->status->bad_group);
    DEC_LAUNCHED("NF group kernel");
    lq_nf_residual next = {NULL, NULL, NULL, 1};
    if (residual) {
        next.residual = d->r;
        next.row_weight = d->row_weight, next.col_weight = d->col_weight;
        next.cols = d->shape.cols;
    }
    const void *arrays[] = {a, d->q, d->w, lowrank, d->fisher, next.residual};
    unsigned value_blocks = blocks;
    if (d->shared->nf_values == DEC_NF_VALUES_VEC4 && lq_nf_vec4_ok(nf, arrays, 6)) {
        value_blocks = lq_nf_grid(nf->numel / 4, LQ_NF_THREADS);
        lq_nf_values_vec4_kernel<true><<<value_blocks, LQ_NF_THREADS, 0, d->stream>>>(
            a, *nf, d->block_scale, d->q, d->w, lowrank, d->fisher, d->partials, next);
    } else {
        lq_nf_values_kernel<true><<<blocks, LQ_NF_THREADS, 0, d->stream>>>(
            a, *nf, d->block_scale, d->q, d->w, lowrank, d->fisher, d->partials, next);
    }
    DEC_LAUNCHED("NF values kernel");
    d->last_lowrank = lowrank;
    return reduce_into(d, value_blocks, DEC_SUM_FULL, err);
}

// Q = dequantize(quantize(W)) (rank 0, or the quantized start) and status->sums[DEC_SUM_FULL]
// = Σ F·(W − Q)²; with residual, r = (W − Q) weighted, the first step's SVD input.
static int quantize_w(struct dec *d, int residual, struct lq_error *err) {
    const struct lq_nf_device_config *nf = &d->nf;
    const unsigned per_block = LQ_NF_THREADS / (unsigned)nf->team;
    const unsigned blocks = lq_nf_grid(nf->n_blocks, per_block);
    DEC_MARK(DEC_PHASE_QUANTIZE);
    DEC_CUDA(cudaMemsetAsync(&d->status->offset_bits, 0xff, sizeof(unsigned), d->stream),
             "cudaMemset");
    lq_nf_absmax_kernel<<<blocks, LQ_NF_THREADS, 0, d->stream>>>(
        d->w, NULL, nf->numel, nf->B0, nf->team, nf->n_blocks, d->absmax, &d->status->offset_bits,
        &d->status->first_bad);
    DEC_LAUNCHED("NF absmax kernel");
    return quantize_rest(d, d->w, NULL, residual, err);
}

// The step after lowrank = L1·L2: status->sums[DEC_SUM_HALF] = Σ F·(W − Q − L1L2)² (q_zero:
// Q is the zero start), then Q = dequantize(quantize(W − L1L2)) with its error; with
// residual, also the next step's SVD input.
static int quantize_step(struct dec *d, int q_zero, int residual, struct lq_error *err) {
    const struct lq_nf_device_config *nf = &d->nf;
    const size_t n = d->shape.numel;
    const unsigned blocks = lq_nf_grid(n, DEC_THREADS);
    const int fused = nf->B0 <= DEC_THREADS && (nf->B0 & (nf->B0 - 1)) == 0;
    const float *q = q_zero ? NULL : d->q;
    // 16-byte loads where every array allows them (and, fused, B0 >= 4: whole quads a block)
    const void *arrays[] = {d->w, q, d->lowrank, d->fisher};
    const int vec4 = d->shared->nf_values == DEC_NF_VALUES_VEC4 && n % 4 == 0 &&
                     (!fused || nf->B0 >= 4) && lq_nf_vec4_ok(nf, arrays, 4);
    DEC_MARK(DEC_PHASE_QUANTIZE);
    DEC_CUDA(cudaMemsetAsync(&d->status->offset_bits, 0xff, sizeof(unsigned), d->stream),
             "cudaMemset");
    unsigned half_blocks = blocks;
    if (vec4) {
        half_blocks = lq_nf_grid(n / 4, DEC_THREADS);
        if (fused)
            dec_half_step_vec4_kernel<true><<<half_blocks, DEC_THREADS, 0, d->stream>>>(
                d->w, q, d->lowrank, d->fisher, n, d->partials, (unsigned)nf->B0, nf->n_blocks,
                d->absmax, &d->status->offset_bits, &d->status->first_bad);
        else
            dec_half_step_vec4_kernel<false><<<half_blocks, DEC_THREADS, 0, d->stream>>>(
                d->w, q, d->lowrank, d->fisher, n, d->partials, 4u, 0, NULL, NULL, NULL);
    } else if (fused) {
        dec_half_step_kernel<true><<<blocks, DEC_THREADS, 0, d->stream>>>(
            d->w, q, d->lowrank, d->fisher, n, d->partials, (unsigned)nf->B0, nf->n_blocks,
            d->absmax, &d->status->offset_bits, &d->status->first_bad);
    } else {
        dec_half_step_kernel<false><<<blocks, DEC_THREADS, 0, d->stream>>>(
            d->w, q, d->lowrank, d->fisher, n, d->partials, 1u, 0, NULL, NULL, NULL);
    }
    DEC_LAUNCHED("half-step kernel");
    DEC_TRY(reduce_into(d, half_blocks, DEC_SUM_HALF, err));
    if (!fused) {
        const unsigned per_block = LQ_NF_THREADS / (unsigned)nf->team;
        lq_nf_absmax_kernel<<<lq_nf_grid(nf->n_blocks, per_block), LQ_NF_THREADS, 0, d->stream>>>(
            d->w, d->lowrank, nf->numel, nf->B0, nf->team, nf->n_blocks, d->absmax,
            &d->status->offset_bits, &d->status->first_bad);
        DEC_LAUNCHED("NF absmax kernel");
    }
    return quantize_rest(d, NULL, d->lowrank, residual, err);
}

// Replaces the columns of the column-major rows x q matrix x by an orthonormal basis of
// their span: CholeskyQR2 (cholesky_qr_cuda.cuh), or Householder QR as svd.c's
// orthonormalize (LQ_CUDA_DECOMPOSE_QR=householder). The span is the same either way.
static int orthonormalize(struct dec *d, float *x, int rows, struct lq_error *err) {
    const int q = d->shape.sketch;
    DEC_MARK(DEC_PHASE_QR);
    if (d->cholesky_qr)
        return lq_cholqr_orthonormalize(&d->qr, d->blas, d->stream, x, rows,
                                        &d->status->qr_fallbacks, err);
    DEC_SOLVER(cusolverDnSgeqrf(d->solver, rows, q, x, rows, d->tau, d->solver_work,
                                d->solver_lwork, &d->status->qr_info),
               "cusolverDnSgeqrf");
    DEC_SOLVER(cusolverDnSorgqr(d->solver, rows, q, q, x, rows, d->tau, d->solver_work,
                                d->solver_lwork, &d->status->qr_info),
               "cusolverDnSorgqr");
    return LQ_OK;
}

// L1, L2 from the randomized SVD of a (m x n row-major, i.e. the column-major n x m matrix
// Aᶜ = Aᵀ), with Ω settled in d->omega. Every product in svd.c's terms:
//   Y = A·Ω       gemm(T, T): Aᶜᵀ (m x n) times Ωᶜᵀ (Ω uploaded row-major is Ωᶜ, q x n)
//   Z = Aᵀ·Y      gemm(N, N): Aᶜ (n x m) times Y (m x q)
//   Y = A·Z       gemm(T, N)
//   Bᵀ = Aᵀ·Y     n x q, as Z
//   L1ᵀ = ubᵀ·Yᵀ  r x m column-major = L1 row-major
//   L2ᵀ = Bᵀ·ubs  n x r column-major = L2 row-major
static int randomized_factors(struct dec *d, const float *a, int power_iters,
                              struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const int m = (int)s->rows, n = (int)s->cols, q = s->sketch, r = s->rank;
    const cublasOperation_t N = CUBLAS_OP_N, T = CUBLAS_OP_T;
    DEC_MARK(DEC_PHASE_PRODUCTS);
    DEC_TRY(range_product(d, T, T, m, q, n, a, n, d->omega, q, d->y, m, err));
    DEC_TRY(orthonormalize(d, d->y, m, err));
    for (int it = 0; it < power_iters; it++) {
        // Re-orthonormalizing between products keeps the small singular directions from
        // drowning in rounding error (Halko et al., Algorithm 4.4).
        DEC_MARK(DEC_PHASE_PRODUCTS);
        DEC_TRY(range_product(d, N, N, n, q, m, a, n, d->y, m, d->z, n, err));
        DEC_TRY(orthonormalize(d, d->z, n, err));
        DEC_MARK(DEC_PHASE_PRODUCTS);
        DEC_TRY(range_product(d, T, N, m, q, n, a, n, d->z, n, d->y, m, err));
        DEC_TRY(orthonormalize(d, d->y, m, err));
    }
    DEC_MARK(DEC_PHASE_PRODUCTS);
    if (d->shared->tf32_bt) // Bᵀ
        DEC_TRY(range_product(d, N, N, n, q, m, a, n, d->y, m, d->z, n, err));
    else
        DEC_TRY(sgemm(d, N, N, n, q, m, a, n, d->y, m, d->z, n, err));
    DEC_MARK(DEC_PHASE_SMALL_SVD);
    const size_t nq = (size_t)n * q;
    dec_widen_kernel<<<lq_nf_grid(nq, DEC_THREADS), DEC_THREADS, 0, d->stream>>>(d->z, nq, d->bt);
    DEC_LAUNCHED("widen kernel");
    const double one = 1.0, zero = 0.0;
    DEC_BLAS(
        cublasDsyrk(d->blas, CUBLAS_FILL_MODE_LOWER, T, q, n, &one, d->bt, n, &zero, d->gram, q),
        "cublasDsyrk");
    if (d->eig_jacobi)
        DEC_TRY(lq_eig_jacobi(d->stream, d->gram, q, d->lambda, &d->status->eig_info, err));
    else if (d->eig_params)
        DEC_SOLVER(cusolverDnXsyevBatched(d->solver, d->eig_params, CUSOLVER_EIG_MODE_VECTOR,
                                          CUBLAS_FILL_MODE_LOWER, q, CUDA_R_64F, d->gram, q,
                                          CUDA_R_64F, d->lambda, CUDA_R_64F, d->eig_work,
                                          d->eig_device_bytes, d->eig_host_work, d->eig_host_bytes,
                                          &d->status->eig_info, 1),
                   "cusolverDnXsyevBatched");
    else
        DEC_SOLVER(cusolverDnDsyevd(d->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, q,
                                    d->gram, q, d->lambda, d->eig_work, d->eig_lwork,
                                    &d->status->eig_info),
                   "cusolverDnDsyevd");
    dec_pick_kernel<<<r, 128, 0, d->stream>>>(d->lambda, d->gram, q, d->ub, d->ubs);
    DEC_LAUNCHED("pick kernel");
    DEC_MARK(DEC_PHASE_FACTORS);
    DEC_TRY(sgemm(d, T, T, r, m, q, d->ub, q, d->y, m, d->L1, r, err));
    DEC_BLAS(cublasDgemm(d->blas, N, N, n, r, q, &one, d->bt, n, d->ubs, q, &zero, d->l2t, n),
             "cublasDgemm");
    const size_t rn = (size_t)r * n, mr = (size_t)m * r;
    dec_l2_kernel<<<lq_nf_grid(rn, DEC_THREADS), DEC_THREADS, 0, d->stream>>>(
        d->l2t, (size_t)n, rn, d->inverse_col, d->L2);
    DEC_LAUNCHED("L2 kernel");
    if (d->inverse_row) {
        dec_scale_rows_kernel<<<lq_nf_grid(mr, DEC_THREADS), DEC_THREADS, 0, d->stream>>>(
            d->L1, mr, r, d->inverse_row);
        DEC_LAUNCHED("row weight kernel");
    }
    return LQ_OK;
}

// L1, L2 from core's exact SVD of the downloaded residual a, with lq.c's factor arithmetic.
static int exact_factors(struct dec *d, const float *a, const struct lq_svd_options *svd,
                         struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const size_t rows = s->rows, cols = s->cols;
    const int rank = s->rank;
    const float *host_row_weight = d->shared->host_row_weight;
    const float *host_col_weight = d->shared->host_col_weight;
    DEC_MARK(DEC_PHASE_SMALL_SVD);
    DEC_CUDA(cudaMemcpyAsync(d->host_residual, a, s->numel * sizeof(float), cudaMemcpyDeviceToHost,
                             d->stream),
             "download the residual");
    DEC_TRY(dec_wait(d, "cudaStreamSynchronize", err));
    DEC_TRY(lq_svd_truncated(d->host_residual, rows, cols, rank, svd, d->host_u, d->host_s,
                             d->host_vt, err));
    float *sv = d->host_s;
    for (int k = 0; k < rank; k++) sv[k] = sqrtf(fmaxf(sv[k], 0.0f));
    for (size_t i = 0; i < rows; i++) {
        float inverse_row = host_row_weight ? 1.0f / host_row_weight[i] : 1.0f;
        for (int k = 0; k < rank; k++)
            d->host_L1[i * (size_t)rank + k] =
                d->host_u[i * (size_t)rank + k] * sv[k] * inverse_row;
    }
    for (int k = 0; k < rank; k++)
        for (size_t j = 0; j < cols; j++) {
            float inverse_col = host_col_weight ? 1.0f / host_col_weight[j] : 1.0f;
            d->host_L2[(size_t)k * cols + j] =
                sv[k] * d->host_vt[(size_t)k * cols + j] * inverse_col;
        }
    DEC_CUDA(cudaMemcpyAsync(d->L1, d->host_L1, rows * (size_t)rank * sizeof(float),
                             cudaMemcpyHostToDevice, d->stream),
             "upload L1");
    DEC_CUDA(cudaMemcpyAsync(d->L2, d->host_L2, (size_t)rank * cols * sizeof(float),
                             cudaMemcpyHostToDevice, d->stream),
             "upload L2");
    return LQ_OK;
}

// lowrank = L1·L2: the row-major m x n product is the column-major (L1·L2)ᵀ = L2ᵀ·L1ᵀ, and
// the row-major factors are exactly the column-major L2ᵀ (n x r) and L1ᵀ (r x m).
static int lowrank_product(struct dec *d, const float *L1, const float *L2, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const int m = (int)s->rows, n = (int)s->cols, r = s->rank;
    return sgemm(d, CUBLAS_OP_N, CUBLAS_OP_N, n, m, r, L2, n, L1, r, d->lowrank, n, err);
}

// One factorization step (lq.c: factorize): L1, L2 <- SVD_r of a = (W − Q) weighted, then
// lowrank = L1·L2. When randomized, Ω is settled in d->omega.
static int factorize(struct dec *d, const float *a, const struct lq_svd_options *svd,
                     struct lq_error *err) {
    if (d->shape.randomized)
        DEC_TRY(randomized_factors(d, a, svd->power_iters, err));
    else
        DEC_TRY(exact_factors(d, a, svd, err));
    DEC_MARK(DEC_PHASE_LOWRANK);
    return lowrank_product(d, d->L1, d->L2, err);
}

// The SVD input of a step: d->r when it already holds (W − Q) weighted, else computed
// (or W itself, for the unweighted zero start: W − 0 is W bit for bit).
static int factor_input(struct dec *d, int q_zero, int residual_ready, const float **a,
                        struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    *a = d->r;
    if (residual_ready) return LQ_OK;
    if (q_zero && !s->weighted) {
        *a = d->w;
        return LQ_OK;
    }
    unsigned row_blocks = (unsigned)(s->rows < LQ_NF_MAX_GRID ? s->rows : LQ_NF_MAX_GRID);
    dec_residual_kernel<<<row_blocks, DEC_THREADS, 0, d->stream>>>(
        d->w, q_zero ? NULL : d->q, s->rows, s->cols, d->row_weight, d->col_weight, d->r);
    DEC_LAUNCHED("residual kernel");
    return LQ_OK;
}

// status->sums[DEC_SUM_NORM] = ||W||² (weighted).
static int norm_squared(struct dec *d, struct lq_error *err) {
    const size_t n = d->shape.numel;
    const unsigned blocks = lq_nf_grid(n, DEC_THREADS);
    dec_norm_kernel<<<blocks, DEC_THREADS, 0, d->stream>>>(d->w, d->fisher, n, d->partials);
    DEC_LAUNCHED("norm kernel");
    return reduce_into(d, blocks, DEC_SUM_NORM, err);
}

static float download_float(struct dec *d, const float *device) {
    float value = NAN;
    if (cudaMemcpyAsync(&value, device, sizeof value, cudaMemcpyDeviceToHost, d->stream) !=
            cudaSuccess ||
        cudaStreamSynchronize(d->stream) != cudaSuccess)
        return NAN;
    return value;
}

// Queues the status's way back; check_step waits for it.
static int queue_status(struct dec *d, struct lq_error *err) {
    DEC_MARK(DEC_PHASE_ROUND_TRIP);
    DEC_CUDA(cudaMemcpyAsync(d->status_host, d->status, sizeof *d->status_host,
                             cudaMemcpyDeviceToHost, d->stream),
             "download the status");
    return LQ_OK;
}

// Waits for the queued step, turns what its status says into core's errors, and settles a
// sketch queued with the step.
static int check_step(struct dec *d, struct lq_error *err) {
    DEC_TRY(dec_wait(d, "decomposition step", err));
    DEC_CUDA(lq_phase_timer_collect(&d->timer), "profile");
    const struct dec_status *st = d->status_host;
    const struct dec_shape *s = &d->shape;
    if (st->qr_info != 0)
        return lq_error_set(err, LQ_ESOLVER,
                            "cuSOLVER QR of the sketch of %zu x %zu failed (info %d)", s->rows,
                            s->cols, st->qr_info);
    if (st->eig_info != 0 && d->eig_jacobi)
        return lq_error_set(err, LQ_ESOLVER,
                            "the Jacobi eigensolver failed on the %d x %d sketch Gram matrix: %s "
                            "(info %d)",
                            s->sketch, s->sketch, lq_eig_jacobi_info_text(st->eig_info),
                            st->eig_info);
    if (st->eig_info != 0)
        return lq_error_set(
            err, LQ_ESOLVER, "cuSOLVER %s failed on the %d x %d sketch Gram matrix (info %d)",
            d->eig_params ? "syevBatched" : "syevd", s->sketch, s->sketch, st->eig_info);
    if (st->first_bad != DEC_NO_INDEX) {
        // The quantizer's input there, formed again as the device formed it.
        size_t index = (size_t)st->first_bad;
        float value = download_float(d, d->w + index);
        if (d->last_lowrank) value = lq_nf_sub(value, download_float(d, d->last_lowrank + index));
        return lq_error_set(err, LQ_ENUMERIC, "value %zu is %g: cannot quantize", index,
                            (double)value);
    }
    if (st->bad_group != DEC_NO_INDEX) {
        size_t group = (size_t)st->bad_group;
        return lq_error_set(err, LQ_ENUMERIC, "group %zu: scale %g overflows %s; choose a wider b2",
                            group, (double)download_float(d, d->group_scale + group),
                            lq_scale_dtype_name((enum lq_scale_dtype)d->nf.b2));
    }
    if (d->sketch_pending) DEC_TRY(sketch_settle(d, err));
    return LQ_OK;
}

static int copy_factors(struct dec *d, float *L1, float *L2, const float *from_L1,
                        const float *from_L2, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const size_t r = (size_t)s->rank;
    DEC_CUDA(cudaMemcpyAsync(L1, from_L1, s->rows * r * sizeof(float), cudaMemcpyDeviceToDevice,
                             d->stream),
             "copy L1");
    DEC_CUDA(cudaMemcpyAsync(L2, from_L2, r * s->cols * sizeof(float), cudaMemcpyDeviceToDevice,
                             d->stream),
             "copy L2");
    return LQ_OK;
}

// One decomposition under configuration c, lq_decompose's loop step for step. history
// (max_iters values) and norm (||W||, weighted like the errors) are optional. With stop,
// the run gives up (DEC_STOPPED) before a step once *stop is set.
static int run_steps(struct dec *d, const struct lq_nf_config *c,
                     const struct lq_decompose_options *o, double *history, double *norm,
                     struct dec_result *res, const int *stop, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const int rank = s->rank, keep = s->keep && rank > 0;
    lq_nf_device_config_init(&d->nf, c, s->numel);
    memset(res, 0, sizeof *res);
    res->best = INFINITY;
    res->best_q_from_w = 1;
    double previous = INFINITY;
    int q_from_w = 1;
    if (keep) {
        // An initial Q that no step beats keeps L = 0 (lq.c zeroes them).
        DEC_CUDA(cudaMemsetAsync(d->out_L1, 0, s->rows * (size_t)rank * sizeof(float), d->stream),
                 "cudaMemset");
        DEC_CUDA(cudaMemsetAsync(d->out_L2, 0, (size_t)rank * s->cols * sizeof(float), d->stream),
                 "cudaMemset");
    }
    lq_phase_timer_restart(&d->timer);
    DEC_MARK(DEC_PHASE_SETUP);
    if (norm) DEC_TRY(norm_squared(d, err)); // comes back with the first status
    // q_zero: Q is the zero start, never stored (the kernels read NULL as zeros).
    // residual_ready: d->r holds (W − Q) weighted, written by the last quantizer pass.
    int q_zero = 0, residual_ready = 0;
    if (o->init == LQ_INIT_QUANTIZED) {
        DEC_TRY(quantize_w(d, rank > 0, err));
        residual_ready = rank > 0;
    } else {
        q_zero = 1;
    }
    if (s->randomized) DEC_TRY(sketch_queue(d, step_seed(o->svd.seed, 1), err));
    if (o->init == LQ_INIT_QUANTIZED || s->randomized) {
        DEC_TRY(queue_status(d, err));
        DEC_TRY(check_step(d, err)); // also settles the first sketch
        if (o->init == LQ_INIT_QUANTIZED) res->best = sqrt(d->status_host->sums[DEC_SUM_FULL]);
    }

    for (int step = 1; step <= o->max_iters; step++) {
        if (stop && __atomic_load_n(stop, __ATOMIC_ACQUIRE)) return DEC_STOPPED;
        const int more = step < o->max_iters; // whether a next step may follow
        if (rank > 0) {
            struct lq_svd_options svd = o->svd;
            svd.seed = step_seed(o->svd.seed, step);
            const float *a = NULL;
            DEC_MARK(DEC_PHASE_SETUP);
            DEC_TRY(factor_input(d, q_zero, residual_ready, &a, err));
            DEC_TRY(factorize(d, a, &svd, err));
            DEC_TRY(quantize_step(d, q_zero, more, err));
            residual_ready = more;
        } else {
            DEC_TRY(quantize_w(d, 0, err));
        }
        q_zero = 0;
        // The next step's sketch, behind this step on the stream: its fix-ups come back
        // with this step's status.
        if (s->randomized && more) DEC_TRY(sketch_queue(d, step_seed(o->svd.seed, step + 1), err));
        DEC_TRY(queue_status(d, err));
        DEC_TRY(check_step(d, err));
        if (norm) *norm = sqrt(d->status_host->sums[DEC_SUM_NORM]);

        const double half = sqrt(d->status_host->sums[DEC_SUM_HALF]);
        const double error = sqrt(d->status_host->sums[DEC_SUM_FULL]);
        // Half step: the previous Q with the new L (Q = 0 of a zero start is no candidate).
        if (rank > 0 && (step > 1 || o->init == LQ_INIT_QUANTIZED) && half < res->best) {
            res->best = half;
            res->best_iter = step, res->best_is_half_step = 1;
            res->best_q_from_w = q_from_w;
            if (keep) {
                DEC_TRY(copy_factors(d, d->best_q_L1, d->best_q_L2, d->prev_L1, d->prev_L2, err));
                DEC_TRY(copy_factors(d, d->out_L1, d->out_L2, d->L1, d->L2, err));
            }
        }
        q_from_w = rank == 0;
        if (history) history[step - 1] = error;
        res->iters = step;
        if (error < res->best) {
            res->best = error;
            res->best_iter = step, res->best_is_half_step = 0;
            res->best_q_from_w = q_from_w;
            if (keep) {
                DEC_TRY(copy_factors(d, d->best_q_L1, d->best_q_L2, d->L1, d->L2, err));
                DEC_TRY(copy_factors(d, d->out_L1, d->out_L2, d->L1, d->L2, err));
            }
        }
        if (keep) DEC_TRY(copy_factors(d, d->prev_L1, d->prev_L2, d->L1, d->L2, err));
        // Without a low-rank part Q is final after one step; otherwise stop as soon as the
        // error stops falling, or falls by less than the requested fraction.
        if (rank == 0 || error >= previous) break;
        if (o->min_improvement > 0 && previous - error < o->min_improvement * previous) break;
        previous = error;
    }
    return LQ_OK;
}

static double dec_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

// run_steps, timed when profiling.
static int run(struct dec *d, const struct lq_nf_config *c, const struct lq_decompose_options *o,
               double *history, double *norm, struct dec_result *res, const int *stop,
               struct lq_error *err) {
    const double start = d->timer.enabled ? dec_seconds() : 0.0;
    const int rc = run_steps(d, c, o, history, norm, res, stop, err);
    if (d->timer.enabled && rc == LQ_OK) {
        d->profile_wall += dec_seconds() - start;
        d->profile_steps += res->iters;
        d->profile_runs++;
    }
    return rc;
}

// The kept factors and the packed Q of the kept step into out.
static int collect(struct dec *d, const struct lq_nf_config *c, const struct dec_result *res,
                   struct lq_decomposition *out, struct lq_error *err) {
    const struct dec_shape *s = &d->shape;
    const size_t r = (size_t)s->rank;
    if (r > 0) {
        DEC_CUDA(cudaMemcpyAsync(out->L1, d->out_L1, s->rows * r * sizeof(float),
                                 cudaMemcpyDeviceToHost, d->stream),
                 "download L1");
        DEC_CUDA(cudaMemcpyAsync(out->L2, d->out_L2, r * s->cols * sizeof(float),
                                 cudaMemcpyDeviceToHost, d->stream),
                 "download L2");
    }
    // Re-quantize the kept Q's input: the same input gives the same Q bit for bit.
    const float *input = d->shared->host_w;
    if (!res->best_q_from_w) {
        if (!d->host_residual) {
            d->host_residual = (float *)malloc(s->numel * sizeof(float));
            if (!d->host_residual)
                return lq_error_set(err, LQ_ENOMEM, "out of memory decomposing %zu x %zu", s->rows,
                                    s->cols);
        }
        DEC_TRY(lowrank_product(d, d->best_q_L1, d->best_q_L2, err));
        const unsigned blocks = lq_nf_grid(s->numel, DEC_THREADS);
        dec_difference_kernel<<<blocks, DEC_THREADS, 0, d->stream>>>(d->w, d->lowrank, s->numel,
                                                                     d->r);
        DEC_LAUNCHED("residual kernel");
        DEC_CUDA(cudaMemcpyAsync(d->host_residual, d->r, s->numel * sizeof(float),
                                 cudaMemcpyDeviceToHost, d->stream),
                 "download the residual");
        input = d->host_residual;
    }
    DEC_TRY(dec_wait(d, "decomposition results", err));
    return lq_nf_quantize(input, s->rows, s->cols, c, &out->Q, err);
}

// ---------- validation (lq.c's rules and messages) ----------

static int validate_matrix(const float *w, size_t rows, size_t cols,
                           const struct lq_decompose_options *o, struct lq_error *err) {
    size_t k = rows < cols ? rows : cols;
    if (rows == 0 || cols == 0 || rows > (size_t)INT32_MAX || cols > (size_t)INT32_MAX)
        return lq_error_set(err, LQ_EINVAL, "cannot decompose a %zu x %zu matrix", rows, cols);
    if (o->rank < 0 || (size_t)o->rank > k)
        return lq_error_set(err, LQ_EINVAL, "rank %d: must be 0..%zu for a %zu x %zu matrix",
                            o->rank, k, rows, cols);
    if (o->max_iters < 1)
        return lq_error_set(err, LQ_EINVAL, "iterations %d: must be >= 1", o->max_iters);
    if (!(o->min_improvement >= 0.0 && o->min_improvement < 1.0))
        return lq_error_set(err, LQ_EINVAL, "minimum improvement %g: must be in [0, 1)",
                            o->min_improvement);
    for (size_t i = 0; i < rows * cols; i++)
        if (!isfinite(w[i]))
            return lq_error_set(err, LQ_ENUMERIC, "W[%zu, %zu] is %g", i / cols, i % cols,
                                (double)w[i]);
    if (o->rank > 0 && (o->svd.oversample < 0 || o->svd.power_iters < 0))
        return lq_error_set(err, LQ_EINVAL, "oversample and power iterations must be >= 0");
    return LQ_OK;
}

// Row and column weights from the Fisher information, as lq.c's fisher_weights: means of
// sqrt(F), floored at 1e-6 of the largest. *row_out, *col_out are malloc'ed.
static int fisher_weights(const float *fisher, size_t rows, size_t cols, float **row_out,
                          float **col_out, struct lq_error *err) {
    *row_out = *col_out = NULL;
    float *row_weight = (float *)malloc(rows * sizeof(float));
    float *col_weight = (float *)malloc(cols * sizeof(float));
    double *col_sum = (double *)calloc(cols, sizeof(double));
    int rc = LQ_OK;
    double largest = 0.0;
    float row_floor = 0.0f, col_floor = 0.0f;
    if (!row_weight || !col_weight || !col_sum) {
        rc = lq_error_set(err, LQ_ENOMEM, "out of memory for Fisher weights");
        goto done;
    }
    for (size_t i = 0; i < rows; i++) {
        double row_sum = 0.0;
        for (size_t j = 0; j < cols; j++) {
            float f = fisher[i * cols + j];
            if (!(f >= 0.0f) || isinf(f)) {
                rc = lq_error_set(err, LQ_EINVAL,
                                  "Fisher information at (%zu, %zu) is %g: must be finite and >= 0",
                                  i, j, (double)f);
                goto done;
            }
            double root = sqrt((double)f);
            row_sum += root;
            col_sum[j] += root;
        }
        row_weight[i] = (float)(row_sum / (double)cols);
        largest = fmax(largest, row_weight[i]);
    }
    for (size_t j = 0; j < cols; j++) col_weight[j] = (float)(col_sum[j] / (double)rows);
    if (largest == 0.0) {
        rc = lq_error_set(err, LQ_EINVAL, "Fisher information is all zero");
        goto done;
    }
    for (size_t i = 0; i < rows; i++) row_floor = fmaxf(row_floor, row_weight[i]);
    for (size_t j = 0; j < cols; j++) col_floor = fmaxf(col_floor, col_weight[j]);
    row_floor *= 1e-6f, col_floor *= 1e-6f;
    for (size_t i = 0; i < rows; i++) row_weight[i] = fmaxf(row_weight[i], row_floor);
    for (size_t j = 0; j < cols; j++) col_weight[j] = fmaxf(col_weight[j], col_floor);
done:
    free(col_sum);
    if (rc) {
        free(row_weight), free(col_weight);
        return rc;
    }
    *row_out = row_weight, *col_out = col_weight;
    return LQ_OK;
}

// The call's sizes for options o over configurations configs[0..n).
static void shape_of(size_t rows, size_t cols, const struct lq_nf_config *configs, size_t n,
                     const struct lq_decompose_options *o, int keep, struct dec_shape *s) {
    memset(s, 0, sizeof *s);
    s->rows = rows, s->cols = cols, s->numel = rows * cols;
    s->rank = o->rank;
    s->keep = keep;
    s->weighted = o->fisher != NULL;
    if (o->rank > 0) {
        // As lq_svd_truncated: anything but an exact resolution is randomized.
        s->exact = lq_svd_resolve(rows, cols, o->rank, &o->svd) == LQ_SVD_EXACT;
        s->randomized = !s->exact;
    }
    if (s->randomized) {
        size_t k = rows < cols ? rows : cols;
        size_t q = (size_t)o->rank + (size_t)(o->svd.oversample > 0 ? o->svd.oversample : 0);
        s->sketch = (int)(q > k ? k : q);
    }
    for (size_t i = 0; i < n; i++) {
        size_t blocks = lq_nf_block_count(s->numel, &configs[i]);
        size_t groups = lq_nf_group_count(s->numel, &configs[i]);
        s->max_blocks = blocks > s->max_blocks ? blocks : s->max_blocks;
        s->max_groups = groups > s->max_groups ? groups : s->max_groups;
    }
}

// ---------- several configurations at once ----------

// The work list of lq_cuda_decompose_errors, shared by its workers.
struct dec_pool {
    const struct lq_nf_config *configs;
    const uint64_t *seeds;
    size_t n_configs;
    const struct lq_decompose_options *options;
    double *errors;
    size_t next; // the next configuration index (atomic)
    int stop;    // set on the first failure (atomic)
    pthread_mutex_t lock;
    int rc;                // the first failure ...
    struct lq_error error; // ... and its message
};

struct dec_thread {
    struct dec_pool *pool;
    struct dec *d;
    pthread_t thread;
};

static void pool_fail(struct dec_pool *p, int rc, const struct lq_error *err) {
    pthread_mutex_lock(&p->lock);
    if (!p->rc) p->rc = rc, p->error = *err;
    pthread_mutex_unlock(&p->lock);
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
}

// Decomposes configurations until none is left or a worker failed.
static void pool_work(struct dec_pool *p, struct dec *d) {
    while (!__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) {
        const size_t i = __atomic_fetch_add(&p->next, (size_t)1, __ATOMIC_RELAXED);
        if (i >= p->n_configs) return;
        struct lq_decompose_options o = *p->options;
        o.svd.seed = p->seeds[i];
        struct dec_result res;
        struct lq_error err;
        memset(&err, 0, sizeof err);
        const int rc = run(d, &p->configs[i], &o, NULL, NULL, &res, &p->stop, &err);
        if (rc == DEC_STOPPED) return;
        if (rc) {
            char text[64];
            lq_error_prefix(&err, "configuration %s",
                            lq_nf_config_format(&p->configs[i], text, sizeof text));
            pool_fail(p, rc, &err);
            return;
        }
        p->errors[i] = res.best * res.best; // the paper's cost, as compress.c squares the error
    }
}

static void *pool_thread(void *argument) {
    struct dec_thread *t = (struct dec_thread *)argument;
    const cudaError_t status = cudaSetDevice(t->d->cuda->device);
    if (status != cudaSuccess) {
        struct lq_error err;
        memset(&err, 0, sizeof err);
        pool_fail(t->pool, lq_cuda_fail(status, "cudaSetDevice", &err), &err);
        return NULL;
    }
    pool_work(t->pool, t->d);
    return NULL;
}

// How many workers lq_cuda_decompose_errors runs, the first (first) already open.
static size_t worker_count(struct lq_backend *backend, const struct dec *first, size_t n_configs) {
    const size_t most = n_configs < DEC_MAX_WORKERS ? n_configs : DEC_MAX_WORKERS;
    const char *env = getenv("LQ_CUDA_DECOMPOSE_STREAMS");
    if (env && *env) {
        char *end = NULL;
        long value = strtol(env, &end, 10);
        if (end && *end == '\0' && value >= 1) return (size_t)value < most ? (size_t)value : most;
    }
    // What the others may take: half of the free device memory, and what the backend's
    // limit leaves.
    struct lq_backend_memory m;
    memset(&m, 0, sizeof m);
    backend->ops->memory(backend, &m);
    size_t room = m.device_free / 2;
    if (m.limit) {
        const size_t held = m.weights + m.buffers + m.scratch + m.jobs;
        const size_t left = m.limit > held ? m.limit - held : 0;
        room = left < room ? left : room;
    }
    const size_t each = first->slab_bytes + first->work_bytes + DEC_WORKER_OVERHEAD;
    size_t count = 1 + room / each;
    if (count > DEC_DEFAULT_WORKERS) count = DEC_DEFAULT_WORKERS;
    return count < most ? count : most;
}

// ---------- entry points ----------

int lq_cuda_decompose(struct lq_backend *backend, const float *w, size_t rows, size_t cols,
                      const struct lq_nf_config *config, const struct lq_decompose_options *options,
                      struct lq_decomposition *out, struct lq_error *err) {
    memset(out, 0, sizeof *out);
    int rc = lq_nf_config_validate(config, err);
    if (rc) return rc;
    if ((rc = validate_matrix(w, rows, cols, options, err))) return rc;
    float *row_weight = NULL, *col_weight = NULL;
    if (options->fisher &&
        (rc = fisher_weights(options->fisher, rows, cols, &row_weight, &col_weight, err)))
        return rc;
    const size_t r = (size_t)options->rank;
    out->rows = rows, out->cols = cols, out->rank = options->rank;
    out->L1 = (float *)malloc((r ? rows * r : 1) * sizeof(float));
    out->L2 = (float *)malloc((r ? r * cols : 1) * sizeof(float));
    out->history = (double *)malloc((size_t)options->max_iters * sizeof(double));
    struct dec_shared *sh = (struct dec_shared *)calloc(1, sizeof *sh);
    struct dec *d = (struct dec *)calloc(1, sizeof *d);
    if (!out->L1 || !out->L2 || !out->history || !sh || !d) {
        free(row_weight), free(col_weight), free(sh), free(d);
        lq_decomposition_free(out);
        return lq_error_set(err, LQ_ENOMEM, "out of memory decomposing %zu x %zu", rows, cols);
    }

    struct dec_shape shape;
    shape_of(rows, cols, config, 1, options, 1, &shape);
    struct dec_result res;
    double norm = 0.0;
    rc = dec_shared_open(sh, lq_cuda_of(backend), &shape, w, options->fisher, row_weight,
                         col_weight, err);
    if (!rc) rc = dec_open(d, sh, 0, err);
    if (!rc) rc = dec_shared_upload(sh, d->stream, err); // the same stream: no wait needed
    if (!rc) rc = run(d, config, options, out->history, &norm, &res, NULL, err);
    if (!rc) rc = collect(d, config, &res, out, err);
    dec_close(d);
    dec_shared_close(sh);
    free(d), free(sh);
    if (rc) {
        lq_decomposition_free(out);
        return rc;
    }
    out->error = res.best;
    out->norm = norm;
    out->iters = res.iters;
    out->best_iter = res.best_iter;
    out->best_is_half_step = res.best_is_half_step;
    return LQ_OK;
}

int lq_cuda_decompose_errors(struct lq_backend *backend, const float *w, size_t rows, size_t cols,
                             const struct lq_nf_config *configs, const uint64_t *seeds,
                             size_t n_configs, const struct lq_decompose_options *options,
                             double *errors, struct lq_error *err) {
    if (n_configs == 0) return LQ_OK;
    int rc = LQ_OK;
    for (size_t i = 0; i < n_configs; i++)
        if ((rc = lq_nf_config_validate(&configs[i], err))) return rc;
    if ((rc = validate_matrix(w, rows, cols, options, err))) return rc;
    float *row_weight = NULL, *col_weight = NULL;
    if (options->fisher &&
        (rc = fisher_weights(options->fisher, rows, cols, &row_weight, &col_weight, err)))
        return rc;

    struct dec_shape shape;
    shape_of(rows, cols, configs, n_configs, options, 0, &shape);
    const size_t most = n_configs < DEC_MAX_WORKERS ? n_configs : DEC_MAX_WORKERS;
    struct dec_shared *sh = (struct dec_shared *)calloc(1, sizeof *sh);
    struct dec *workers = (struct dec *)calloc(most, sizeof *workers);
    struct dec_thread *threads = (struct dec_thread *)calloc(most, sizeof *threads);
    if (!sh || !workers || !threads) {
        free(row_weight), free(col_weight), free(sh), free(workers), free(threads);
        return lq_error_set(err, LQ_ENOMEM, "out of memory decomposing %zu x %zu", rows, cols);
    }
    // The first worker uploads the shared data and waits, so that every worker finds it.
    size_t opened = 0;
    rc = dec_shared_open(sh, lq_cuda_of(backend), &shape, w, options->fisher, row_weight,
                         col_weight, err);
    if (!rc) {
        rc = dec_open(&workers[0], sh, most > 1, err);
        opened = 1;
    }
    if (!rc) rc = dec_shared_upload(sh, workers[0].stream, err);
    if (!rc) rc = dec_wait(&workers[0], "upload W", err);
    if (!rc) {
        // More workers while they fit: one that cannot be set up is dropped (its reason was
        // printed by the allocator) and the others go on.
        const size_t wanted = worker_count(backend, &workers[0], n_configs);
        while (opened < wanted) {
            struct lq_error ignored;
            memset(&ignored, 0, sizeof ignored);
            if (dec_open(&workers[opened], sh, 1, &ignored)) {
                dec_close(&workers[opened]);
                break;
            }
            opened++;
        }
        struct dec_pool pool;
        memset(&pool, 0, sizeof pool);
        pool.configs = configs, pool.seeds = seeds, pool.n_configs = n_configs;
        pool.options = options, pool.errors = errors;
        pthread_mutex_init(&pool.lock, NULL);
        size_t started = 1; // workers[0] runs on this thread
        for (; started < opened; started++) {
            threads[started].pool = &pool, threads[started].d = &workers[started];
            if (pthread_create(&threads[started].thread, NULL, pool_thread, &threads[started]))
                break; // fewer threads take the same work
        }
        pool_work(&pool, &workers[0]);
        for (size_t k = 1; k < started; k++) pthread_join(threads[k].thread, NULL);
        pthread_mutex_destroy(&pool.lock);
        rc = pool.rc;
        if (rc && err) *err = pool.error;
    }
    for (size_t k = 0; k < opened; k++) dec_close(&workers[k]);
    dec_shared_close(sh);
    free(sh), free(workers), free(threads);
    return rc;
}
