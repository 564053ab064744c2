/* Flash attention in float32 for CPUs with AVX2 and FMA: out, lse of softmax(q k^T * scale) v.
 *
 * Built and loaded by promptcache/model/native.py (a plain C library called through ctypes). The
 * float32 twin of flash_bf16.c, for the CPUs without native bf16 math, where the engine computes in
 * float32 (AVX2-only machines: most AMD EPYCs before Zen 4). Why: PyTorch's CPU flash kernel runs at
 * about half of the float32 GEMM rate there, needs K/V heads repeated per query head, a gather of
 * scattered slots and a mask for ragged lengths; this reads all of those in place.
 *
 * Shapes and meaning as flash_bf16.c (strides in elements, the last dimension contiguous):
 *   q [B, Hq, M, D] float32; k, v [B, Hk, N, D] float32, or bf16 (kv_bf16: a bf16 KV cache beside
 *   float32 math; converted exactly while read); out [B, Hq, M, D] float32; lse [B, Hq, M] float32.
 *   causal: query i sees keys [0, N - M + i]. kv_lens (or NULL): [B] keys of each sequence, <= N.
 *   kv_idx (or NULL): [B, N] rows of k / v holding each key (slots of a paged cache, read in place).
 *   D a multiple of 16, at most 256.
 *
 * Layout: keys are packed per (b, KV head) into tiles of 8 keys transposed (Kp[tile][d][8]: one
 * vector of 8 keys per dimension), so q . k is a broadcast query element times a vector of keys;
 * values are copied (float32) or converted (bf16) into slices of 16 dimensions (Vp[d / 16][key][16]),
 * so p . v reads a slice's keys as one contiguous run that stays in L1 across a block's rows (rows
 * read in place, 256 bytes apart at d = 64, fall in a quarter of L1's sets and evicted each other:
 * 128 queries x 3 heads over 1,920 cached keys, 2 threads, in-process, with the kept buffers below:
 * 6.82 -> 5.81 ms).
 * Both are packed with prefetches some rows ahead: a context is cold (every other layer's K/V went
 * through the caches since the last step), and a copy keeps many misses in flight where the
 * micro-kernel's row reads would wait on each (a group's decode call measured 0.64 -> 0.47 ms hot,
 * 0.72 -> 0.60 ms cold, 2 threads). Packed K/V go to buffers each thread keeps for its next call.
 * Micro-kernels: 6 query rows x 16 keys (q . k) and 6 rows x 16 dims (p . v), 12 accumulators each.
 * Work items as in flash_bf16.c; key splits too, causal calls included (flash_bf16.c splits
 * non-causal ones only).
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp256.h"

typedef uint16_t bf16;

#define RB 6   /* query rows per micro-kernel */
#define QB 24  /* queries per work item (a multiple of RB) */
#define KB 128 /* keys per score block (a multiple of 16; 128 measured best of 128-512 for causal chunks) */
#define MAXD 256
#define PF 4 /* tiles (of 8 keys) prefetched ahead while packing */

static inline __m256 load8_bf16(const bf16 *p) { /* 8 bf16 -> 8 float32 (exact) */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __m256 load8(const void *base, int kv_bf16, int64_t off) {
    return kv_bf16 ? load8_bf16((const bf16 *)base + off) : _mm256_loadu_ps((const float *)base + off);
}

/* an 8 x 8 transpose: r[a] holds row a; afterwards r[c] holds column c */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);
        r[4 + k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);
    }
}

/* Kp[t][c][j] = k[8t + j][c]; keys past n are zero. Key j is row idx[j] where idx is given (idx is
 * read only for real keys: it may end at n). */
static void pack_k(const void *k, int kv_bf16, int64_t stride, const int64_t *idx, int64_t n, int64_t npad,
                   int64_t d, float *kp) {
    for (int64_t t = 0; t < npad / 8; t++) {
        float *tile = kp + t * d * 8;
        int64_t rows[8];
        for (int j = 0; j < 8; j++) {
            int64_t key = 8 * t + j;
            rows[j] = key < n ? (idx != NULL ? idx[key] : key) * stride : -1;
        }
        for (int j = 0; j < 8; j++) { /* the rows PF tiles ahead: many misses in flight, not 8 */
            int64_t ahead = 8 * (t + PF) + j;
            if (ahead < n) {
                const char *row = (const char *)k + (idx != NULL ? idx[ahead] : ahead) * stride * (kv_bf16 ? 2 : 4);
                for (int64_t off = 0; off < d * (kv_bf16 ? 2 : 4); off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
            }
        }
        for (int64_t c = 0; c < d; c += 8) {
            __m256 r[8];
            for (int j = 0; j < 8; j++) r[j] = rows[j] >= 0 ? load8(k, kv_bf16, rows[j] + c) : _mm256_setzero_ps();
            transpose8(r);
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(tile + (c + j) * 8, r[j]);
        }
    }
}

/* values copied (float32) or converted (bf16) into slices of 16 dimensions, Vp[c / 16][j][16]
 * (keys past n: zeros) */
static void pack_v(const void *v, int kv_bf16, int64_t stride, const int64_t *idx, int64_t n, int64_t npad,
                   int64_t d, float *vp) {
    const int64_t esize = kv_bf16 ? 2 : 4;
    for (int64_t j = 0; j < npad; j++) {
        if (j >= n) {
            for (int64_t c = 0; c < d; c += 16) memset(vp + c * npad + j * 16, 0, sizeof(float) * 16);
            continue;
        }
        int64_t ahead = j + 8 * PF;
        if (ahead < n) {
            const char *row = (const char *)v + (idx != NULL ? idx[ahead] : ahead) * stride * esize;
            for (int64_t off = 0; off < d * esize; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
        }
        int64_t row = (idx != NULL ? idx[j] : j) * stride;
        for (int64_t c = 0; c < d; c += 16) {
            float *dst = vp + c * npad + j * 16;
            _mm256_storeu_ps(dst, load8(v, kv_bf16, row + c));
            _mm256_storeu_ps(dst + 8, load8(v, kv_bf16, row + c + 8));
        }
    }
}

/* s[RB][16] = q[RB rows] . k[16 keys: tiles kp, kp + 8 d] */
static inline void qk_6x16(const float *q, int64_t d, const float *kp, float *s, int64_t ld) {
    __m256 acc[RB][2];
    for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float *k1 = kp + d * 8;
    for (int64_t c = 0; c < d; c++) {
        __m256 a = _mm256_loadu_ps(kp + c * 8), b = _mm256_loadu_ps(k1 + c * 8);
        for (int r = 0; r < RB; r++) {
            __m256 qb = _mm256_broadcast_ss(q + r * d + c);
            acc[r][0] = _mm256_fmadd_ps(qb, a, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(qb, b, acc[r][1]);
        }
    }
    for (int r = 0; r < RB; r++) {
        _mm256_storeu_ps(s + r * ld, acc[r][0]);
        _mm256_storeu_ps(s + r * ld + 8, acc[r][1]);
    }
}

/* o[RB rows][16 dims] += p[RB rows][nk keys] . v[keys][16 dims] (vs: one packed slice, 16 per key) */
static inline void pv_6x16(const float *p, int64_t ldp, const float *vs, int64_t nk, float *o, int64_t ldo) {
    __m256 acc[RB][2];
    for (int r = 0; r < RB; r++) {
        acc[r][0] = _mm256_loadu_ps(o + r * ldo);
        acc[r][1] = _mm256_loadu_ps(o + r * ldo + 8);
    }
    for (int64_t j = 0; j < nk; j++) {
        const float *vr = vs + j * 16;
        __m256 a = _mm256_loadu_ps(vr), b = _mm256_loadu_ps(vr + 8);
        for (int r = 0; r < RB; r++) {
            __m256 pb = _mm256_broadcast_ss(p + r * ldp + j);
            acc[r][0] = _mm256_fmadd_ps(pb, a, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(pb, b, acc[r][1]);
        }
    }
    for (int r = 0; r < RB; r++) {
        _mm256_storeu_ps(o + r * ldo, acc[r][0]);
        _mm256_storeu_ps(o + r * ldo + 8, acc[r][1]);
    }
}

typedef struct {
    int64_t b, h, q0, k_lo, k_hi, split;
} Item;

/* Where the keys of one (b, KV head) are: packed K tiles and V slices (pack_k, pack_v of npad keys)
 * from key kbase. */
typedef struct {
    const float *kp, *vp;
    int64_t kbase, npad;
} Keys;

static void run_item(const Item *it, const float *q, const int64_t *qs, const Keys *kv, int64_t M, int64_t N,
                     int64_t D, float scale, int causal, float *out, const int64_t *os, float *lse,
                     const int64_t *ls, float *part_o, float *part_l) {
    float qloc[QB * MAXD];
    float s[QB * KB];
    float o[QB * MAXD], mx[QB], sum[QB];
    int64_t rows = M - it->q0 < QB ? M - it->q0 : QB;
    int64_t rowsr = (rows + RB - 1) / RB * RB;
    const __m256 vscale = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
    for (int64_t r = 0; r < rowsr; r++) { /* queries times the scale: scores come out scaled */
        const float *src = q + it->b * qs[0] + it->h * qs[1] + (it->q0 + r) * qs[2];
        for (int64_t c = 0; c < D; c += 8)
            _mm256_storeu_ps(qloc + r * D + c, r < rows ? _mm256_mul_ps(_mm256_loadu_ps(src + c), vscale)
                                                        : _mm256_setzero_ps());
        mx[r] = -INFINITY;
        sum[r] = 0.0f;
    }
    memset(o, 0, sizeof(float) * rowsr * D);
    int64_t k_hi = it->k_hi;
    if (causal && N - M + it->q0 + rows < k_hi) k_hi = N - M + it->q0 + rows;
    for (int64_t k0 = it->k_lo; k0 < k_hi; k0 += KB) {
        int64_t nk = k_hi - k0 < KB ? k_hi - k0 : KB;
        int64_t nk16 = (nk + 15) & ~(int64_t)15; /* within the packed keys: they are padded to 16 */
        int64_t rel = k0 - kv->kbase;
        for (int64_t r = 0; r < rowsr; r += RB)
            for (int64_t j = 0; j < nk16; j += 16)
                qk_6x16(qloc + r * D, D, kv->kp + (rel + j) * D, s + r * KB + j, KB);
        for (int64_t r = 0; r < rowsr; r++) {
            float *sr = s + r * KB;
            int64_t valid = nk;
            if (causal) {
                int64_t last = N - M + it->q0 + r; /* the last key this query sees */
                valid = last + 1 - k0 < nk ? last + 1 - k0 : nk;
            }
            if (r >= rows || valid <= 0) { /* sees nothing here: p = 0, state unchanged */
                memset(sr, 0, nk16 * sizeof(float));
                continue;
            }
            __m256 vmax = ninf;
            int64_t j = 0;
            for (; j + 8 <= valid; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sr + j));
            float m_new = hmax256(vmax);
            for (; j < valid; j++)
                if (sr[j] > m_new) m_new = sr[j];
            for (; j < nk16; j++) sr[j] = -INFINITY;
            if (mx[r] > m_new) m_new = mx[r];
            float alpha = expf(mx[r] - m_new); /* mx = -inf at first: 0 */
            __m256 vm = _mm256_set1_ps(m_new), vsum = _mm256_setzero_ps();
            for (j = 0; j < nk16; j += 8) {
                __m256 p = exp256_le0(_mm256_sub_ps(_mm256_loadu_ps(sr + j), vm));
                vsum = _mm256_add_ps(vsum, p);
                _mm256_storeu_ps(sr + j, p);
            }
            sum[r] = sum[r] * alpha + hsum256(vsum);
            mx[r] = m_new;
            if (alpha != 1.0f) {
                __m256 va = _mm256_set1_ps(alpha);
                for (int64_t c = 0; c < D; c += 8)
                    _mm256_storeu_ps(o + r * D + c, _mm256_mul_ps(_mm256_loadu_ps(o + r * D + c), va));
            }
        }
        for (int64_t c = 0; c < D; c += 16) /* a slice's keys stay in L1 for every row */
            for (int64_t r = 0; r < rowsr; r += RB)
                pv_6x16(s + r * KB, KB, kv->vp + c * kv->npad + rel * 16, nk16, o + r * D + c, D);
    }
    for (int64_t r = 0; r < rows; r++) {
        float inv = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f;
        float l = sum[r] > 0.0f ? mx[r] + logf(sum[r]) : -INFINITY;
        int64_t row = it->q0 + r;
        float *dst = part_o != NULL ? part_o + (it->split * M + row) * D /* a split: [splits, M, D] partials */
                                    : out + it->b * os[0] + it->h * os[1] + row * os[2];
        __m256 vinv = _mm256_set1_ps(inv);
        for (int64_t c = 0; c < D; c += 8) _mm256_storeu_ps(dst + c, _mm256_mul_ps(_mm256_loadu_ps(o + r * D + c), vinv));
        if (part_o != NULL)
            part_l[it->split * M + row] = l;
        else
            lse[it->b * ls[0] + it->h * ls[1] + row * ls[2]] = l;
    }
}

/* Buffers each thread keeps between calls: a fresh one per call or work item is fresh pages, which
 * the kernel faults in and zeroes (a prefill chunk over 1,920 cached keys measured ~15% slower so, 2
 * threads). Two per thread — [0] a work item's own packed keys (decode-like calls, any worker), [1]
 * a call's packed K and V for all its heads (the calling thread, itself a worker too) — freed when
 * the thread ends (an engine's thread that stops must not leave them behind). */
typedef struct {
    float *buf;
    int64_t len;
} Kept;
static pthread_key_t kept_key;
static pthread_once_t kept_once = PTHREAD_ONCE_INIT;
static void kept_free(void *p) {
    Kept *k = (Kept *)p;
    free(k[0].buf);
    free(k[1].buf);
    free(k);
}
static void kept_init(void) { pthread_key_create(&kept_key, kept_free); }

/* A buffer of at least n floats: the thread's kept one `which`, grown as needed, up to keep floats;
 * a larger one (a very long context) is the caller's, to free after use (*owned set), so one long
 * step does not leave every thread holding its size. */
static float *kept(int which, int64_t n, int64_t keep, int *owned) {
    pthread_once(&kept_once, kept_init);
    Kept *k = (Kept *)pthread_getspecific(kept_key);
    if (k == NULL && n <= keep) {
        k = (Kept *)calloc(2, sizeof(Kept));
        if (k != NULL && pthread_setspecific(kept_key, k) != 0) {
            free(k);
            k = NULL;
        }
    }
    *owned = n > keep || k == NULL;
    if (*owned) return (float *)malloc(sizeof(float) * n);
    if (n > k[which].len) {
        free(k[which].buf);
        k[which].buf = (float *)malloc(sizeof(float) * n);
        k[which].len = k[which].buf != NULL ? n : 0;
    }
    return k[which].buf;
}

/* a work item's own packed keys, per worker thread: 16 MiB at most kept */
static float *thread_scratch(int64_t n, int *owned) { return kept(0, n, 4 << 20, owned); }

/* a call's packed K and V for all its heads, per calling thread: 32 MiB at most kept */
static float *call_scratch(int64_t n, int *owned) { return kept(1, n, 8 << 20, owned); }

/* Returns 0, or a negative code for arguments it does not take (-1: the caller falls back) or
 * memory it could not get (-2). */
int pc_flash_f32(const float *q, const void *k, const void *v, float *out, float *lse, int64_t B, int64_t Hq,
                 int64_t Hk, int64_t M, int64_t N, int64_t D, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                 const int64_t *os, const int64_t *ls, const int64_t *kv_lens, const int64_t *kv_idx, float scale,
                 int causal, int kv_bf16, int num_threads) {
    if (D % 16 != 0 || D > MAXD || Hk <= 0 || Hq % Hk != 0 || M <= 0 || N <= 0) return -1;
    if (num_threads < 1) num_threads = 1;
    const size_t esize = kv_bf16 ? sizeof(bf16) : sizeof(float);
    const int64_t group = Hq / Hk;
    const int64_t npad = (N + 15) & ~(int64_t)15;
    const int64_t per_head = npad * D; /* floats per (b, KV head) in Kp (and Vp) */
    const int64_t qblocks = (M + QB - 1) / QB;
    /* decode-like calls (one query block per KV head) pack each work item's own keys, where they
     * are read at once; others pack every (b, KV head) once up front for all its blocks */
    const int pack_in_items = qblocks == 1 && group == 1;
    float *kp = NULL, *vp = NULL, *packed = NULL;
    int packed_owned = 0;
    if (!pack_in_items) {
        packed = call_scratch(2 * B * Hk * per_head, &packed_owned);
        if (packed == NULL) return -2;
        kp = packed, vp = packed + B * Hk * per_head;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t i = 0; i < 2 * B * Hk; i++) {
            int64_t bh = i / 2, b = bh / Hk, h = bh % Hk;
            int64_t n = kv_lens != NULL && kv_lens[b] < N ? kv_lens[b] : N;
            const int64_t *idx = kv_idx != NULL ? kv_idx + b * N : NULL;
            if (i % 2 == 0)
                pack_k((const char *)k + (b * ks[0] + h * ks[1]) * esize, kv_bf16, ks[2], idx, n, npad, D,
                       kp + bh * per_head);
            else
                pack_v((const char *)v + (b * vs[0] + h * vs[1]) * esize, kv_bf16, vs[2], idx, n, npad, D,
                       vp + bh * per_head);
        }
    }
    /* split the keys when query blocks alone leave threads idle: a decode's, or a few tokens' causal
     * chunk over a long context (a split past a query's last key leaves it nothing: lse -inf, merged
     * away) */
    const int64_t want = 4 * num_threads, have = B * Hq * qblocks;
    int64_t splits = 1;
    while (have * splits < want && N / (splits * 2) >= 2 * KB) splits *= 2;
    const int64_t span = ((N + splits - 1) / splits + 15) / 16 * 16; /* whole 16-key tiles */
    const int64_t num_items = B * Hq * qblocks * splits;
    Item *items = (Item *)malloc(sizeof(Item) * num_items);
    float *part_o = NULL, *part_l = NULL;
    if (splits > 1) {
        part_o = (float *)malloc(sizeof(float) * B * Hq * splits * M * D);
        part_l = (float *)malloc(sizeof(float) * B * Hq * splits * M);
    }
    if (items == NULL || (splits > 1 && (part_o == NULL || part_l == NULL))) {
        if (packed_owned) free(packed);
        free(items);
        free(part_o);
        free(part_l);
        return -2;
    }
    int64_t n_items = 0;
    for (int64_t qb = qblocks - 1; qb >= 0; qb--) /* causal: the longest key ranges first */
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
        int64_t b = it->b, h = it->h / group, bh = b * Hk + h;
        float *po = NULL, *pl = NULL;
        if (splits > 1) {
            po = part_o + (b * Hq + it->h) * splits * M * D;
            pl = part_l + (b * Hq + it->h) * splits * M;
        }
        int64_t n = kv_lens != NULL && kv_lens[b] < N ? kv_lens[b] : N;
        Item own = *it;
        if (own.k_hi > n) own.k_hi = n; /* a split past the sequence's keys sees none: lse -inf */
        const int64_t *idx = kv_idx != NULL ? kv_idx + b * N : NULL;
        Keys kv;
        if (!pack_in_items) {
            kv.kp = kp + bh * per_head, kv.vp = vp + bh * per_head;
            kv.kbase = 0, kv.npad = npad;
            run_item(&own, q, qs, &kv, M, n, D, scale, causal, out, os, lse, ls, po, pl);
            continue;
        }
        int64_t len = own.k_hi > own.k_lo ? own.k_hi - own.k_lo : 0, lpad = (len + 15) & ~(int64_t)15;
        int owned = 0;
        float *local = thread_scratch(2 * lpad * D + 16, &owned);
        if (local == NULL) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        /* this item's keys and values, packed together: read once from memory with many misses in
         * flight (a decode's context is cold: other layers' K/V came through the caches since) */
        const int64_t *lidx = idx != NULL ? idx + own.k_lo : NULL;
        int64_t koff = b * ks[0] + h * ks[1] + (lidx != NULL ? 0 : own.k_lo * ks[2]);
        int64_t voff = b * vs[0] + h * vs[1] + (lidx != NULL ? 0 : own.k_lo * vs[2]);
        pack_k((const char *)k + koff * esize, kv_bf16, ks[2], lidx, len, lpad, D, local);
        pack_v((const char *)v + voff * esize, kv_bf16, vs[2], lidx, len, lpad, D, local + lpad * D);
        kv.kp = local, kv.vp = local + lpad * D;
        kv.kbase = own.k_lo, kv.npad = lpad;
        run_item(&own, q, qs, &kv, M, n, D, scale, causal, out, os, lse, ls, po, pl);
        if (owned) free(local);
    }
    if (failed) {
        if (packed_owned) free(packed);
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
                float *dst = out + b * os[0] + h * os[1] + row * os[2];
                for (int64_t c = 0; c < D; c++) dst[c] = acc[c] * inv;
                lse[b * ls[0] + h * ls[1] + row * ls[2]] = total > 0.0f ? top + logf(total) : -INFINITY;
            }
        }
    }
    free(items);
    free(part_o);
    free(part_l);
    if (packed_owned) free(packed);
    return 0;
}
