/* Fused SRU recurrence for the CPU, forward and backward, in float32 and float64.
 *
 * Plain C with OpenMP and no Python or torch headers: the package build compiles it to a shared
 * library that srupp/ops/cpu.py loads with ctypes and calls on tensor data pointers.
 */
#include <math.h>
#include <stdint.h>

#define CHUNK 64
#define SRUPP_CAT(a, b) a##b
#define SRUPP_CAT2(a, b) SRUPP_CAT(a, b)

#define real float
#define EXP expf
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
