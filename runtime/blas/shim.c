/* Route MLX's CBLAS calls to OpenBLAS.
 *
 * The Linux mlx[cpu] wheel links the reference (netlib) BLAS, about 20x slower than an optimized
 * one. scipy-openblas32 ships OpenBLAS with its symbols prefixed `scipy_`, so it cannot stand in
 * directly. This shim exports the three CBLAS functions libmlx imports under their standard names
 * and forwards them; loaded with RTLD_GLOBAL before mlx, it wins symbol resolution.
 *
 * Small products run on one thread. OpenBLAS threads a product once m*n*k passes 2^18, but its
 * worker threads synchronise by spinning and yielding: with every core busy (other processes, or
 * MLX's own stream thread) a small threaded call can stall for milliseconds to seconds (measured:
 * a 16x8-head attention over 256 tokens, 22 ms single-threaded, took 20 ms to 3 s with two
 * threads on a loaded 2-core machine). Below SMALL_WORK multiply-adds (VIDPORT_BLAS_SMALL_WORK
 * overrides it; 0 disables) the call is made with one thread, where threading gains little anyway;
 * larger ones use all of OpenBLAS's threads. MLX calls BLAS from its one CPU stream thread, so
 * switching OpenBLAS's global thread count around a call does not race with another call.
 */
#include <stdlib.h>
typedef int blasint;

void scipy_openblas_set_num_threads(int);
int scipy_openblas_get_num_threads(void);

static double small_work = 4.0 * 1024 * 1024; /* m*n*k below which one thread is used */
static int all_threads = -1, threads_now = -1;
static int fixed_threads = 0; /* > 0: every product uses this many threads (vidport_blas_fix_threads) */
static int thread_limit = 0;  /* > 0: at most this many threads (vidport_blas_limit_threads) */

static void init_threads(void) {
    if (all_threads < 0) {
        const char *override = getenv("VIDPORT_BLAS_SMALL_WORK");
        if (override) small_work = atof(override);
        all_threads = threads_now = scipy_openblas_get_num_threads();
    }
}

static void pick_threads(blasint m, blasint n, blasint k) {
    init_threads();
    if (fixed_threads > 0) return;
    int want = (double)m * (double)n * (double)k < small_work ? 1 : all_threads;
    int limit = __atomic_load_n(&thread_limit, __ATOMIC_RELAXED);
    if (limit > 0 && want > limit) want = limit;
    if (want != threads_now) {
        scipy_openblas_set_num_threads(want);
        threads_now = want;
    }
}

/* While several MLX streams compute at once, each on its own thread (vidport.runtime.cpu_threads),
 * OpenBLAS's thread count is global: one caller switching it under another's running product is a
 * race. So the count is fixed for that time (threads > 0: every product uses `threads`), and
 * threads = 0 restores the choice by size. */
void vidport_blas_fix_threads(int threads) {
    init_threads();
    fixed_threads = threads > 0 ? threads : 0;
    int want = fixed_threads > 0 ? fixed_threads : all_threads;
    if (want != threads_now) {
        scipy_openblas_set_num_threads(want);
        threads_now = want;
    }
}

/* The cores other processes leave free (vidport.runtime.cpu_load, from its own thread): products
 * use at most `threads` threads, 0 lifts the cap. It takes effect at the next product, on the
 * thread that makes it; counts fixed by vidport_blas_fix_threads are already shared out and stay. */
void vidport_blas_limit_threads(int threads) {
    __atomic_store_n(&thread_limit, threads > 0 ? threads : 0, __ATOMIC_RELAXED);
}

void scipy_cblas_sgemm(int, int, int, blasint, blasint, blasint, float, const float *, blasint,
                       const float *, blasint, float, float *, blasint);
void scipy_cblas_dgemm(int, int, int, blasint, blasint, blasint, double, const double *, blasint,
                       const double *, blasint, double, double *, blasint);
void scipy_cblas_cgemm(int, int, int, blasint, blasint, blasint, const void *, const void *, blasint,
                       const void *, blasint, const void *, void *, blasint);

void cblas_sgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, float alpha, const float *a,
                 blasint lda, const float *b, blasint ldb, float beta, float *c, blasint ldc) {
    pick_threads(m, n, k);
    scipy_cblas_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, double alpha, const double *a,
                 blasint lda, const double *b, blasint ldb, double beta, double *c, blasint ldc) {
    pick_threads(m, n, k);
    scipy_cblas_dgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_cgemm(int order, int ta, int tb, blasint m, blasint n, blasint k, const void *alpha, const void *a,
                 blasint lda, const void *b, blasint ldb, const void *beta, void *c, blasint ldc) {
    pick_threads(m, n, k);
    scipy_cblas_cgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
