/* NormalFloat (NF) quantization with the configurable double quantization of LQ-LoRA
 * (paper §2.2 and §3.2, Eq. 3). A matrix is flattened row-major into blocks of B0 values;
 * each value becomes a b0-bit index into the NF-b0 code table scaled by its block's absmax.
 * The block absmaxes are quantized again: minus one per-matrix offset, b1-bit unsigned
 * integers relative to one b2-typed scale per group of B1 blocks. */
#ifndef LQ_NF_H
#define LQ_NF_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

/* Storage type of the second-level (per group) scales: b2 in the paper. */
enum lq_scale_dtype {
    LQ_SCALE_BF16 = 0,
    LQ_SCALE_FP16 = 1,
    LQ_SCALE_FP32 = 2,
};

int lq_scale_dtype_bits(enum lq_scale_dtype dtype);
const char *lq_scale_dtype_name(enum lq_scale_dtype dtype); /* "bf16", "fp16", "fp32" */

/* c = (b0, b1, b2, B0, B1). */
struct lq_nf_config {
    int b0;                 /* code bits: 2, 3, 4 or 8 */
    int b1;                 /* bits of each quantized block scale: 1..8 */
    enum lq_scale_dtype b2; /* type of the per-group scale */
    int B0;                 /* values per block (1..65536) */
    int B1;                 /* blocks per scale group (1..65536) */
};

/* The paper's NF4 with double quantization, (4, 8, fp32, 64, 256): 4.127 bits/param. */
#define LQ_NF_CONFIG_NF4 ((struct lq_nf_config){4, 8, LQ_SCALE_FP32, 64, 256})
/* The uniform NF3 baseline of the reference code, (3, 8, fp32, 64, 256). */
#define LQ_NF_CONFIG_NF3 ((struct lq_nf_config){3, 8, LQ_SCALE_FP32, 64, 256})

int lq_nf_config_validate(const struct lq_nf_config *config, struct lq_error *err);
/* Parses "b0,b1,b2,B0,B1" with b2 one of bf16/fp16/fp32 (or 16 meaning fp16, 32 fp32),
 * e.g. "3,8,fp32,64,256". */
int lq_nf_config_parse(const char *text, struct lq_nf_config *out, struct lq_error *err);
/* Writes "(b0, b1, b2, B0, B1)" into buffer; returns buffer. */
char *lq_nf_config_format(const struct lq_nf_config *config, char *buffer, size_t size);

/* Table 1 of the paper: b0, b1 in {2,3,4}; b2 in {bf16, fp16, fp32}; B0 in {16,32,64};
 * B1 in {16,64,256}, nested in that order (b0 slowest). */
#define LQ_NF_TABLE1_SIZE 243
void lq_nf_grid_table1(struct lq_nf_config out[LQ_NF_TABLE1_SIZE]);

/* Bits per parameter by Eq. 3: b0 + b1/B0 + b2/(B0*B1). */
double lq_nf_bits_per_param(const struct lq_nf_config *config);
/* storage(A, c) of Eq. 3 in bits for a matrix of numel values. */
double lq_nf_storage_bits(size_t numel, const struct lq_nf_config *config);

/* The NF-k code table (2^k ascending floats, table[2^(k-1)-1] == 0, ends exactly -1 and 1)
 * for k in 2..8, built from Gaussian quantiles at probabilities evenly spaced up to
 * 1 - (1/30 + 1/32)/2 (paper §2.2; equals bitsandbytes' NF4 for k = 4). Never NULL for a
 * valid k; the table is static and shared. */
const float *lq_nf_code_table(int bits);

/* Standard normal quantile function, to double precision (used to build the tables). */
double lq_normal_quantile(double probability);

size_t lq_nf_block_count(size_t numel, const struct lq_nf_config *config);
size_t lq_nf_group_count(size_t numel, const struct lq_nf_config *config);

/* A quantized matrix. Owns its three buffers. */
struct lq_nf_matrix {
    struct lq_nf_config config;
    size_t rows, cols;
    uint8_t *codes;        /* rows*cols b0-bit codes, bit-packed (core/bitpack.h) */
    uint8_t *scale_codes;  /* one b1-bit code per block, bit-packed */
    uint8_t *group_scales; /* one b2 value per group, little-endian (2 or 4 bytes each) */
    float scale_offset;    /* the minimum block absmax of the whole matrix */
};

/* Quantizes the rows x cols row-major matrix a. The last block and group may be partial.
 * Each value gets the nearest code of value / reconstructed block scale, the block scale
 * being the double-quantized one that dequantization uses; a value exactly between two
 * codes takes the lower code; values beyond the table saturate. NaN/Inf input is
 * rejected (LQ_ENUMERIC). On success free out with lq_nf_matrix_free. */
int lq_nf_quantize(const float *a, size_t rows, size_t cols, const struct lq_nf_config *config,
                   struct lq_nf_matrix *out, struct lq_error *err);

/* Writes the rows*cols dequantized values into out. */
void lq_nf_dequantize(const struct lq_nf_matrix *matrix, float *out);
/* Dequantizes the flattened values [first, first + count) into out[0..count): rows of a
 * tile, for dequantizing matmuls. Bit-identical to lq_nf_dequantize. */
void lq_nf_dequantize_range(const struct lq_nf_matrix *matrix, size_t first, size_t count,
                            float *out);

/* The dequantized scale of block `block` (the factor its codes' table values are multiplied
 * by): exactly the float lq_nf_dequantize_range uses, for fused dequantizing kernels. */
float lq_nf_block_scale(const struct lq_nf_matrix *matrix, size_t block);
/* The b2-typed scale of group `group`, as a float. */
float lq_nf_group_scale(const struct lq_nf_matrix *matrix, size_t group);
/* The scales of blocks [first, first + count) into scales[0..count), each the float
 * lq_nf_block_scale gives, with each group's scale decoded once (a call per block was a quarter
 * of a decode profile). */
void lq_nf_block_scales(const struct lq_nf_matrix *matrix, size_t first, size_t count,
                        float *scales);

/* out = dequantize(quantize(a)) for numel values, bit for bit, without building the packed
 * form: the inner step of the LQ decomposition. a and out may be the same array. */
int lq_nf_quantize_dequantize(const float *a, size_t numel, const struct lq_nf_config *config,
                              float *out, struct lq_error *err);

/* Bytes the packed buffers take (codes + scale codes + group scales + the offset). */
size_t lq_nf_matrix_bytes(const struct lq_nf_matrix *matrix);
size_t lq_nf_codes_bytes(const struct lq_nf_matrix *matrix);
size_t lq_nf_scale_codes_bytes(const struct lq_nf_matrix *matrix);
size_t lq_nf_group_scales_bytes(const struct lq_nf_matrix *matrix);

void lq_nf_matrix_free(struct lq_nf_matrix *matrix);

#endif
