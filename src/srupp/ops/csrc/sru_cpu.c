/* Fused SRU recurrence for the CPU, forward and backward, in float32 and float64.
 *
 * Plain C with POSIX threads and no Python or torch headers: the package build compiles it to a
 * shared library that srupp/ops/cpu.py loads with ctypes and calls on tensor data pointers.
 *
 * Why not OpenMP: torch ships its own OpenMP runtime, and a second one in the same process keeps
 * its idle workers spinning while torch's run, so on a 2-core machine every op around the kernel
 * slowed down ~10x (measured). Threads made per call and joined before returning leave nothing behind.
 */
#define _DEFAULT_SOURCE /* madvise */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>

#ifndef CHUNK
#define CHUNK 256
#endif
#define MAX_THREADS 256
/* Below this many elements (T*B*D) a thread costs more to start than it saves. */
#define MIN_WORK_PER_THREAD 65536

/* The outputs are fresh allocations that glibc maps anew for every call, and first touching them
 * costs a page fault per 4 KiB: for a training step of T=512 B=16 D=512 that was more time than the
 * kernel itself. Asking for huge pages on the 2 MiB-aligned interior of each large output (which is
 * ours alone) cuts the faults 512-fold where the kernel allows it (THP "madvise"); elsewhere the
 * call fails harmlessly. */
static void hint_huge_pages(void *start, int64_t bytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)1 << 21;
    const uintptr_t begin = ((uintptr_t)start + huge - 1) & ~(huge - 1);
    const uintptr_t end = ((uintptr_t)start + (uintptr_t)bytes) & ~(huge - 1);
    if (start && end > begin) madvise((void *)begin, end - begin, MADV_HUGEPAGE);
#else
    (void)start;
    (void)bytes;
#endif
}

typedef void (*srupp_work_fn)(const void *args, int64_t begin, int64_t end);

struct srupp_job {
    srupp_work_fn fn;
    const void *args;
    int64_t begin, end;
};

static void *srupp_run_job(void *job) {
    const struct srupp_job *j = job;
    j->fn(j->args, j->begin, j->end);
    return 0;
}

/* Split [0, items) evenly over up to nthreads threads; the calling thread takes the first share,
 * and a share whose thread cannot be started runs on the calling thread too. */
static void srupp_parallel_for(int64_t items, int64_t work, int nthreads, srupp_work_fn fn, const void *args) {
    int64_t n = nthreads;
    if (n > items) n = items;
    if (n > work / MIN_WORK_PER_THREAD) n = work / MIN_WORK_PER_THREAD;
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (n <= 1) {
        fn(args, 0, items);
        return;
    }
    pthread_t threads[MAX_THREADS];
    struct srupp_job jobs[MAX_THREADS];
    int started[MAX_THREADS];
    for (int64_t k = 0; k < n; ++k) {
        jobs[k].fn = fn;
        jobs[k].args = args;
        jobs[k].begin = items * k / n;
        jobs[k].end = items * (k + 1) / n;
    }
    for (int64_t k = 1; k < n; ++k) started[k] = pthread_create(&threads[k], 0, srupp_run_job, &jobs[k]) == 0;
    srupp_run_job(&jobs[0]);
    for (int64_t k = 1; k < n; ++k) {
        if (started[k])
            pthread_join(threads[k], 0);
        else
            srupp_run_job(&jobs[k]);
    }
}

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
