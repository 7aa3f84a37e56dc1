/* herd_decode.c -- the decode step of a Llama model with quantized linear layers: every decoder layer for a few
 * new tokens in one call, so that the small per-layer operations (RMSNorm, RoPE, the cache write, attention over
 * the cache, SiLU * up, the residual adds) cost no Python / ATen dispatch. The tokens are rows: one per sequence
 * when decoding, or several consecutive rows of one sequence (a prompt chunk, a speculative verification), which
 * are attended together but each with the arithmetic it gets alone -- so prefilling a prompt here leaves the same
 * bits in the cache and the hidden states as decoding it token by token, wherever herd_q_matmul gives a row the
 * same bits in any batch (the integer activation modes on AVX-512).
 *
 * The arithmetic is herd/models/llama.py's (SPEC.md section 1) in float32; the linear layers are herd_q_matmul,
 * the same kernels QuantLinear calls, so only the summation order of the small operations differs from the
 * PyTorch path. Shapes: B rows (sequences), D dim, H query heads, KV key/value heads, hd head dim, F hidden,
 * S cache positions per row.
 *
 * Two cache layouts: contiguous (herd/models/kv_cache.py: per layer (rows, KV, S, hd)) and paged (the scheduler's
 * PagedKVCache: per layer a pool (n_pages, P, KV, hd) and a page table (rows, S / P); position p of table row r lives
 * at page table[r, p / P], offset p % P). Attention reads a row's keys as runs of consecutive positions -- one run
 * of S positions, or one run per page -- and does the same arithmetic in the same order on both, so a row gives the
 * same bits from either layout.
 *
 * The cache holds each (position, KV head) vector of hd values as float32, float16 or q8_0 (hd/32 blocks of an fp16
 * scale and 32 int8, 34 bytes; herd/models/kv_cache.py's kv_encode is the definition, and hd_kv_encode below does
 * the same arithmetic). Attention over an f16 or q8_0 cache decodes HD_CHUNK positions at a time into float32
 * scratch and runs the float32 loops on it: the same bits as a float32 cache holding the decoded values.
 */
#include "herd_quant.h"
#include "hq_formats.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* One decoder layer: weights as QuantLinear holds them, plus its cache buffers. Mirrored by ctypes in
 * herd/quant/decode.py; every field is 8 bytes wide so that the two layouts cannot drift apart by padding. */
typedef struct {
    const uint8_t *w;
    int64_t type, mode, out_features;
} hd_linear;

typedef struct {
    const float *attn_norm, *ffn_norm; /* (D,) */
    hd_linear wq, wk, wv, wo, w1, w2, w3;
    /* in head vectors (kv_vec_bytes each): contiguous: row r, KV head j, position p at r * row_stride + j * S + p;
     * paged: the pools, position p of table row r, KV head j at (table[r, p / P] * P + p % P) * KV + j */
    uint8_t *k_cache, *v_cache;
} hd_layer;

typedef struct {
    int64_t dim, n_heads, n_kv_heads, head_dim, hidden, n_layers;
    double eps;
    int64_t cache_rows, cache_len, row_stride; /* cache (or table) rows, S, elements between two cache rows */
    const float *inv_freq;                     /* (hd/2,) */
    const float *final_norm;                   /* (D,) or NULL: leave x un-normalised */
    const hd_layer *layers;
    const int64_t *page_table; /* (cache_rows, table_stride) page ids, or NULL for the contiguous layout */
    int64_t table_stride, page_size, n_pages; /* elements between two table rows, P, pages in each pool */
    int64_t row_align; /* > 1: the linear layers run on the rows padded with zero rows to a multiple of this, the
                        * row count for which herd_q_matmul gives each row the same bits whatever the batch */
    int64_t kv_type, kv_vec_bytes; /* HD_KV_F32 / F16 / Q8_0, and the bytes of one stored head vector */
} hd_model;

#define HD_ERR_SHAPE (-2)
#define HD_ERR_PAGE (-3)
#define HD_ERR_NOMEM (-5)

#define HD_KV_F32 0
#define HD_KV_F16 1
#define HD_KV_Q8_0 2
#define HD_CHUNK 64 /* positions decoded to float32 at a time from an f16 / q8_0 cache */
#define HD_TOK 16   /* tokens of one sequence attended together (a prompt chunk, a speculative verification) */

/* Where the keys and values of one (row, KV head) live: runs of `run` consecutive positions (the last may be
 * shorter), `step` head vectors apart within a run; run i starts at vector page[i] * page_vecs from k (page NULL:
 * one run at k). Vectors are `vec_bytes` long, stored as `type`; tmp: HD_CHUNK * hd floats of scratch. */
typedef struct {
    const uint8_t *k, *v;
    const int64_t *page;
    int64_t run, step, page_vecs, type, vec_bytes;
    float *tmp;
} hd_kv;

/* float -> IEEE half, round to nearest even (as torch's .half()), portable: overflow gives inf, NaN stays NaN. */
static inline uint16_t hd_float_to_half(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a >= 0x47800000u) /* |f| >= 65536, inf or NaN */
        return (uint16_t)(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
    if (a < 0x38800000u) { /* below 2^-14: a half subnormal; adding 0.5 moves the bits to the units of 2^-24 and
                            * the float addition rounds them to nearest even */
        float x, half = 0.5f;
        memcpy(&x, &a, 4);
        x += half;
        uint32_t r;
        memcpy(&r, &x, 4);
        return (uint16_t)(sign | (r - 0x3F000000u));
    }
    /* normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even; a carry into
     * the exponent is the correct result (up to inf for values in [65520, 65536)) */
    const uint32_t odd = (a >> 13) & 1u;
    return (uint16_t)(sign | ((a - 0x38000000u + 0xFFFu + odd) >> 13));
}

/* One head vector x (hd) into its stored form (kv_encode in herd/models/kv_cache.py). */
static void hd_kv_encode(const float *x, int64_t hd, int64_t type, uint8_t *dst) {
    if (type == HD_KV_F32) {
        memcpy(dst, x, sizeof(float) * (size_t)hd);
    } else if (type == HD_KV_F16) {
        for (int64_t i = 0; i < hd; i++) {
            const uint16_t h = hd_float_to_half(x[i]);
            memcpy(dst + 2 * i, &h, 2);
        }
    } else {
        for (int64_t b = 0; b < hd / 32; b++, x += 32, dst += 34) {
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
            const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            const uint16_t h = hd_float_to_half(d);
            memcpy(dst, &h, 2);
            for (int i = 0; i < 32; i++) {
                const float y = x[i] * inv, r = floorf(fabsf(y) + 0.5f); /* half away from zero */
                dst[2 + i] = (uint8_t)(int8_t)(y < 0.0f ? -r : r);
            }
        }
    }
}

/* m stored vectors, `stride` bytes apart, decoded to float32 rows of hd (kv_decode). */
static void hd_kv_decode(const uint8_t *src, int64_t m, int64_t stride, int64_t hd, int64_t type, float *out) {
    for (int64_t p = 0; p < m; p++, src += stride, out += hd) {
        if (type == HD_KV_F16) {
            for (int64_t i = 0; i < hd; i++) out[i] = hq_f16(src + 2 * i);
        } else {
            for (int64_t b = 0; b < hd / 32; b++) {
                const uint8_t *blk = src + 34 * b;
                const float d = hq_f16(blk);
                for (int i = 0; i < 32; i++) out[32 * b + i] = (float)(int8_t)blk[2 + i] * d;
            }
        }
    }
}

/* Float32 rows of positions p .. p + m - 1 of a run that starts at `base`: in place for an f32 cache (*st set to
 * the float stride), else decoded into kv->tmp (m <= HD_CHUNK, *st = hd). */
static const float *hd_kv_rows(const hd_kv *kv, const uint8_t *base, int64_t p, int64_t m, int64_t hd, int64_t *st) {
    const uint8_t *src = base + p * kv->step * kv->vec_bytes;
    if (kv->type == HD_KV_F32) {
        *st = kv->step * hd;
        return (const float *)src;
    }
    hd_kv_decode(src, m, kv->step * kv->vec_bytes, hd, kv->type, kv->tmp);
    *st = hd;
    return kv->tmp;
}

/* Positions 0 .. n - 1 of one KV head's keys or values (`store`: kv->k or kv->v) as float32 spans, in position
 * order: each run (a page, or the whole contiguous row) whole for an f32 cache, else HD_CHUNK positions at a time.
 *   hd_walk w = hd_walk_start(kv, kv->k, n, hd);
 *   while ((K = hd_walk_next(&w, &at, &m, &st))) ... positions at .. at + m - 1, position at + j at K + j * st */
typedef struct {
    const hd_kv *kv;
    const uint8_t *store;
    int64_t n, hd, chunk, p0, run, c;
} hd_walk;

static hd_walk hd_walk_start(const hd_kv *kv, const uint8_t *store, int64_t n, int64_t hd) {
    hd_walk w = {kv, store, n, hd, kv->type == HD_KV_F32 ? kv->run : HD_CHUNK, 0, 0, 0};
    return w;
}

static const float *hd_walk_next(hd_walk *w, int64_t *at, int64_t *m, int64_t *st) {
    const hd_kv *kv = w->kv;
    if (w->p0 >= w->n) return NULL;
    int64_t len = w->n - w->p0 < kv->run ? w->n - w->p0 : kv->run; /* positions of the current run */
    if (w->c >= len) { /* the next run */
        w->p0 += kv->run;
        w->run++;
        w->c = 0;
        if (w->p0 >= w->n) return NULL;
        len = w->n - w->p0 < kv->run ? w->n - w->p0 : kv->run;
    }
    const uint8_t *base = w->store + (kv->page ? kv->page[w->run] * kv->page_vecs : 0) * kv->vec_bytes;
    *m = len - w->c < w->chunk ? len - w->c : w->chunk;
    *at = w->p0 + w->c;
    const float *rows = hd_kv_rows(kv, base, w->c, *m, w->hd, st);
    w->c += *m;
    return rows;
}

/* Export for tests: n head vectors x (n, hd) -> their stored form (n, bytes per vector). */
int herd_kv_encode(const float *x, int64_t n, int64_t hd, int type, uint8_t *out) {
    if (n < 0 || hd <= 0 || type < HD_KV_F32 || type > HD_KV_Q8_0 || (type == HD_KV_Q8_0 && hd % 32))
        return HD_ERR_SHAPE;
    const int64_t vb = type == HD_KV_F32 ? 4 * hd : (type == HD_KV_F16 ? 2 * hd : hd / 32 * 34);
    for (int64_t i = 0; i < n; i++) hd_kv_encode(x + i * hd, hd, type, out + i * vb);
    return 0;
}


/* e^x in float32 within ~2 ulp (Cephes' expf polynomial after a Cody-Waite reduction), written so that gcc
 * vectorizes the loops calling it (libm's expf does not vectorize without -ffast-math). x is clamped to
 * [-87.3, 88.3]: below, the result is ~0 (flushed to 2^-126 scale), above it would overflow. */
static inline float hd_expf(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union { int32_t i; float f; } sc = {.i = ((int32_t)n + 127) << 23};
    return p * sc.f;
}

/* out = (x * rsqrt(mean(x^2) + eps)) * w, the row normalised in float32 as torch does it (then scaled). */
static void hd_rms_norm(const float *x, const float *w, int64_t D, double eps, float *out) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)D + (float)eps);
    for (int64_t i = 0; i < D; i++) out[i] = (x[i] * r) * w[i];
}

/* Rotate adjacent pairs (2i, 2i+1) of each of nh heads by the row's angles (Meta's interleaved RoPE). */
static void hd_rope(float *v, int64_t nh, int64_t hd, const float *cs, const float *sn) {
    for (int64_t h = 0; h < nh; h++) {
        float *p = v + h * hd;
        for (int64_t i = 0; i < hd / 2; i++) {
            const float a = p[2 * i], b = p[2 * i + 1];
            p[2 * i] = a * cs[i] - b * sn[i];
            p[2 * i + 1] = a * sn[i] + b * cs[i];
        }
    }
}

#ifdef __AVX512F__
#include <immintrin.h>
/* Lane p of the result = ((0 + a[p][0]) + a[p][1]) + ... + a[p][15]: each vector's lanes summed in order, as the
 * portable loop's `omp simd` reduction does (so both paths give the same bits); through a 16 x 16 transpose. */
static inline __m512 hd_sum_lanes16(const __m512 *a) {
    __m512 t[16], u[16], col[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* u[4i + e], 128-bit lane L: element e of lane L of rows 4i .. 4i + 3 */
        __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
        __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int e = 0; e < 4; e++) { /* column 4L + e = lanes L of u[e], u[4 + e], u[8 + e], u[12 + e] */
        __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44), v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
        __m512 v2 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44), v3 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
        col[e] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        col[4 + e] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
        col[8 + e] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        col[12 + e] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
    __m512 s = _mm512_setzero_ps();
    for (int c = 0; c < 16; c++) s = _mm512_add_ps(s, col[c]);
    return s;
}

/* scores sc[r * ld + p] = q_r . K_p * scale (K_p at K + p * ks) for hd % 16 == 0, 16 positions at a time; the
 * same arithmetic as the portable loop: per lane an FMA chain over the 16-float chunks, then the lanes summed in
 * order. Each score is its own dot product, so how the positions are split into calls changes no bit. */
static void hd_scores_avx512(const float *q, int64_t R, const float *K, int64_t n, int64_t ks, int64_t hd,
                             float scale, float *sc, int64_t ld) {
    for (int64_t r = 0; r < R; r++) {
        const float *qr = q + r * hd;
        for (int64_t p0 = 0; p0 < n; p0 += 16) {
            const int np = (int)(n - p0 < 16 ? n - p0 : 16);
            const float *kp[16]; /* positions past the end repeat the last one; their scores are not stored */
            __m512 a[16];
            for (int j = 0; j < 16; j++) {
                kp[j] = K + (p0 + (j < np ? j : np - 1)) * ks;
                a[j] = _mm512_setzero_ps();
            }
            for (int64_t i = 0; i < hd; i += 16) {
                const __m512 qv = _mm512_loadu_ps(qr + i);
                for (int j = 0; j < 16; j++) a[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kp[j] + i), a[j]);
            }
            _mm512_mask_storeu_ps(sc + r * ld + p0, (__mmask16)((1u << np) - 1u),
                                  _mm512_mul_ps(hd_sum_lanes16(a), _mm512_set1_ps(scale)));
        }
    }
}

/* out rows o[0..3] (hd) = (more ? o : 0) + sum over positions p < n of w[r][p] V_p, an FMA chain per element in
 * position order; the first nrows stored (the others repeat a row). Rows by pointer: heads of one token or of
 * several. */
static void hd_wsum4_avx512(const float *const *w, const float *V, int64_t n, int64_t vs, int64_t hd,
                            float *const *o, int nrows, int more) {
    for (int64_t c0 = 0; c0 < hd; c0 += 64) {
        int64_t col[4];
        for (int c = 0; c < 4; c++) col[c] = c0 + 16 * c < hd ? c0 + 16 * c : hd - 16;
        __m512 acc[4][4];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = more ? _mm512_loadu_ps(o[r] + col[c]) : _mm512_setzero_ps();
        for (int64_t p = 0; p < n; p++) {
            const float *vp = V + p * vs;
            __m512 v[4];
            for (int c = 0; c < 4; c++) v[c] = _mm512_loadu_ps(vp + col[c]);
            for (int r = 0; r < 4; r++) {
                const __m512 wr = _mm512_set1_ps(w[r][p]);
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(wr, v[c], acc[r][c]);
            }
        }
        for (int r = 0; r < nrows; r++)
            for (int c = 0; c < 4 && c0 + 16 * c < hd; c++) _mm512_storeu_ps(o[r] + c0 + 16 * c, acc[r][c]);
    }
}

/* out (R, hd) = weights sc (R, n; rows ld apart) . V (n, hd; V_p at V + p * vs) for hd % 16 == 0, added to out
 * when `more` (a later run of positions: the FMA chain goes on from the stored partial sums, the same bits as one
 * chain): blocks of 4 heads x 64 columns in registers, an FMA chain over the positions per element (the portable
 * loop's order). Heads / columns past the end are computed on repeated data and not stored. */
static void hd_weighted_sum_avx512(const float *sc, int64_t ld, int64_t R, const float *V, int64_t n, int64_t vs,
                                   int64_t hd, float *out, int more) {
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
        const float *w[4];
        float *o[4];
        for (int r = 0; r < 4; r++) {
            const int64_t row = r0 + r < R ? r0 + r : R - 1;
            w[r] = sc + row * ld;
            o[r] = out + row * hd;
        }
        hd_wsum4_avx512(w, V, n, vs, hd, o, (int)(R - r0 < 4 ? R - r0 : 4), more);
    }
}
#endif

#ifdef __AVX512F__
/* hd_expf on 16 lanes: the same steps, FMAs where the scalar form has a multiply-add */
static inline __m512 hd_expf16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    const __m512 big = _mm512_set1_ps(12582912.0f);
    const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), big), big);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

/* sr[0 .. n) = softmax(sr) in place. One function for every caller (the decode step's rows and the multi-token
 * path), so that a row gets the same bits wherever it is attended. */
static void hd_softmax_row(float *sr, int64_t n) {
#ifdef __AVX512F__
    __m512 vm = _mm512_set1_ps(-INFINITY), vs = _mm512_setzero_ps();
    for (int64_t p = 0; p < n; p += 16) {
        const __mmask16 k = (__mmask16)(n - p >= 16 ? 0xFFFFu : (1u << (n - p)) - 1u);
        vm = _mm512_mask_max_ps(vm, k, vm, _mm512_maskz_loadu_ps(k, sr + p));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
    for (int64_t p = 0; p < n; p += 16) {
        const __mmask16 k = (__mmask16)(n - p >= 16 ? 0xFFFFu : (1u << (n - p)) - 1u);
        const __m512 e = _mm512_maskz_mov_ps(k, hd_expf16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sr + p), mx)));
        _mm512_mask_storeu_ps(sr + p, k, e);
        vs = _mm512_add_ps(vs, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vs));
    for (int64_t p = 0; p < n; p += 16) {
        const __mmask16 k = (__mmask16)(n - p >= 16 ? 0xFFFFu : (1u << (n - p)) - 1u);
        _mm512_mask_storeu_ps(sr + p, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sr + p), inv));
    }
#else
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t p = 0; p < n; p++) mx = sr[p] > mx ? sr[p] : mx;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < n; p++) {
        sr[p] = hd_expf(sr[p] - mx);
        sum += sr[p];
    }
    const float inv = 1.0f / sum;
    for (int64_t p = 0; p < n; p++) sr[p] *= inv;
#endif
}

/* The R query heads q (R, hd) that share one KV head, over its positions 0..n-1 (kv: where they live):
 * out (R, hd) = softmax(q . K^T / sqrt(hd)) V, each key and value row read once for all R. sc: R * n floats. */
static void hd_attend_group(const float *q, int64_t R, const hd_kv *kv, int64_t n, int64_t hd, float *sc,
                            float *out) {
    const float scale = 1.0f / sqrtf((float)hd);
#ifdef __AVX512F__
    const int simd = hd % 16 == 0;
#else
    const int simd = 0;
#endif
    const float *K, *V;
    int64_t at, mc, st;
    for (hd_walk w = hd_walk_start(kv, kv->k, n, hd); (K = hd_walk_next(&w, &at, &mc, &st));) { /* scores */
        if (simd) {
#ifdef __AVX512F__
            hd_scores_avx512(q, R, K, mc, st, hd, scale, sc + at, n);
#endif
            continue;
        }
        for (int64_t p = 0; p < mc; p++) {
            const float *kp = K + p * st;
            for (int64_t r = 0; r < R; r++) {
                const float *qr = q + r * hd;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < hd; i++) s += qr[i] * kp[i];
                sc[r * n + at + p] = s * scale;
            }
        }
    }
    for (int64_t r = 0; r < R; r++) hd_softmax_row(sc + r * n, n);
    if (!simd) memset(out, 0, sizeof(float) * (size_t)(R * hd));
    for (hd_walk w = hd_walk_start(kv, kv->v, n, hd); (V = hd_walk_next(&w, &at, &mc, &st));) { /* weighted values */
        if (simd) {
#ifdef __AVX512F__
            hd_weighted_sum_avx512(sc + at, n, R, V, mc, st, hd, out, at > 0);
#endif
            continue;
        }
        for (int64_t p = 0; p < mc; p++) {
            const float *vp = V + p * st;
            for (int64_t r = 0; r < R; r++) {
                const float wgt = sc[r * n + at + p];
                float *o = out + r * hd;
#pragma omp simd
                for (int64_t i = 0; i < hd; i++) o[i] += wgt * vp[i];
            }
        }
    }
}

#ifdef __AVX512F__

/* T tokens of one sequence (cache row), token t at position pos[t], each with R query heads on one KV head: the
 * R heads of token t at q + t * qs (hd apart), their outputs at out + t * qs. Every row gets hd_attend_group's
 * arithmetic over its own positions 0 .. pos[t] (so the same bits as when decoded alone), but the keys are
 * transposed once for all the rows (kt: ceil16(max pos + 1) * hd floats) and the scores of 4 rows are formed at
 * once from them: each lane of the decode step's 16-wide partial sums is a broadcast-FMA chain here, and the
 * lanes are added in the same order, with no transpose per score. sc: T * R * ceil16(max pos + 1) floats. */
static void hd_attend_tokens_avx512(const float *q, int64_t qs, int64_t R, const int64_t *pos, int64_t T,
                                    const hd_kv *kv, int64_t hd, float *kt, float *sc, float *out) {
    const float scale = 1.0f / sqrtf((float)hd);
    int64_t nmax = 0;
    for (int64_t t = 0; t < T; t++) nmax = pos[t] + 1 > nmax ? pos[t] + 1 : nmax;
    const int64_t ld = (nmax + 15) / 16 * 16, NR = T * R;
    const float *K, *V;
    int64_t at, mc, st;
    /* kt[(p / 16 * hd + d) * 16 + p % 16] = K_p[d]; lanes past nmax zero */
    for (int64_t p = nmax; p < ld; p++)
        for (int64_t d = 0; d < hd; d++) kt[(p / 16 * hd + d) * 16 + p % 16] = 0.0f;
    for (hd_walk w = hd_walk_start(kv, kv->k, nmax, hd); (K = hd_walk_next(&w, &at, &mc, &st));)
        for (int64_t pp = 0; pp < mc; pp++) {
            const int64_t P = at + pp;
            float *dst = kt + (P / 16 * hd) * 16 + P % 16;
            const float *src = K + pp * st;
            for (int64_t d = 0; d < hd; d++) dst[d * 16] = src[d];
        }
    /* rows i = t * R + r in groups of 4 (a group past the end repeats its last row, computed and not stored) */
    for (int64_t i0 = 0; i0 < NR; i0 += 4) {
        const float *qr[4];
        float *sr[4];
        int64_t nr[4], nmx = 0;
        const int nrows = (int)(NR - i0 < 4 ? NR - i0 : 4);
        for (int k = 0; k < 4; k++) {
            const int64_t i = i0 + (k < nrows ? k : nrows - 1), t = i / R;
            qr[k] = q + t * qs + (i % R) * hd;
            sr[k] = sc + i * ld;
            nr[k] = pos[t] + 1;
            nmx = nr[k] > nmx ? nr[k] : nmx;
        }
        for (int64_t blk = 0; blk * 16 < nmx; blk++) {
            const float *kb = kt + blk * hd * 16;
            __m512 s[4];
            for (int k = 0; k < 4; k++) s[k] = _mm512_setzero_ps();
            for (int l = 0; l < 16; l++) {
                __m512 a[4];
                for (int k = 0; k < 4; k++) a[k] = _mm512_setzero_ps();
                for (int64_t c = 0; c < hd; c += 16) {
                    const __m512 kl = _mm512_loadu_ps(kb + (c + l) * 16);
                    for (int k = 0; k < 4; k++) a[k] = _mm512_fmadd_ps(_mm512_set1_ps(qr[k][c + l]), kl, a[k]);
                }
                for (int k = 0; k < 4; k++) s[k] = _mm512_add_ps(s[k], a[k]);
            }
            for (int k = 0; k < nrows; k++) {
                const int64_t left = nr[k] - blk * 16;
                if (left > 0)
                    _mm512_mask_storeu_ps(sr[k] + blk * 16, (__mmask16)(left >= 16 ? 0xFFFFu : (1u << left) - 1u),
                                          _mm512_mul_ps(s[k], _mm512_set1_ps(scale)));
            }
        }
    }
    for (int64_t i = 0; i < NR; i++) { /* softmax over the row's own positions; weight 0 past them */
        const int64_t n = pos[i / R] + 1;
        hd_softmax_row(sc + i * ld, n);
        memset(sc + i * ld + n, 0, sizeof(float) * (size_t)(nmax - n));
    }
    /* weighted values: each chunk of positions (decoded once) for every group of rows that reaches it; a row's
     * zero weights past its positions leave its sums as they are */
    for (hd_walk wk = hd_walk_start(kv, kv->v, nmax, hd); (V = hd_walk_next(&wk, &at, &mc, &st));)
        for (int64_t i0 = 0; i0 < NR; i0 += 4) {
            const int nrows = (int)(NR - i0 < 4 ? NR - i0 : 4);
            const float *w[4];
            float *o[4];
            int64_t nmx = 0;
            for (int k = 0; k < 4; k++) {
                const int64_t ii = i0 + (k < nrows ? k : nrows - 1), t = ii / R;
                w[k] = sc + ii * ld + at;
                o[k] = out + t * qs + (ii % R) * hd;
                nmx = pos[t] + 1 > nmx ? pos[t] + 1 : nmx;
            }
            if (nmx > at) hd_wsum4_avx512(w, V, nmx - at < mc ? nmx - at : mc, st, hd, o, nrows, at > 0);
        }
}
#endif

static int hd_linear_apply(const hd_linear *L, const float *x, int64_t m, int64_t k, float *y, int nthreads) {
    return herd_q_matmul(x, m, k, L->w, (int)L->type, L->out_features, y, (int)L->mode, -1, nthreads);
}

/* x (B, D) float32, updated in place: the hidden state after every layer (and the final norm if given).
 * pos (B,) the position of each row's token; rows (B,) its cache (or page-table) row, or NULL for row b. Returns 0,
 * or HD_ERR_SHAPE (a position or row outside the cache), HD_ERR_PAGE (a page id outside the pools), HD_ERR_NOMEM. */
int herd_llama_decode(const void *model, float *x, int64_t B, const int64_t *pos, const int64_t *rows,
                      int nthreads) {
    const hd_model *M = (const hd_model *)model;
    const int64_t D = M->dim, H = M->n_heads, KV = M->n_kv_heads, hd = M->head_dim, F = M->hidden, S = M->cache_len;
    const int64_t *table = M->page_table, P = M->page_size;
    if (B <= 0 || H % KV || hd % 2 || (table && (P <= 0 || S > M->table_stride * P))) return HD_ERR_SHAPE;
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t r = rows ? rows[b] : b;
        if (pos[b] < 0 || pos[b] >= S || r < 0 || r >= M->cache_rows) return HD_ERR_SHAPE;
        max_len = pos[b] + 1 > max_len ? pos[b] + 1 : max_len;
        if (table) /* every page this row reads or writes must lie in the pools */
            for (int64_t i = 0; i <= pos[b] / P; i++)
                if (table[r * M->table_stride + i] < 0 || table[r * M->table_stride + i] >= M->n_pages)
                    return HD_ERR_PAGE;
    }
    /* Bm rows for the linear layers: B, or B padded with zero rows (xn, att, g past row B stay zero) */
    const int64_t A = M->row_align, Bm = A > 1 ? (B + A - 1) / A * A : B;
    /* scratch: xn (Bm, D), q (Bm, H*hd), k, v (Bm, KV*hd), att (Bm, H*hd), t (Bm, D), g, u (Bm, F),
     * cos, sin (B, hd/2), scores (threads, H/KV, max_len), decoded keys / values (threads, HD_CHUNK, hd) */
    int nt = nthreads > 0 ? nthreads : 1;
    const int64_t vb = M->kv_vec_bytes;
    if (M->kv_type < HD_KV_F32 || M->kv_type > HD_KV_Q8_0 || (M->kv_type == HD_KV_Q8_0 && hd % 32) ||
        vb != (M->kv_type == HD_KV_F32 ? 4 * hd : (M->kv_type == HD_KV_F16 ? 2 * hd : hd / 32 * 34)))
        return HD_ERR_SHAPE;
    const size_t n_scratch = (size_t)(Bm * (2 * D + 2 * H * hd + 2 * KV * hd + 2 * F) + B * hd + nt * H / KV * max_len
                                      + nt * HD_CHUNK * hd);
    float *buf = (float *)(Bm > B ? calloc(n_scratch, sizeof(float)) : malloc(sizeof(float) * n_scratch));
    if (!buf) return HD_ERR_NOMEM;
    float *xn = buf, *q = xn + Bm * D, *k = q + Bm * H * hd, *v = k + Bm * KV * hd, *att = v + Bm * KV * hd;
    float *t = att + Bm * H * hd, *g = t + Bm * D, *u = g + Bm * F, *cs = u + Bm * F, *sn = cs + B * hd / 2;
    float *scores = sn + B * hd / 2, *kv_tmp = scores + nt * H / KV * max_len;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < hd / 2; i++) {
            const float a = (float)pos[b] * M->inv_freq[i]; /* float32 angle, as input_pos.float() * inv_freq */
            cs[b * hd / 2 + i] = cosf(a);
            sn[b * hd / 2 + i] = sinf(a);
        }
    /* attention: parallel over (row, KV head) once there is enough work to pay for a fork/join. Consecutive rows
     * of one cache row (a prompt chunk, a speculative verification) are attended together, HD_TOK tokens a task
     * (hd_attend_tokens_avx512: the same bits per row as alone); any other row alone. task: (first row, rows). */
    const int att_nt = (B * H * max_len * hd >= (1 << 16)) ? nt : 1;
    int64_t *task = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * B)), n_tasks = 0, multi = 0;
    for (int64_t b = 0; b < B && task;) {
        int64_t e = b + 1;
#ifdef __AVX512F__
        if (hd % 16 == 0 && rows)
            while (e < B && e - b < HD_TOK && rows[e] == rows[b]) e++;
#endif
        task[2 * n_tasks] = b, task[2 * n_tasks + 1] = e - b, n_tasks++;
        multi |= e - b > 1;
        b = e;
    }
    const int64_t ld_max = (max_len + 15) / 16 * 16, R = H / KV;
    const int64_t m_stride = multi ? ld_max * hd + HD_TOK * R * ld_max : 0; /* keys transposed, scores */
    float *mbuf = multi ? (float *)malloc(sizeof(float) * (size_t)(nt * m_stride)) : NULL;
    if (!task || (multi && !mbuf)) {
        free(task), free(mbuf), free(buf);
        return HD_ERR_NOMEM;
    }
    int rc = 0;
    for (int64_t l = 0; l < M->n_layers && !rc; l++) {
        const hd_layer *L = &M->layers[l];
        for (int64_t b = 0; b < B; b++) hd_rms_norm(x + b * D, L->attn_norm, D, M->eps, xn + b * D);
        if (!rc) rc = hd_linear_apply(&L->wq, xn, Bm, D, q, nthreads);
        if (!rc) rc = hd_linear_apply(&L->wk, xn, Bm, D, k, nthreads);
        if (!rc) rc = hd_linear_apply(&L->wv, xn, Bm, D, v, nthreads);
        if (rc) break;
        for (int64_t b = 0; b < B; b++) {
            hd_rope(q + b * H * hd, H, hd, cs + b * hd / 2, sn + b * hd / 2);
            hd_rope(k + b * KV * hd, KV, hd, cs + b * hd / 2, sn + b * hd / 2);
            const int64_t r = rows ? rows[b] : b;
            for (int64_t j = 0; j < KV; j++) {
                const int64_t at = table ? (table[r * M->table_stride + pos[b] / P] * P + pos[b] % P) * KV + j
                                         : r * M->row_stride + j * S + pos[b];
                hd_kv_encode(k + (b * KV + j) * hd, hd, M->kv_type, L->k_cache + at * vb);
                hd_kv_encode(v + (b * KV + j) * hd, hd, M->kv_type, L->v_cache + at * vb);
            }
        }
#pragma omp parallel for num_threads(att_nt) if (att_nt > 1) schedule(dynamic, 1)
        for (int64_t tj = 0; tj < n_tasks * KV; tj++) { /* query heads j*R .. j*R+R-1 use KV head j (GQA) */
            const int64_t b = task[2 * (tj / KV)], nb = task[2 * (tj / KV) + 1], j = tj % KV, r = rows ? rows[b] : b;
            int tid = 0;
#ifdef _OPENMP
            tid = omp_get_thread_num();
#endif
            const int64_t at = (table ? j : r * M->row_stride + j * S) * vb;
            const hd_kv kv = {L->k_cache + at, L->v_cache + at, table ? table + r * M->table_stride : NULL,
                              table ? P : S, table ? KV : 1, P * KV, M->kv_type, vb, kv_tmp + tid * HD_CHUNK * hd};
            (void)nb; /* only the AVX-512 build attends several tokens at once */
#ifdef __AVX512F__
            if (nb > 1) {
                float *kt = mbuf + tid * m_stride;
                hd_attend_tokens_avx512(q + (b * H + j * R) * hd, H * hd, R, pos + b, nb, &kv, hd, kt, kt + ld_max * hd,
                                        att + (b * H + j * R) * hd);
                continue;
            }
#endif
            hd_attend_group(q + (b * H + j * R) * hd, R, &kv, pos[b] + 1, hd, scores + tid * H / KV * max_len,
                            att + (b * H + j * R) * hd);
        }
        if (!rc) rc = hd_linear_apply(&L->wo, att, Bm, H * hd, t, nthreads);
        if (rc) break;
        for (int64_t i = 0; i < B * D; i++) x[i] += t[i];
        for (int64_t b = 0; b < B; b++) hd_rms_norm(x + b * D, L->ffn_norm, D, M->eps, xn + b * D);
        if (!rc) rc = hd_linear_apply(&L->w1, xn, Bm, D, g, nthreads);
        if (!rc) rc = hd_linear_apply(&L->w3, xn, Bm, D, u, nthreads);
        if (rc) break;
#pragma omp simd
        for (int64_t i = 0; i < B * F; i++) g[i] = g[i] / (1.0f + hd_expf(-g[i])) * u[i]; /* silu(gate) * up */
        if (Bm > B) memset(g + B * F, 0, sizeof(float) * (size_t)((Bm - B) * F)); /* padding rows: zero again */
        if (!rc) rc = hd_linear_apply(&L->w2, g, Bm, F, t, nthreads);
        if (rc) break;
        for (int64_t i = 0; i < B * D; i++) x[i] += t[i];
    }
    if (!rc && M->final_norm)
        for (int64_t b = 0; b < B; b++) {
            hd_rms_norm(x + b * D, M->final_norm, D, M->eps, xn + b * D);
            memcpy(x + b * D, xn + b * D, sizeof(float) * (size_t)D);
        }
    free(buf), free(task), free(mbuf);
    return rc;
}
