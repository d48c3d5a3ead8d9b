// Splitting a kernel's items over threads only when each thread gets enough work to pay for it.
//
// at::parallel_for (torch's intra-op pool: it follows torch.set_num_threads and runs serially when called from
// inside another parallel region) splits [0, n) into at most ceil(n / grain) equal chunks, one per thread, and runs
// on the calling thread alone when n <= grain. The kernels here give it a grain computed from the work of their
// items: a call of at most kMinWorkPerThread multiply-adds runs on the calling thread, a larger one in at most
// ceil(work / kMinWorkPerThread) equal chunks. Starting a parallel region and meeting at its end costs microseconds on an idle machine and up to a
// scheduler time slice when the cores are shared (a woken worker waits for a core, the others spin at the
// barrier), more than a second thread saves on a small call (a few heads, tens of queries, a handful of window
// entries each). The split never changes results: every output element is computed by one thread, in the same
// order, whatever the chunking.
//
// serial_begin / serial_end scope a whole small call (its kernels and the torch operators it runs) to the calling
// thread: with torch's OpenMP backend at::get_num_threads() reads the calling thread's own OpenMP thread count
// (omp_get_max_threads), which omp_set_num_threads changes for that thread only, and MKL (torch's vectorised
// math and GEMMs) has a per-thread count of its own; other threads, and this one after serial_end, keep theirs.
#pragma once

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#if AT_PARALLEL_OPENMP && defined(_OPENMP)
#include <omp.h>
#endif
#if AT_MKL_ENABLED() && defined(__GNUC__)
// MKL's C call for the calling thread's own thread count (0: MKL's global one); weak, so that a torch whose MKL
// does not export it still loads the module (the count then stays as it is)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

namespace sparse_bias {

// The fewest multiply-adds one thread gets (some 30-100 us of the window kernels' arithmetic on one core).
constexpr int64_t kMinWorkPerThread = int64_t(1) << 18;

// The calls that ran on more than one thread since the module loaded (parallel_calls() in Python).
inline std::atomic<int64_t> parallel_call_count{0};

// The grain for n items that cost `work` multiply-adds in all: ceil(kMinWorkPerThread / work per item), n (one
// chunk) when the whole holds no more than kMinWorkPerThread.
inline int64_t work_grain(int64_t n, double work) {
  if (n <= 1 || work <= 0) return std::max<int64_t>(n, 1);
  const double per_item = work / static_cast<double>(n);
  const double grain = static_cast<double>(kMinWorkPerThread) / per_item;
  return grain >= static_cast<double>(n) ? n : std::max<int64_t>(1, static_cast<int64_t>(grain + 0.999999));
}

// at::parallel_for over [0, n) with the grain of `work` multiply-adds in all.
template <class F>
inline void parallel_items(int64_t n, double work, const F& f) {
  const int64_t grain = work_grain(n, work);
  if (n > grain && n > 1 && at::get_num_threads() > 1 && !at::in_parallel_region())
    parallel_call_count.fetch_add(1, std::memory_order_relaxed);
  at::parallel_for(0, n, grain, f);
}

// What serial_end restores: the calling thread's OpenMP thread count (0: unchanged) and its MKL thread count
// (MKL's own threading, used by torch's vectorised exp / log and its GEMMs; -1: unchanged).
using SerialState = std::pair<int64_t, int64_t>;

// Runs the calling thread's parallel regions -- torch's at::parallel_for and MKL's -- on one thread until
// serial_end. Changes nothing when the thread already runs one thread or torch's pool is not OpenMP.
inline SerialState serial_begin() {
  SerialState state{0, -1};
#if AT_PARALLEL_OPENMP && defined(_OPENMP)
  at::internal::lazy_init_num_threads();   // torch's per-thread setup first, so that it does not undo the change
  const int threads = omp_get_max_threads();
  if (threads <= 1) return state;
  omp_set_num_threads(1);
  state.first = threads;
#if AT_MKL_ENABLED() && defined(__GNUC__)
  if (MKL_Set_Num_Threads_Local) state.second = MKL_Set_Num_Threads_Local(1);
#endif
#endif
  return state;
}

// Gives the calling thread back the thread counts serial_begin changed.
inline void serial_end(SerialState state) {
#if AT_PARALLEL_OPENMP && defined(_OPENMP)
  if (state.first > 1) omp_set_num_threads(static_cast<int>(state.first));
#if AT_MKL_ENABLED() && defined(__GNUC__)
  if (state.second >= 0 && MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(static_cast<int>(state.second));
#endif
#endif
  (void)state;
}

}  // namespace sparse_bias
