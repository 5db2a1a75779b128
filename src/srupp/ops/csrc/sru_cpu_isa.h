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
 *   trap, so it vectorises too). Two integer mins and a select, three steps deep; the earlier clamp
 *   (mask off the sign, cap, put the sign back, compare for NaN, select) took eight instructions, and
 *   the loops, which wait on the exp's chain of dependent steps, ran faster without them (forward in
 *   cache, Zen 4: AVX2 +3-9%, AVX-512 +4-7%);
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
     * scheme) rather than one after another (Horner's): the dependency chain is half as long, and the loops,
     * which wait on it more than on the arithmetic units, ran 3-13% faster in cache (Zen 4, every variant).
     * Within 1.3 ulp of exp on the clamped range (Horner's: 1.0). */
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

#define real float
#define EXP SRUPP_ISA_FN(srupp_expf_)
#define SRUPP_FN(name) SRUPP_CAT2(SRUPP_CAT2(srupp_sru_##name, _f32_), SRUPP_ISA)
#include "sru_cpu_impl.h"
#undef real
#undef EXP
#undef SRUPP_FN
#include "sru_token_impl.h"

#define real double
#define EXP SRUPP_ISA_FN(srupp_exp_)
#define SRUPP_FN(name) SRUPP_CAT2(SRUPP_CAT2(srupp_sru_##name, _f64_), SRUPP_ISA)
#include "sru_cpu_impl.h"
#undef real
#undef EXP
#undef SRUPP_FN

#undef STREAM
#undef SRUPP_ISA_FN
