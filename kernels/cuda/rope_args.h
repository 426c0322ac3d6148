// What a kernel needs to do a decode step's rotary embedding itself (the one-token attention
// kernel, attention_decode_kernel.h): the rope kernel's cached cos/sin table (row p: cos[head_dim
// / 2] then sin[head_dim / 2]) for positions below `positions` (NULL: none), and theta for the
// rest, whose angles are computed as that kernel computes them. C as well as CUDA.
#ifndef LQ_ROPE_ARGS_H
#define LQ_ROPE_ARGS_H

struct lq_rope_args {
    int on; // 0: the kernel does no rotary embedding
    const float *table;
    int positions;
    float theta;
};

#endif
