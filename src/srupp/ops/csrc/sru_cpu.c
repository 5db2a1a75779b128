/* Fused SRU recurrence for the CPU, forward and backward, in float32 and float64.
 *
 * Plain C with OpenMP and no Python or torch headers: the package build compiles it to a shared
 * library that srupp/ops/cpu.py loads with ctypes and calls on tensor data pointers.
 */
#include <math.h>
#include <stdint.h>

#ifndef CHUNK
#define CHUNK 256
#endif

/* exp for float32 that the compiler can vectorise (libm's expf is a scalar call): Cody-Waite range
 * reduction x = n ln2 + r, a degree-6 polynomial for e^r (Cephes' coefficients), then 2^n built in
 * the exponent bits. Within 2 ulp of expf on [-87, 88]; inputs are clamped to that range, which only
 * moves sigmoid by less than 1e-38. NaN fails both comparisons and so propagates. */
static inline float srupp_expf(float x) {
    x = x > 88.0f ? 88.0f : x;
    x = x < -87.0f ? -87.0f : x;
    /* n = nearest integer to x/ln2: adding then subtracting 1.5 * 2^23 rounds in the FPU; floorf
     * would block vectorisation unless -fno-trapping-math. */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}
#define SRUPP_CAT(a, b) a##b
#define SRUPP_CAT2(a, b) SRUPP_CAT(a, b)

#define real float
#define EXP srupp_expf
#define SRUPP_FN(name) SRUPP_CAT2(srupp_sru_##name, _f32)
#include "sru_cpu_impl.h"
#undef real
#undef EXP
#undef SRUPP_FN

#define real double
#define EXP exp
#define SRUPP_FN(name) SRUPP_CAT2(srupp_sru_##name, _f64)
#include "sru_cpu_impl.h"
#undef real
#undef EXP
#undef SRUPP_FN

int srupp_abi_version(void) { return 1; }
int srupp_chunk(void) { return CHUNK; }
