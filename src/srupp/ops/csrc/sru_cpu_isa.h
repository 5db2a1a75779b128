/* One instruction set's copy of the kernels; included by sru_cpu.c once per SRUPP_ISA under that
 * instruction set's target options. Everything here is static except the four entry points, whose
 * names end in _<dtype>_<isa> (e.g. srupp_sru_forward_f32_avx2). */

#define SRUPP_ISA_FN(name) SRUPP_CAT2(name, SRUPP_ISA)

/* exp that the compiler can vectorise (libm's is a scalar call): Cody-Waite range reduction
 * x = n ln2 + r, a polynomial for e^r, then 2^n built in the exponent bits.
 *
 * Written so that the loops calling it vectorise with the compiler's default (trapping) math:
 * - the clamp to [-88, 88] is integer arithmetic on the bits (a float comparison may trap, and the
 *   compiler then keeps it a branch). As signed integers the bits of positive floats grow with the
 *   value, so a signed min with 88's bits caps them (and leaves every negative float, a negative
 *   integer, alone); as unsigned integers the bits of negative floats grow with the magnitude and lie
 *   above every positive float's, so an unsigned min with -88's bits caps those. A NaN, which those
 *   two would turn into +-88, is put back by a select on isnan (a quiet comparison, which does not
 *   trap, so it vectorises too). Two integer mins and a select, three steps deep: the loops wait on the
 *   exp's chain of dependent steps, so its depth, more than its instruction count, sets their speed;
 * - n is rounded by adding 1.5 * 2^mantissa_bits, which leaves n in the low bits of the sum, so 2^n
 *   is integer arithmetic on those bits: no floor() and no float-to-int conversion.
 * At -88, 2^n is 2^-127, whose bits this builds as 0: e^-88 comes out 0 instead of 6e-39, which moves
 * sigmoid by less than the smallest normal value; +-inf give the limits and NaN stays NaN. */
static inline float SRUPP_ISA_FN(srupp_expf_)(float x) {
    int32_t bits_in;
    memcpy(&bits_in, &x, sizeof bits_in);
    const int32_t capped = bits_in < 0x42B00000 ? bits_in : 0x42B00000;                    /* 88.0f */
    const uint32_t key = (uint32_t)capped < 0xC2B00000u ? (uint32_t)capped : 0xC2B00000u; /* -88.0f */
    float clamped;
    memcpy(&clamped, &key, sizeof clamped);
    x = isnan(x) ? x : clamped;
    const float shifted = x * 1.44269504088896341f + 12582912.0f; /* 1.5 * 2^23 */
    const float n = shifted - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    /* Cephes' minimax coefficients, 1 + r + r^2 (c0 + c1 r + ... + c5 r^5), evaluated in pairs (Estrin's
     * scheme) rather than one after another (Horner's): the dependency chain is half as long, and the loops
     * wait on it more than on the arithmetic units. Within 1.3 ulp of exp on the clamped range (Horner's:
     * 1.0). */
    const float r2 = r * r;
    const float c45 = 1.9875691500e-4f * r + 1.3981999507e-3f;
    const float c23 = 8.3334519073e-3f * r + 4.1665795894e-2f;
    const float c01 = 1.6666665459e-1f * r + 5.0000001201e-1f;
    const float p = ((c45 * r2 + c23) * r2 + c01) * r2 + (r + 1.0f);
    uint32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23; /* the low bits held 2^22 + n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline double SRUPP_ISA_FN(srupp_exp_)(double x) {
    int64_t bits_in, key;
    memcpy(&bits_in, &x, sizeof bits_in);
    key = bits_in ^ ((bits_in >> 63) & 0x7FFFFFFFFFFFFFFFll);
    key = key > 0x4086280000000000ll ? 0x4086280000000000ll : key;                   /* 709.0 */
    key = key < (int64_t)0xBF79DFFFFFFFFFFFull ? (int64_t)0xBF79DFFFFFFFFFFFull : key; /* -708.0 */
    key ^= (key >> 63) & 0x7FFFFFFFFFFFFFFFll;
    key = (bits_in & 0x7FFFFFFFFFFFFFFFll) > 0x7FF0000000000000ll ? bits_in : key;
    memcpy(&x, &key, sizeof x);
    const double shifted = x * 1.4426950408889634074 + 6755399441055744.0; /* 1.5 * 2^52 */
    const double n = shifted - 6755399441055744.0;
    /* ln2 split in two so that n * ln2_hi is exact (fdlibm's constants). */
    const double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
    /* Taylor series to r^13: |r| <= ln2 / 2 puts the first dropped term below 1e-17 relative. */
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uint64_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4338000000000000ull + 1023ull) << 52; /* the low bits held 2^51 + n */
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Copy `bytes` from src to dst with non-temporal stores where dst is aligned to the vector width (plain
 * copies for the unaligned head and tail); the caller fences (SRUPP_FENCE) before its results are used. */
static inline void SRUPP_ISA_FN(srupp_stream_)(void *dst, const void *src, int64_t bytes) {
#if SRUPP_STREAM_WIDTH == 0
    memcpy(dst, src, (size_t)bytes);
#else
    char *d = dst;
    const char *s = src;
    int64_t head = (int64_t)(-(uintptr_t)d & (SRUPP_STREAM_WIDTH - 1));
    if (head > bytes) head = bytes;
    memcpy(d, s, (size_t)head);
    d += head, s += head, bytes -= head;
    for (; bytes >= SRUPP_STREAM_WIDTH; bytes -= SRUPP_STREAM_WIDTH, d += SRUPP_STREAM_WIDTH, s += SRUPP_STREAM_WIDTH)
#if SRUPP_STREAM_WIDTH == 64
        _mm512_stream_si512((void *)d, _mm512_loadu_si512((const void *)s));
#elif SRUPP_STREAM_WIDTH == 32
        _mm256_stream_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
#else
        _mm_stream_si128((__m128i *)d, _mm_loadu_si128((const __m128i *)s));
#endif
    memcpy(d, s, (size_t)bytes);
#endif
}
#define STREAM SRUPP_ISA_FN(srupp_stream_)

/* 16-bit storage formats, converted to and from float32 in the kernels' registers. Written in integer and float
 * operations the compiler vectorises in every variant (there is no portable vector conversion instruction);
 * float32 to 16 bits rounds to nearest even, as torch's own conversions do. */

/* bfloat16 is float32's upper half. */
static inline float SRUPP_ISA_FN(srupp_from_bf16_)(uint16_t value) { return srupp_float((uint32_t)value << 16); }

/* Adding 0x7FFF plus the kept part's lowest bit carries into the kept half exactly when the dropped half is
 * above one half, or equal to it with the kept part odd: round to nearest even; a carry out of the mantissa
 * raises the exponent (up to infinity), as rounding should. NaN keeps its sign and payload and is made quiet,
 * so that the rounding cannot turn it into infinity. */
static inline uint16_t SRUPP_ISA_FN(srupp_to_bf16_)(float value) {
    const uint32_t bits = srupp_bits(value);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return (uint16_t)(isnan(value) ? (bits >> 16) | 0x40u : rounded);
}

/* IEEE half: 5 exponent bits (bias 15) and 10 mantissa bits. Shifted into float32's place, the magnitude bits
 * read as a float32 2^112 too small (the biases differ by 112), subnormal halves as subnormal floats included;
 * one exact multiplication corrects both. Infinity and NaN (exponent all ones) have their exponent bits set to
 * float32's all ones, which keeps the mantissa: an OR, not a select, which the compiler would turn into a branch
 * around the multiplication (a float operation that may trap) and leave the loop scalar. */
static inline float SRUPP_ISA_FN(srupp_from_f16_)(uint16_t value) {
    const uint32_t magnitude = (uint32_t)(value & 0x7FFFu) << 13;
    uint32_t bits = srupp_bits(srupp_float(magnitude) * 0x1p112f);
    bits |= ((value & 0x7C00u) == 0x7C00u) * 0x7F800000u;
    return srupp_float(bits | (uint32_t)(value & 0x8000u) << 16);
}

/* Normal halves (magnitudes from 2^-14): round float32's 23 mantissa bits to 10 as for bfloat16 above, then
 * rebias the exponent; a magnitude that rounds to 2^16 or more comes out as the infinity pattern, and larger
 * ones are capped to it. Subnormal halves (below 2^-14): adding 0.5, whose float32 spacing is 2^-24, the
 * halves' subnormal step, rounds the magnitude to that step (to nearest even, the float unit's rounding), and
 * the sum's low bits count the steps; a count of 0x400 is the smallest normal half, correctly. */
static inline uint16_t SRUPP_ISA_FN(srupp_to_f16_)(float value) {
    const uint32_t bits = srupp_bits(value);
    const uint32_t magnitude = bits & 0x7FFFFFFFu, sign = (bits >> 16) & 0x8000u;
    const uint32_t normal = ((magnitude + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13) - (112u << 10);
    const uint32_t subnormal = srupp_bits(fabsf(value) + 0.5f) - 0x3F000000u; /* 0.5f */
    /* the choice as masks (signed comparisons, which SSE2 has; the magnitudes fit): a select would let the
     * compiler move the float addition into a branch of its own */
    const uint32_t is_subnormal = -(uint32_t)((int32_t)magnitude < 0x38800000);
    const uint32_t is_normal = -(uint32_t)((int32_t)magnitude < 0x47800000) & ~is_subnormal;
    const uint32_t is_nan = -(uint32_t)((int32_t)magnitude > 0x7F800000);
    const uint32_t finite = (subnormal & is_subnormal) | (normal & is_normal) | (0x7C00u & ~(is_subnormal | is_normal));
    const uint32_t half = (finite & ~is_nan) | ((0x7E00u | ((bits >> 13) & 0x3FFu)) & is_nan);
    return (uint16_t)(sign | half);
}

/* Write a chunk of n floats as 16-bit values (the kernels' outputs; n <= PREFETCH_LANES). */
static inline void SRUPP_ISA_FN(srupp_pack_f16_)(uint16_t *restrict out, const float *restrict in, int64_t n) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = SRUPP_ISA_FN(srupp_to_f16_)(in[j]);
}

static inline void SRUPP_ISA_FN(srupp_pack_bf16_)(uint16_t *restrict out, const float *restrict in, int64_t n) {
#if SRUPP_AVX512BF16
    /* one instruction per 16 values. It reads float32 subnormals (below 2^-126) as zero, which the integer
     * path keeps; elsewhere both round to nearest even. */
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        _mm256_storeu_si256((__m256i *)(out + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in + j)));
    if (j < n) {
        const __mmask16 tail = (__mmask16)((1u << (n - j)) - 1u);
        const __m256i packed = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, in + j));
        _mm256_mask_storeu_epi16(out + j, tail, packed);
    }
#else
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = SRUPP_ISA_FN(srupp_to_bf16_)(in[j]);
#endif
}

#define real float
#define EXP SRUPP_ISA_FN(srupp_expf_)
#define elem float
#define LOAD(value) (value)
#define SRUPP_HALF 0
#define SRUPP_FN(name) SRUPP_CAT2(SRUPP_CAT2(srupp_sru_##name, _f32_), SRUPP_ISA)
#include "sru_cpu_impl.h"
#undef elem
#undef LOAD
#undef SRUPP_HALF
#undef SRUPP_FN

/* bfloat16 and float16 storage of u, x, h and their gradients; the state, the gates' parameters and every sum
 * stay float32 (rounding the saved states c to 16 bits would change the gradients computed from them). */
#define elem uint16_t
#define SRUPP_HALF 1
#define LOAD(value) SRUPP_ISA_FN(srupp_from_bf16_)(value)
#define PACK SRUPP_ISA_FN(srupp_pack_bf16_)
#define SRUPP_FN(name) SRUPP_CAT2(SRUPP_CAT2(srupp_sru_##name, _bf16_), SRUPP_ISA)
#include "sru_cpu_impl.h"
#undef LOAD
#undef PACK
#undef SRUPP_FN
#define LOAD(value) SRUPP_ISA_FN(srupp_from_f16_)(value)
#define PACK SRUPP_ISA_FN(srupp_pack_f16_)
#define SRUPP_FN(name) SRUPP_CAT2(SRUPP_CAT2(srupp_sru_##name, _f16_), SRUPP_ISA)
#include "sru_cpu_impl.h"
#undef LOAD
#undef PACK
#undef SRUPP_FN
#undef elem
#undef SRUPP_HALF
#undef real
#undef EXP
#include "sru_token_impl.h"

#define real double
#define EXP SRUPP_ISA_FN(srupp_exp_)
#define elem double
#define LOAD(value) (value)
#define SRUPP_HALF 0
#define SRUPP_FN(name) SRUPP_CAT2(SRUPP_CAT2(srupp_sru_##name, _f64_), SRUPP_ISA)
#include "sru_cpu_impl.h"
#undef real
#undef EXP
#undef elem
#undef LOAD
#undef SRUPP_HALF
#undef SRUPP_FN

#undef STREAM
#undef SRUPP_ISA_FN
