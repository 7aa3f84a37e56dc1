/* herd_quant.h -- C ABI of herd's quantized linear kernels (loaded from Python with ctypes).
 *
 * Weights are GGML blocks exactly as in a GGUF file: n rows, each of k/QK blocks, row-major.
 * Activations x are float32 [m, k] row-major (contiguous); outputs y float32 [m, n].
 * Two arithmetic modes:
 *   HQ_MODE_F32: y = x . dequant(W)^T with float32 activations (dequantized in registers, FMA).
 *   HQ_MODE_I8:  x is first rounded, per row and per 32-element block, to int8 with a float32 scale
 *                d = max|x| / 127, q = round_half_even(x * (1/d)) (d = 0 gives q = 0);
 *                then y = sum_blocks of integer dot products times scales (as llama.cpp does).
 *   HQ_MODE_I16: the same with int16 activations, d = max|x| / 32767 (error ~1/258 of int8's).
 * isa: -1 = best compiled, 0 = scalar C, 1 = AVX2, 2 = AVX-512 (F, BW, VL, VNNI).
 * Functions return 0 on success or a negative HQ_ERR_* code.
 */
#ifndef HERD_QUANT_H
#define HERD_QUANT_H
#include <stdint.h>

#define HQ_MODE_F32 0
#define HQ_MODE_I8 1
#define HQ_MODE_I16 2

#define HQ_ERR_TYPE (-1)  /* ggml type not supported */
#define HQ_ERR_SHAPE (-2) /* k not a multiple of the block size, or negative sizes */
#define HQ_ERR_ISA (-3)   /* the requested instruction set is not compiled in */
#define HQ_ERR_MODE (-4)  /* unknown mode */
#define HQ_ERR_NOMEM (-5) /* allocation failed */

int herd_q_abi_version(void);
int herd_q_best_isa(void);
int herd_q_set_gemm_min_rows(int m); /* rows from which the AVX-512 int8 path uses its GEMM; returns the old value */
int herd_q_set_gemv(int on); /* 1: fewer AVX-512 int8 / int16 rows than the GEMM's switch run the fused kernel with the GEMM's arithmetic, 0: the decode kernels; -1 reads; returns the old value */
int herd_q_block_elems(int type);
int herd_q_block_bytes(int type);
int herd_q_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int type, int64_t n, float *y, int mode,
                  int isa, int nthreads);
int herd_q_dequantize(const uint8_t *w, int type, int64_t n, int64_t k, float *out, int isa, int nthreads);
int herd_q_dequantize_rows(const uint8_t *w, int type, int64_t k, const int64_t *rows, int64_t nrows, float *out,
                           int nthreads);
/* bits 8 (q: int8 [m, k]) or 16 (q: int16 [m, k]); d: float [m, k/32] */
int herd_q_quantize_act(const float *x, int64_t m, int64_t k, void *q, float *d, int bits, int isa);
/* herd_decode.c: every decoder layer of a Llama model for one new token per row (layout: hd_model there) */
int herd_llama_decode(const void *model, float *x, int64_t B, const int64_t *pos, const int64_t *rows, int nthreads);
/* n head vectors x (n, hd) in the KV cache's stored form: type 0 f32, 1 f16, 2 q8_0 (hd % 32 == 0) */
int herd_kv_encode(const float *x, int64_t n, int64_t hd, int type, uint8_t *out);
#endif
