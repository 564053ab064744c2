/* Row-wise float32 ops of a decoder layer in one pass each, for CPUs with AVX2 and FMA (built with
 * flash_f32.c into one library by promptcache/model/native.py); ops_bf16.c's float32 twins, with
 * the same signatures. Each computes what PyTorch's composite computes, op by op (no fused
 * multiply-adds where PyTorch rounds between a multiply and an add), so results match it but for the
 * order of a float32 sum (RMSNorm's mean of squares) and exp's last bits (SiLU):
 *   rms_norm:  out = w * (x * rsqrt(mean(x^2) + eps))
 *   silu_mul:  out = silu(gate) * up over a row [gate | up]
 *   rope:      out = x * cos + rotate_half(x) * sin
 *   write_kv:  a step's K and V rows copied to their slots of the paged cache (index_copy_)
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "exp256.h"

/* the first n (< 8) of 8 floats, zeros after; and the store of as many */
static inline __m256i first_n(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline __m256 load_n(const float *p, int n) { return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_n(n)); }

static inline void store_n(float *p, __m256 x, int n) {
    if (n >= 8)
        _mm256_storeu_ps(p, x);
    else
        _mm256_maskstore_ps(p, first_n(n), x);
}

static inline float inv_rms(const float *row, int64_t H, float eps) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < H; c += 8) {
        __m256 v = load_n(row + c, (int)(H - c));
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    return 1.0f / sqrtf(hsum256(acc) / (float)H + eps);
}

/* x [T, H] with row stride ldx; w [H]; out [T, H] contiguous */
void pc_rms_norm_f32(const float *x, int64_t ldx, const float *w, float *out, int64_t T, int64_t H, float eps,
                     int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * H >= 32768)
    for (int64_t t = 0; t < T; t++) {
        const float *row = x + t * ldx;
        __m256 vr = _mm256_set1_ps(inv_rms(row, H, eps));
        for (int64_t c = 0; c < H; c += 8) {
            int n = (int)(H - c);
            store_n(out + t * H + c, _mm256_mul_ps(load_n(w + c, n), _mm256_mul_ps(load_n(row + c, n), vr)), n);
        }
    }
}

/* The residual add and the next RMSNorm in one pass: s = x + delta -> sum_out, out = rms_norm(s)
 * (x, delta, sum_out, out all [T, H] contiguous) */
void pc_add_rms_norm_f32(const float *x, const float *delta, const float *w, float *sum_out, float *out, int64_t T,
                         int64_t H, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * H >= 32768)
    for (int64_t t = 0; t < T; t++) {
        float *s = sum_out + t * H;
        for (int64_t c = 0; c < H; c += 8) {
            int n = (int)(H - c);
            store_n(s + c, _mm256_add_ps(load_n(x + t * H + c, n), load_n(delta + t * H + c, n)), n);
        }
        __m256 vr = _mm256_set1_ps(inv_rms(s, H, eps));
        for (int64_t c = 0; c < H; c += 8) {
            int n = (int)(H - c);
            store_n(out + t * H + c, _mm256_mul_ps(load_n(w + c, n), _mm256_mul_ps(load_n(s + c, n), vr)), n);
        }
    }
}

/* gu [T, 2I] (gate | up) with row stride ldg; out [T, I] contiguous */
void pc_silu_mul_f32(const float *gu, int64_t ldg, float *out, int64_t T, int64_t I, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * I >= 32768)
    for (int64_t t = 0; t < T; t++) {
        const float *gate = gu + t * ldg, *up = gate + I;
        for (int64_t c = 0; c < I; c += 8) {
            int n = (int)(I - c);
            __m256 g = load_n(gate + c, n);
            __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            store_n(out + t * I + c, _mm256_mul_ps(s, load_n(up + c, n)), n);
        }
    }
}

/* Rotate-half RoPE: x [T, heads, D] (strides xt, xh; D contiguous), cos/sin [T, D] (row stride cst)
 * -> out [T, heads, D] contiguous, where rotate_half(x) = [-x[D/2:], x[:D/2]] */
void pc_rope_f32(const float *x, int64_t xt, int64_t xh, const float *cos, const float *sin, int64_t cst, float *out,
                 int64_t T, int64_t heads, int64_t D, int num_threads) {
    const int64_t half = D / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * heads * D >= 65536)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * cst, *s = sin + t * cst;
        for (int64_t h = 0; h < heads; h++) {
            const float *row = x + t * xt + h * xh;
            float *dst = out + (t * heads + h) * D;
            for (int64_t j = 0; j < half; j += 8) {
                int n = (int)(half - j);
                __m256 lo = load_n(row + j, n), hi = load_n(row + half + j, n);
                __m256 neg_hi = _mm256_sub_ps(_mm256_setzero_ps(), hi);
                store_n(dst + j, _mm256_add_ps(_mm256_mul_ps(lo, load_n(c + j, n)), _mm256_mul_ps(neg_hi, load_n(s + j, n))),
                        n);
                store_n(dst + half + j,
                        _mm256_add_ps(_mm256_mul_ps(hi, load_n(c + half + j, n)), _mm256_mul_ps(lo, load_n(s + half + j, n))),
                        n);
            }
        }
    }
}

/* k, v [T, H, D] (strides kst, ksh / vst, vsh; D contiguous) -> cache_k, cache_v [H, slots, D]
 * (strides ch, cs) at slots[t] */
void pc_write_kv_f32(const float *k, int64_t kst, int64_t ksh, const float *v, int64_t vst, int64_t vsh,
                     float *cache_k, float *cache_v, int64_t ch, int64_t cs, const int64_t *slots, int64_t T,
                     int64_t H, int64_t D, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * H * D >= 65536)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            memcpy(cache_k + h * ch + slots[t] * cs, k + t * kst + h * ksh, D * sizeof(float));
            memcpy(cache_v + h * ch + slots[t] * cs, v + t * vst + h * vsh, D * sizeof(float));
        }
}

/* y = x w^T (+ bias) for few rows of x (decode steps), the weight in bf16 — the values a bf16
 * checkpoint holds, exactly — converted to float32 as it is read: float32 math reading half the
 * bytes of the float32 copy oneDNN multiplies by (a decode step's linears are bound by reading
 * their weights). x [M, K] (row stride xs), w [N, K] bf16 contiguous, bias [N] or NULL, y [M, N]
 * (row stride ys); K a multiple of 8. Each output is one dot product over k (8 lanes, summed at the
 * end); 4 weight rows x up to 3 rows of x per tile, 12 accumulators. */
#define W16_NR 4
static inline __m256 load8_w16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __attribute__((always_inline)) void w16_tile(const float *x, int64_t xs, const uint16_t *w, int64_t k_len,
                                                           int64_t n0, int nr, int mr, const float *bias, float *y,
                                                           int64_t ys) {
    __m256 acc[3][W16_NR];
    const uint16_t *wr[W16_NR];
    for (int j = 0; j < W16_NR; j++) wr[j] = w + (n0 + (j < nr ? j : 0)) * k_len; /* past N: row n0 again, unused */
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < W16_NR; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_len; k += 8) {
        __m256 wv[W16_NR];
        for (int j = 0; j < W16_NR; j++) wv[j] = load8_w16(wr[j] + k);
        for (int i = 0; i < mr; i++) {
            __m256 xv = _mm256_loadu_ps(x + i * xs + k);
            for (int j = 0; j < W16_NR; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) y[i * ys + n0 + j] = hsum256(acc[i][j]) + (bias != NULL ? bias[n0 + j] : 0.0f);
}

void pc_linear_w16_f32(const float *x, int64_t xs, const uint16_t *w, const float *bias, float *y, int64_t ys, int64_t m,
                       int64_t n, int64_t k_len, int num_threads) {
    int64_t blocks = (n + W16_NR - 1) / W16_NR;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * W16_NR;
        int nr = n - n0 < W16_NR ? (int)(n - n0) : W16_NR;
        for (int64_t m0 = 0; m0 < m; m0 += 3) {
            const float *xm = x + m0 * xs;
            float *ym = y + m0 * ys;
            switch (m - m0 < 3 ? m - m0 : 3) { /* constant row counts: each case its own unrolled tile */
            case 1: w16_tile(xm, xs, w, k_len, n0, nr, 1, bias, ym, ys); break;
            case 2: w16_tile(xm, xs, w, k_len, n0, nr, 2, bias, ym, ys); break;
            default: w16_tile(xm, xs, w, k_len, n0, nr, 3, bias, ym, ys); break;
            }
        }
    }
}
