// Where a stream's time goes, phase by phase, without waiting for it: an event is recorded
// at the start of each phase, and once the host has waited for the stream anyway, the time
// between consecutive events is added to the phase that began at the first of them. The last
// event stays as the start of the next interval, so the gap before the next phase (a copy to
// the host, the host's wait and its bookkeeping) is charged to the phase marked last.
// Opt-in diagnostics (events cost a little): a timer opened disabled does nothing.
#ifndef LQ_PHASE_TIMER_CUDA_CUH
#define LQ_PHASE_TIMER_CUDA_CUH

#include <cuda_runtime.h>

#define LQ_PHASE_TIMER_EVENTS 128 // marks between two collections; more are dropped
#define LQ_PHASE_TIMER_PHASES 16

struct lq_phase_timer {
    int enabled;
    int count;   // events recorded since the last collection (the first is the carried one)
    int dropped; // marks dropped because the list was full
    cudaEvent_t events[LQ_PHASE_TIMER_EVENTS];
    int phases[LQ_PHASE_TIMER_EVENTS];
    double ms[LQ_PHASE_TIMER_PHASES];
};

// enabled = 0 gives a timer whose calls do nothing. Returns a CUDA error (events).
cudaError_t lq_phase_timer_open(struct lq_phase_timer *t, int enabled);
void lq_phase_timer_close(struct lq_phase_timer *t);
// Phase `phase` (< LQ_PHASE_TIMER_PHASES) starts now on stream.
cudaError_t lq_phase_timer_mark(struct lq_phase_timer *t, cudaStream_t stream, int phase);
// Forgets the marks since the last collection (a new run starts: no interval spans the gap).
void lq_phase_timer_restart(struct lq_phase_timer *t);
// After a wait that covers every mark: adds the intervals to ms[].
cudaError_t lq_phase_timer_collect(struct lq_phase_timer *t);

#endif
