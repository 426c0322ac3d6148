// Phase timing on a stream (see phase_timer_cuda.cuh).
#include <string.h>

#include "kernels/cuda/phase_timer_cuda.cuh"

cudaError_t lq_phase_timer_open(struct lq_phase_timer *t, int enabled) {
    memset(t, 0, sizeof *t);
    if (!enabled) return cudaSuccess;
    for (int i = 0; i < LQ_PHASE_TIMER_EVENTS; i++) {
        cudaError_t status = cudaEventCreate(&t->events[i]);
        if (status != cudaSuccess) {
            lq_phase_timer_close(t);
            return status;
        }
    }
    t->enabled = 1;
    return cudaSuccess;
}

void lq_phase_timer_close(struct lq_phase_timer *t) {
    for (int i = 0; i < LQ_PHASE_TIMER_EVENTS; i++)
        if (t->events[i]) cudaEventDestroy(t->events[i]);
    memset(t, 0, sizeof *t);
}

cudaError_t lq_phase_timer_mark(struct lq_phase_timer *t, cudaStream_t stream, int phase) {
    if (!t->enabled) return cudaSuccess;
    if (t->count == LQ_PHASE_TIMER_EVENTS || phase < 0 || phase >= LQ_PHASE_TIMER_PHASES) {
        t->dropped++;
        return cudaSuccess;
    }
    cudaError_t status = cudaEventRecord(t->events[t->count], stream);
    if (status == cudaSuccess) t->phases[t->count++] = phase;
    return status;
}

void lq_phase_timer_restart(struct lq_phase_timer *t) {
    t->count = 0;
}

cudaError_t lq_phase_timer_collect(struct lq_phase_timer *t) {
    if (!t->enabled || t->count < 2) return cudaSuccess;
    for (int i = 0; i + 1 < t->count; i++) {
        float ms = 0.0f;
        cudaError_t status = cudaEventElapsedTime(&ms, t->events[i], t->events[i + 1]);
        if (status != cudaSuccess) return status;
        t->ms[t->phases[i]] += ms;
    }
    // the last event starts the next interval
    cudaEvent_t last = t->events[t->count - 1];
    t->events[t->count - 1] = t->events[0];
    t->events[0] = last;
    t->phases[0] = t->phases[t->count - 1];
    t->count = 1;
    return cudaSuccess;
}
