// Decode-step graphs (kernels/backend.h: graph_begin, graph_end). A decode step of a 7B model is
// about 700 kernel launches; issued one by one, the host sets the pace (microseconds per
// launch, against kernels of a few microseconds). The step is therefore recorded once with
// stream capture and replayed with one cudaGraphLaunch.
//
// Policy per key: the first step with a key runs eagerly (it also sizes the workspaces, so the
// recording allocates nothing); the second is recorded, then launched; later ones replay. A
// recording that fails (an op that cannot be captured, a workspace that had to grow meanwhile)
// is discarded before anything ran, and the caller runs the step eagerly; after two failures
// a key stays eager. Recorded graphs hold device pointers (weights, workspaces, the caller's
// buffers), so every graph recorded before cuda->generation changed is dropped, never
// replayed; the caller's own buffers are its keys' business (kernels/backend.h).
//
// Locking: graph_begin takes cuda->lock (recursive) and, when it answers RECORDING, keeps it
// until graph_end, so no other thread's op lands in the capture. Capture runs in relaxed mode:
// compress jobs on other threads and streams may allocate meanwhile.
#include <stdlib.h>

#include "kernels/cuda/cuda_internal.h"

namespace {

void drop(struct lq_cuda_graph *g) {
    if (g->exec) cudaGraphExecDestroy(g->exec);
    *g = lq_cuda_graph{};
}

// The entry for key, or a new one (the least recently used replaced).
struct lq_cuda_graph *entry_for(struct lq_cuda *cuda, uint64_t key, bool *created) {
    struct lq_cuda_graph *oldest = &cuda->graphs[0];
    for (int i = 0; i < LQ_CUDA_GRAPHS; i++) {
        struct lq_cuda_graph *g = &cuda->graphs[i];
        if (g->used && g->key == key) {
            *created = false;
            return g;
        }
        if (!g->used || (oldest->used && g->last_used < oldest->last_used)) oldest = g;
    }
    drop(oldest);
    oldest->used = 1;
    oldest->key = key;
    *created = true;
    return oldest;
}

uint64_t generation_of(struct lq_cuda *cuda) {
    return __atomic_load_n(&cuda->generation, __ATOMIC_ACQUIRE);
}

} // namespace

int lq_cuda_op_graph_begin(struct lq_backend *backend, uint64_t key) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    pthread_mutex_lock(&cuda->lock);
    cudaSetDevice(cuda->device);
    if (!cuda->graphs_enabled) {
        pthread_mutex_unlock(&cuda->lock);
        return LQ_GRAPH_EAGER;
    }
    if (cuda->recording >= 0) { // graph_begin inside a recording
        pthread_mutex_unlock(&cuda->lock);
        return LQ_EINVAL;
    }
    const uint64_t generation = generation_of(cuda);
    for (int i = 0; i < LQ_CUDA_GRAPHS; i++)
        if (cuda->graphs[i].exec && cuda->graphs[i].generation != generation) {
            // recorded over memory that has gone since: record again when next seen
            cudaGraphExecDestroy(cuda->graphs[i].exec);
            cuda->graphs[i].exec = NULL;
        }
    bool created = false;
    struct lq_cuda_graph *g = entry_for(cuda, key, &created);
    g->last_used = ++cuda->graph_clock;
    if (g->exec) {
        const cudaError_t status = cudaGraphLaunch(g->exec, cuda->stream);
        pthread_mutex_unlock(&cuda->lock);
        return status == cudaSuccess ? LQ_GRAPH_REPLAYED
                                     : lq_cuda_fail(status, "cudaGraphLaunch", NULL);
    }
    if (created || g->failures >= 2) {
        pthread_mutex_unlock(&cuda->lock);
        return LQ_GRAPH_EAGER;
    }
    const cudaError_t status = cudaStreamBeginCapture(cuda->stream, cudaStreamCaptureModeRelaxed);
    if (status != cudaSuccess) {
        g->failures++;
        pthread_mutex_unlock(&cuda->lock);
        cudaGetLastError();
        return LQ_GRAPH_EAGER;
    }
    cuda->recording = (int)(g - cuda->graphs);
    cuda->recording_generation = generation;
    return LQ_GRAPH_RECORDING; // the lock stays held until graph_end
}

int lq_cuda_op_graph_end(struct lq_backend *backend, int failed) {
    struct lq_cuda *cuda = lq_cuda_of(backend);
    // graph_begin's lock is still held by this thread; a recursive lock makes this call safe
    // even when graph_end is called without a recording (then it is an error)
    pthread_mutex_lock(&cuda->lock);
    if (cuda->recording < 0) {
        pthread_mutex_unlock(&cuda->lock);
        return LQ_EINVAL;
    }
    struct lq_cuda_graph *g = &cuda->graphs[cuda->recording];
    cuda->recording = -1;
    cudaGraph_t graph = NULL;
    cudaError_t status = cudaStreamEndCapture(cuda->stream, &graph);
    int rc = failed ? failed : LQ_OK;
    if (!rc && status != cudaSuccess) rc = lq_cuda_fail(status, "recording a decode step", NULL);
    if (!rc && generation_of(cuda) != cuda->recording_generation)
        rc = LQ_EUNSUPPORTED; // memory the recording points into changed while it was made
    cudaGraphExec_t exec = NULL;
    if (!rc && (status = cudaGraphInstantiate(&exec, graph, 0)) != cudaSuccess)
        rc = lq_cuda_fail(status, "instantiating a decode step", NULL);
    if (graph) cudaGraphDestroy(graph);
    if (!rc && (status = cudaGraphLaunch(exec, cuda->stream)) != cudaSuccess) {
        rc = lq_cuda_fail(status, "cudaGraphLaunch", NULL);
        cudaGraphExecDestroy(exec);
        exec = NULL;
    }
    if (rc) {
        g->failures++;
        cudaGetLastError(); // a failed capture leaves its error behind; it is not sticky
    } else {
        g->exec = exec;
        g->generation = cuda->recording_generation;
    }
    pthread_mutex_unlock(&cuda->lock); // this call's
    pthread_mutex_unlock(&cuda->lock); // graph_begin's
    return rc;
}

void lq_cuda_graphs_destroy(struct lq_cuda *cuda) {
    for (int i = 0; i < LQ_CUDA_GRAPHS; i++) drop(&cuda->graphs[i]);
}
