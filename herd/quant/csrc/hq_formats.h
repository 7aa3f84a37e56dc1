/* hq_formats.h -- GGML block formats, as stored in GGUF files, and how herd's kernels unpack them.
 *
 * Every supported format is read through one common view of a 32-element group:
 *     value[j] = da * u[j] + ma   for j in 0..15      (u: unsigned 8-bit integers)
 *     value[j] = db * u[j] + mb   for j in 16..31
 * Symmetric formats (Q4_0, Q5_0, Q6_K) use u = q + c and m = -c * d, with c a power of two, so that
 * fmaf(d, u, m) == d * (q - c) exactly. Q8_0 is the one "signed" format: its u is the int8 q itself
 * (read as int8_t) and m = 0. Only Q6_K has different scales for the two halves of a group.
 * Later additions, handled by the scalar kernels only (hq_signed / hq_block_elems; the SIMD tables skip them):
 *   Q2_K   two 16-element sub-blocks per group, each with its own 4-bit scale and min: u = q (0..3),
 *          d = d_blk * sc, m = -(dmin_blk * mn); fmaf(d, u, m) rounds d*q - dmin*mn once, as gguf-py does.
 *   Q3_K   two sub-blocks per group with signed 6-bit scales: u = q + 4 (0..7), m = -4 * d (exact).
 *   IQ4_NL, IQ4_XS   "signed" like Q8_0: u = kvalues_iq4nl[nibble] (int8), m = 0; IQ4_XS has a 6-bit scale per
 *          group of 32, IQ4_NL one fp16 per 32-element block.
 * Byte layouts: see SPEC.md section 4 "Block formats" (ggml-common.h in llama.cpp is the source).
 */
#ifndef HQ_FORMATS_H
#define HQ_FORMATS_H

#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HQ_HAVE_AVX2 1
#include <immintrin.h>
#endif
#if defined(HQ_HAVE_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define HQ_HAVE_AVX512 1
#endif

#define HQ_ALWAYS_INLINE static inline __attribute__((always_inline))

/* ggml_type ids (SPEC.md section 4). */
enum { HQ_Q4_0 = 2, HQ_Q4_1 = 3, HQ_Q5_0 = 6, HQ_Q5_1 = 7, HQ_Q8_0 = 8, HQ_Q2_K = 10, HQ_Q3_K = 11, HQ_Q4_K = 12,
       HQ_Q5_K = 13, HQ_Q6_K = 14, HQ_IQ4_NL = 20, HQ_IQ4_XS = 23 };

/* The 16 values of a 4-bit IQ4_NL / IQ4_XS index (ggml-common.h kvalues_iq4nl). */
static const int8_t hq_iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* Formats whose u are int8 values (read as int8_t), with m = 0. */
static inline int hq_signed(int type) { return type == HQ_Q8_0 || type == HQ_IQ4_NL || type == HQ_IQ4_XS; }

/* Elements per block (QK) and bytes per block; 0 for types herd does not handle. */
static inline int hq_block_elems(int type) {
    switch (type) {
    case HQ_Q4_0: case HQ_Q4_1: case HQ_Q5_0: case HQ_Q5_1: case HQ_Q8_0: case HQ_IQ4_NL: return 32;
    case HQ_Q2_K: case HQ_Q3_K: case HQ_Q4_K: case HQ_Q5_K: case HQ_Q6_K: case HQ_IQ4_XS: return 256;
    default: return 0;
    }
}
static inline int hq_block_bytes(int type) {
    switch (type) {
    case HQ_Q4_0: return 18; case HQ_Q4_1: return 20; case HQ_Q5_0: return 22; case HQ_Q5_1: return 24;
    case HQ_Q8_0: return 34; case HQ_Q4_K: return 144; case HQ_Q5_K: return 176; case HQ_Q6_K: return 210;
    case HQ_Q2_K: return 84; case HQ_Q3_K: return 110; case HQ_IQ4_NL: return 18; case HQ_IQ4_XS: return 136;
    default: return 0;
    }
}

/* IEEE half -> float, portable (no F16C needed); handles subnormals, inf and NaN. */
static inline float hq_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal: renormalize */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7F800000u | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
HQ_ALWAYS_INLINE float hq_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef HQ_HAVE_AVX2
    return _cvtsh_ss(h);
#else
    return hq_half_to_float(h);
#endif
}
HQ_ALWAYS_INLINE uint32_t hq_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j (SPEC.md). */
HQ_ALWAYS_INLINE void hq_k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) { *sc = s[j] & 63; *mn = s[j + 4] & 63; }
    else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Q3_K: signed 6-bit scale of 16-element sub-block j (0..15) from the 12 packed bytes s: low 4 bits in nibble
 * j / 8 of s[j % 8], high 2 bits at bits 2 (j / 4) of s[8 + j % 4], stored with an offset of 32. */
HQ_ALWAYS_INLINE int hq_q3k_scale(const uint8_t *s, int j) {
    int lo = (s[j % 8] >> (4 * (j / 8))) & 0xF, hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    return (lo | (hi << 4)) - 32;
}

/* Scales of group g (0..QK/32-1) of one block: the view described at the top of this file. */
HQ_ALWAYS_INLINE void hq_group_scales(int type, const uint8_t *b, int g, float *da, float *ma, float *db, float *mb) {
    float d, m;
    int sc, mn;
    switch (type) {
    case HQ_Q4_0: d = hq_f16(b); m = -8.0f * d; break;
    case HQ_Q5_0: d = hq_f16(b); m = -16.0f * d; break;
    case HQ_Q4_1: case HQ_Q5_1: d = hq_f16(b); m = hq_f16(b + 2); break;
    case HQ_Q8_0: case HQ_IQ4_NL: d = hq_f16(b); m = 0.0f; break;
    case HQ_IQ4_XS: { /* scales_l nibble g % 2 of byte 4 + g / 2, scales_h (u16 at byte 2) bits 2g, 2g + 1 */
        int ls = ((b[4 + g / 2] >> (4 * (g % 2))) & 0xF) | ((((b[2] | (b[3] << 8)) >> (2 * g)) & 3) << 4);
        d = hq_f16(b) * (float)(ls - 32);
        m = 0.0f;
        break;
    }
    case HQ_Q2_K: { /* 84 bytes: scales[16] | qs[64] | d | dmin; sub-blocks 2g, 2g + 1 */
        float D = hq_f16(b + 80), M = hq_f16(b + 82);
        *da = D * (float)(b[2 * g] & 0xF);
        *ma = -(M * (float)(b[2 * g] >> 4));
        *db = D * (float)(b[2 * g + 1] & 0xF);
        *mb = -(M * (float)(b[2 * g + 1] >> 4));
        return;
    }
    case HQ_Q3_K: { /* 110 bytes: hmask[32] | qs[64] | scales[12] | d */
        float D = hq_f16(b + 108);
        *da = D * (float)hq_q3k_scale(b + 96, 2 * g);
        *ma = -4.0f * *da;
        *db = D * (float)hq_q3k_scale(b + 96, 2 * g + 1);
        *mb = -4.0f * *db;
        return;
    }
    case HQ_Q4_K: case HQ_Q5_K:
        hq_k_scale_min(b + 4, g, &sc, &mn);
        d = hq_f16(b) * (float)sc;
        m = -(hq_f16(b + 2) * (float)mn);
        break;
    case HQ_Q6_K: { /* group g = 4n + j of half n: scales sc[8n + 2j] (first 16) and sc[8n + 2j + 1] */
        const int8_t *s = (const int8_t *)(b + 192);
        float D = hq_f16(b + 208);
        *da = D * (float)s[2 * g];
        *ma = -32.0f * *da;
        *db = D * (float)s[2 * g + 1];
        *mb = -32.0f * *db;
        return;
    }
    default: d = 0; m = 0;
    }
    *da = *db = d;
    *ma = *mb = m;
}

/* Unsigned values u[0..31] of group g, scalar reference (Q8_0: the int8 values, stored as bytes). */
static inline void hq_group_u8_ref(int type, const uint8_t *b, int g, uint8_t *u) {
    int j;
    switch (type) {
    case HQ_Q4_0: case HQ_Q4_1: {
        const uint8_t *qs = b + (type == HQ_Q4_0 ? 2 : 4);
        for (j = 0; j < 16; j++) { u[j] = qs[j] & 0xF; u[j + 16] = qs[j] >> 4; }
        break;
    }
    case HQ_Q5_0: case HQ_Q5_1: {
        uint32_t qh = hq_u32(b + (type == HQ_Q5_0 ? 2 : 4));
        const uint8_t *qs = b + (type == HQ_Q5_0 ? 6 : 8);
        for (j = 0; j < 16; j++) {
            u[j] = (uint8_t)((qs[j] & 0xF) | (((qh >> j) & 1) << 4));
            u[j + 16] = (uint8_t)((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
        }
        break;
    }
    case HQ_Q8_0: memcpy(u, b + 2, 32); break;
    case HQ_IQ4_NL: case HQ_IQ4_XS: { /* 16 bytes of nibbles (IQ4_XS: 16 per group after an 8-byte header) */
        const uint8_t *qs = type == HQ_IQ4_NL ? b + 2 : b + 8 + 16 * g;
        for (j = 0; j < 16; j++) {
            u[j] = (uint8_t)hq_iq4_values[qs[j] & 0xF];
            u[j + 16] = (uint8_t)hq_iq4_values[qs[j] >> 4];
        }
        break;
    }
    case HQ_Q2_K: case HQ_Q3_K: { /* group g = 4h + s: bits 2s, 2s + 1 of qs[32h + j]; Q3_K: + 4 * bit g of hmask[j] */
        const uint8_t *qs = b + (type == HQ_Q2_K ? 16 : 32) + 32 * (g / 4);
        const int s = 2 * (g % 4);
        for (j = 0; j < 32; j++) u[j] = (uint8_t)((qs[j] >> s) & 3);
        if (type == HQ_Q3_K)
            for (j = 0; j < 32; j++) u[j] = (uint8_t)(u[j] + (((b[j] >> g) & 1) << 2));
        break;
    }
    case HQ_Q4_K: {
        const uint8_t *qs = b + 16 + 32 * (g / 2);
        for (j = 0; j < 32; j++) u[j] = (g & 1) ? (qs[j] >> 4) : (qs[j] & 0xF);
        break;
    }
    case HQ_Q5_K: {
        const uint8_t *qh = b + 16, *qs = b + 48 + 32 * (g / 2);
        for (j = 0; j < 32; j++)
            u[j] = (uint8_t)(((g & 1) ? (qs[j] >> 4) : (qs[j] & 0xF)) | (((qh[j] >> g) & 1) << 4));
        break;
    }
    case HQ_Q6_K: {
        int n = g / 4, jj = g % 4;
        const uint8_t *ql = b + 64 * n + 32 * (jj & 1), *qh = b + 128 + 32 * n;
        for (j = 0; j < 32; j++) {
            int lo = (jj >> 1) ? (ql[j] >> 4) : (ql[j] & 0xF);
            u[j] = (uint8_t)(lo | (((qh[j] >> (2 * jj)) & 3) << 4));
        }
        break;
    }
    default: memset(u, 0, 32);
    }
}

#ifdef HQ_HAVE_AVX2
/* byte j of the result is 0xFF where bit j of x is set */
HQ_ALWAYS_INLINE __m256i hq_bits_to_bytes(uint32_t x) {
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}
/* 16 packed bytes -> 32 values: low nibbles (elements 0..15) then high nibbles (16..31) */
HQ_ALWAYS_INLINE __m256i hq_nibbles32(const uint8_t *qs) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m128i q = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
}
/* SIMD version of hq_group_u8_ref (same result). */
HQ_ALWAYS_INLINE __m256i hq_group_u8(int type, const uint8_t *b, int g) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    switch (type) {
    case HQ_Q4_0: return hq_nibbles32(b + 2);
    case HQ_Q4_1: return hq_nibbles32(b + 4);
    case HQ_Q5_0:
        return _mm256_or_si256(hq_nibbles32(b + 6),
                               _mm256_and_si256(hq_bits_to_bytes(hq_u32(b + 2)), _mm256_set1_epi8(0x10)));
    case HQ_Q5_1:
        return _mm256_or_si256(hq_nibbles32(b + 8),
                               _mm256_and_si256(hq_bits_to_bytes(hq_u32(b + 4)), _mm256_set1_epi8(0x10)));
    case HQ_Q8_0: return _mm256_loadu_si256((const __m256i *)(b + 2));
    case HQ_Q4_K: {
        __m256i q = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * (g / 2)));
        return (g & 1) ? _mm256_and_si256(_mm256_srli_epi16(q, 4), m4) : _mm256_and_si256(q, m4);
    }
    case HQ_Q5_K: {
        __m256i q = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * (g / 2)));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
        __m256i lo = (g & 1) ? _mm256_and_si256(_mm256_srli_epi16(q, 4), m4) : _mm256_and_si256(q, m4);
        __m256i hb = _mm256_and_si256(_mm256_srli_epi16(qh, g), _mm256_set1_epi8(1));
        return _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4));
    }
    case HQ_Q6_K: {
        int n = g / 4, jj = g % 4;
        __m256i ql = _mm256_loadu_si256((const __m256i *)(b + 64 * n + 32 * (jj & 1)));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n));
        __m256i lo = (jj >> 1) ? _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4) : _mm256_and_si256(ql, m4);
        __m256i hb = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * jj), _mm256_set1_epi8(3));
        return _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4));
    }
    default: return _mm256_setzero_si256();
    }
}
/* Non-split formats: lanes [da, ma, 0, 0] of group g (so that one multiply by [d_x, d_x * sum q_x] gives both
 * the scale of the integer dot product and the offset term). Q6_K (two scales per group) has no such view. */
HQ_ALWAYS_INLINE __m128 hq_group_dm(int type, const uint8_t *b, int g) {
    uint16_t h;
    memcpy(&h, b, 2);
    switch (type) {
    case HQ_Q4_0: return _mm_mul_ps(_mm_cvtph_ps(_mm_set1_epi16((short)h)), _mm_setr_ps(1.0f, -8.0f, 0.0f, 0.0f));
    case HQ_Q5_0: return _mm_mul_ps(_mm_cvtph_ps(_mm_set1_epi16((short)h)), _mm_setr_ps(1.0f, -16.0f, 0.0f, 0.0f));
    case HQ_Q8_0: return _mm_cvtph_ps(_mm_cvtsi32_si128(h));
    case HQ_Q4_1: case HQ_Q5_1: return _mm_cvtph_ps(_mm_cvtsi32_si128((int)hq_u32(b)));
    case HQ_Q4_K: case HQ_Q5_K: {
        int sc, mn;
        hq_k_scale_min(b + 4, g, &sc, &mn);
        __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128((int)hq_u32(b))); /* [d, dmin] */
        return _mm_mul_ps(dd, _mm_setr_ps((float)sc, -(float)mn, 0.0f, 0.0f));
    }
    default: return _mm_setzero_ps();
    }
}

/* K-quants, once per block: tab[2g], tab[2g + 1] = (da, ma) of group g for Q4_K / Q5_K, (da, db) for Q6_K.
 * The 6-bit scale unpacking works on 32-bit words (4 sub-blocks at a time), same values as hq_k_scale_min. */
HQ_ALWAYS_INLINE void hq_kblock_tab(int type, const uint8_t *b, float *tab) {
    if (type == HQ_Q4_K || type == HQ_Q5_K) {
        uint32_t w0 = hq_u32(b + 4), w1 = hq_u32(b + 8), w2 = hq_u32(b + 12);
        uint64_t sc = (uint64_t)(w0 & 0x3f3f3f3fu) |
                      ((uint64_t)((w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u)) << 32);
        uint64_t mn = (uint64_t)(w1 & 0x3f3f3f3fu) |
                      ((uint64_t)(((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 2) & 0x30303030u)) << 32);
        __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128((int)hq_u32(b))); /* [d, dmin] */
        __m256 d8 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc))),
                                  _mm256_broadcastss_ps(dd));
        __m256 m8 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn))),
                                  _mm256_broadcastss_ps(_mm_sub_ps(_mm_setzero_ps(), _mm_movehdup_ps(dd))));
        __m256 lo = _mm256_unpacklo_ps(d8, m8), hi = _mm256_unpackhi_ps(d8, m8);
        _mm256_storeu_ps(tab, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_storeu_ps(tab + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    } else if (type == HQ_Q6_K) {
        __m128i s = _mm_loadu_si128((const __m128i *)(b + 192));
        __m256 d = _mm256_set1_ps(hq_f16(b + 208));
        _mm256_storeu_ps(tab, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s)), d));
        _mm256_storeu_ps(tab + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s, 8))), d));
    }
}
#endif /* HQ_HAVE_AVX2 */

#endif /* HQ_FORMATS_H */
