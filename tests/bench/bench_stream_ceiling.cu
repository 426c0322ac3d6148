// What a batch-1 decode step made of one kernel per linear layer can reach at best: the same
// bytes as the LLaMA-2-7B-shaped ~3-bit model's step (tests/bench/bench_cuda.c: 32 layers of
// four 8.7 MB and three 21.5 MB layers, then a 524 MB head), each layer read by a kernel that
// does nothing but stream its bytes (16-byte loads, all of a thread's loads in flight before
// the first use) and hand a value to the next, as a decode kernel hands y to the next layer.
//
// Why: the decode kernels run at 20-35% of the copy bandwidth, and the question is how much of
// that a kernel can ever win at these sizes, and how much only overlapping consecutive kernels
// can. So each way of chaining them is timed as a CUDA graph of the whole step:
//   plain   kernels one after another (a kernel starts when the one before has ended);
//   pdl     programmatic dependent launch, each kernel waiting first (lqd's step kernels);
//   early   PDL, each kernel loading its bytes before it waits for the one before, as a decode
//           kernel may (weights do not depend on x) and lqd's do not yet (they wait for the
//           projection kernel before them, which waits first).
// Also each layer size alone (queued calls on buffers that do not fit L2 together), at 1 to 8
// CTAs per SM, against the copy bandwidth (bytes read + written, as bench_cuda measures it).
//
// Usage: bench_stream_ceiling [--ctas-per-sm N]  (exits 77 without a GPU)
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK_CUDA(call)                                                                           \
    do {                                                                                           \
        cudaError_t status_ = (call);                                                              \
        if (status_ != cudaSuccess) {                                                              \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                          \
                    cudaGetErrorString(status_));                                                  \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

enum chain { CHAIN_PLAIN, CHAIN_PDL, CHAIN_EARLY };
static const char *const chain_names[] = {"plain", "pdl", "early"};

#define THREADS 256
#define LOADS 4 // 16-byte loads a thread has in flight per round

// Reads n16 16-byte words of w; adds the xor of all it read (zero unless the bytes are odd:
// a branch the compiler cannot drop) to the value the kernel before left in *link, and leaves
// that for the next. EARLY: the loads go out before griddepcontrol.wait.
template <int EARLY>
__global__ void __launch_bounds__(THREADS)
    stream_kernel(const uint4 *__restrict__ w, size_t n16, float *link, float *sink) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (!EARLY) asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    const size_t stride = (size_t)gridDim.x * THREADS;
    uint32_t acc = 0;
    size_t i = (size_t)blockIdx.x * THREADS + threadIdx.x;
    for (; i + (LOADS - 1) * stride < n16; i += LOADS * stride) {
        uint4 v[LOADS];
#pragma unroll
        for (int k = 0; k < LOADS; k++) v[k] = __ldcs(w + i + k * stride);
#pragma unroll
        for (int k = 0; k < LOADS; k++) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
    for (; i < n16; i += stride) {
        const uint4 v = __ldcs(w + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (EARLY) asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    if (acc == 0x9e3779b9u) sink[blockIdx.x] = (float)acc; // never, for zeroed buffers
    __syncthreads();
    if (blockIdx.x == 0 && threadIdx.x == 0) *link += 1.0f; // the value the next layer takes
}

struct layer {
    const uint4 *w;
    size_t n16;
};

static void launch(const struct layer *l, enum chain chain, int grid, float *link, float *sink,
                   cudaStream_t stream) {
    cudaLaunchAttribute attribute = {};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(grid);
    config.blockDim = dim3(THREADS);
    config.stream = stream;
    config.attrs = chain == CHAIN_PLAIN ? NULL : &attribute;
    config.numAttrs = chain == CHAIN_PLAIN ? 0 : 1;
    if (chain == CHAIN_EARLY)
        CHECK_CUDA(cudaLaunchKernelEx(&config, stream_kernel<1>, l->w, l->n16, link, sink));
    else
        CHECK_CUDA(cudaLaunchKernelEx(&config, stream_kernel<0>, l->w, l->n16, link, sink));
}

static int compare_doubles(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// Device-to-device copy bandwidth, bytes read + written per second (median of 20), as
// bench_cuda.c measures it.
static double copy_bandwidth(void) {
    const size_t bytes = (size_t)1 << 30;
    void *a, *b;
    CHECK_CUDA(cudaMalloc(&a, bytes));
    CHECK_CUDA(cudaMalloc(&b, bytes));
    cudaEvent_t start, stop;
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
    double t[20];
    for (int i = 0; i < 20; i++) {
        CHECK_CUDA(cudaEventRecord(start));
        CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
        CHECK_CUDA(cudaEventRecord(stop));
        CHECK_CUDA(cudaEventSynchronize(stop));
        float ms;
        CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
        t[i] = ms / 1e3;
    }
    qsort(t, 20, sizeof t[0], compare_doubles);
    CHECK_CUDA(cudaFree(a));
    CHECK_CUDA(cudaFree(b));
    return 2.0 * bytes / t[10];
}

// Median seconds of one replay of the graph of `count` layers chained as `chain`.
static double time_graph(const struct layer *layers, int count, enum chain chain, int grid,
                         float *link, float *sink, cudaStream_t stream) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < count; i++)
        launch(&layers[i], i == 0 ? CHAIN_PLAIN : chain, grid, link, sink, stream);
    CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
    CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    cudaEvent_t start, stop;
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
    enum { RUNS = 15 };
    double t[RUNS];
    for (int r = 0; r < RUNS + 2; r++) {
        CHECK_CUDA(cudaEventRecord(start, stream));
        CHECK_CUDA(cudaGraphLaunch(exec, stream));
        CHECK_CUDA(cudaEventRecord(stop, stream));
        CHECK_CUDA(cudaEventSynchronize(stop));
        float ms;
        CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
        if (r >= 2) t[r - 2] = ms / 1e3;
    }
    qsort(t, RUNS, sizeof t[0], compare_doubles);
    CHECK_CUDA(cudaGraphExecDestroy(exec));
    CHECK_CUDA(cudaGraphDestroy(graph));
    CHECK_CUDA(cudaEventDestroy(start));
    CHECK_CUDA(cudaEventDestroy(stop));
    return t[RUNS / 2];
}

int main(int argc, char **argv) {
    int only_ctas = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--ctas-per-sm") == 0 && i + 1 < argc) {
            only_ctas = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: bench_stream_ceiling [--ctas-per-sm N]\n");
            return 2;
        }
    }
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    cudaDeviceProp prop;
    CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    const double bandwidth = copy_bandwidth();
    printf("device: %s, %d SMs, %d MB L2; copy bandwidth %.2f TB/s (read + write)\n", prop.name,
           prop.multiProcessorCount, prop.l2CacheSize >> 20, bandwidth / 1e12);

    // The step's layers, in order: per transformer layer q, k, v, o (4096 x 4096) and gate, up,
    // down (11008 x 4096), at bench_cuda's ~3-bit sizes; then the fp32 head.
    const size_t small = 8700000, large = 21500000, head = (size_t)32000 * 4096 * 4;
    enum { LAYERS = 32, PER_LAYER = 7, COUNT = LAYERS * PER_LAYER + 1 };
    struct layer layers[COUNT];
    size_t total = 0;
    for (int i = 0; i < COUNT; i++) {
        const size_t bytes = i == COUNT - 1 ? head : (i % PER_LAYER) < 4 ? small : large;
        layers[i].n16 = bytes / 16;
        total += layers[i].n16 * 16;
    }
    uint4 *pool;
    CHECK_CUDA(cudaMalloc(&pool, total));
    CHECK_CUDA(cudaMemset(pool, 0, total));
    size_t offset = 0;
    for (int i = 0; i < COUNT; i++) layers[i].w = pool + offset, offset += layers[i].n16;
    float *link, *sink;
    CHECK_CUDA(cudaMalloc(&link, sizeof(float)));
    CHECK_CUDA(cudaMalloc(&sink, 65536 * sizeof(float)));
    CHECK_CUDA(cudaMemset(link, 0, sizeof(float)));
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    const int sms = prop.multiProcessorCount;
    printf("step: %d kernels, %.2f GB; the limit at the copy bandwidth: %.3f ms\n", COUNT,
           total / 1e9, total / bandwidth * 1e3);
    for (int ctas = 1; ctas <= 8; ctas *= 2) {
        if (only_ctas && ctas != only_ctas) continue;
        const int grid = sms * ctas;
        // each size alone: a graph of 16 kernels of that size on distinct buffers (16 x 8.7 MB
        // and 16 x 21.5 MB do not fit the L2 together), per kernel
        for (int kind = 0; kind < 2; kind++) {
            const int first = kind == 0 ? 0 : 4; // layers 0..15 hold both sizes: pick by stride
            struct layer same[16];
            for (int j = 0; j < 16; j++) same[j] = layers[first + (j / 3) * PER_LAYER + j % 3];
            for (int c = 0; c < 3; c++) {
                const double s = time_graph(same, 16, (enum chain)c, grid, link, sink, stream) / 16;
                const double bytes = (double)same[0].n16 * 16;
                printf("%d CTAs/SM, %5.1f MB layers, %-5s: %6.2f us each, %3.0f%% of the copy "
                       "bandwidth\n",
                       ctas, bytes / 1e6, chain_names[c], s * 1e6, 100.0 * bytes / s / bandwidth);
            }
        }
        for (int c = 0; c < 3; c++) {
            const double s = time_graph(layers, COUNT, (enum chain)c, grid, link, sink, stream);
            printf("%d CTAs/SM, whole step, %-5s: %.3f ms, %3.0f%% of the copy bandwidth\n", ctas,
                   chain_names[c], s * 1e3, 100.0 * total / s / bandwidth);
        }
    }
    float value = 0.0f;
    CHECK_CUDA(cudaMemcpy(&value, link, sizeof value, cudaMemcpyDeviceToHost));
    printf("(the chained value: %.0f, one per kernel run)\n", value);
    CHECK_CUDA(cudaFree(pool));
    CHECK_CUDA(cudaFree(link));
    CHECK_CUDA(cudaFree(sink));
    return 0;
}
