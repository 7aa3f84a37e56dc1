/* herd_quant.c -- quantized matmul kernels for herd: y[m, n] = x[m, k] . W[n, k]^T, W in GGML blocks.
 *
 * Layout of this file (read hq_formats.h first for the common "u8 group" view of every format):
 *   1. job description and activation preparation (int8 / int16 quantization, block sums of x)
 *   2. scalar kernels (any CPU; the reference the SIMD paths are tested against)
 *   3. AVX2 / AVX-512 "decode" kernels, straight from the GGUF layout: a few weight rows per pass against
 *      1 or 4 activation rows (everything on AVX2; float mode and single-row int8 / int16 on AVX-512), with
 *      software prefetch of the weight stream
 *   4. AVX-512 VNNI GEMM for 5+ activation rows (vpdpbusd; int16 activations split into bytes): 16 weight rows repacked
 *      to 8-bit tiles, lanes = rows; and its few-row form (a decode step, a speculative verification), the tiles
 *      kept in registers, with the same arithmetic per output, so that a row's bits do not depend on how many rows
 *      share the call
 *   5. dequantization, the C API and threading (OpenMP, sharing the process's libgomp with torch)
 * Build: gcc -O3 -march=native -fopenmp -shared -fPIC herd_quant.c (see herd/quant/native.py).
 */
#include "herd_quant.h"
#include "hq_formats.h"

#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define HQ_ABI_VERSION 5
#ifndef HQ_GEMM_MIN_ROWS
#define HQ_GEMM_MIN_ROWS 5
#endif
/* AVX-512 int8 / int16 paths: from this many activation rows on, use the tiled GEMM, below it the fused few-row
 * kernel (measured crossover; tunable for tests and benchmarks) */
static int hq_gemm_min_rows = HQ_GEMM_MIN_ROWS;
/* AVX-512 int8 / int16 paths, fewer rows than that: 1 = hq_gemv_int (the GEMM's arithmetic, so a row's bits do not
 * depend on the batch), 0 = the decode kernels (kept for AVX2 builds; tests compare the two) */
static int hq_gemv = 1;

/* =====================================================================================================
 * 1. Job and activations
 * ===================================================================================================== */
typedef struct {
    int64_t m, k, n, rowbytes;
    int type, mode;
    const float *x;    /* [m, k] float activations */
    const uint8_t *w;  /* [n, rowbytes] GGML blocks */
    float *y;          /* [m, n] */
    const int8_t *q;   /* int8 mode: [m, k] quantized activations */
    const int16_t *q16; /* int16 mode: [m, k] quantized activations */
    const float *ad;   /* int modes: [m, k/32, 4] = d, d*sum(q), d*sum(q[0:16]), d*sum(q[16:32]) per block */
    const float *xs;   /* float mode: [m, k/32] sums of x per 32-element group */
    int *failed;       /* set to 1 by a kernel whose scratch allocation failed */
    const uint8_t *q16s; /* AVX-512 GEMM / one-row kernels, int16 mode: q16 split for vpdpbusd (hq_split16_row) */
    const int32_t *slo;  /* with q16s, Q8_0 only: [m, k/32] sums of the low bytes per group (its offset term) */
} hq_job;

/* Quantize one row of k floats per 32-block to int8 (q8) or int16 (q16, the other NULL): d = max|x| / L with
 * L = 127 or 32767, q = round-half-even(x * (1/d)) (see herd_quant.h); ad gets d and d * (sums of q). */
static void hq_quantize_row_ref(const float *x, int64_t k, int8_t *q8, int16_t *q16, float *ad) {
    const float lim = q16 ? 32767.0f : 127.0f;
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / lim, id = d != 0.0f ? 1.0f / d : 0.0f;
        int sa = 0, sb = 0;
        for (int j = 0; j < 32; j++) {
            float v = nearbyintf(xb[j] * id); /* default rounding mode: half to even */
            int iv = (int)(v > lim ? lim : (v < -lim ? -lim : v));
            if (q16) q16[b * 32 + j] = (int16_t)iv;
            else q8[b * 32 + j] = (int8_t)iv;
            if (j < 16) sa += iv; else sb += iv;
        }
        ad[4 * b] = d;
        ad[4 * b + 1] = d * (float)(sa + sb);
        ad[4 * b + 2] = d * (float)sa;
        ad[4 * b + 3] = d * (float)sb;
    }
}

#ifdef HQ_HAVE_AVX512
/* Same result as hq_quantize_row_ref: cvtps rounds half to even under the default MXCSR. */
static void hq_quantize_row_avx512(const float *x, int64_t k, int8_t *q8, int16_t *q16, float *ad) {
    const float L = q16 ? 32767.0f : 127.0f;
    const __m512 lim = _mm512_set1_ps(L), nlim = _mm512_set1_ps(-L);
    for (int64_t b = 0; b < k / 32; b++) {
        __m512 x0 = _mm512_loadu_ps(x + b * 32), x1 = _mm512_loadu_ps(x + b * 32 + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        float d = amax / L, id = d != 0.0f ? 1.0f / d : 0.0f;
        __m512i i0 = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(x0, _mm512_set1_ps(id)), lim), nlim));
        __m512i i1 = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(x1, _mm512_set1_ps(id)), lim), nlim));
        if (q16) {
            _mm256_storeu_si256((__m256i *)(q16 + b * 32), _mm512_cvtepi32_epi16(i0));
            _mm256_storeu_si256((__m256i *)(q16 + b * 32 + 16), _mm512_cvtepi32_epi16(i1));
        } else {
            _mm_storeu_si128((__m128i *)(q8 + b * 32), _mm512_cvtepi32_epi8(i0));
            _mm_storeu_si128((__m128i *)(q8 + b * 32 + 16), _mm512_cvtepi32_epi8(i1));
        }
        int sa = _mm512_reduce_add_epi32(i0), sb = _mm512_reduce_add_epi32(i1);
        ad[4 * b] = d;
        ad[4 * b + 1] = d * (float)(sa + sb);
        ad[4 * b + 2] = d * (float)sa;
        ad[4 * b + 3] = d * (float)sb;
    }
}

/* int16 activations for vpdpbusd (one instruction per 4 products, where vpdpwssd needs two and has half its
 * throughput here): x = 256 hi + lo with hi = x >> 8 (int8) and lo = x & 255 (uint8); each 4 consecutive values
 * become 8 bytes, hi0..hi3 then lo0..lo3. A dot product with uint8 weights u is then 256 (u . hi) + (lo . u), the
 * second with u read as int8 (<= 127; Q8_0 reads its signed q and adds 128 * sum(lo), slo[g]). Integer sums: the
 * same int32 as the int16 dot product, so the same bits downstream. */
static void hq_split16_row(const int16_t *q16, int64_t k, uint8_t *out, int32_t *slo) {
    const __m512i idx = _mm512_broadcast_i32x4(_mm_setr_epi8(1, 3, 5, 7, 0, 2, 4, 6, 9, 11, 13, 15, 8, 10, 12, 14));
    for (int64_t g = 0; g < k / 32; g++) {
        const __m512i v = _mm512_loadu_si512((const void *)(q16 + g * 32));
        _mm512_storeu_si512((void *)(out + g * 64), _mm512_shuffle_epi8(v, idx));
        if (slo)
            slo[g] = _mm512_reduce_add_epi32(_mm512_madd_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0xFF)),
                                                               _mm512_set1_epi16(1)));
    }
}
#endif

static void hq_quantize_row(const float *x, int64_t k, int8_t *q8, int16_t *q16, float *ad, int isa) {
#ifdef HQ_HAVE_AVX512
    if (isa >= 2) { hq_quantize_row_avx512(x, k, q8, q16, ad); return; }
#endif
    (void)isa;
    hq_quantize_row_ref(x, k, q8, q16, ad);
}

static void hq_group_sums_row(const float *x, int64_t k, float *xs) {
    for (int64_t g = 0; g < k / 32; g++) {
        float s = 0.0f;
        for (int j = 0; j < 32; j++) s += x[g * 32 + j];
        xs[g] = s;
    }
}

/* =====================================================================================================
 * 2. Scalar kernels: unpack one weight row to (u, scales) and loop. Any CPU.
 * ===================================================================================================== */
typedef struct { float da, ma, db, mb; } hq_scales;

/* One row -> u[k] (int16: Q8_0 values are signed) and per-group scales. */
static void hq_unpack_row_ref(int type, const uint8_t *wr, int64_t k, int16_t *u, hq_scales *sc) {
    const int QK = hq_block_elems(type), BS = hq_block_bytes(type), G = QK / 32;
    uint8_t tmp[32];
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *blk = wr + b * BS;
        for (int g = 0; g < G; g++) {
            int64_t gi = b * G + g;
            hq_group_u8_ref(type, blk, g, tmp);
            for (int j = 0; j < 32; j++) u[gi * 32 + j] = hq_signed(type) ? (int16_t)(int8_t)tmp[j] : (int16_t)tmp[j];
            hq_group_scales(type, blk, g, &sc[gi].da, &sc[gi].ma, &sc[gi].db, &sc[gi].mb);
        }
    }
}

static void hq_rows_scalar(const hq_job *J, int64_t r0, int64_t r1) {
    const int64_t k = J->k, ng = k / 32;
    int16_t *u = (int16_t *)malloc(sizeof(int16_t) * k);
    hq_scales *sc = (hq_scales *)malloc(sizeof(hq_scales) * ng);
    float *wf = (float *)malloc(sizeof(float) * k);
    if (!u || !sc || !wf) { free(u); free(sc); free(wf); *J->failed = 1; return; }
    for (int64_t r = r0; r < r1; r++) {
        hq_unpack_row_ref(J->type, J->w + r * J->rowbytes, k, u, sc);
        if (J->mode == HQ_MODE_F32) {
            for (int64_t gi = 0; gi < ng; gi++)
                for (int j = 0; j < 32; j++)
                    wf[gi * 32 + j] = j < 16 ? fmaf(sc[gi].da, (float)u[gi * 32 + j], sc[gi].ma)
                                             : fmaf(sc[gi].db, (float)u[gi * 32 + j], sc[gi].mb);
            for (int64_t i = 0; i < J->m; i++) {
                const float *xi = J->x + i * k;
                float acc = 0.0f;
                for (int64_t j = 0; j < k; j++) acc += wf[j] * xi[j];
                J->y[i * J->n + r] = acc;
            }
        } else {
            for (int64_t i = 0; i < J->m; i++) {
                const int8_t *qi = J->q ? J->q + i * k : NULL;
                const int16_t *qi16 = J->q16 ? J->q16 + i * k : NULL;
                const float *ad = J->ad + i * ng * 4;
                float acc = 0.0f;
                for (int64_t gi = 0; gi < ng; gi++) {
                    int32_t da = 0, db = 0; /* |u q| <= 255 * 32767, 16 of them: fits int32 */
                    for (int j = 0; j < 32; j++) {
                        int32_t qv = qi16 ? qi16[gi * 32 + j] : qi[gi * 32 + j];
                        if (j < 16) da += (int32_t)u[gi * 32 + j] * qv; else db += (int32_t)u[gi * 32 + j] * qv;
                    }
                    const float *a = ad + gi * 4;
                    acc += a[0] * (sc[gi].da * (float)da + sc[gi].db * (float)db) + sc[gi].ma * a[2] + sc[gi].mb * a[3];
                }
                J->y[i * J->n + r] = acc;
            }
        }
    }
    free(u); free(sc); free(wf);
}

/* =====================================================================================================
 * 3. SIMD decode kernels (AVX2 and AVX-512): each 32-element group of a weight row is unpacked once into a
 *    ymm of 32 u8 and reused for 1 or 4 activation rows; several weight rows per pass give independent
 *    accumulator chains. One instance per type through always_inline functions called with constants.
 * ===================================================================================================== */
#ifdef HQ_HAVE_AVX2
HQ_ALWAYS_INLINE float hq_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* int32 lanes of the dot product of 32 weights (u8, or int8 for Q8_0) with 32 int8 activations;
 * 'au' is |u| for the signed format. vnni: AVX512-VNNI (the AVX-512 build); else maddubs (no saturation:
 * |products| <= 128*127*2 for Q8_0 after the sign trick, <= 63*127*2 for the others). */
HQ_ALWAYS_INLINE __m256i hq_dot32(__m256i u, __m256i au, __m256i q, const int sgn, const int vnni) {
    __m256i a = sgn ? au : u, b = sgn ? _mm256_sign_epi8(q, u) : q;
#if defined(HQ_HAVE_AVX512)
    if (vnni) return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#endif
    (void)vnni;
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
}

/* Software prefetch for streaming weights from DRAM: the rows of a pass are contiguous, so the bytes that the
 * pass `ahead` passes later reads at the same progress are `ahead * nbytes` further on; hardware prefetchers alone
 * reach only ~40% of one core's bandwidth on the interleaved row streams. */
#define HQ_PF_AHEAD 2
HQ_ALWAYS_INLINE void hq_prefetch_span(const uint8_t *p, int64_t nbytes) {
    for (int64_t o = 0; o < nbytes; o += 64) _mm_prefetch((const char *)(p + o), _MM_HINT_T0);
}

/* int16 activations: accumulate the products of 16 int16 weights with 16 int16 activations into 8 int32 lanes
 * (|u q| <= 255 * 32767, pairs summed: fits). */
HQ_ALWAYS_INLINE __m256i hq_dot16(__m256i acc, __m256i w, __m256i x, const int vnni) {
#if defined(HQ_HAVE_AVX512)
    if (vnni) return _mm256_dpwssd_epi32(acc, w, x);
#endif
    (void)vnni;
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
}

/* int8 / int16 mode (wide = 1: int16): weight rows [r, r + NR) against activation rows [i0, i0 + MB). Each weight group is unpacked once
 * per pass, each activation group loaded once; NR * MB independent accumulators keep the FMA chains short.
 * Non-split types: p = [da, ma] * [d_x, d_x sum q_x] gives the dot's scale (lane 0) and the offset (lane 1). */
HQ_ALWAYS_INLINE void hq_dec_int_pass(const hq_job *J, int64_t r, const int NR, int64_t i0, const int MB,
                                      const int type, const int vnni, const int wide) {
    const int QK = hq_block_elems(type), BS = hq_block_bytes(type), G = QK / 32;
    const int split = type == HQ_Q6_K, sgn = type == HQ_Q8_0;
    const int64_t k = J->k, ng = k / 32;
    __m256 acc[4][4];
    __m128 macc[4][4];
    for (int rr = 0; rr < NR; rr++)
        for (int i = 0; i < MB; i++) { acc[rr][i] = _mm256_setzero_ps(); macc[rr][i] = _mm_setzero_ps(); }
    const int ktab = G > 1;
    float tab[4][16];
    const uint8_t *pf = J->w + (r + HQ_PF_AHEAD * NR) * J->rowbytes; /* same progress, HQ_PF_AHEAD passes on */
    for (int64_t b = 0; b < k / QK; b++) {
        hq_prefetch_span(pf + b * NR * BS, NR * BS);
        if (ktab)
            for (int rr = 0; rr < NR; rr++) hq_kblock_tab(type, J->w + (r + rr) * J->rowbytes + b * BS, tab[rr]);
        for (int g = 0; g < G; g++) {
            const int64_t gi = b * G + g;
            __m256i u[4], au[4];
            __m128 dm[4];
            for (int rr = 0; rr < NR; rr++) {
                const uint8_t *blk = J->w + (r + rr) * J->rowbytes + b * BS;
                if (wide && (type == HQ_Q4_0 || type == HQ_Q4_1)) { /* nibbles straight to int16 */
                    const __m128i m4 = _mm_set1_epi8(0x0F);
                    __m128i qs = _mm_loadu_si128((const __m128i *)(blk + (type == HQ_Q4_0 ? 2 : 4)));
                    u[rr] = _mm256_cvtepu8_epi16(_mm_and_si128(qs, m4));
                    au[rr] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(qs, 4), m4));
                } else if (wide) { /* u[rr] / au[rr] become the int16 weights of elements 0..15 / 16..31 */
                    u[rr] = hq_group_u8(type, blk, g);
                    __m128i lo = _mm256_castsi256_si128(u[rr]), hi = _mm256_extracti128_si256(u[rr], 1);
                    u[rr] = sgn ? _mm256_cvtepi8_epi16(lo) : _mm256_cvtepu8_epi16(lo);
                    au[rr] = sgn ? _mm256_cvtepi8_epi16(hi) : _mm256_cvtepu8_epi16(hi);
                } else {
                    u[rr] = hq_group_u8(type, blk, g);
                    au[rr] = sgn ? _mm256_abs_epi8(u[rr]) : u[rr];
                }
                dm[rr] = ktab ? _mm_castpd_ps(_mm_load_sd((const double *)(tab[rr] + 2 * g))) : hq_group_dm(type, blk, g);
            }
            for (int i = 0; i < MB; i++) {
                const float *a = J->ad + ((i0 + i) * ng + gi) * 4;
                __m256i q = _mm256_setzero_si256(), qb = q;
                if (wide) {
                    q = _mm256_loadu_si256((const __m256i *)(J->q16 + (i0 + i) * k + gi * 32));
                    qb = _mm256_loadu_si256((const __m256i *)(J->q16 + (i0 + i) * k + gi * 32 + 16));
                } else {
                    q = _mm256_loadu_si256((const __m256i *)(J->q + (i0 + i) * k + gi * 32));
                }
                __m128 ax = _mm_castpd_ps(_mm_load_sd((const double *)a)); /* [d_x, d_x sum q] */
                for (int rr = 0; rr < NR; rr++) {
                    if (wide && split) { /* Q6_K: the two halves' dot products stay apart */
                        __m128 s2 = _mm_mul_ps(dm[rr], _mm_broadcastss_ps(ax)); /* [da d_x, db d_x] */
                        __m256 d0 = _mm256_cvtepi32_ps(hq_dot16(_mm256_setzero_si256(), u[rr], q, vnni));
                        __m256 d1 = _mm256_cvtepi32_ps(hq_dot16(_mm256_setzero_si256(), au[rr], qb, vnni));
                        acc[rr][i] = _mm256_fmadd_ps(d0, _mm256_broadcastss_ps(s2), acc[rr][i]);
                        acc[rr][i] = _mm256_fmadd_ps(d1, _mm256_broadcastss_ps(_mm_movehdup_ps(s2)), acc[rr][i]);
                        macc[rr][i] = _mm_fmadd_ps(dm[rr], _mm_castpd_ps(_mm_load_sd((const double *)(a + 2))),
                                                   macc[rr][i]);
                        continue;
                    }
                    __m256 dot = _mm256_cvtepi32_ps(
                        wide ? hq_dot16(hq_dot16(_mm256_setzero_si256(), u[rr], q, vnni), au[rr], qb, vnni)
                             : hq_dot32(u[rr], au[rr], q, sgn, vnni));
                    if (split) { /* dm = [da, db]; offsets -32 da, -32 db (Q6_K) */
                        __m128 s2 = _mm_mul_ps(dm[rr], _mm_broadcastss_ps(ax));
                        __m256 sc = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s2),
                                                             _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
                        acc[rr][i] = _mm256_fmadd_ps(dot, sc, acc[rr][i]);
                        macc[rr][i] = _mm_fmadd_ps(dm[rr], _mm_castpd_ps(_mm_load_sd((const double *)(a + 2))),
                                                   macc[rr][i]);
                    } else {
                        __m128 p = _mm_mul_ps(dm[rr], ax);
                        acc[rr][i] = _mm256_fmadd_ps(dot, _mm256_broadcastss_ps(p), acc[rr][i]);
                        macc[rr][i] = _mm_add_ps(macc[rr][i], p);
                    }
                }
            }
        }
    }
    for (int rr = 0; rr < NR; rr++)
        for (int i = 0; i < MB; i++) {
            __m128 mc = macc[rr][i];
            float off = split ? -32.0f * (_mm_cvtss_f32(mc) + _mm_cvtss_f32(_mm_movehdup_ps(mc)))
                              : _mm_cvtss_f32(_mm_movehdup_ps(mc));
            J->y[(i0 + i) * J->n + r + rr] = hq_hsum256(acc[rr][i]) + off;
        }
}

/* Weight rows [r0, r1): NR1 rows per pass for single activation rows, NR4 rows per pass for groups of 4. */
HQ_ALWAYS_INLINE void hq_dec_int(const hq_job *J, int64_t r0, int64_t r1, const int type, const int vnni,
                                 const int wide) {
    const int NR1 = vnni ? 4 : 2, NR4 = vnni ? 2 : 1;
    int64_t r = r0;
    for (; r + NR1 <= r1; r += NR1) {
        int64_t i0 = 0;
        for (; i0 + 4 <= J->m; i0 += 4)
            for (int rr = 0; rr < NR1; rr += NR4) hq_dec_int_pass(J, r + rr, NR4, i0, 4, type, vnni, wide);
        for (; i0 < J->m; i0++) hq_dec_int_pass(J, r, NR1, i0, 1, type, vnni, wide);
    }
    for (; r < r1; r++) {
        int64_t i0 = 0;
        for (; i0 + 4 <= J->m; i0 += 4) hq_dec_int_pass(J, r, 1, i0, 4, type, vnni, wide);
        for (; i0 < J->m; i0++) hq_dec_int_pass(J, r, 1, i0, 1, type, vnni, wide);
    }
}

/* float mode, AVX2 (8 lanes): weights dequantized per group in registers, then FMA with x. */
HQ_ALWAYS_INLINE __m256 hq_u8x8_to_ps(__m128i v8, const int sgn) { /* low 8 bytes -> 8 floats */
    return _mm256_cvtepi32_ps(sgn ? _mm256_cvtepi8_epi32(v8) : _mm256_cvtepu8_epi32(v8));
}
HQ_ALWAYS_INLINE void hq_dec_f32_pass_avx2(const hq_job *J, const uint8_t *wr, int64_t r, int64_t i0, const int MB,
                                           const int type) {
    const int QK = hq_block_elems(type), BS = hq_block_bytes(type), G = QK / 32, sgn = type == HQ_Q8_0;
    const int64_t k = J->k;
    __m256 acc[4];
    for (int i = 0; i < MB; i++) acc[i] = _mm256_setzero_ps();
    const uint8_t *pf = wr + HQ_PF_AHEAD * J->rowbytes;
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *blk = wr + b * BS;
        hq_prefetch_span(pf + b * BS, BS);
        for (int g = 0; g < G; g++) {
            const int64_t gi = b * G + g;
            float da, ma, db, mb;
            __m256i u = hq_group_u8(type, blk, g);
            hq_group_scales(type, blk, g, &da, &ma, &db, &mb);
            __m128i lo = _mm256_castsi256_si128(u), hi = _mm256_extracti128_si256(u, 1);
            __m256 vda = _mm256_set1_ps(da), vma = _mm256_set1_ps(ma), vdb = _mm256_set1_ps(db), vmb = _mm256_set1_ps(mb);
            __m256 w0 = _mm256_fmadd_ps(hq_u8x8_to_ps(lo, sgn), vda, vma);
            __m256 w1 = _mm256_fmadd_ps(hq_u8x8_to_ps(_mm_srli_si128(lo, 8), sgn), vda, vma);
            __m256 w2 = _mm256_fmadd_ps(hq_u8x8_to_ps(hi, sgn), vdb, vmb);
            __m256 w3 = _mm256_fmadd_ps(hq_u8x8_to_ps(_mm_srli_si128(hi, 8), sgn), vdb, vmb);
            for (int i = 0; i < MB; i++) {
                const float *xi = J->x + (i0 + i) * k + gi * 32;
                acc[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xi), acc[i]);
                acc[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xi + 8), acc[i]);
                acc[i] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xi + 16), acc[i]);
                acc[i] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xi + 24), acc[i]);
            }
        }
    }
    for (int i = 0; i < MB; i++) J->y[(i0 + i) * J->n + r] = hq_hsum256(acc[i]);
}
HQ_ALWAYS_INLINE void hq_dec_f32_avx2(const hq_job *J, int64_t r0, int64_t r1, const int type) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = J->w + r * J->rowbytes;
        int64_t i0 = 0;
        for (; i0 + 4 <= J->m; i0 += 4) hq_dec_f32_pass_avx2(J, wr, r, i0, 4, type);
        for (; i0 < J->m; i0++) hq_dec_f32_pass_avx2(J, wr, r, i0, 1, type);
    }
}
#endif /* HQ_HAVE_AVX2 */

#ifdef HQ_HAVE_AVX512
/* float mode, AVX-512 (16 lanes), weight rows [r, r + NR) against activation rows [i0, i0 + MB).
 * One activation row: the scale is applied once per group to the partial dot (t * da) and the offset through
 * the group sum of x (ma * sum x); several rows: the group is dequantized once, then one FMA per row and half. */
HQ_ALWAYS_INLINE __m512 hq_u8x16_to_ps(__m128i v16, const int sgn) {
    return _mm512_cvtepi32_ps(sgn ? _mm512_cvtepi8_epi32(v16) : _mm512_cvtepu8_epi32(v16));
}
HQ_ALWAYS_INLINE void hq_dec_f32_pass_avx512(const hq_job *J, int64_t r, const int NR, int64_t i0, const int MB,
                                             const int type) {
    const int QK = hq_block_elems(type), BS = hq_block_bytes(type), G = QK / 32;
    const int sgn = type == HQ_Q8_0, split = type == HQ_Q6_K, delayed = MB == 1 && !split, ktab = G > 1;
    const int64_t k = J->k, ng = k / 32;
    __m512 acc[4][4];
    __m128 macc[4];
    float tab[4][16];
    for (int rr = 0; rr < NR; rr++) {
        macc[rr] = _mm_setzero_ps();
        for (int i = 0; i < MB; i++) acc[rr][i] = _mm512_setzero_ps();
    }
    const uint8_t *pf = J->w + (r + HQ_PF_AHEAD * NR) * J->rowbytes;
    for (int64_t b = 0; b < k / QK; b++) {
        hq_prefetch_span(pf + b * NR * BS, NR * BS);
        if (ktab)
            for (int rr = 0; rr < NR; rr++) hq_kblock_tab(type, J->w + (r + rr) * J->rowbytes + b * BS, tab[rr]);
        for (int g = 0; g < G; g++) {
            const int64_t gi = b * G + g;
            __m512 x0 = _mm512_setzero_ps(), x1 = x0;
            __m128 xsv = _mm_setzero_ps();
            if (delayed) {
                x0 = _mm512_loadu_ps(J->x + i0 * k + gi * 32);
                x1 = _mm512_loadu_ps(J->x + i0 * k + gi * 32 + 16);
                xsv = _mm_setr_ps(1.0f, J->xs[i0 * ng + gi], 0.0f, 0.0f);
            }
            for (int rr = 0; rr < NR; rr++) {
                const uint8_t *blk = J->w + (r + rr) * J->rowbytes + b * BS;
                __m256i u = hq_group_u8(type, blk, g);
                __m128 dm = ktab ? _mm_castpd_ps(_mm_load_sd((const double *)(tab[rr] + 2 * g))) : hq_group_dm(type, blk, g);
                __m512 lo = hq_u8x16_to_ps(_mm256_castsi256_si128(u), sgn);
                __m512 hi = hq_u8x16_to_ps(_mm256_extracti128_si256(u, 1), sgn);
                if (delayed) { /* p = [da, ma * sum x] */
                    __m128 p = _mm_mul_ps(dm, xsv);
                    __m512 t = _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0));
                    acc[rr][0] = _mm512_fmadd_ps(t, _mm512_broadcastss_ps(p), acc[rr][0]);
                    macc[rr] = _mm_add_ps(macc[rr], p);
                    continue;
                }
                __m512 w0, w1;
                if (split) { /* dm = [da, db], offsets -32 da, -32 db */
                    __m512 da = _mm512_broadcastss_ps(dm), db = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
                    w0 = _mm512_mul_ps(_mm512_sub_ps(lo, _mm512_set1_ps(32.0f)), da);
                    w1 = _mm512_mul_ps(_mm512_sub_ps(hi, _mm512_set1_ps(32.0f)), db);
                } else {
                    __m512 da = _mm512_broadcastss_ps(dm), ma = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
                    w0 = _mm512_fmadd_ps(lo, da, ma);
                    w1 = _mm512_fmadd_ps(hi, da, ma);
                }
                for (int i = 0; i < MB; i++) {
                    const float *xi = J->x + (i0 + i) * k + gi * 32;
                    acc[rr][i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), acc[rr][i]);
                    acc[rr][i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), acc[rr][i]);
                }
            }
        }
    }
    for (int rr = 0; rr < NR; rr++)
        for (int i = 0; i < MB; i++)
            J->y[(i0 + i) * J->n + r + rr] =
                _mm512_reduce_add_ps(acc[rr][i]) + (delayed ? _mm_cvtss_f32(_mm_movehdup_ps(macc[rr])) : 0.0f);
}
HQ_ALWAYS_INLINE void hq_dec_f32_avx512(const hq_job *J, int64_t r0, int64_t r1, const int type) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        int64_t i0 = 0;
        for (; i0 + 4 <= J->m; i0 += 4) {
            hq_dec_f32_pass_avx512(J, r, 2, i0, 4, type);
            hq_dec_f32_pass_avx512(J, r + 2, 2, i0, 4, type);
        }
        for (; i0 < J->m; i0++) hq_dec_f32_pass_avx512(J, r, 4, i0, 1, type);
    }
    for (; r < r1; r++) {
        int64_t i0 = 0;
        for (; i0 + 4 <= J->m; i0 += 4) hq_dec_f32_pass_avx512(J, r, 1, i0, 4, type);
        for (; i0 < J->m; i0++) hq_dec_f32_pass_avx512(J, r, 1, i0, 1, type);
    }
}

/* =====================================================================================================
 * 4. AVX-512 VNNI GEMM. A tile of 16 weight rows is unpacked into an int8 buffer laid out
 *    [group][quad 0..7][row 0..15][4 bytes], so that one vpdpbusd (16 lanes = 16 weight rows, 4 bytes
 *    each) against a broadcast 4-byte slice of one activation row advances 16 dot products; per group
 *    the int32 lanes are scaled once: y += cvt(dot) * (d_row * d_x) + m_row * (d_x * sum q_x).
 *    Q8_0 is stored as u = q + 128 with m = -128 d; Q6_K keeps separate scales per 16-element half.
 *    int16 activations reuse the same tiles: each activation is split x = 256 hi + lo (hq_split16_row) and a
 *    lane gets 256 (u . hi) + (lo . u), two vpdpbusd per 4 products (vpdpwssd, also two per 4 products, runs
 *    at about half vpdpbusd's rate on Sapphire/Emerald Rapids), the same int32 as the int16 dot product.
 *    The packing is a transpose in zmm registers (Q4_0 / Q4_1 straight from their packed nibbles; rows to
 *    128-bit lanes by broadcast loads, then in-lane unpacks, to spare the shuffle port). At 8 rows the micro
 *    kernel is bound by its vpdpbusd and the float operations per group and row. The next tile's weights are
 *    prefetched spread over the micro kernel's groups.
 * ===================================================================================================== */
#define HQ_NR 16
#define HQ_MR 8
#ifndef HQ_PF_TILES
#define HQ_PF_TILES 1 /* the GEMM prefetches the weights of the tile this many tiles on */
#endif

/* Two 8x8 dword transposes at once, one per 256-bit half: z[j] holds rows j (low half) and j + 8 (high half) of
 * 8 dwords each; afterwards z[q] holds dword q of rows 0..15 (lane = row). */
HQ_ALWAYS_INLINE void hq_transpose16x8(__m512i *z) {
    __m512i t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(z[2 * i], z[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(z[2 * i], z[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        s[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        s[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        s[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        s[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for (int j = 0; j < 4; j++) {
        z[j] = _mm512_permutex2var_epi64(s[j], lo, s[j + 4]);
        z[j + 4] = _mm512_permutex2var_epi64(s[j], hi, s[j + 4]);
    }
}

/* The 16 bytes at p of 16 rows (row stride `stride`) -> z[d] = their dword d, lane = row. Each row's 16 bytes
 * go to one 128-bit lane by a broadcast load (masked: a load and a blend, no shuffle-port work), register j's lane l
 * holding row 4 l + j, so that a 4x4 dword transpose inside each lane (8 unpacks) leaves row r in lane r. */
HQ_ALWAYS_INLINE void hq_rows16x16(const uint8_t *p, int64_t stride, __m512i *z) {
    __m512i a[4], t[4];
    for (int j = 0; j < 4; j++) {
        a[j] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p + j * stride)));
        for (int l = 1; l < 4; l++)
            a[j] = _mm512_mask_broadcast_i32x4(a[j], (__mmask16)(0xFu << (4 * l)),
                                               _mm_loadu_si128((const __m128i *)(p + (4 * l + j) * stride)));
    }
    t[0] = _mm512_unpacklo_epi32(a[0], a[1]);
    t[1] = _mm512_unpackhi_epi32(a[0], a[1]);
    t[2] = _mm512_unpacklo_epi32(a[2], a[3]);
    t[3] = _mm512_unpackhi_epi32(a[2], a[3]);
    z[0] = _mm512_unpacklo_epi64(t[0], t[2]);
    z[1] = _mm512_unpackhi_epi64(t[0], t[2]);
    z[2] = _mm512_unpacklo_epi64(t[1], t[3]);
    z[3] = _mm512_unpackhi_epi64(t[1], t[3]);
}

/* Q4_0 / Q4_1, the 16 bytes of 4-bit values of 16 rows -> the 8 quads of the tile. Row r's byte j holds elements j
 * (low nibble) and j + 16 (high nibble), so dword d of the packed bytes gives quads d and d + 4: transpose the
 * 16 x 4 dwords (4 rows per zmm, one row per 128-bit lane), then split the nibbles. */
HQ_ALWAYS_INLINE void hq_pack_nibbles16(const uint8_t *qs, int64_t stride, int nr, __m512i *out) {
    if (nr == 16) {
        __m512i p[4];
        hq_rows16x16(qs, stride, p);
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        for (int d = 0; d < 4; d++) {
            out[d] = _mm512_and_si512(p[d], m4);
            out[d + 4] = _mm512_and_si512(_mm512_srli_epi16(p[d], 4), m4);
        }
        return;
    }
    __m512i t[4], u[4];
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int j = 0; j < 4; j++) {
        __m512i a = _mm512_setzero_si512();
        if (4 * j + 3 < nr) {
            a = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(qs + (4 * j) * stride)));
            a = _mm512_inserti32x4(a, _mm_loadu_si128((const __m128i *)(qs + (4 * j + 1) * stride)), 1);
            a = _mm512_inserti32x4(a, _mm_loadu_si128((const __m128i *)(qs + (4 * j + 2) * stride)), 2);
            a = _mm512_inserti32x4(a, _mm_loadu_si128((const __m128i *)(qs + (4 * j + 3) * stride)), 3);
        } else {
            for (int l = 0; l < 4 && 4 * j + l < nr; l++)
                a = _mm512_mask_broadcast_i32x4(a, (__mmask16)(0xFu << (4 * l)),
                                                _mm_loadu_si128((const __m128i *)(qs + (4 * j + l) * stride)));
        }
        t[j] = _mm512_permutexvar_epi32(idx, a); /* lane d: dword d of the 4 rows */
    }
    u[0] = _mm512_shuffle_i32x4(t[0], t[1], 0x44); /* lanes t0.0, t0.1, t1.0, t1.1 */
    u[1] = _mm512_shuffle_i32x4(t[0], t[1], 0xEE);
    u[2] = _mm512_shuffle_i32x4(t[2], t[3], 0x44);
    u[3] = _mm512_shuffle_i32x4(t[2], t[3], 0xEE);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int d = 0; d < 4; d++) {
        __m512i p = _mm512_shuffle_i32x4(u[d >> 1], u[2 + (d >> 1)], (d & 1) ? 0xDD : 0x88); /* dword d, rows 0..15 */
        out[d] = _mm512_and_si512(p, m4);
        out[d + 4] = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
    }
}

/* The 32 bytes at p of nr <= 16 rows -> z[d] = their dword d, lane = row; missing rows are zero. */
HQ_ALWAYS_INLINE void hq_load16x32(const uint8_t *p, int64_t stride, int nr, __m512i *z) {
    if (nr == 16) {
        hq_rows16x16(p, stride, z);
        hq_rows16x16(p + 16, stride, z + 4);
        return;
    }
    for (int j = 0; j < 8; j++) {
        __m256i u0 = j < nr ? _mm256_loadu_si256((const __m256i *)(p + j * stride)) : _mm256_setzero_si256();
        __m256i u1 = j + 8 < nr ? _mm256_loadu_si256((const __m256i *)(p + (j + 8) * stride)) : _mm256_setzero_si256();
        z[j] = _mm512_inserti64x4(_mm512_castsi256_si512(u0), u1, 1);
    }
    hq_transpose16x8(z);
}

/* The callers of hq_kquant_group keep kraw / kraw2 / khi between the groups of a block: they are written at the
 * block's first group (g = 0, and g = 4 n for Q6_K) before any read, which gcc cannot see through the inlining */
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
/* Group g of a K-quant block (Q4_K, Q5_K, Q6_K) of nr <= 16 rows at base: z[q] = elements 4q .. 4q + 3, lane = row.
 * The raw bytes are transposed into kraw / kraw2 / khi once for the groups that share them (kept by the caller
 * between the groups of one block, g = 0, 1, ... in order) and unpacked in registers:
 *   Q4_K / Q5_K: groups 2j and 2j + 1 are the low and high nibbles of the same 32 bytes; Q5_K's fifth bit of
 *   element e in group g is bit g of qh byte e;
 *   Q6_K, g = 4 n + j: the low (j < 2) or high nibbles of ql bytes 64 n + 32 (j & 1), and bits 2 j, 2 j + 1 of qh
 *   bytes 128 + 32 n. */
HQ_ALWAYS_INLINE void hq_kquant_group(int type, const uint8_t *base, int64_t stride, int nr, int g, __m512i *kraw,
                                     __m512i *kraw2, __m512i *khi, __m512i *z) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    if (type == HQ_Q6_K) {
        const int n4 = g / 4, jj = g % 4;
        if (jj == 0) {
            hq_load16x32(base + 64 * n4, stride, nr, kraw);
            hq_load16x32(base + 64 * n4 + 32, stride, nr, kraw2);
            hq_load16x32(base + 128 + 32 * n4, stride, nr, khi);
        }
        for (int qd = 0; qd < 8; qd++) {
            const __m512i ql = jj & 1 ? kraw2[qd] : kraw[qd];
            const __m512i lo = _mm512_and_si512(jj >> 1 ? _mm512_srli_epi16(ql, 4) : ql, m4);
            const __m512i hb = _mm512_and_si512(_mm512_srli_epi16(khi[qd], 2 * jj), _mm512_set1_epi8(3));
            z[qd] = _mm512_or_si512(lo, _mm512_slli_epi16(hb, 4));
        }
        return;
    }
    if (!(g & 1)) hq_load16x32(base + 16 + (type == HQ_Q5_K ? 32 : 0) + 32 * (g / 2), stride, nr, kraw);
    for (int qd = 0; qd < 8; qd++) z[qd] = _mm512_and_si512(g & 1 ? _mm512_srli_epi16(kraw[qd], 4) : kraw[qd], m4);
    if (type == HQ_Q5_K) {
        if (g == 0) hq_load16x32(base + 16, stride, nr, khi);
        for (int qd = 0; qd < 8; qd++)
            z[qd] = _mm512_or_si512(z[qd], _mm512_slli_epi16(
                _mm512_and_si512(_mm512_srli_epi16(khi[qd], g), _mm512_set1_epi8(1)), 4));
    }
}

/* Formats with one group per block: the fp16 d (and m) of 16 rows' blocks at base (row stride in offs), gathered at
 * once; missing rows are zero. */
HQ_ALWAYS_INLINE void hq_tile_dm(int type, const uint8_t *base, __m512i offs, __mmask16 rows, __m512 *d, __m512 *m) {
    const __m512i h = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, offs, base, 1);
    *d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
    switch (type) {
    case HQ_Q4_1: case HQ_Q5_1: *m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16))); break;
    case HQ_Q4_0: *m = _mm512_mul_ps(*d, _mm512_set1_ps(-8.0f)); break;
    case HQ_Q5_0: *m = _mm512_mul_ps(*d, _mm512_set1_ps(-16.0f)); break;
    default: *m = _mm512_mul_ps(*d, _mm512_set1_ps(-128.0f)); /* Q8_0 stored as q + 128 */
    }
}

/* Group g of nr <= 16 rows' blocks at base, unpacked row by row (hq_group_u8) and transposed: z[q] holds elements
 * 4q .. 4q + 3 of rows 0..15 (lane = row); missing rows are zero. */
HQ_ALWAYS_INLINE void hq_tile_group_u8(int type, const uint8_t *base, int64_t stride, int nr, int g, __m512i *z) {
    for (int j = 0; j < 8; j++) {
        __m256i u0 = j < nr ? hq_group_u8(type, base + j * stride, g) : _mm256_setzero_si256();
        __m256i u1 = j + 8 < nr ? hq_group_u8(type, base + (j + 8) * stride, g) : _mm256_setzero_si256();
        z[j] = _mm512_inserti64x4(_mm512_castsi256_si512(u0), u1, 1);
    }
    hq_transpose16x8(z);
}

/* Unpack blocks [b0, b1) of weight rows [r0, r0 + nr) (nr <= 16) into pu [group][8][16][4], ps [group][2][16]
 * (scales of the two halves; the second only for Q6_K) and pm [group][2][16] (offsets); missing rows are zero. */
HQ_ALWAYS_INLINE void hq_gemm_pack(const hq_job *J, int64_t r0, int nr, int64_t b0, int64_t b1, uint8_t *pu,
                                   float *ps, float *pm, int pf_rows, const int type) {
    const int QK = hq_block_elems(type), BS = hq_block_bytes(type), G = QK / 32, sgn = type == HQ_Q8_0;
    const int ktab = G > 1, split = type == HQ_Q6_K, nib = type == HQ_Q4_0 || type == HQ_Q4_1;
    const __mmask16 rows = (__mmask16)((1u << nr) - 1u);
    const __m512i offs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)J->rowbytes));
    float tab[HQ_NR][16];
    __m512i kraw[8], kraw2[8], khi[8];
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *base = J->w + r0 * J->rowbytes + b * BS;
        if (pf_rows) /* the same blocks of the tile of rows HQ_PF_TILES on */
            for (int rr = 0; rr < HQ_NR; rr++) hq_prefetch_span(base + (HQ_PF_TILES * HQ_NR + rr) * J->rowbytes, BS);
        if (ktab) {
            for (int rr = 0; rr < nr; rr++) hq_kblock_tab(type, base + rr * J->rowbytes, tab[rr]);
        } else { /* one group per block: gather the 16 rows' fp16 d (and m) at once */
            __m512 d, m;
            hq_tile_dm(type, base, offs, rows, &d, &m);
            _mm512_storeu_ps(ps + (b - b0) * 32, d);
            _mm512_storeu_ps(pm + (b - b0) * 32, m);
        }
        for (int g = 0; g < G; g++) {
            const int64_t gi = (b - b0) * G + g;
            float *gs = ps + gi * 32, *gm = pm + gi * 32;
            __m512i z[8];
            if (nib) {
                hq_pack_nibbles16(base + (type == HQ_Q4_0 ? 2 : 4), J->rowbytes, nr, z);
            } else if (ktab) { /* Q4_K, Q5_K, Q6_K: the raw bytes transposed once for the groups sharing them */
                hq_kquant_group(type, base, J->rowbytes, nr, g, kraw, kraw2, khi, z);
            } else {
                hq_tile_group_u8(type, base, J->rowbytes, nr, g, z);
            }
            for (int qd = 0; qd < 8; qd++) {
                __m512i v = z[qd];
                if (sgn) v = _mm512_maskz_xor_epi32(rows, v, _mm512_set1_epi8((char)0x80)); /* int8 q -> u8 q + 128 */
                _mm512_store_si512((void *)(pu + gi * 512 + qd * 64), v);
            }
            if (ktab)
                for (int rr = 0; rr < HQ_NR; rr++) {
                    float da = 0.0f, ma = 0.0f, db = 0.0f, mb = 0.0f;
                    if (rr < nr) {
                        da = tab[rr][2 * g];
                        if (split) { db = tab[rr][2 * g + 1]; ma = -32.0f * da; mb = -32.0f * db; }
                        else ma = tab[rr][2 * g + 1];
                    }
                    gs[rr] = da; gm[rr] = ma;
                    if (split) { gs[16 + rr] = db; gm[16 + rr] = mb; }
                }
        }
    }
}

/* 4 bytes at p broadcast to all 16 lanes, read in place (folds into the {1to16} memory operand of vpdpwssd /
 * vpdpbusd; a memcpy to a scalar first makes gcc broadcast from a general register, one slow uop per product) */
typedef int32_t hq_i32u __attribute__((aligned(1), may_alias));
HQ_ALWAYS_INLINE __m512i hq_bcast32(const void *p) { return _mm512_set1_epi32(*(const hq_i32u *)p); }

/* The int16 dot product from the split accumulators: 256 (sum of the na/2 hi chains) + (sum of the lo chains) + c. */
HQ_ALWAYS_INLINE __m512i hq_join16(const __m512i *acc, const int na, int32_t c) {
    const __m512i hi = na == 4 ? _mm512_add_epi32(acc[0], acc[1]) : acc[0];
    const __m512i lo = na == 4 ? _mm512_add_epi32(acc[2], acc[3]) : acc[1];
    return _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo), _mm512_set1_epi32(c));
}
HQ_ALWAYS_INLINE __m512i hq_join8(const __m512i *acc, const int na) {
    return na == 4 ? _mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3]))
                   : _mm512_add_epi32(acc[0], acc[1]);
}

/* y[i0 .. i0+MR) x [c0, c0 + nc) += packed groups [g0, g1) (or = when !accum). */
HQ_ALWAYS_INLINE void hq_gemm_micro(const hq_job *J, const uint8_t *pu, const float *ps, const float *pm, int64_t i0,
                                    int64_t c0, int nc, int64_t g0, int64_t g1, int accum, const uint8_t *pf,
                                    int64_t pf_bytes, const int MR, const int split, const int wide, const int sgn) {
    const int64_t k = J->k, ng = k / 32;
    const __mmask16 mask = (__mmask16)((1u << nc) - 1u);
    __m512 accf[HQ_MR];
    __m512i acc[HQ_MR][2]; /* int16: u . hi, lo . u (hq_join16); int8: [0] only */
    for (int i = 0; i < MR; i++)
        accf[i] = accum ? _mm512_maskz_loadu_ps(mask, J->y + (i0 + i) * J->n + c0) : _mm512_setzero_ps();
    for (int64_t gi = g0; gi < g1; gi++) {
        const uint8_t *pg = pu + (gi - g0) * 512;
        const float *pgs = ps + (gi - g0) * 32, *pgm = pm + (gi - g0) * 32;
        if (pf) hq_prefetch_span(pf + (gi - g0) * pf_bytes, pf_bytes);
        for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int qd = 0; qd < 8; qd++) {
            __m512i wv = _mm512_loadu_si512((const void *)(pg + qd * 64));
            if (wide) { /* hq_split16_row: acc[0] gets u . hi, acc[1] lo . u (u as int8: Q8_0's packed q + 128 back to q) */
                const __m512i ws = sgn ? _mm512_xor_si512(wv, _mm512_set1_epi8((char)0x80)) : wv;
                for (int i = 0; i < MR; i++) {
                    const uint8_t *xp = J->q16s + ((i0 + i) * k + gi * 32 + qd * 4) * 2;
                    acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], wv, hq_bcast32(xp));
                    acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], hq_bcast32(xp + 4), ws);
                }
            } else {
                for (int i = 0; i < MR; i++)
                    acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], wv, hq_bcast32(J->q + (i0 + i) * k + gi * 32 + qd * 4));
            }
            if (split && qd == 3) { /* first 16 elements of the group have their own scale */
                __m512 sv = _mm512_loadu_ps(pgs), mv = _mm512_loadu_ps(pgm);
                for (int i = 0; i < MR; i++) {
                    const float *a = J->ad + ((i0 + i) * ng + gi) * 4;
                    const __m512i acci = wide ? hq_join16(acc[i], 2, 0) : acc[i][0];
                    accf[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acci), _mm512_mul_ps(sv, _mm512_set1_ps(a[0])), accf[i]);
                    accf[i] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a[2]), accf[i]);
                    acc[i][0] = acc[i][1] = _mm512_setzero_si512();
                }
            }
        }
        __m512 sv = _mm512_loadu_ps(pgs + (split ? 16 : 0)), mv = _mm512_loadu_ps(pgm + (split ? 16 : 0));
        for (int i = 0; i < MR; i++) {
            const float *a = J->ad + ((i0 + i) * ng + gi) * 4;
            const __m512i acci = wide ? hq_join16(acc[i], 2, sgn ? 128 * J->slo[(i0 + i) * ng + gi] : 0) : acc[i][0];
            accf[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acci), _mm512_mul_ps(sv, _mm512_set1_ps(a[0])), accf[i]);
            accf[i] = _mm512_fmadd_ps(mv, _mm512_set1_ps(split ? a[3] : a[1]), accf[i]);
        }
    }
    for (int i = 0; i < MR; i++) _mm512_mask_storeu_ps(J->y + (i0 + i) * J->n + c0, mask, accf[i]);
}

/* Weight rows [r0, r1) in tiles of 16; K in chunks whose quantized activations (all m rows) stay in L2. */
HQ_ALWAYS_INLINE void hq_gemm_int(const hq_job *J, int64_t r0, int64_t r1, const int type, const int wide) {
    const int G = hq_block_elems(type) / 32, split = type == HQ_Q6_K, sgn = type == HQ_Q8_0;
    const int64_t nb = J->k / (32 * G);
    int64_t max_groups = (192 * 1024) / (32 * (wide ? 2 : 1) * (J->m > 0 ? J->m : 1));
    int64_t bpc = max_groups / G < 1 ? 1 : max_groups / G; /* blocks per chunk */
    const int64_t nchunks = (nb + bpc - 1) / bpc;
    bpc = (nb + nchunks - 1) / nchunks;
    uint8_t *pu = (uint8_t *)aligned_alloc(64, (size_t)(bpc * G * 512));
    float *ps = (float *)aligned_alloc(64, (size_t)(bpc * G * 32 * sizeof(float)));
    float *pm = (float *)aligned_alloc(64, (size_t)(bpc * G * 32 * sizeof(float)));
    if (!pu || !ps || !pm) { free(pu); free(ps); free(pm); *J->failed = 1; return; }
    { /* the first tiles, which no earlier tile prefetched */
        const int64_t e = r0 + HQ_PF_TILES * HQ_NR < r1 ? r0 + HQ_PF_TILES * HQ_NR : r1;
        hq_prefetch_span(J->w + r0 * J->rowbytes, (e - r0) * J->rowbytes);
    }
    for (int64_t c0 = r0; c0 < r1; c0 += HQ_NR) {
        const int nc = (int)(r1 - c0 < HQ_NR ? r1 - c0 : HQ_NR);
        for (int64_t b0 = 0; b0 < nb; b0 += bpc) {
            const int64_t b1 = b0 + bpc < nb ? b0 + bpc : nb, g0 = b0 * G, g1 = b1 * G;
            const int accum = b0 > 0;
            /* prefetch the tile HQ_PF_TILES on: when all of K is one chunk it is contiguous, and the first micro
             * kernel spreads its lines over its groups (a burst of them from the packing would stall on the
             * outstanding misses); else the packing takes each row's blocks */
            const int whole = b0 == 0 && b1 == nb;
            const uint8_t *pf = whole ? J->w + (c0 + HQ_PF_TILES * HQ_NR) * J->rowbytes : NULL;
            const int64_t pf_bytes = (HQ_NR * J->rowbytes + (g1 - g0) - 1) / (g1 - g0);
            hq_gemm_pack(J, c0, nc, b0, b1, pu, ps, pm, !whole, type);
            int64_t i0 = 0;
            for (; i0 + HQ_MR <= J->m; i0 += HQ_MR, pf = NULL)
                hq_gemm_micro(J, pu, ps, pm, i0, c0, nc, g0, g1, accum, pf, pf_bytes, HQ_MR, split, wide, sgn);
            for (; i0 + 4 <= J->m; i0 += 4, pf = NULL)
                hq_gemm_micro(J, pu, ps, pm, i0, c0, nc, g0, g1, accum, pf, pf_bytes, 4, split, wide, sgn);
            for (; i0 < J->m; i0++, pf = NULL)
                hq_gemm_micro(J, pu, ps, pm, i0, c0, nc, g0, g1, accum, pf, pf_bytes, 1, split, wide, sgn);
        }
    }
    free(pu); free(ps); free(pm);
}

#ifdef __AVX512BITALG__
#define HQ_BITALG 1
#else /* without vpshufbitqmb, Q5_0 / Q5_1 unpack row by row (hq_group_u8) */
#define HQ_BITALG 0
#define _mm512_bitshuffle_epi64_mask(b, c) ((__mmask64)0)
#endif
/* bitshuffle selector for quad qd of a Q5_0 / Q5_1 tile: a qword holds two rows' qh (bits 0..31, 32..63); its
 * bytes 0..3 take bits 4 qd + j of the first row, bytes 4..7 those of the second */
HQ_ALWAYS_INLINE uint64_t hq_q5_sel(int qd) {
    uint64_t c = 0;
    for (int j = 0; j < 4; j++) c |= (uint64_t)(4 * qd + j) << (8 * j) | (uint64_t)(32 + 4 * qd + j) << (8 * (j + 4));
    return c;
}

/* 32 bytes at p of each of nr <= 16 rows (row stride 'stride'), transposed: z[q] holds bytes 4q .. 4q + 3 of rows
 * 0..15 (lane = row); missing rows are zero */

/* A few activation rows (a decode step, a speculative verification, a small batch) with the GEMM's arithmetic, the
 * packing fused into the dot products: each tile's transposed groups stay in registers instead of going through the
 * packed buffer, and the K-quants' scales are computed for the 16 rows at once from a few gathered words per block.
 * The activation rows go through a tile MR = 4, 2 or 1 at a time, all MR sharing each group's unpacked weights (the
 * tile's bytes stay in L1/L2 between the passes). Per output the float operations are hq_gemm_micro's with MR = 1,
 * in the same order (the int32 dot of a group is exact whatever its order), so a row gets the same bits alone, with
 * a few others, or in any GEMM batch: the decode step needs no padding row for batch invariance. The next tile is
 * prefetched spread over the groups of a tile's first pass. */

/* Activation rows [i0, i0 + MR) against the tile of nr <= 16 weight rows from c0. */
HQ_ALWAYS_INLINE void hq_gemv_tile(const hq_job *J, int64_t c0, int nr, int64_t i0, const int MR, int pf,
                                   const int type, const int wide) {
    const int QK = hq_block_elems(type), BS = hq_block_bytes(type), G = QK / 32, sgn = type == HQ_Q8_0;
    const int ktab = G > 1, split = type == HQ_Q6_K, nib = type == HQ_Q4_0 || type == HQ_Q4_1;
    const int q5 = HQ_BITALG && (type == HQ_Q5_0 || type == HQ_Q5_1), kq = type == HQ_Q4_K || type == HQ_Q5_K;
    /* integer chains per row: four alone (a vpdpbusd waits ~5 cycles for its accumulator), two when rows share
     * the tile (MR rows give MR independent chains already); int16: half of them u . hi, half lo . u */
    const int NA = MR == 1 ? 4 : 2;
    __m512i kraw[8], khi[8], kraw2[8];
    const int64_t k = J->k, ng = k / 32, nb = k / QK, tile_bytes = HQ_NR * J->rowbytes, end = J->n * J->rowbytes;
    const int64_t pf_bytes = (tile_bytes + nb * G - 1) / (nb * G); /* the tile HQ_PF_TILES on, over the groups */
    const __m512i offs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)J->rowbytes));
    const __mmask16 rows = (__mmask16)((1u << nr) - 1u);
    const uint8_t *tile = J->w + c0 * J->rowbytes;
    const int64_t pf0 = (c0 + HQ_PF_TILES * HQ_NR) * J->rowbytes;
    __m512 accf[4];
    for (int i = 0; i < MR; i++) accf[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *base = tile + b * BS;
        __m512 sv = _mm512_setzero_ps(), mv = sv, sv_hi = sv, mv_hi = sv, kd = sv, kdm = sv;
        __m512i kw[4];
        if (ktab) { /* the 16 rows' scale words, lane = row (hq_kblock_tab's values, computed per group below) */
            const __m512i z0 = _mm512_setzero_si512();
            if (type == HQ_Q6_K) {
                for (int j = 0; j < 4; j++) kw[j] = _mm512_mask_i32gather_epi32(z0, rows, offs, base + 192 + 4 * j, 1);
                kd = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(
                    _mm512_mask_i32gather_epi32(z0, rows, offs, base + 206, 1), 16))); /* d: bytes 208..209 */
            } else {
                const __m512i h = _mm512_mask_i32gather_epi32(z0, rows, offs, base, 1);
                kd = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
                kdm = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16))));
                for (int j = 0; j < 3; j++) kw[j] = _mm512_mask_i32gather_epi32(z0, rows, offs, base + 4 + 4 * j, 1);
            }
        } else {
            hq_tile_dm(type, base, offs, rows, &sv, &mv);
        }
        for (int g = 0; g < G; g++) {
            const int64_t gi = b * G + g;
            if (pf && pf0 + (gi + 1) * pf_bytes <= end) hq_prefetch_span(J->w + pf0 + gi * pf_bytes, pf_bytes);
            if (ktab && split) { /* Q6_K: int8 scales 2g, 2g + 1 times d; offsets -32 da, -32 db */
                const __m512i w = kw[g / 2];
                const int sh = 16 * (g & 1);
                sv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 24 - sh), 24)), kd);
                sv_hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 16 - sh), 24)), kd);
                mv = _mm512_mul_ps(sv, _mm512_set1_ps(-32.0f));
                mv_hi = _mm512_mul_ps(sv_hi, _mm512_set1_ps(-32.0f));
            } else if (ktab) { /* Q4_K / Q5_K: 6-bit scale and min of group g (hq_k_scale_min) */
                const __m512i m6 = _mm512_set1_epi32(63), m4 = _mm512_set1_epi32(15), m2 = _mm512_set1_epi32(3);
                __m512i sc, mn;
                if (g < 4) {
                    sc = _mm512_and_si512(_mm512_srli_epi32(kw[0], 8 * g), m6);
                    mn = _mm512_and_si512(_mm512_srli_epi32(kw[1], 8 * g), m6);
                } else {
                    const int j = 8 * (g - 4);
                    sc = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(kw[2], j), m4),
                                         _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(kw[0], j + 6), m2), 4));
                    mn = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(kw[2], j + 4), m4),
                                         _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(kw[1], j + 6), m2), 4));
                }
                sv = _mm512_mul_ps(_mm512_cvtepi32_ps(sc), kd);
                mv = _mm512_mul_ps(_mm512_cvtepi32_ps(mn), kdm);
            }
            __m512i z[8];
            if (nib || q5) {
                hq_pack_nibbles16(base + (type == HQ_Q4_0 ? 2 : type == HQ_Q4_1 ? 4 : type == HQ_Q5_0 ? 6 : 8),
                                  J->rowbytes, nr, z);
                if (q5) { /* bit e of the rows' 32-bit qh is element e's fifth bit: byte j of quad qd is 4 qd + j */
                    const __m512i qh = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, offs,
                                                                   base + (type == HQ_Q5_0 ? 2 : 4), 1);
                    for (int qd = 0; qd < 8; qd++) {
                        const __mmask64 hi = _mm512_bitshuffle_epi64_mask(
                            qh, _mm512_set1_epi64((long long)hq_q5_sel(qd)));
                        z[qd] = _mm512_mask_add_epi8(z[qd], hi, z[qd], _mm512_set1_epi8(0x10));
                    }
                }
            } else if (kq || split) {
                hq_kquant_group(type, base, J->rowbytes, nr, g, kraw, kraw2, khi, z);
            } else {
                hq_tile_group_u8(type, base, J->rowbytes, nr, g, z);
            }
            /* integer sums, so the chains' split does not change the bits; int16 activations (hq_split16_row):
             * the hi chains get u . hi, the lo chains lo . u (u as int8: Q8_0's raw q) */
            __m512i acc[4][4];
            for (int i = 0; i < MR; i++)
                for (int c = 0; c < NA; c++) acc[i][c] = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int qd = 0; qd < 8; qd++) {
                const __m512i wv = sgn ? _mm512_maskz_xor_epi32(rows, z[qd], _mm512_set1_epi8((char)0x80)) : z[qd];
                for (int i = 0; i < MR; i++) {
                    if (wide) {
                        const uint8_t *xp = J->q16s + ((i0 + i) * k + gi * 32 + qd * 4) * 2;
                        const int c = NA == 4 ? (qd & 1) : 0;
                        acc[i][c] = _mm512_dpbusd_epi32(acc[i][c], wv, hq_bcast32(xp));
                        acc[i][NA / 2 + c] = _mm512_dpbusd_epi32(acc[i][NA / 2 + c], hq_bcast32(xp + 4), z[qd]);
                    } else {
                        const int c = qd & (NA - 1);
                        acc[i][c] = _mm512_dpbusd_epi32(acc[i][c], wv, hq_bcast32(J->q + (i0 + i) * k + gi * 32 + qd * 4));
                    }
                }
                if (split && qd == 3) {
                    for (int i = 0; i < MR; i++) {
                        const float *a = J->ad + ((i0 + i) * ng + gi) * 4;
                        const __m512i acci = wide ? hq_join16(acc[i], NA, 0) : hq_join8(acc[i], NA);
                        accf[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acci), _mm512_mul_ps(sv, _mm512_set1_ps(a[0])),
                                                  accf[i]);
                        accf[i] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a[2]), accf[i]);
                        for (int c = 0; c < NA; c++) acc[i][c] = _mm512_setzero_si512();
                    }
                }
            }
            const __m512 s2 = split ? sv_hi : sv, m2 = split ? mv_hi : mv;
            for (int i = 0; i < MR; i++) {
                const float *a = J->ad + ((i0 + i) * ng + gi) * 4;
                const __m512i acci = wide ? hq_join16(acc[i], NA, sgn ? 128 * J->slo[(i0 + i) * ng + gi] : 0)
                                          : hq_join8(acc[i], NA);
                accf[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acci), _mm512_mul_ps(s2, _mm512_set1_ps(a[0])), accf[i]);
                accf[i] = _mm512_fmadd_ps(m2, _mm512_set1_ps(split ? a[3] : a[1]), accf[i]);
            }
        }
    }
    for (int i = 0; i < MR; i++) _mm512_mask_storeu_ps(J->y + (i0 + i) * J->n + c0, rows, accf[i]);
}

HQ_ALWAYS_INLINE void hq_gemv_int(const hq_job *J, int64_t r0, int64_t r1, const int type, const int wide) {
    hq_prefetch_span(J->w + r0 * J->rowbytes,
                     ((r0 + HQ_PF_TILES * HQ_NR < r1 ? r0 + HQ_PF_TILES * HQ_NR : r1) - r0) * J->rowbytes);
    for (int64_t c0 = r0; c0 < r1; c0 += HQ_NR) {
        const int nr = (int)(r1 - c0 < HQ_NR ? r1 - c0 : HQ_NR);
        if (J->m == 1) {
            hq_gemv_tile(J, c0, nr, 0, 1, 1, type, wide);
            continue;
        }
        /* passes of 4 rows, the last one or two of 3 or 2 (5 = 3 + 2, 6 = 3 + 3, 7 = 4 + 3) */
        for (int64_t i0 = 0; i0 < J->m;) {
            const int64_t left = J->m - i0;
            const int mr = left == 5 || left == 6 || left == 3 ? 3 : left == 2 ? 2 : left == 1 ? 1 : 4;
            if (mr == 4) hq_gemv_tile(J, c0, nr, i0, 4, i0 == 0, type, wide);
            else if (mr == 3) hq_gemv_tile(J, c0, nr, i0, 3, i0 == 0, type, wide);
            else if (mr == 2) hq_gemv_tile(J, c0, nr, i0, 2, i0 == 0, type, wide);
            else hq_gemv_tile(J, c0, nr, i0, 1, i0 == 0, type, wide);
            i0 += mr;
        }
    }
}
#endif /* HQ_HAVE_AVX512 */

/* =====================================================================================================
 * 5. Per-type instantiation, dequantization, API, threading
 * ===================================================================================================== */
typedef void (*hq_kernel)(const hq_job *, int64_t, int64_t);

/* kernel kinds, per instruction set and type */
enum { HQ_K_DEC_I8, HQ_K_DEC_F32, HQ_K_GEMM_I8, HQ_K_DEC_I16, HQ_K_GEMM_I16, HQ_K_GEMV_I8, HQ_K_GEMV_I16, HQ_K_KINDS };
/* Q2_K, Q3_K, IQ4_NL and IQ4_XS have no SIMD kernels yet: hq_pick returns 0 for them and herd_q_matmul runs
 * hq_rows_scalar (exact unpacking through hq_formats.h, the loops left to the compiler's vectorizer). */
#define HQ_NTYPES 8
#define HQ_FOR_TYPES(X) X(HQ_Q4_0) X(HQ_Q4_1) X(HQ_Q5_0) X(HQ_Q5_1) X(HQ_Q8_0) X(HQ_Q4_K) X(HQ_Q5_K) X(HQ_Q6_K)
static int hq_type_index(int type) {
    switch (type) {
    case HQ_Q4_0: return 0; case HQ_Q4_1: return 1; case HQ_Q5_0: return 2; case HQ_Q5_1: return 3;
    case HQ_Q8_0: return 4; case HQ_Q4_K: return 5; case HQ_Q5_K: return 6; case HQ_Q6_K: return 7;
    default: return -1;
    }
}
#define HQ_NAMES(P) {P##HQ_Q4_0, P##HQ_Q4_1, P##HQ_Q5_0, P##HQ_Q5_1, P##HQ_Q8_0, P##HQ_Q4_K, P##HQ_Q5_K, P##HQ_Q6_K}

#ifdef HQ_HAVE_AVX2
#define HQ_DEF_AVX2(T)                                                                                       \
    static void hq_avx2_i8_##T(const hq_job *J, int64_t a, int64_t b) { hq_dec_int(J, a, b, T, 0, 0); }       \
    static void hq_avx2_f32_##T(const hq_job *J, int64_t a, int64_t b) { hq_dec_f32_avx2(J, a, b, T); }       \
    static void hq_avx2_i16_##T(const hq_job *J, int64_t a, int64_t b) { hq_dec_int(J, a, b, T, 0, 1); }
HQ_FOR_TYPES(HQ_DEF_AVX2)
static const hq_kernel hq_avx2_table[HQ_K_KINDS][HQ_NTYPES] = {
    HQ_NAMES(hq_avx2_i8_), HQ_NAMES(hq_avx2_f32_), {0}, HQ_NAMES(hq_avx2_i16_), {0}, {0}, {0}};
#endif
#ifdef HQ_HAVE_AVX512
#define HQ_DEF_AVX512(T)                                                                                      \
    static void hq_avx512_i8_##T(const hq_job *J, int64_t a, int64_t b) { hq_dec_int(J, a, b, T, 1, 0); }      \
    static void hq_avx512_f32_##T(const hq_job *J, int64_t a, int64_t b) { hq_dec_f32_avx512(J, a, b, T); }    \
    static void hq_avx512_gi8_##T(const hq_job *J, int64_t a, int64_t b) { hq_gemm_int(J, a, b, T, 0); }       \
    static void hq_avx512_i16_##T(const hq_job *J, int64_t a, int64_t b) { hq_dec_int(J, a, b, T, 1, 1); }     \
    static void hq_avx512_gi16_##T(const hq_job *J, int64_t a, int64_t b) { hq_gemm_int(J, a, b, T, 1); }      \
    static void hq_avx512_vi8_##T(const hq_job *J, int64_t a, int64_t b) { hq_gemv_int(J, a, b, T, 0); }       \
    static void hq_avx512_vi16_##T(const hq_job *J, int64_t a, int64_t b) { hq_gemv_int(J, a, b, T, 1); }
HQ_FOR_TYPES(HQ_DEF_AVX512)
static const hq_kernel hq_avx512_table[HQ_K_KINDS][HQ_NTYPES] = {
    HQ_NAMES(hq_avx512_i8_), HQ_NAMES(hq_avx512_f32_), HQ_NAMES(hq_avx512_gi8_), HQ_NAMES(hq_avx512_i16_),
    HQ_NAMES(hq_avx512_gi16_), HQ_NAMES(hq_avx512_vi8_), HQ_NAMES(hq_avx512_vi16_)};
#endif

static hq_kernel hq_pick(int isa, int kind, int type) {
    int t = hq_type_index(type);
    if (t < 0) return 0;
#ifdef HQ_HAVE_AVX512
    if (isa == 2) return hq_avx512_table[kind][t];
#endif
#ifdef HQ_HAVE_AVX2
    if (isa == 1) return hq_avx2_table[kind][t];
#endif
    (void)kind;
    return 0;
}

int herd_q_abi_version(void) { return HQ_ABI_VERSION; }
int herd_q_set_gemm_min_rows(int m) {
    int old = hq_gemm_min_rows;
    if (m > 0) hq_gemm_min_rows = m;
    return old;
}
int herd_q_set_gemv(int on) {
    int old = hq_gemv;
    if (on >= 0) hq_gemv = on != 0;
    return old;
}
int herd_q_best_isa(void) {
#if defined(HQ_HAVE_AVX512)
    return 2;
#elif defined(HQ_HAVE_AVX2)
    return 1;
#else
    return 0;
#endif
}
int herd_q_block_elems(int type) { return hq_block_elems(type); }
int herd_q_block_bytes(int type) { return hq_block_bytes(type); }

static int hq_resolve_isa(int isa) {
    if (isa < 0) return herd_q_best_isa();
    return isa <= herd_q_best_isa() ? isa : HQ_ERR_ISA;
}

/* Split [0, n) over T threads in units of 'align' rows; thread t gets [*a, *b). */
static void hq_split(int64_t n, int t, int T, int64_t align, int64_t *a, int64_t *b) {
    int64_t units = (n + align - 1) / align;
    int64_t u0 = units * t / T, u1 = units * (t + 1) / T;
    *a = u0 * align < n ? u0 * align : n;
    *b = u1 * align < n ? u1 * align : n;
}

static int hq_threads(int nthreads, int64_t work) {
    int nt = nthreads > 0 ? nthreads : 1;
    if (work < (1 << 16)) nt = 1; /* too small to pay for a fork/join */
    return nt;
}

/* Activation rows [a, b): int8 / int16 quantization or (float mode) group sums. */
static void hq_prepare_rows(const hq_job *J, int8_t *q, int16_t *q16, float *ad, float *xs, int64_t a, int64_t b,
                            int isa) {
    const int64_t k = J->k, ng = k / 32;
    for (int64_t i = a; i < b; i++) {
        if (J->mode == HQ_MODE_F32) hq_group_sums_row(J->x + i * k, k, xs + i * ng);
        else hq_quantize_row(J->x + i * k, k, q ? q + i * k : NULL, q16 ? q16 + i * k : NULL, ad + i * ng * 4, isa);
#ifdef HQ_HAVE_AVX512
        if (J->q16s)
            hq_split16_row(q16 + i * k, k, (uint8_t *)J->q16s + i * k * 2, J->slo ? (int32_t *)J->slo + i * ng : NULL);
#endif
    }
}

int herd_q_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int type, int64_t n, float *y, int mode,
                  int isa, int nthreads) {
    const int QK = hq_block_elems(type);
    if (!QK) return HQ_ERR_TYPE;
    if (m < 0 || n < 0 || k <= 0 || k % QK) return HQ_ERR_SHAPE;
    if (mode != HQ_MODE_F32 && mode != HQ_MODE_I8 && mode != HQ_MODE_I16) return HQ_ERR_MODE;
    isa = hq_resolve_isa(isa);
    if (isa < 0) return isa;
    if (m == 0 || n == 0) return 0;

    int failed = 0;
    hq_job J = {m, k, n, (k / QK) * hq_block_bytes(type), type, mode, x, w, y, NULL, NULL, NULL, NULL, &failed};
    int8_t *q = NULL;
    int16_t *q16 = NULL;
    float *ad = NULL, *xs = NULL;
    const int64_t ng = k / 32;
    if (mode == HQ_MODE_F32) {
        xs = (float *)malloc(sizeof(float) * (size_t)(m * ng));
        if (!xs) return HQ_ERR_NOMEM;
        J.xs = xs;
    } else {
        if (mode == HQ_MODE_I8) q = (int8_t *)malloc((size_t)(m * k));
        else q16 = (int16_t *)malloc(sizeof(int16_t) * (size_t)(m * k));
        ad = (float *)malloc(sizeof(float) * (size_t)(m * ng * 4));
        if ((!q && !q16) || !ad) { free(q); free(q16); free(ad); return HQ_ERR_NOMEM; }
        J.q = q;
        J.q16 = q16;
        J.ad = ad;
    }
    hq_kernel kern = NULL;
    int64_t align = 1;
    if (isa > 0) {
        int kind = mode == HQ_MODE_F32 ? HQ_K_DEC_F32 : mode == HQ_MODE_I8 ? HQ_K_DEC_I8 : HQ_K_DEC_I16;
        align = 4; /* the decode kernels take 4 (AVX-512) or 2 (AVX2) weight rows per pass */
        if (isa == 2 && mode != HQ_MODE_F32 && m >= hq_gemm_min_rows) {
            kind = mode == HQ_MODE_I8 ? HQ_K_GEMM_I8 : HQ_K_GEMM_I16;
            align = 16;
        } else if (isa == 2 && mode != HQ_MODE_F32 && hq_gemv) {
            kind = mode == HQ_MODE_I8 ? HQ_K_GEMV_I8 : HQ_K_GEMV_I16;
            align = 16;
        }
        kern = hq_pick(isa, kind, type);
        if (kern && (kind == HQ_K_GEMM_I16 || kind == HQ_K_GEMV_I16)) { /* they read the split form */
            uint8_t *q16s = (uint8_t *)malloc((size_t)(m * k * 2));
            int32_t *slo = type == HQ_Q8_0 ? (int32_t *)malloc(sizeof(int32_t) * (size_t)(m * ng)) : NULL;
            if (!q16s || (type == HQ_Q8_0 && !slo)) { free(q16s); free(slo); free(q16); free(ad); return HQ_ERR_NOMEM; }
            J.q16s = q16s;
            J.slo = slo;
        }
    }
    const int nt = hq_threads(nthreads, m * n * k);
    /* Few activation rows: prepare them here, so that the threads meet only once (at the end); a barrier costs
     * little on idle cores but a whole time slice when a thread has been preempted. */
    const int serial_prep = m * k <= 32768;
    if (serial_prep) hq_prepare_rows(&J, q, q16, ad, xs, 0, m, isa);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        int64_t a, b;
        if (!serial_prep) {
            hq_split(m, t, T, 1, &a, &b);
            hq_prepare_rows(&J, q, q16, ad, xs, a, b, isa);
#pragma omp barrier
        }
        hq_split(n, t, T, align, &a, &b); /* weight rows */
        if (a < b) {
            if (kern) kern(&J, a, b);
            else hq_rows_scalar(&J, a, b);
        }
    }
    free(q); free(q16); free(ad); free(xs); free((void *)J.q16s); free((void *)J.slo);
    return failed ? HQ_ERR_NOMEM : 0;
}

/* Dequantize rows of W: out[i, :] = dequant(row i), k floats each. */
static void hq_dequant_row(int type, const uint8_t *wr, int64_t k, float *out, int isa) {
    const int QK = hq_block_elems(type), BS = hq_block_bytes(type), G = QK / 32;
    for (int64_t b = 0; b < k / QK; b++) {
        const uint8_t *blk = wr + b * BS;
        for (int g = 0; g < G; g++) {
            float da, ma, db, mb, *o = out + (b * G + g) * 32;
            hq_group_scales(type, blk, g, &da, &ma, &db, &mb);
#ifdef HQ_HAVE_AVX2
            if (isa >= 1 && hq_type_index(type) >= 0) { /* a type with SIMD unpacking */
                __m256i u = hq_group_u8(type, blk, g);
                const int sgn = type == HQ_Q8_0;
                __m128i lo = _mm256_castsi256_si128(u), hi = _mm256_extracti128_si256(u, 1);
                __m256 vda = _mm256_set1_ps(da), vma = _mm256_set1_ps(ma), vdb = _mm256_set1_ps(db), vmb = _mm256_set1_ps(mb);
                _mm256_storeu_ps(o, _mm256_fmadd_ps(hq_u8x8_to_ps(lo, sgn), vda, vma));
                _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(hq_u8x8_to_ps(_mm_srli_si128(lo, 8), sgn), vda, vma));
                _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(hq_u8x8_to_ps(hi, sgn), vdb, vmb));
                _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(hq_u8x8_to_ps(_mm_srli_si128(hi, 8), sgn), vdb, vmb));
                continue;
            }
#endif
            (void)isa;
            uint8_t u[32];
            hq_group_u8_ref(type, blk, g, u);
            for (int j = 0; j < 32; j++) {
                float uf = hq_signed(type) ? (float)(int8_t)u[j] : (float)u[j];
                o[j] = j < 16 ? fmaf(da, uf, ma) : fmaf(db, uf, mb);
            }
        }
    }
}

int herd_q_dequantize(const uint8_t *w, int type, int64_t n, int64_t k, float *out, int isa, int nthreads) {
    const int QK = hq_block_elems(type);
    if (!QK) return HQ_ERR_TYPE;
    if (n < 0 || k <= 0 || k % QK) return HQ_ERR_SHAPE;
    isa = hq_resolve_isa(isa);
    if (isa < 0) return isa;
    const int64_t rowbytes = (k / QK) * hq_block_bytes(type);
    const int nt = hq_threads(nthreads, n * k / 8);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t r = 0; r < n; r++) hq_dequant_row(type, w + r * rowbytes, k, out + r * k, isa);
    return 0;
}

int herd_q_dequantize_rows(const uint8_t *w, int type, int64_t k, const int64_t *rows, int64_t nrows, float *out,
                           int nthreads) {
    const int QK = hq_block_elems(type);
    if (!QK) return HQ_ERR_TYPE;
    if (nrows < 0 || k <= 0 || k % QK) return HQ_ERR_SHAPE;
    const int64_t rowbytes = (k / QK) * hq_block_bytes(type);
    const int nt = hq_threads(nthreads, nrows * k / 8);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t i = 0; i < nrows; i++) hq_dequant_row(type, w + rows[i] * rowbytes, k, out + i * k, herd_q_best_isa());
    return 0;
}

int herd_q_quantize_act(const float *x, int64_t m, int64_t k, void *q, float *d, int bits, int isa) {
    if (m < 0 || k <= 0 || k % 32) return HQ_ERR_SHAPE;
    if (bits != 8 && bits != 16) return HQ_ERR_MODE;
    isa = hq_resolve_isa(isa);
    if (isa < 0) return isa;
    float *ad = (float *)malloc(sizeof(float) * (size_t)(k / 32) * 4);
    if (!ad) return HQ_ERR_NOMEM;
    for (int64_t i = 0; i < m; i++) {
        if (bits == 8) hq_quantize_row(x + i * k, k, (int8_t *)q + i * k, NULL, ad, isa);
        else hq_quantize_row(x + i * k, k, NULL, (int16_t *)q + i * k, ad, isa);
        for (int64_t b = 0; b < k / 32; b++) d[i * (k / 32) + b] = ad[4 * b];
    }
    free(ad);
    return 0;
}
