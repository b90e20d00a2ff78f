// A standalone probe (bench/NOTES.md, session 21): what moving cache lines between the machine's first
// two CPUs costs. Thread A (CPU 0) writes a buffer, thread B (CPU 1) reads it, then A writes it again:
// the read takes lines A holds modified, the rewrite must take back lines B holds shared. On the Zen 4
// VM, 64 KiB: read 1.1 us and rewrite 7.2 with the two vCPUs on one CCD, 7.4 and 33 on two.
// Build and run:   gcc -O2 -mavx512f -o vcpu_transfer vcpu_transfer.c -lpthread
//                  ./vcpu_transfer BYTES METHOD    (METHOD 0: vector loads; 1: a prefetch burst first;
//                                                   2: one scalar load a line)
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static _Alignas(64) atomic_long phase;
static float* buf;
static long floats, rounds = 2000;
static int method;
static double read_ns, write_ns, rewrite_ns;
volatile float sink;

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

static void wait_for(long value) {
  while (atomic_load_explicit(&phase, memory_order_acquire) != value) {
  }
}

static void* reader(void* unused) {  // CPU 1: reads the buffer A has just written
  (void)unused;
  pin(1);
  for (long r = 0; r < rounds; r++) {
    wait_for(3 * r + 1);
    const double t0 = now_ns();
    float s = 0;
    if (method == 1)
      for (long i = 0; i < floats; i += 16) _mm_prefetch((const char*)(buf + i), _MM_HINT_T0);
    if (method == 2) {
      for (long i = 0; i < floats; i += 16) s += buf[i];
    } else {
      __m512 acc = _mm512_setzero_ps();
      for (long i = 0; i < floats; i += 16) acc = _mm512_add_ps(acc, _mm512_load_ps(buf + i));
      s += _mm512_reduce_add_ps(acc);
    }
    sink = s;
    read_ns += now_ns() - t0;
    atomic_store_explicit(&phase, 3 * r + 2, memory_order_release);
  }
  return NULL;
}

static void write_all(float value) {
  const __m512 v = _mm512_set1_ps(value);
  for (long i = 0; i < floats; i += 16) _mm512_store_ps(buf + i, v);
}

int main(int argc, char** argv) {
  const long bytes = argc > 1 ? atol(argv[1]) : 65536;
  method = argc > 2 ? atoi(argv[2]) : 0;
  floats = bytes / 4;
  buf = aligned_alloc(64, bytes);
  memset(buf, 0, bytes);
  pthread_t other;
  pthread_create(&other, NULL, reader, NULL);
  pin(0);
  for (long r = 0; r < rounds; r++) {
    double t0 = now_ns();
    write_all(r);  // lines A itself rewrote last (the previous round's rewrite): local
    write_ns += now_ns() - t0;
    atomic_store_explicit(&phase, 3 * r + 1, memory_order_release);
    wait_for(3 * r + 2);
    t0 = now_ns();
    write_all(r + 0.5f);  // lines B has just read: each must be taken back from B's cache
    rewrite_ns += now_ns() - t0;
    atomic_store_explicit(&phase, 3 * r + 3, memory_order_release);
  }
  pthread_join(other, NULL);
  printf("%ld bytes, method %d: B reads %.2f us; A rewrites what B read %.2f us; A writes its own lines %.2f us\n",
         bytes, method, read_ns / rounds / 1e3, rewrite_ns / rounds / 1e3, write_ns / rounds / 1e3);
  return 0;
}
