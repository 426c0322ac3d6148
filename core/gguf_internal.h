/* Shared by the GGUF reader (gguf.c) and the ggml type code (gguf_dequant.c); not public. */
#ifndef LQ_GGUF_INTERNAL_H
#define LQ_GGUF_INTERNAL_H

#include <stdint.h>

/* Converts numel values of a readable ggml type (lq_ggml_type_is_readable) from source,
 * which holds whole blocks, to out. No checks: the reader validated sizes. */
void lq_gguf_dequantize(uint32_t type, const uint8_t *source, uint64_t numel, float *out);

#endif
