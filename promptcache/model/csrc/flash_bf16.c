/* Flash attention for bf16 on CPUs with AVX512-BF16 (vdpbf16ps): out, lse of softmax(q k^T * scale) v.
 *
 * Built and loaded by promptcache/model/native.py (a plain C library called through ctypes; no torch
 * headers). Why: PyTorch's CPU flash kernel reaches a third of the machine's bf16 GEMM rate at
 * head_dim 64 (its blocks call a general GEMM per 32 x 512 tile). Here the products run in
 * registers: q . k as bf16 pairs accumulated in float32, softmax in float32, p . v with p rounded to
 * bf16 (as PyTorch's kernel does), accumulated in float32.
 *
 * Shapes (strides in elements; the last dimension is contiguous):
 *   q [B, Hq, M, D], k, v [B, Hk, N, D] with Hq a multiple of Hk (query head h reads KV head
 *   h / (Hq / Hk)); out [B, Hq, M, D] bf16; lse [B, Hq, M] float32 (natural log, of scaled scores).
 *   causal: query i sees keys [0, N - M + i] (aligned at the end; the same as top-left when M == N).
 *   kv_lens (or NULL): [B] keys of each sequence, <= N (its K/V past them are never read).
 *   kv_idx (or NULL): [B, N] rows of k / v holding each key (slots of a paged cache, read in place;
 *   then k, v are [B, Hk, slots, D] and B's stride may be 0).
 *   D a multiple of 32, at most 256.
 *
 * Layout: each (b, KV head)'s keys are packed once per call into tiles of 16 keys as bf16 pairs
 * along d (Kp[tile][d / 2][16]: one vector of pairs per 16 keys), and values as pairs of keys
 * (Vp[key / 2][d]: one vector per 16 dims), so both products are vdpbf16ps with a broadcast pair.
 * Work items are (b, query head, block of QB queries, split of the keys); a few long key ranges are
 * split (flash-decoding) when there are too few query blocks to keep every thread busy, and the
 * splits merged by their log-sum-exps at the end.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp512.h"

typedef uint16_t bf16;

#define QB 32  /* queries per work item (rows of the score block) */
#define KB 256 /* keys per score block (a multiple of 64) */
#define MAXD 256


static inline float bf16_to_float(bf16 x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 float_to_bf16(float f) { /* round to nearest even (no NaNs reach here) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);
    return (bf16)(u >> 16);
}

/* a 16 x 16 transpose of 32-bit elements: r[a] holds row a; afterwards r[c] holds column c */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* u[4i + k], 128-bit lane L: column 4L + k of rows 4i .. 4i + 3 */
    for (int i = 0; i < 4; i++) {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int k = 0; k < 4; k++) { /* a 4 x 4 transpose of 128-bit lanes */
        __m512i v0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44), v1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE);
        __m512i v2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
        __m512i v3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
        r[k] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        r[4 + k] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
        r[8 + k] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
    }
}

/* Kp[t][p][j] = the pair (k[16t + j][2p], k[16t + j][2p + 1]); keys past n are zero. Each tile is
 * 16 keys x d/2 pairs, transposed 16 pairs at a time. */
static void pack_k(const bf16 *k, int64_t stride, const int64_t *idx, int64_t n, int64_t npad, int64_t d,
                   uint32_t *kp) {
    int64_t half = d / 2;
    for (int64_t t = 0; t < npad / 16; t++) {
        uint32_t *tile = kp + t * half * 16;
        for (int64_t p0 = 0; p0 < half; p0 += 16) {
            __m512i r[16];
            for (int j = 0; j < 16; j++) {
                int64_t key = 16 * t + j;
                /* idx is read only for real keys: past n it may end (the padding is zeros) */
                r[j] = key < n ? _mm512_loadu_si512(k + (idx != NULL ? idx[key] : key) * stride + 2 * p0)
                               : _mm512_setzero_si512();
            }
            transpose16(r);
            for (int c = 0; c < 16; c++) _mm512_storeu_si512(tile + (p0 + c) * 16, r[c]);
        }
    }
}

/* Vp[kp][c] = the pair (v[2 kp][c], v[2 kp + 1][c]); keys past n are zero. Key j is row idx[j]
 * (a slot of the cache) where idx is given, row j otherwise; pack_k alike. */
static void pack_v(const bf16 *v, int64_t stride, const int64_t *idx, int64_t n, int64_t npad, int64_t d,
                   uint32_t *vp) {
    /* words 0..15 of a and of b interleaved (lo), then words 16..31 (hi); b's indices have bit 5 set */
    static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                        24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    const __m512i lo = _mm512_loadu_si512(lo_idx), hi = _mm512_loadu_si512(hi_idx);
    for (int64_t kp = 0; kp < npad / 2; kp++) {
        uint32_t *dst = vp + kp * d;
        for (int64_t c = 0; c < d; c += 32) {
            int64_t ka = 2 * kp, kb = 2 * kp + 1;
            __m512i a = ka < n ? _mm512_loadu_si512(v + (idx != NULL ? idx[ka] : ka) * stride + c)
                               : _mm512_setzero_si512();
            __m512i b = kb < n ? _mm512_loadu_si512(v + (idx != NULL ? idx[kb] : kb) * stride + c)
                               : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + c, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(dst + c + 16, _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

/* s[4][64] = q[4 rows] . k[64 keys from tile t0]: 4 x 4 accumulators, d / 2 pair steps */
static inline void qk_4x64(const uint32_t *q, int64_t half, const uint32_t *kp, float *s, int64_t ld) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    const int64_t tile = half * 16;
    for (int64_t p = 0; p < half; p++) {
        __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + p * 16);
        __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + tile + p * 16);
        __m512bh k2 = (__m512bh)_mm512_loadu_si512(kp + 2 * tile + p * 16);
        __m512bh k3 = (__m512bh)_mm512_loadu_si512(kp + 3 * tile + p * 16);
        for (int r = 0; r < 4; r++) {
            __m512bh qb = (__m512bh)_mm512_set1_epi32((int)q[r * half + p]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, k0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, k1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], qb, k2);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], qb, k3);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + r * ld + 16 * c, acc[r][c]);
}

/* o[4 rows][NZ * 16 dims] += p[4 rows][keys] . v over npairs key pairs */
#define PV_KERNEL(NAME, NZ)                                                                              \
    static inline void NAME(const uint32_t *p, int64_t ldp, const uint32_t *vp, int64_t d, int64_t npairs, \
                            float *o, int64_t ldo) {                                                     \
        __m512 acc[4][NZ];                                                                               \
        for (int r = 0; r < 4; r++)                                                                      \
            for (int c = 0; c < NZ; c++) acc[r][c] = _mm512_loadu_ps(o + r * ldo + 16 * c);              \
        for (int64_t kp = 0; kp < npairs; kp++) {                                                        \
            __m512bh vv[NZ];                                                                             \
            for (int c = 0; c < NZ; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vp + kp * d + 16 * c);     \
            for (int r = 0; r < 4; r++) {                                                                \
                __m512bh pb = (__m512bh)_mm512_set1_epi32((int)p[r * ldp + kp]);                         \
                for (int c = 0; c < NZ; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);         \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < 4; r++)                                                                      \
            for (int c = 0; c < NZ; c++) _mm512_storeu_ps(o + r * ldo + 16 * c, acc[r][c]);              \
    }
PV_KERNEL(pv_4x64, 4)
PV_KERNEL(pv_4x32, 2)

typedef struct {
    int64_t b, h, q0, k_lo, k_hi, split;
} Item;

/* One work item: queries [q0, q0 + QB) of (b, h) over keys [k_lo, k_hi); writes its normalised
 * output and log-sum-exp to (o_out, lse_out) rows (float32 partials) or straight to out/lse. */
static void run_item(const Item *it, const bf16 *q, const int64_t *qs, const uint32_t *kp, const uint32_t *vp,
                     int64_t kbase, int64_t M, int64_t N, int64_t D, float scale, int causal, bf16 *out,
                     const int64_t *os, float *lse, const int64_t *ls, float *part_o, float *part_l) {
    const int64_t half = D / 2;
    uint32_t qloc[QB * MAXD / 2];
    float s[QB * KB];
    uint32_t pb[QB * KB / 2];
    float o[QB * MAXD], mx[QB], sum[QB];
    int64_t rows = M - it->q0 < QB ? M - it->q0 : QB;
    int64_t rows4 = (rows + 3) & ~(int64_t)3;
    for (int64_t r = 0; r < rows4; r++) {
        if (r < rows)
            memcpy(qloc + r * half, q + it->b * qs[0] + it->h * qs[1] + (it->q0 + r) * qs[2], D * 2);
        else
            memset(qloc + r * half, 0, D * 2);
        mx[r] = -INFINITY;
        sum[r] = 0.0f;
    }
    memset(o, 0, sizeof(float) * rows4 * D);
    int64_t k_hi = it->k_hi;
    if (causal && N - M + it->q0 + rows < k_hi) k_hi = N - M + it->q0 + rows;
    for (int64_t k0 = it->k_lo; k0 < k_hi; k0 += KB) {
        int64_t nk = k_hi - k0 < KB ? k_hi - k0 : KB;
        int64_t nk64 = (nk + 63) & ~(int64_t)63; /* within npad: npad is a multiple of 64 */
        for (int64_t r = 0; r < rows4; r += 4)
            for (int64_t j = 0; j < nk64; j += 64)
                qk_4x64(qloc + r * half, half, kp + (k0 - kbase + j) / 16 * half * 16, s + r * KB + j, KB);
        for (int64_t r = 0; r < rows4; r++) {
            float *sr = s + r * KB;
            bf16 *pr = (bf16 *)(pb + r * KB / 2);
            int64_t valid = nk;
            if (causal) {
                int64_t last = N - M + it->q0 + r; /* the last key this query sees */
                valid = last + 1 - k0 < nk ? last + 1 - k0 : nk;
            }
            if (r >= rows || valid <= 0) { /* sees nothing here: p = 0, state unchanged */
                memset(pr, 0, nk64 * 2);
                continue;
            }
            __m512 vscale = _mm512_set1_ps(scale);
            __m512 vmax = _mm512_set1_ps(-INFINITY);
            int64_t j = 0;
            for (; j + 16 <= valid; j += 16) {
                __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sr + j), vscale);
                _mm512_storeu_ps(sr + j, x);
                vmax = _mm512_max_ps(vmax, x);
            }
            if (j < valid) {
                __mmask16 m = (__mmask16)((1u << (valid - j)) - 1);
                __m512 x = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), m, _mm512_loadu_ps(sr + j), vscale);
                _mm512_storeu_ps(sr + j, x);
                vmax = _mm512_max_ps(vmax, x);
                j += 16;
            }
            for (; j < nk64; j += 16) _mm512_storeu_ps(sr + j, _mm512_set1_ps(-INFINITY));
            float m_new = _mm512_reduce_max_ps(vmax);
            if (mx[r] > m_new) m_new = mx[r];
            float alpha = expf(mx[r] - m_new); /* mx = -inf at first: 0 */
            __m512 vm = _mm512_set1_ps(m_new);
            __m512 vsum = _mm512_setzero_ps();
            for (j = 0; j < nk64; j += 32) {
                __m512 p0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), vm));
                __m512 p1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j + 16), vm));
                vsum = _mm512_add_ps(vsum, _mm512_add_ps(p0, p1));
                _mm512_storeu_si512(pr + j, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
            }
            sum[r] = sum[r] * alpha + _mm512_reduce_add_ps(vsum);
            mx[r] = m_new;
            if (alpha != 1.0f) {
                __m512 va = _mm512_set1_ps(alpha);
                for (int64_t c = 0; c < D; c += 16)
                    _mm512_storeu_ps(o + r * D + c, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + c), va));
            }
        }
        for (int64_t r = 0; r < rows4; r += 4) {
            int64_t c = 0;
            for (; c + 64 <= D; c += 64)
                pv_4x64(pb + r * KB / 2, KB / 2, vp + (k0 - kbase) / 2 * D + c, D, nk64 / 2, o + r * D + c, D);
            if (c < D)
                pv_4x32(pb + r * KB / 2, KB / 2, vp + (k0 - kbase) / 2 * D + c, D, nk64 / 2, o + r * D + c, D);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float inv = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f;
        float l = sum[r] > 0.0f ? mx[r] + logf(sum[r]) : -INFINITY;
        int64_t row = it->q0 + r;
        if (part_o != NULL) { /* a split: float32 partials [B, Hq, splits, M, D] / [.., M] */
            float *dst = part_o + (it->split * M + row) * D;
            for (int64_t c = 0; c < D; c++) dst[c] = o[r * D + c] * inv;
            part_l[it->split * M + row] = l;
        } else {
            bf16 *dst = out + it->b * os[0] + it->h * os[1] + row * os[2];
            for (int64_t c = 0; c < D; c++) dst[c] = float_to_bf16(o[r * D + c] * inv);
            lse[it->b * ls[0] + it->h * ls[1] + row * ls[2]] = l;
        }
    }
}

/* A buffer of at least n pairs owned by the calling thread and kept for its next call (the threads
 * are OpenMP's pool, which lives as long as the process): a fresh allocation per work item would
 * be a fresh mapping, and its pages would fault in, wherever malloc hands large blocks to mmap.
 * Kept up to SCRATCH_KEEP pairs: a larger one (a work item over a very long context) is the
 * caller's, freed after the item (*owned set), so one long step does not leave every thread
 * holding its size (as in flash_f32.c). */
#define SCRATCH_KEEP (4 << 20) /* pairs: 16 MiB per thread at most */
static uint32_t *thread_scratch(int64_t n, int *owned) {
    static _Thread_local uint32_t *buf = NULL;
    static _Thread_local int64_t len = 0;
    *owned = n > SCRATCH_KEEP;
    if (*owned) return (uint32_t *)malloc(sizeof(uint32_t) * n);
    if (n > len) {
        free(buf);
        buf = (uint32_t *)malloc(sizeof(uint32_t) * n);
        len = buf != NULL ? n : 0;
    }
    return buf;
}

/* Returns 0, or a negative code for arguments it does not take (the caller falls back). */
int pc_flash_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, float *lse, int64_t B, int64_t Hq,
                  int64_t Hk, int64_t M, int64_t N, int64_t D, const int64_t *qs, const int64_t *ks,
                  const int64_t *vs, const int64_t *os, const int64_t *ls, const int64_t *kv_lens,
                  const int64_t *kv_idx, float scale, int causal, int num_threads) {
    if (D % 32 != 0 || D > MAXD || Hk <= 0 || Hq % Hk != 0 || M <= 0 || N <= 0) return -1;
    if (num_threads < 1) num_threads = 1;
    const int64_t group = Hq / Hk;
    const int64_t npad = (N + 63) & ~(int64_t)63;
    const int64_t per_head = npad * D / 2; /* pairs per (b, KV head), in Kp and in Vp */
    const int64_t qblocks = (M + QB - 1) / QB;
    /* Where each KV head is read by one query block (decode-like calls: a group's stacked decodes,
     * the decode tails), each work item packs just its own keys and attends to them at once, while
     * they are in cache; otherwise every (b, KV head) is packed once up front for all its blocks. */
    const int pack_in_items = qblocks == 1 && group == 1;
    uint32_t *kp = NULL, *vp = NULL;
    if (!pack_in_items) {
        kp = (uint32_t *)malloc(sizeof(uint32_t) * B * Hk * per_head);
        vp = (uint32_t *)malloc(sizeof(uint32_t) * B * Hk * per_head);
        if (kp == NULL || vp == NULL) {
            free(kp);
            free(vp);
            return -2;
        }
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t i = 0; i < 2 * B * Hk; i++) {
            int64_t bh = i / 2, b = bh / Hk, h = bh % Hk;
            int64_t n = kv_lens != NULL && kv_lens[b] < N ? kv_lens[b] : N; /* keys past it: zeros */
            const int64_t *idx = kv_idx != NULL ? kv_idx + b * N : NULL;
            if (i % 2 == 0)
                pack_k(k + b * ks[0] + h * ks[1], ks[2], idx, n, npad, D, kp + bh * per_head);
            else
                pack_v(v + b * vs[0] + h * vs[1], vs[2], idx, n, npad, D, vp + bh * per_head);
        }
    }
    /* split the keys when query blocks alone leave threads idle (decode-like calls over long
     * contexts; causal calls are prefill-like and have blocks enough) */
    int64_t splits = 1;
    if (!causal) {
        int64_t want = 4 * num_threads, have = B * Hq * qblocks;
        while (have * splits < want && N / (splits * 2) >= 2 * KB) splits *= 2;
    }
    const int64_t span = ((N + splits - 1) / splits + 63) / 64 * 64; /* whole 64-key tiles */
    const int64_t num_items = B * Hq * qblocks * splits;
    Item *items = (Item *)malloc(sizeof(Item) * num_items);
    float *part_o = NULL, *part_l = NULL;
    if (splits > 1) {
        part_o = (float *)malloc(sizeof(float) * B * Hq * splits * M * D);
        part_l = (float *)malloc(sizeof(float) * B * Hq * splits * M);
    }
    if (items == NULL || (splits > 1 && (part_o == NULL || part_l == NULL))) {
        free(kp);
        free(vp);
        free(items);
        free(part_o);
        free(part_l);
        return -2;
    }
    int64_t n_items = 0;
    /* causal: the longest key ranges (the last query blocks) first, for balance */
    for (int64_t qb = qblocks - 1; qb >= 0; qb--)
        for (int64_t bh = 0; bh < B * Hq; bh++)
            for (int64_t sp = 0; sp < splits; sp++) {
                int64_t lo = sp * span, hi = (sp + 1) * span < N ? (sp + 1) * span : N;
                if (lo >= hi) continue;
                Item it = {bh / Hq, bh % Hq, qb * QB, lo, hi, sp};
                items[n_items++] = it;
            }
    int failed = 0;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < n_items; i++) {
        const Item *it = &items[i];
        int64_t kvh = it->b * Hk + it->h / group;
        float *po = NULL, *pl = NULL;
        if (splits > 1) {
            po = part_o + (it->b * Hq + it->h) * splits * M * D;
            pl = part_l + (it->b * Hq + it->h) * splits * M;
        }
        int64_t n = kv_lens != NULL && kv_lens[it->b] < N ? kv_lens[it->b] : N;
        Item own = *it;
        if (own.k_hi > n) own.k_hi = n; /* a split past the sequence's keys sees none: lse -inf */
        if (!pack_in_items) {
            run_item(&own, q, qs, kp + kvh * per_head, vp + kvh * per_head, 0, M, n, D, scale, causal, out, os, lse,
                     ls, po, pl);
            continue;
        }
        int64_t len = own.k_hi > own.k_lo ? own.k_hi - own.k_lo : 0, lpad = (len + 63) & ~(int64_t)63;
        int owned = 0;
        uint32_t *local = thread_scratch(lpad * D + 16, &owned);
        if (local == NULL) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        uint32_t *lk = local, *lv = local + lpad * D / 2;
        int64_t b = it->b, h = it->h / group;
        if (kv_idx != NULL) {
            const int64_t *idx = kv_idx + b * N + own.k_lo;
            pack_k(k + b * ks[0] + h * ks[1], ks[2], idx, len, lpad, D, lk);
            pack_v(v + b * vs[0] + h * vs[1], vs[2], idx, len, lpad, D, lv);
        } else {
            pack_k(k + b * ks[0] + h * ks[1] + own.k_lo * ks[2], ks[2], NULL, len, lpad, D, lk);
            pack_v(v + b * vs[0] + h * vs[1] + own.k_lo * vs[2], vs[2], NULL, len, lpad, D, lv);
        }
        run_item(&own, q, qs, lk, lv, own.k_lo, M, n, D, scale, causal, out, os, lse, ls, po, pl);
        if (owned) free(local);
    }
    if (failed) {
        free(items);
        free(part_o);
        free(part_l);
        return -2;
    }
    if (splits > 1) { /* merge the splits of each query by their log-sum-exps */
        int64_t used = (N + span - 1) / span;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t bh = 0; bh < B * Hq; bh++) {
            int64_t b = bh / Hq, h = bh % Hq;
            const float *po = part_o + bh * splits * M * D;
            const float *pl = part_l + bh * splits * M;
            for (int64_t row = 0; row < M; row++) {
                float top = -INFINITY;
                for (int64_t sp = 0; sp < used; sp++)
                    if (pl[sp * M + row] > top) top = pl[sp * M + row];
                float acc[MAXD], total = 0.0f;
                memset(acc, 0, sizeof(float) * D);
                for (int64_t sp = 0; sp < used; sp++) {
                    float l = pl[sp * M + row];
                    if (l == -INFINITY) continue;
                    float w = expf(l - top);
                    total += w;
                    for (int64_t c = 0; c < D; c++) acc[c] += w * po[(sp * M + row) * D + c];
                }
                float inv = total > 0.0f ? 1.0f / total : 0.0f;
                bf16 *dst = out + b * os[0] + h * os[1] + row * os[2];
                for (int64_t c = 0; c < D; c++) dst[c] = float_to_bf16(acc[c] * inv);
                lse[b * ls[0] + h * ls[1] + row * ls[2]] = total > 0.0f ? top + logf(total) : -INFINITY;
            }
        }
    }
    free(items);
    free(part_o);
    free(part_l);
    free(kp);
    free(vp);
    return 0;
}

/* for tests: a bf16 value as this library rounds it (to nearest even) */
float pc_round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }
