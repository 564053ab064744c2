/* Row-wise bf16 ops of a decoder layer in one pass each, for CPUs with AVX512-BF16 (built with
 * flash_bf16.c into one library by promptcache/model/native.py).
 *
 * Each rounds where PyTorch's composite of the same ops rounds, so results match it but for the
 * order of a float32 sum (RMSNorm's mean of squares) and exp's last bits (SiLU):
 *   rms_norm:  out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), x in float32
 *              (transformers' LlamaRMSNorm: normalise in float32, scale in the input dtype)
 *   silu_mul:  out = bf16(bf16(silu(gate)) * up) over a row [gate | up]
 *   rope:      out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin))
 *   write_kv:  a step's K and V rows copied to their slots of the paged cache (index_copy_)
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "exp512.h"

typedef uint16_t bf16;

static inline __m512 load_bf16(const bf16 *p) { /* 16 bf16 -> 16 float32 (exact) */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 load_bf16_n(const bf16 *p, int n) { /* the first n of 16, zeros after */
    __mmask16 m = (__mmask16)((1u << n) - 1);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __m512 round_bf16(__m512 x) { /* to bf16 (nearest even) and back */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

static inline void store_bf16(bf16 *p, __m512 x) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x)); }

static inline void store_bf16_n(bf16 *p, __m512 x, int n) {
    _mm256_mask_storeu_epi16(p, (__mmask16)((1u << n) - 1), (__m256i)_mm512_cvtneps_pbh(x));
}


/* x [T, H] with row stride ldx; w [H]; out [T, H] contiguous */
void pc_rms_norm_bf16(const bf16 *x, int64_t ldx, const bf16 *w, bf16 *out, int64_t T, int64_t H, float eps,
                      int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * H >= 32768)
    for (int64_t t = 0; t < T; t++) {
        const bf16 *row = x + t * ldx;
        bf16 *dst = out + t * H;
        __m512 acc = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c + 16 <= H; c += 16) {
            __m512 v = load_bf16(row + c);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        if (c < H) {
            __m512 v = load_bf16_n(row + c, (int)(H - c));
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float r = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)H + eps);
        __m512 vr = _mm512_set1_ps(r);
        for (c = 0; c + 16 <= H; c += 16)
            store_bf16(dst + c, _mm512_mul_ps(load_bf16(w + c), round_bf16(_mm512_mul_ps(load_bf16(row + c), vr))));
        if (c < H) {
            int n = (int)(H - c);
            store_bf16_n(dst + c, _mm512_mul_ps(load_bf16_n(w + c, n), round_bf16(_mm512_mul_ps(load_bf16_n(row + c, n), vr))),
                         n);
        }
    }
}

/* gu [T, 2I] (gate | up) with row stride ldg; out [T, I] contiguous */
void pc_silu_mul_bf16(const bf16 *gu, int64_t ldg, bf16 *out, int64_t T, int64_t I, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * I >= 32768)
    for (int64_t t = 0; t < T; t++) {
        const bf16 *gate = gu + t * ldg, *up = gate + I;
        bf16 *dst = out + t * I;
        for (int64_t c = 0; c < I; c += 16) {
            int n = I - c < 16 ? (int)(I - c) : 16;
            __m512 g = load_bf16_n(gate + c, n), u = load_bf16_n(up + c, n);
            __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            store_bf16_n(dst + c, _mm512_mul_ps(round_bf16(s), u), n);
        }
    }
}

/* k, v [T, H, D] (strides kst, ksh / vst, vsh; D contiguous) -> cache_k, cache_v [H, slots, D]
 * (strides ch, cs) at slots[t] */
void pc_write_kv_bf16(const bf16 *k, int64_t kst, int64_t ksh, const bf16 *v, int64_t vst, int64_t vsh,
                      bf16 *cache_k, bf16 *cache_v, int64_t ch, int64_t cs, const int64_t *slots, int64_t T,
                      int64_t H, int64_t D, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * H * D >= 65536)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            memcpy(cache_k + h * ch + slots[t] * cs, k + t * kst + h * ksh, D * sizeof(bf16));
            memcpy(cache_v + h * ch + slots[t] * cs, v + t * vst + h * vsh, D * sizeof(bf16));
        }
}

/* Rotate-half RoPE: x [T, heads, D] (strides xt, xh; D contiguous), cos/sin [T, D] (row stride cst)
 * -> out [T, heads, D] contiguous: bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), where
 * rotate_half(x) = [-x[D/2:], x[:D/2]] (PyTorch's composite rounds after each op; so does this) */
void pc_rope_bf16(const bf16 *x, int64_t xt, int64_t xh, const bf16 *cos, const bf16 *sin, int64_t cst, bf16 *out,
                  int64_t T, int64_t heads, int64_t D, int num_threads) {
    const int64_t half = D / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * heads * D >= 65536)
    for (int64_t t = 0; t < T; t++) {
        const bf16 *c = cos + t * cst, *s = sin + t * cst;
        for (int64_t h = 0; h < heads; h++) {
            const bf16 *row = x + t * xt + h * xh;
            bf16 *dst = out + (t * heads + h) * D;
            for (int64_t j = 0; j < half; j += 16) {
                int n = half - j < 16 ? (int)(half - j) : 16;
                __m512 lo = load_bf16_n(row + j, n), hi = load_bf16_n(row + half + j, n);
                __m512 c_lo = load_bf16_n(c + j, n), c_hi = load_bf16_n(c + half + j, n);
                __m512 s_lo = load_bf16_n(s + j, n), s_hi = load_bf16_n(s + half + j, n);
                __m512 neg_hi = _mm512_sub_ps(_mm512_setzero_ps(), hi);
                store_bf16_n(dst + j, _mm512_add_ps(round_bf16(_mm512_mul_ps(lo, c_lo)),
                                                    round_bf16(_mm512_mul_ps(neg_hi, s_lo))), n);
                store_bf16_n(dst + half + j, _mm512_add_ps(round_bf16(_mm512_mul_ps(hi, c_hi)),
                                                           round_bf16(_mm512_mul_ps(lo, s_hi))), n);
            }
        }
    }
}

/* The residual add and the next RMSNorm in one pass: s = bf16(x + delta) -> sum_out, then
 * out = rms_norm(s) as pc_rms_norm_bf16 (x, delta, sum_out, out all [T, H] contiguous) */
void pc_add_rms_norm_bf16(const bf16 *x, const bf16 *delta, const bf16 *w, bf16 *sum_out, bf16 *out, int64_t T,
                          int64_t H, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * H >= 32768)
    for (int64_t t = 0; t < T; t++) {
        const bf16 *a = x + t * H, *b = delta + t * H;
        bf16 *s = sum_out + t * H;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < H; c += 16) {
            int n = H - c < 16 ? (int)(H - c) : 16;
            __m512 v = round_bf16(_mm512_add_ps(load_bf16_n(a + c, n), load_bf16_n(b + c, n)));
            store_bf16_n(s + c, v, n);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        __m512 vr = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)H + eps));
        for (int64_t c = 0; c < H; c += 16) {
            int n = H - c < 16 ? (int)(H - c) : 16;
            store_bf16_n(out + t * H + c,
                         _mm512_mul_ps(load_bf16_n(w + c, n), round_bf16(_mm512_mul_ps(load_bf16_n(s + c, n), vr))), n);
        }
    }
}
