// Runs the kernels of a cuda/*.cu source on the CPU, for tests/test_kernels_emulated.py.
//
// Built as a shared library by the test with two macros on the command line:
//   HEDGEROW_EMU_SOURCE        the .cu file to include, as a string literal ("/path/x.cu");
//   HEDGEROW_EMU_KERNELS(X)    X(name) for each extern "C" kernel of that file.
// It exports emu_launch(name, grid x/y/z, block threads, args), args being pointers to each
// kernel argument as cuda.core's launch takes them; it returns 0, -1 on a deadlock, -2 for a bad
// block size and -3 for an unknown kernel.
//
// Host emulation of the CUDA subset that cuda/*.cu use: every CUDA thread of a block is a fiber
// (ucontext) on one OS thread, blocks run one after another, __shared__ is a static, barriers and
// warp shuffles are cooperative. A barrier that cannot complete (divergent __syncthreads, a shuffle
// with exited lanes) is reported as a deadlock instead of hanging.
#define HEDGEROW_HOST_EMULATION 1
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <ucontext.h>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct hr_dim3 { unsigned x, y, z; };
static hr_dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __int_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float hr_f16_to_f32(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short hr_f32_to_f16(float f) { _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h; }

namespace emu {
constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 256 * 1024;
struct Fiber { ucontext_t ctx; std::vector<char> stack; bool done; };
static ucontext_t g_sched;
static Fiber* g_fibers;
static int g_nthreads, g_cur;
static unsigned long long g_progress;
static int g_arrived[kMaxThreads / 32 + 2];         // [0..31] warps, [32] __syncthreads, [33] block end
static unsigned long long g_gen[kMaxThreads / 32 + 2];
static unsigned long long g_xchg[kMaxThreads / 32][32];
static void (*g_body)(void**);
static void** g_args;

inline void yield() { swapcontext(&g_fibers[g_cur].ctx, &g_sched); }
inline void barrier(int id, int size) {
  ++g_progress;
  if (++g_arrived[id] == size) { g_arrived[id] = 0; ++g_gen[id]; return; }
  const unsigned long long gen = g_gen[id];
  const unsigned tid = threadIdx.x;
  while (g_gen[id] == gen) yield();
  threadIdx.x = tid;
}
static void fiber_main() {
  const int tid = g_cur;
  for (unsigned z = 0; z < gridDim.z; ++z)
    for (unsigned y = 0; y < gridDim.y; ++y)
      for (unsigned x = 0; x < gridDim.x; ++x) {
        blockIdx = {x, y, z};
        threadIdx = {(unsigned)tid, 0, 0};
        g_body(g_args);
        barrier(kMaxThreads / 32 + 1, g_nthreads);   // block end (its own counter)
      }
  ++g_progress;
  g_fibers[tid].done = true;
}
// Runs the grid; returns 0, or -1 on deadlock.
inline int run(void (*body)(void**), void** args, hr_dim3 grid, int block) {
  if (block <= 0 || block > kMaxThreads || block % 32) return -2;
  g_body = body; g_args = args; gridDim = grid; blockDim = {(unsigned)block, 1, 1}; g_nthreads = block;
  std::memset(g_arrived, 0, sizeof g_arrived);
  std::vector<Fiber> fibers(block);
  g_fibers = fibers.data();
  for (int i = 0; i < block; ++i) {
    Fiber& f = fibers[i];
    f.stack.resize(kStack); f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data(); f.ctx.uc_stack.ss_size = kStack; f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (;;) {
    bool all_done = true;
    const unsigned long long before = g_progress;
    for (int i = 0; i < block; ++i) {
      if (fibers[i].done) continue;
      all_done = false;
      g_cur = i;
      threadIdx = {(unsigned)i, 0, 0};
      swapcontext(&g_sched, &fibers[i].ctx);
    }
    if (all_done) return 0;
    if (g_progress == before) {
      std::fprintf(stderr, "emulation deadlock in block (%u,%u,%u)\n", blockIdx.x, blockIdx.y, blockIdx.z);
      return -1;
    }
  }
}
}  // namespace emu

inline void __syncthreads() { emu::barrier(emu::kMaxThreads / 32, blockDim.x); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::barrier(threadIdx.x >> 5, 32); }
template <typename T> inline T hr_shfl(T v, int src_lane) {
  const unsigned w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::g_xchg[w][lane] = bits;
  __syncwarp();
  bits = emu::g_xchg[w][src_lane & 31];
  __syncwarp();
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int m) { return hr_shfl(v, (threadIdx.x & 31) ^ m); }

#include HEDGEROW_EMU_SOURCE

namespace emu {
template <auto F> struct Body;
template <typename... A, void (*F)(A...)> struct Body<F> {
  template <size_t... I> static void call(void** a, std::index_sequence<I...>) { F(*static_cast<A*>(a[I])...); }
  static void run(void** a) { call(a, std::index_sequence_for<A...>{}); }
};
struct Entry { const char* name; void (*run)(void**); };
}  // namespace emu
#define HEDGEROW_EMU_ENTRY(name) {#name, &emu::Body<&name>::run},
static const emu::Entry kEntries[] = { HEDGEROW_EMU_KERNELS(HEDGEROW_EMU_ENTRY) };
extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, int block, void** args) {
  for (const emu::Entry& e : kEntries)
    if (std::strcmp(e.name, name) == 0) return emu::run(e.run, args, hr_dim3{gx, gy, gz}, block);
  return -3;
}
