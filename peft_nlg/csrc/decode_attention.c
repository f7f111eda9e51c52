/* One decoding step's attention (one query position per row) over bf16 key/value caches, for x86 CPUs with
 * AVX512-BF16. Built and loaded by peft_nlg/cpu_kernels.py, which says when it is used and why.
 *
 * Per row and key/value head: the scores of its query heads against every cached position (bf16 pairs multiplied
 * and summed in fp32 by vdpbf16ps), softmax in fp32, the weights rounded to bf16 and the weighted sum of the values
 * accumulated in fp32 -- the precision of torch's CPU flash attention. Positions whose keep byte is 0 (padding, a
 * cache room's unwritten positions) get weight 0. Each row's keys and values are read once, in order.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_DIM 128

/* e^x for x <= 0 to about one ulp: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^7 */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  /* ln2 in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* lane j: the sum of a[j]'s sixteen lanes (a transpose folded into the additions) */
static inline __m512 lane_sums(const __m512 a[16]) {
    __m512 x[8], y[4];
    for (int i = 0; i < 8; i++)
        x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(x[2 * i]), _mm512_castps_pd(x[2 * i + 1]));
        __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(x[2 * i]), _mm512_castps_pd(x[2 * i + 1]));
        y[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x44), _mm512_shuffle_f32x4(y[0], y[1], 0xEE));
    __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x44), _mm512_shuffle_f32x4(y[2], y[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

/* s[l] = scaling * (q . k[l]), or -inf where keep[l] is 0; s holds room rounded up to 16 */
static inline __attribute__((always_inline)) void head_scores(const uint16_t *q, const uint16_t *k,
                                                             const uint8_t *keep, int64_t room, const int64_t dim,
                                                             float scaling, float *s) {
    __m512bh qh[MAX_DIM / 32];
    for (int64_t c = 0; c < dim / 32; c++) qh[c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
    for (int64_t first = 0; first < room; first += 16) {
        int64_t n = room - first < 16 ? room - first : 16;
        __mmask16 valid = (__mmask16)((1u << n) - 1);
        __mmask16 kept = _mm_mask_cmpneq_epi8_mask(valid, _mm_maskz_loadu_epi8(valid, keep + first),
                                                    _mm_setzero_si128());
        __m512 acc[16];
        if (n == 16) {  /* the common case apart, so that the accumulators stay in registers */
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++) {
                acc[j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(k + (first + j) * dim),
                                          qh[0]);
#pragma GCC unroll 4
                for (int64_t c = 1; c < dim / 32; c++)
                    acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(k + (first + j) * dim + 32 * c),
                                              qh[c]);
            }
        } else {
            for (int j = 0; j < 16; j++) {
                acc[j] = _mm512_setzero_ps();
                if (j < n)
                    for (int64_t c = 0; c < dim / 32; c++)
                        acc[j] = _mm512_dpbf16_ps(acc[j],
                                                  (__m512bh)_mm512_loadu_si512(k + (first + j) * dim + 32 * c), qh[c]);
            }
        }
        __m512 scores = _mm512_mul_ps(lane_sums(acc), _mm512_set1_ps(scaling));
        _mm512_storeu_ps(s + first, _mm512_mask_blend_ps(kept, _mm512_set1_ps(-INFINITY), scores));
    }
}

/* scores -> softmax weights rounded to bf16, two positions to a 32-bit word (the even one low); an odd room's
 * last word pairs its position with weight 0. Nothing kept: every weight 0. */
static inline void softmax_pairs(const float *s, int64_t room, uint32_t *pairs) {
    const int64_t blocks = (room + 15) / 16;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 mx = ninf;
    for (int64_t b = 0; b < blocks; b++) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + 16 * b));
    float m = _mm512_reduce_max_ps(mx);
    __m512 shift = _mm512_set1_ps(m == -INFINITY ? 0.0f : m), total = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m512 x = _mm512_loadu_ps(s + 16 * b);
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ),
                                                         exp_nonpositive(_mm512_sub_ps(x, shift))));
    }
    float t = _mm512_reduce_add_ps(total);
    __m512 inverse = _mm512_set1_ps(t > 0 ? 1.0f / t : 0.0f);
    for (int64_t b = 0; b < blocks; b += 2) {
        __m512 x0 = _mm512_loadu_ps(s + 16 * b), x1 = b + 1 < blocks ? _mm512_loadu_ps(s + 16 * b + 16) : ninf;
        __m512 w0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x0, ninf, _CMP_NEQ_OQ),
                                        _mm512_mul_ps(exp_nonpositive(_mm512_sub_ps(x0, shift)), inverse));
        __m512 w1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x1, ninf, _CMP_NEQ_OQ),
                                        _mm512_mul_ps(exp_nonpositive(_mm512_sub_ps(x1, shift)), inverse));
        _mm512_storeu_si512(pairs + 8 * b, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
    }
}

/* out[h] = sum over positions l of weight[h][l] * v[l], for `heads` query heads at once (so each value row is read
 * once): vdpbf16ps over pairs of positions, two value rows interleaved; per 32 dims that leaves one accumulator for
 * dims {0-3, 8-11, 16-19, 24-27} and one for the other four-dim groups, put back in order at the end */
static inline __attribute__((always_inline)) void weighted_values(const uint32_t *pairs, int64_t pair_stride,
                                                                 const uint16_t *v, int64_t room, const int64_t dim,
                                                                 const int heads, uint16_t *out) {
    __m512 acc[4][MAX_DIM / 16];
    for (int h = 0; h < heads; h++)
        for (int64_t c = 0; c < dim / 16; c++) acc[h][c] = _mm512_setzero_ps();
    for (int64_t l = 0; l < room; l += 2) {
        int unweighted = 1;
        for (int h = 0; h < heads; h++) unweighted &= pairs[h * pair_stride + l / 2] == 0;
        if (unweighted) continue;  /* padding and unwritten room: not read */
        for (int64_t c = 0; c < dim / 32; c++) {
            __m512i r0 = _mm512_loadu_si512(v + l * dim + 32 * c);
            __m512i r1 = l + 1 < room ? _mm512_loadu_si512(v + (l + 1) * dim + 32 * c) : _mm512_setzero_si512();
            __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(r0, r1), hi = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
            for (int h = 0; h < heads; h++) {
                __m512bh w = (__m512bh)_mm512_set1_epi32((int)pairs[h * pair_stride + l / 2]);
                acc[h][2 * c] = _mm512_dpbf16_ps(acc[h][2 * c], lo, w);
                acc[h][2 * c + 1] = _mm512_dpbf16_ps(acc[h][2 * c + 1], hi, w);
            }
        }
    }
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int h = 0; h < heads; h++)
        for (int64_t c = 0; c < dim / 32; c++) {
            __m512 a = _mm512_permutex2var_ps(acc[h][2 * c], first, acc[h][2 * c + 1]);
            __m512 b = _mm512_permutex2var_ps(acc[h][2 * c], second, acc[h][2 * c + 1]);
            _mm512_storeu_si512(out + h * dim + 32 * c, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
}

static inline __attribute__((always_inline)) void attend(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                                        const uint8_t *keep, uint16_t *out, int64_t group,
                                                        int64_t room, const int64_t dim, float scaling,
                                                        float *scores, uint32_t *pairs) {
    const int64_t pair_stride = (room + 31) / 32 * 16;
    for (int64_t h = 0; h < group; h++) {
        head_scores(q + h * dim, k, keep, room, dim, scaling, scores);
        softmax_pairs(scores, room, pairs + h * pair_stride);
    }
    const int64_t together = dim <= 64 ? 4 : 2;  /* accumulators: together * dim / 16 <= 16 */
    for (int64_t h = 0; h < group; h += together) {
        const uint32_t *p = pairs + h * pair_stride;
        switch (group - h < together ? group - h : together) {  /* constant head counts: unrolled loops */
            case 4: weighted_values(p, pair_stride, v, room, dim, 4, out + h * dim); break;
            case 3: weighted_values(p, pair_stride, v, room, dim, 3, out + h * dim); break;
            case 2: weighted_values(p, pair_stride, v, room, dim, 2, out + h * dim); break;
            default: weighted_values(p, pair_stride, v, room, dim, 1, out + h * dim);
        }
    }
}

/* q, out: [rows, kv_heads * group, dim]; k, v: [rows, kv_heads, room, dim]; keep: [rows, room], nonzero where a
 * position is attended; all contiguous, bf16 as uint16 (keep: bytes); dim a multiple of 32 up to MAX_DIM.
 * Returns 0, or -1 for a shape it does not handle (nothing written). */
int peft_nlg_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *keep,
                              uint16_t *out, int64_t rows, int64_t kv_heads, int64_t group, int64_t room,
                              int64_t dim, float scaling, int threads) {
    if (dim % 32 || dim > MAX_DIM || dim <= 0 || room <= 0 || group <= 0) return -1;
    const int64_t padded = (room + 31) / 32 * 32;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
        float *scores = aligned_alloc(64, sizeof(float) * padded);
        uint32_t *pairs = aligned_alloc(64, sizeof(uint32_t) * group * padded / 2);
        if (!scores || !pairs) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * kv_heads; i++) {
            if (!scores || !pairs) continue;
            const uint8_t *keep_i = keep + i / kv_heads * room;
            const uint16_t *q_i = q + i * group * dim, *k_i = k + i * room * dim, *v_i = v + i * room * dim;
            uint16_t *out_i = out + i * group * dim;
            if (dim == 64)  /* SmolLM2's and Llama's: a constant, so the loops over dims unroll */
                attend(q_i, k_i, v_i, keep_i, out_i, group, room, 64, scaling, scores, pairs);
            else
                attend(q_i, k_i, v_i, keep_i, out_i, group, room, dim, scaling, scores, pairs);
        }
        free(scores);
        free(pairs);
    }
    return failed ? -2 : 0;
}
