// Decode-step matrix products for the TensorFlow backend, as an XLA custom call (see tf_matvec.py).
//
// out[b, n] = sum_k x[b, k] * w[n, k] for B rows of x (B = 1..8, the rows decoding together) against a
// row-major [out, in] float32 weight matrix. Why not XLA's own dot: its kernel for one row (a
// matrix-vector product) gives other bits than its kernel for 2+ rows, so a request alone would not
// get the answer it gets next to others; running a lone row beside a dummy twin paid the slower
// 2-row kernel (GPT-2 124M: 0.67x of transformers' XLA generate). Here every (b, n) is computed by the
// same instructions in the same order whatever B is, whatever thread does it, and the weights are read
// from memory once per step for all B rows (a block of weight rows stays in cache while each group of
// x rows passes over it), so 3 rows cost little more than 1.
//
// Built at first use by tf_matvec.py with -march=native (the bits are fixed per machine, which is all
// the invariance needs) and registered with XLA's CPU custom-call registry.
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#include "xla/service/custom_call_target_registry.h"

namespace {

typedef float v16 __attribute__((vector_size(64)));                // 16 partial sums of one dot product
typedef float v16u __attribute__((vector_size(64), aligned(4)));   // the same, read from unaligned memory
constexpr int kLanes = 16;
constexpr int kBlockRows = 64;  // weight rows kept in cache while every group of x rows passes over them
constexpr int kPrefetchRows = 8;  // software prefetch this many weight rows ahead (measured: 8 > 4 > none)

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }

// The one place a dot product is finished: a fixed pairwise tree over the 16 lanes, then the tail of K.
inline float finish(v16 acc, const float* w, const float* x, int k0, int K) {
  float t[kLanes];
  for (int j = 0; j < kLanes; ++j) t[j] = acc[j];
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) t[j] += t[j + width];
  float s = t[0];
  for (int k = k0; k < K; ++k) s += w[k] * x[k];
  return s;
}

// NR weight rows from n against NB rows of x: NR * NB independent dot products, each summed per lane
// in k order. NR and NB only change how many run side by side, not any one's arithmetic.
template <int NB, int NR>
inline void tile(const float* x, const float* w, float* out, int K, int N, int n) {
  const int kv = K - K % kLanes;
  const float* wn = w + static_cast<size_t>(n) * K;
  v16 acc[NB][NR] = {};
  for (int k = 0; k < kv; k += kLanes) {
    for (int r = 0; r < NR; ++r) __builtin_prefetch(wn + static_cast<size_t>(r + kPrefetchRows) * K + k, 0, 3);
    v16 wr[NR];
    for (int r = 0; r < NR; ++r) wr[r] = load(wn + static_cast<size_t>(r) * K + k);
    for (int b = 0; b < NB; ++b) {
      const v16 xv = load(x + static_cast<size_t>(b) * K + k);
      for (int r = 0; r < NR; ++r) acc[b][r] += wr[r] * xv;
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < NR; ++r)
      out[static_cast<size_t>(b) * N + n + r] =
          finish(acc[b][r], wn + static_cast<size_t>(r) * K, x + static_cast<size_t>(b) * K, kv, K);
}

template <int NB>
void group(const float* x, const float* w, float* out, int K, int N, int n0, int n1) {
  int n = n0;
  for (; n + 4 <= n1; n += 4) tile<NB, 4>(x, w, out, K, N, n);
  for (; n < n1; ++n) tile<NB, 1>(x, w, out, K, N, n);
}

// Weight rows n0..n1 for all B rows of x.
void rows(const float* x, const float* w, float* out, int B, int K, int N, int n0, int n1) {
  for (int m0 = n0; m0 < n1; m0 += kBlockRows) {
    const int m1 = m0 + kBlockRows < n1 ? m0 + kBlockRows : n1;
    for (int b = 0; b < B; b += 4) {  // at most 4 x rows at a time: 16 accumulators fit the registers
      const float* xb = x + static_cast<size_t>(b) * K;
      float* ob = out + static_cast<size_t>(b) * N;
      switch (B - b < 4 ? B - b : 4) {
        case 1: group<1>(xb, w, ob, K, N, m0, m1); break;
        case 2: group<2>(xb, w, ob, K, N, m0, m1); break;
        case 3: group<3>(xb, w, ob, K, N, m0, m1); break;
        default: group<4>(xb, w, ob, K, N, m0, m1); break;
      }
    }
  }
}

// One helper thread takes the second half of the weight rows: one thread alone does not reach the
// memory bandwidth of this 2-core machine (GPT-2 124M's matrices: 37 ms a step alone, 20 with help;
// XLA's own matrix-vector kernel uses both cores too). It spins briefly between calls (the calls of a
// step come close together), then sleeps.
struct Helper {
  std::mutex busy;  // one caller at a time; a second one computes alone
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<int> job{0}, done{0};
  const float* x = nullptr;
  const float* w = nullptr;
  float* out = nullptr;
  int B = 0, K = 0, N = 0, n0 = 0, n1 = 0;

  Helper() { std::thread([this] { loop(); }).detach(); }
  void loop() {
    int seen = 0;
    for (;;) {
      for (int spin = 0; spin < 4000 && job.load(std::memory_order_acquire) == seen; ++spin) __builtin_ia32_pause();
      if (job.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return job.load(std::memory_order_acquire) != seen; });
      }
      seen = job.load(std::memory_order_acquire);
      rows(x, w, out, B, K, N, n0, n1);
      done.store(seen, std::memory_order_release);
    }
  }
};

std::atomic<int> g_threads{1};

Helper* helper() {
  static Helper* h = new Helper();  // never destroyed: XLA may call in until the process exits
  return h;
}

void matvec(const float* x, const float* w, float* out, int B, int K, int N) {
  if (g_threads.load() < 2 || N < 2 * kBlockRows) return rows(x, w, out, B, K, N, 0, N);
  Helper* h = helper();
  std::unique_lock<std::mutex> use(h->busy, std::try_to_lock);
  if (!use.owns_lock()) return rows(x, w, out, B, K, N, 0, N);
  const int mid = N / 2;
  h->x = x; h->w = w; h->out = out; h->B = B; h->K = K; h->N = N; h->n0 = mid; h->n1 = N;
  const int id = h->job.load() + 1;
  {
    std::lock_guard<std::mutex> lock(h->mu);
    h->job.store(id, std::memory_order_release);
  }
  h->cv.notify_one();
  rows(x, w, out, B, K, N, 0, mid);
  while (h->done.load(std::memory_order_acquire) != id) __builtin_ia32_pause();
}

}  // namespace

// XLA's CPU custom-call ABI (API_VERSION_STATUS_RETURNING_UNIFIED, what TensorFlow's XlaCustomCallV2
// emits): in[0] is x [B, K], in[1] is w [N, K]; the opaque string is "B K N", written by tf_matvec.py
// from the static shapes it traced.
extern "C" __attribute__((visibility("default"))) void slm_matvec(void* out, const void** in, const char* opaque, size_t opaque_len, void* /*status*/) {
  int B = 0, K = 0, N = 0;
  const std::string shape(opaque, opaque_len);
  if (std::sscanf(shape.c_str(), "%d %d %d", &B, &K, &N) != 3) return;
  matvec(static_cast<const float*>(in[0]), static_cast<const float*>(in[1]), static_cast<float*>(out), B, K, N);
}

extern "C" __attribute__((visibility("default"))) int slm_matvec_register(int threads) {
  g_threads.store(threads);
  xla::CustomCallTargetRegistry::Global()->Register("slm_matvec", reinterpret_cast<void*>(&slm_matvec), "Host");
  return 1;
}
