/* How a quantized matrix and an LQ decomposition are laid out as safetensors tensors, so
 * that any safetensors library can open them. For a prefix P:
 *   P.q_codes         U8  [bytes]      b0-bit NF codes, bit-packed LSB first (core/bitpack.h)
 *   P.q_scale_codes   U8  [bytes]      b1-bit block-scale codes, bit-packed
 *   P.q_group_scales  BF16|F16|F32 [groups]  per-group scale (b2)
 *   P.q_scale_offset  F32 [1]          per-matrix block-scale offset
 *   P.lora_A          F32 [rank, cols] L2 (PEFT orientation: W ≈ Q + lora_B·lora_A)
 *   P.lora_B          F32 [rows, rank] L1
 * and string metadata P.lq_config = "b0,b1,b2,B0,B1", P.lq_shape = "rows,cols",
 * P.lq_rank = "r". */
#ifndef LQ_STORE_H
#define LQ_STORE_H

#include "core/lq.h"
#include "core/model.h"
#include "core/nf.h"
#include "core/safetensors.h"

/* Adds matrix's tensors and metadata under prefix (data copied into the writer). */
int lq_nf_matrix_store(struct lq_safetensors_writer *writer, const char *prefix,
                       const struct lq_nf_matrix *matrix, struct lq_error *err);

/* Adds Q's tensors, lora_A/lora_B (when rank > 0) and the rank metadata under prefix. */
int lq_decomposition_store(struct lq_safetensors_writer *writer, const char *prefix,
                           const struct lq_decomposition *d, struct lq_error *err);

/* Reads the LQ matrix stored under prefix into linear (is_lq = 1, rows/cols from lq_shape,
 * which must equal linear->rows/cols when those are set). Every size is checked against
 * the configuration and shape; errors name the tensor. */
int lq_linear_load_lq(const struct lq_safetensors *file, const char *prefix,
                      struct lq_linear *linear, struct lq_error *err);

#endif
