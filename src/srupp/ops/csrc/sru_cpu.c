/* Fused SRU recurrence for the CPU, forward and backward: float32 and float64, and bfloat16 and float16 storage
 * with float32 arithmetic.
 *
 * Plain C with POSIX threads and no Python or torch headers: the package build compiles it to a
 * shared library that srupp/ops/library.py loads with ctypes and calls on tensor data pointers.
 *
 * Threads: the library is not built with OpenMP, because torch ships its own OpenMP runtime and a second one in
 * the same process keeps its idle workers spinning while torch's run, slowing every op around the kernel. Torch's
 * own workers spin too, for a while after each of its parallel ops, and threads of ours started beside them would
 * share the cores with them. So where torch runs on libgomp, cpu.py hands this library that runtime's entry
 * points (srupp_use_openmp) and the kernels run on torch's own thread team; elsewhere, threads made per call and
 * joined before returning. (Measurements: BENCHMARKS.md, "The recurrence op".)
 */
#define _DEFAULT_SOURCE /* madvise */
#include <math.h>
#include <string.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

/* Lanes (batch row, feature) per block of work: the length of a block's state arrays on the stack (six of
 * them in the backward pass: 24 KiB in float32, 48 KiB in float64; the threads this file
 * starts get a stack of WORKER_STACK bytes, whatever the C library's default, and OpenMP's get the
 * runtime's default, 2 MiB or more unless OMP_STACKSIZE sets less). */
#ifndef BLOCK
#define BLOCK 1024
#endif
/* A block's time step reads one span of every input per batch row, and the next step's spans lie B*D
 * elements further on, in other 4 KiB pages: the hardware prefetchers, which follow a stream within a page,
 * start over at every step and the first lines of each span would wait for memory. So the kernels fetch the
 * next step's spans themselves, one cache line per input for every line's worth of lanes they compute, in
 * groups of PREFETCH_LANES lanes. The lines go to L2 (locality hint 2, x86 prefetcht1) rather than L1, whose few
 * miss buffers the loop's own loads need. */
#define PREFETCH_LANES 64
/* The backward pass's loop body is long (two exps, two divisions and some thirty other operations per lane),
 * and the out-of-order core, which can hold only so many operations waiting on their inputs, then overlaps few
 * of its iterations. With SRUPP_SPLIT_GATES, each chunk's gates are computed first, in two short loops of their
 * own (the exps' arguments, then the sigmoids, through a buffer in L1), and the gradients after. That pays where
 * a vector holds few lanes (baseline, AVX2); AVX-512's vectors do twice the work per operation, so its variant
 * keeps the one loop. Each variant below sets it. */
#define LINE_LANES (64 / (int64_t)sizeof(real))
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(address) __builtin_prefetch(address, 0, 2)
#else
#define PREFETCH(address) ((void)(address))
#endif
#define MAX_THREADS 256
#define WORKER_STACK (1 << 20)
/* Both passes write outputs of at least this many bytes per [T, B, D] tensor with non-temporal stores: they go
 * to memory without first being read into the cache (a normal store reads the line it writes, so streamed
 * outputs would cost more than their bytes), and they are far larger than the caches anyway. Smaller outputs
 * stay in the cache for whatever reads them next. Each pass computes a chunk of PREFETCH_LANES lanes into a
 * small buffer and streams it out while it is in L1, rather than staging a whole row span. */
#ifndef SRUPP_STREAM_MIN_BYTES
#define SRUPP_STREAM_MIN_BYTES (8 << 20)
#endif
/* Below this many elements (T*B*D) a thread costs more to start than it saves. */
#define MIN_WORK_PER_THREAD 65536

/* Outputs the caller allocated afresh are mapped anew by the C library, and first touching them costs a page
 * fault per 4 KiB, which for a training step can be more time than the kernel itself. Asking for huge pages on
 * the 2 MiB-aligned interior of each large output (which is ours alone) cuts the faults 512-fold where the
 * kernel allows it (THP "madvise"); elsewhere the call fails harmlessly. */
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

/* A float32's bits and back (memcpy: the defined way, compiled to nothing). */
static inline uint32_t srupp_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static inline float srupp_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
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

/* The OpenMP runtime torch runs on, if cpu.py found one (GOMP_parallel is libgomp's ABI for
 * `#pragma omp parallel`, also exported by LLVM's and Intel's runtimes). */
typedef void (*srupp_gomp_parallel_fn)(void (*fn)(void *), void *data, unsigned nthreads, unsigned flags);
typedef int (*srupp_omp_int_fn)(void);
static srupp_gomp_parallel_fn srupp_gomp_parallel;
static srupp_omp_int_fn srupp_omp_thread_num, srupp_omp_num_threads;

/* Run the kernels' threads on that runtime's team from now on; null pointers go back to threads of our
 * own. Returns 1 when the runtime is in use. */
int srupp_use_openmp(void *parallel, void *thread_num, void *num_threads) {
    const int ok = parallel && thread_num && num_threads;
    srupp_gomp_parallel = ok ? (srupp_gomp_parallel_fn)parallel : 0;
    srupp_omp_thread_num = ok ? (srupp_omp_int_fn)thread_num : 0;
    srupp_omp_num_threads = ok ? (srupp_omp_int_fn)num_threads : 0;
    return ok;
}

struct srupp_team_job {
    srupp_work_fn fn;
    const void *args;
    int64_t items;
};

/* One member of the OpenMP team: its share of the items, from the team's actual size (the runtime may
 * give fewer threads than asked for, e.g. when called from inside another parallel region). */
static void srupp_team_member(void *data) {
    const struct srupp_team_job *j = data;
    const int64_t k = srupp_omp_thread_num(), n = srupp_omp_num_threads();
    const int64_t begin = j->items * k / n, end = j->items * (k + 1) / n;
    if (begin < end) j->fn(j->args, begin, end);
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
    if (srupp_gomp_parallel) {
        struct srupp_team_job job = {fn, args, items};
        srupp_gomp_parallel(srupp_team_member, &job, (unsigned)n, 0);
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
    pthread_attr_t attr;
    const int have_attr = pthread_attr_init(&attr) == 0;
    if (have_attr) pthread_attr_setstacksize(&attr, WORKER_STACK);
    for (int64_t k = 1; k < n; ++k)
        started[k] = pthread_create(&threads[k], have_attr ? &attr : 0, srupp_run_job, &jobs[k]) == 0;
    if (have_attr) pthread_attr_destroy(&attr);
    srupp_run_job(&jobs[0]);
    for (int64_t k = 1; k < n; ++k) {
        if (started[k])
            pthread_join(threads[k], 0);
        else
            srupp_run_job(&jobs[k]);
    }
}

/* The kernels proper, compiled once per instruction set: baseline (SSE2 on x86-64, NEON on aarch64),
 * AVX2+FMA, AVX-512, and AVX-512 with the BF16 conversion instructions (Cooper Lake, Sapphire Rapids, Zen 4),
 * each under its own symbol suffix. The build flags stay at the baseline, so the
 * library runs on any CPU of its architecture; Python picks the best variant the CPU has at load time
 * (srupp_isa_supported) or the one SRUPP_CPU_ISA names. */
/* The weights of one layer for srupp_token_step_f32_<isa> (sru_token_impl.h), gathered once per decoding run;
 * srupp/ops/decode_kernel.py mirrors this layout (TokenLayer). Norm weights and biases may be null (no affine). */
struct srupp_token_layer {
    const float *in_norm_w, *in_norm_b, *wq_t, *wkv_t, *alpha, *norm_w, *norm_b, *wo_t, *u_bias, *gate_v;
    float in_norm_eps, norm_eps;
    int64_t in, proj, out, hidden, heads;
    int has_in_norm, project_skip;
};

/* A decoding run of a whole stack for srupp_token_run_f32_<isa>: per layer its weights, its cache buffer
 * [B, 2, heads, capacity, head_size] at position 0 (null without attention) and that buffer's strides in
 * elements (batch, key/value, head, position); the run's padding marks [B, pad_stride] (null when none).
 * Optionally a language model's ends: an embedding table [vocab_in, in] that turns token ids (int64) into
 * the first layer's input, and an output layer (weight stored [width, vocab_out], bias [vocab_out]) whose
 * log-softmax becomes the output. srupp/ops/decode_kernel.py mirrors it (TokenRunArgs). */
struct srupp_token_run {
    const struct srupp_token_layer *layers;
    float *const *windows;
    const int64_t *strides;
    uint8_t *pad;
    int64_t pad_stride, num_layers, batch, width; /* width: the layers' output size */
    const float *embedding, *head_t, *head_bias;
    int64_t vocab_in, vocab_out;
};

#define SRUPP_CAT(a, b) a##b
#define SRUPP_CAT2(a, b) SRUPP_CAT(a, b)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SRUPP_STREAM_WIDTH 16 /* SSE2 */
#define SRUPP_FENCE() _mm_sfence()
#else
#define SRUPP_STREAM_WIDTH 0 /* no portable non-temporal store: plain copies */
#define SRUPP_FENCE() ((void)0)
#endif
#define SRUPP_AVX512BF16 0 /* the AVX-512 BF16 conversion, in its own variant */
#define SRUPP_SPLIT_GATES 1
#define SRUPP_ISA baseline
#include "sru_cpu_isa.h"
#undef SRUPP_ISA
#undef SRUPP_STREAM_WIDTH
#undef SRUPP_SPLIT_GATES

#define SRUPP_ISA_BASELINE 1
#define SRUPP_ISA_AVX2 2
#define SRUPP_ISA_AVX512 4
#define SRUPP_ISA_AVX512BF16 8

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SRUPP_X86_VARIANTS 1

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define SRUPP_STREAM_WIDTH 32
#define SRUPP_SPLIT_GATES 1
#define SRUPP_ISA avx2
#include "sru_cpu_isa.h"
#undef SRUPP_ISA
#undef SRUPP_STREAM_WIDTH
#undef SRUPP_SPLIT_GATES
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
/* 512-bit vectors: the loops are long and branch-free, so the wider registers pay off. */
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#endif
#define SRUPP_STREAM_WIDTH 64
#define SRUPP_SPLIT_GATES 0
#define SRUPP_ISA avx512
#include "sru_cpu_isa.h"
#undef SRUPP_ISA
#undef SRUPP_STREAM_WIDTH
#undef SRUPP_SPLIT_GATES
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,prefer-vector-width=512")
#endif
#define SRUPP_STREAM_WIDTH 64
#define SRUPP_SPLIT_GATES 0
#undef SRUPP_AVX512BF16
#define SRUPP_AVX512BF16 1
#define SRUPP_ISA avx512bf16
#include "sru_cpu_isa.h"
#undef SRUPP_ISA
#undef SRUPP_STREAM_WIDTH
#undef SRUPP_SPLIT_GATES
#undef SRUPP_AVX512BF16
#define SRUPP_AVX512BF16 0
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

/* Bit mask of the variants compiled into this library. */
int srupp_isa_compiled(void) {
#ifdef SRUPP_X86_VARIANTS
    return SRUPP_ISA_BASELINE | SRUPP_ISA_AVX2 | SRUPP_ISA_AVX512 | SRUPP_ISA_AVX512BF16;
#else
    return SRUPP_ISA_BASELINE;
#endif
}

/* Bit mask of the compiled variants this CPU (and its operating system) can run. */
int srupp_isa_supported(void) {
    int isa = SRUPP_ISA_BASELINE;
#ifdef SRUPP_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa |= SRUPP_ISA_AVX2;
    if ((isa & SRUPP_ISA_AVX2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        isa |= SRUPP_ISA_AVX512;
    if ((isa & SRUPP_ISA_AVX512) && __builtin_cpu_supports("avx512bf16")) isa |= SRUPP_ISA_AVX512BF16;
#endif
    return isa;
}

int srupp_abi_version(void) { return 7; }
