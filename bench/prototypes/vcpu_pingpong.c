// A standalone probe (bench/NOTES.md, session 19): how far apart the machine's first two CPUs are.
// Two threads, pinned to CPUs 0 and 1, pass one cache line back and forth; the mean round trip says
// where the two sit: about 60-90 ns on the Zen 4 VM when its two vCPUs share a CCD (and its L3), about
// 350 ns when the host has put them on two CCDs, the state in which fastprune's two-thread batch-1
// layers run a third slower (each layer's halo rows and inputs cross between the CCDs).
// Build and run:   gcc -O2 -o vcpu_pingpong vcpu_pingpong.c -lpthread && ./vcpu_pingpong 200000
// or as a library (gcc -O2 -shared -fPIC -o pingpong.so vcpu_pingpong.c -lpthread), from Python:
//   lib = ctypes.CDLL("./pingpong.so"); lib.pingpong.restype = ctypes.c_double; lib.pingpong(50000)
// to classify each second of a benchmark by the state it ran in.
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Alignas(64) atomic_long flag;
static long rounds;

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void* answer(void* unused) {  // on CPU 1: waits for each odd value, writes the next even one
  (void)unused;
  pin(1);
  for (long i = 0; i < rounds; i++) {
    while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 1) {
    }
    atomic_store_explicit(&flag, 2 * i + 2, memory_order_release);
  }
  return NULL;
}

// Mean nanoseconds of a round trip over n of them; the caller's affinity is restored to CPUs 0-1.
double pingpong(long n) {
  rounds = n;
  atomic_store(&flag, 0);
  pthread_t other;
  pthread_create(&other, NULL, answer, NULL);
  pin(0);
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < n; i++) {
    atomic_store_explicit(&flag, 2 * i + 1, memory_order_release);
    while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 2) {
    }
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  pthread_join(other, NULL);
  cpu_set_t both;
  CPU_ZERO(&both);
  CPU_SET(0, &both);
  CPU_SET(1, &both);
  sched_setaffinity(0, sizeof both, &both);
  return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n;
}

#ifndef PINGPONG_LIBRARY_ONLY
int main(int argc, char** argv) {
  printf("%.1f ns a round trip\n", pingpong(argc > 1 ? atol(argv[1]) : 200000));
  return 0;
}
#endif
