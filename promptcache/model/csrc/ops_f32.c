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
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
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

/* y = x w^T (+ bias) in float32, the weight in bf16 — the values a bf16 checkpoint holds, exactly —
 * converted to float32 as it is read: float32 math on half the bytes (a decode step's linears are
 * bound by reading their weights), and no float32 copy of the weights at all. x [M, K] (row stride
 * xs), y [M, N] (row stride ys), bias [N] or NULL; the weight packed in panels of 16 outputs
 * (native_lib.pack_w16): panel p holds outputs 16p..16p+15 as [K][16] bf16, the 16 of each k ordered
 * 0, 8, 1, 9, ..., 7, 15, so one 32-byte load gives outputs 0-7 in the low halves of its 32-bit
 * words (a shift makes them floats) and 8-15 in the high halves (a mask does). A register-blocked
 * GEMM: a tile is up to 6 rows of x x one panel, 12 accumulators, each x value broadcast once per k.
 * Each output is one float32 chain of fused multiply-adds over k, whatever M, the tiling or the
 * thread count: a row's result does not depend on the rows beside it. */
#define P16_MR 6
static inline __attribute__((always_inline)) void p16_tile(const float *x, int64_t xs, const uint16_t *wp,
                                                           const float *wf, const uint16_t *next, int64_t k_len,
                                                           int mr, int nr, const float *bias, float *y, int64_t ys) {
    __m256 acc[P16_MR][2];
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int64_t k = 0; k < k_len; k++) {
        __m256 lo, hi;
        if (next != NULL && (k & 1) == 0) _mm_prefetch((const char *)(next + k * 16), _MM_HINT_T1);
        if (wf != NULL) { /* the panel already converted (many tiles share it) */
            lo = _mm256_loadu_ps(wf + k * 16), hi = _mm256_loadu_ps(wf + k * 16 + 8);
        } else {
            __m256i v = _mm256_loadu_si256((const __m256i *)(wp + k * 16));
            lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), hi = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        }
        for (int i = 0; i < mr; i++) {
            __m256 xb = _mm256_broadcast_ss(x + i * xs + k);
            acc[i][0] = _mm256_fmadd_ps(xb, lo, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(xb, hi, acc[i][1]);
        }
    }
    __m256 b0 = bias != NULL ? load_n(bias, nr) : _mm256_setzero_ps();
    __m256 b1 = bias != NULL && nr > 8 ? load_n(bias + 8, nr - 8) : _mm256_setzero_ps();
    for (int i = 0; i < mr; i++) {
        store_n(y + i * ys, _mm256_add_ps(acc[i][0], b0), nr);
        if (nr > 8) store_n(y + i * ys + 8, _mm256_add_ps(acc[i][1], b1), nr - 8);
    }
}

/* one panel's outputs for rows m0..m_hi of x; wf: the panel converted, or NULL; next: the panel to
 * fetch into L2 meanwhile (the first tile's loop touches it: weights come from memory), or NULL */
static void p16_rows(const float *x, int64_t xs, const uint16_t *wp, const float *wf, const uint16_t *next,
                     int64_t k_len, int nr, const float *bias, float *y, int64_t ys, int64_t m0, int64_t m_hi) {
    for (; m0 < m_hi; m0 += P16_MR, next = NULL) {
        const float *xm = x + m0 * xs;
        float *ym = y + m0 * ys;
        /* the next tile's output lines, fetched while this one computes: outputs are fresh memory
         * (a step's new tensor), and their stores missing every cache cost the [128, 576] x [576,
         * 3072] up projection ~20 % (measured against all rows stored to one cached row); this
         * recovers 2-7 % of it (2-core Zen 3, interleaved medians, a fresh output per call) */
        for (int64_t i = m0 + P16_MR; i < m0 + 2 * P16_MR && i < m_hi; i++) {
            _mm_prefetch((const char *)(y + i * ys), _MM_HINT_T0);
            _mm_prefetch((const char *)(y + i * ys + nr - 1), _MM_HINT_T0);
        }
        int64_t mr = m_hi - m0 < P16_MR ? m_hi - m0 : P16_MR;
        if (wf != NULL && mr == P16_MR) {
            if (next != NULL) /* the first tile only: a copy of its own, the others' loop without the test */
                p16_tile(xm, xs, wp, wf, next, k_len, P16_MR, nr, bias, ym, ys);
            else
                p16_tile(xm, xs, wp, wf, NULL, k_len, P16_MR, nr, bias, ym, ys);
            continue;
        }
        switch (mr) { /* constant row counts: each its own unrolled tile */
        case 1: p16_tile(xm, xs, wp, NULL, next, k_len, 1, nr, bias, ym, ys); break;
        case 2: p16_tile(xm, xs, wp, NULL, next, k_len, 2, nr, bias, ym, ys); break;
        case 3: p16_tile(xm, xs, wp, NULL, next, k_len, 3, nr, bias, ym, ys); break;
        case 4: p16_tile(xm, xs, wp, NULL, next, k_len, 4, nr, bias, ym, ys); break;
        case 5: p16_tile(xm, xs, wp, NULL, next, k_len, 5, nr, bias, ym, ys); break;
        default: p16_tile(xm, xs, wp, NULL, next, k_len, 6, nr, bias, ym, ys); break;
        }
    }
}

#define P16_MB 192 /* rows of x per pass over a thread's panels: 6 x K floats per tile stay in L1, the pass's in L2 */
#define P16_CONVERT 24 /* a pass of at least this many rows converts each panel to float32 once */
void pc_linear_w16_f32(const float *x, int64_t xs, const uint16_t *wp, const float *bias, float *y, int64_t ys,
                       int64_t m, int64_t n, int64_t k_len, int num_threads) {
    int64_t panels = (n + 15) / 16;
#pragma omp parallel num_threads(num_threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t p_lo = panels * t / nt, p_hi = panels * (t + 1) / nt;
        float *cv = m >= P16_CONVERT ? aligned_alloc(64, (size_t)k_len * 16 * sizeof(float)) : NULL;
        for (int64_t mb = 0; mb < m; mb += P16_MB) {
            int64_t m_hi = m - mb < P16_MB ? m : mb + P16_MB;
            for (int64_t p = p_lo; p < p_hi; p++) {
                int64_t n0 = p * 16;
                const uint16_t *w = wp + p * k_len * 16;
                const float *wf = NULL;
                if (cv != NULL && m_hi - mb >= P16_CONVERT) {
                    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
                    for (int64_t k = 0; k < k_len; k++) {
                        __m256i v = _mm256_loadu_si256((const __m256i *)(w + k * 16));
                        _mm256_store_ps(cv + k * 16, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
                        _mm256_store_ps(cv + k * 16 + 8, _mm256_castsi256_ps(_mm256_and_si256(v, high)));
                    }
                    wf = cv;
                }
                p16_rows(x, xs, w, wf, p + 1 < p_hi ? w + k_len * 16 : NULL, k_len, n - n0 < 16 ? (int)(n - n0) : 16, bias != NULL ? bias + n0 : NULL,
                         y + n0, ys, mb, m_hi);
            }
        }
        free(cv);
    }
}
