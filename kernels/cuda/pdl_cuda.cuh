// Programmatic dependent launch (Hopper): a kernel launched with the attribute may begin
// launching while the kernel before it in the stream still runs, once every CTA of that one has
// called lq_pdl_trigger (or ended); it must call lq_pdl_wait before it touches anything the
// kernel before it reads or writes.
//
// Why: a batch-1 decode step is ~600 small kernels, and each one's launch and ramp-up used to
// start only when the one before had drained. With the attribute, the next kernel's CTAs are
// already resident when the current one ends.
//
// The protocol of the step kernels (lq_pdl_enter, first thing in every such kernel): wait,
// then trigger. So when a kernel is released, the kernel before the one now running has ended
// and its writes are visible; the only kernels that read before waiting, the one-token decode
// kernels, read x (written two kernels back, before their projection kernel) and the weights.
// A kernel that never waits must not be launched with the attribute (it could end before the
// kernel before it, and the next one would then find unfinished writes).
#ifndef LQ_PDL_CUDA_CUH
#define LQ_PDL_CUDA_CUH

#include <cuda_runtime.h>

// Lets the next kernel, if launched with the attribute, begin launching.
__device__ __forceinline__ void lq_pdl_trigger(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Waits until the kernel before has ended and its writes are visible (a no-op when this kernel
// was launched without the attribute, and below sm_90).
__device__ __forceinline__ void lq_pdl_wait(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The first statement of a step kernel launched by lq_launch_pdl: every thread waits, then
// lets the next kernel launch.
__device__ __forceinline__ void lq_pdl_enter(void) {
    lq_pdl_wait();
    lq_pdl_trigger();
}

// kernel<<<grid, block, shared, stream>>>(args...), with the attribute when `pdl`.
template <typename... Params, typename... Args>
static cudaError_t lq_launch_pdl(bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block,
                                 size_t shared, cudaStream_t stream, Args... args) {
    cudaLaunchAttribute attribute = {};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared;
    config.stream = stream;
    config.attrs = pdl ? &attribute : NULL;
    config.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, args...);
}

#endif
