/* Shared by flash_f32.c and ops_f32.c (AVX2 + FMA). */
#ifndef PROMPTCACHE_EXP256_H
#define PROMPTCACHE_EXP256_H
#include <immintrin.h>

/* e^x for 8 floats x <= 88 (larger saturates at e^88): 2^n * e^f, n = round(x log2 e), f = x - n ln 2
 * (ln 2 in two parts, |f| <= ln 2 / 2), e^f by a degree-5 polynomial fitted to it on that range
 * (relative error 8e-8 in exact arithmetic, < 3e-7 in float32). Below -87 it gives e^-87 (float32's
 * smallest normal order); exp256 makes that 0 (masked scores are -inf), exp256_le0 — the softmax's,
 * whose arguments are scores minus their maximum, never above 0 — leaves it (a masked key weighs
 * 1.6e-38 beside the maximum's 1: nothing a float32 sum can see) and saves three instructions. */
static inline __m256 exp256_le0(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x); /* ln 2's first 16 bits */
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), f); /* the rest */
    __m256 p = _mm256_set1_ps(0.008291716687381268f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.04191502928733826f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.1666766256093979f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.49998900294303894f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.9999996423721313f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0000001192092896f));
    /* 2^n as a float: n + 127 in the exponent field (n in [-126, 127] after the clamps) */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 exp256(__m256 x) {
    __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    return _mm256_and_ps(exp256_le0(_mm256_min_ps(x, _mm256_set1_ps(88.0f))), keep);
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
