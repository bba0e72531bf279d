// Decode-step kernels of the TensorFlow backend, called from its XLA programs as custom calls
// (see tf_matvec.py):
//
// * slm_matvec: out[b, n] = sum_k x[b, k] * w[n, k] for the B rows decoding together, against a
//   row-major [out, in] float32 weight matrix (the block matrices and GPT-2's head);
// * slm_attention: each row's attention over its own slot's cells 0..position, read in place from the
//   KV cache.
//
// Why not XLA's own ops: its dot for one row (a matrix-vector product) gives other bits than its dot
// for 2+ rows, so a request alone would not get the answer it gets next to others; running a lone row
// beside a dummy twin paid the slower 2-row kernel (GPT-2 124M: 0.67x of transformers' XLA generate).
// Here every output is computed by the same instructions in the same order whatever B is and whatever
// thread does it, and the weights are read from memory once per step for all B rows (a block of weight
// rows stays in cache while each group of x rows passes over it), so 3 rows cost little more than 1.
//
// Built at first use by tf_matvec.py with -march=native (the bits are fixed per machine, which is all
// the invariance needs) and registered with XLA's CPU custom-call registry.
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

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
    // (Past the last row this points beyond the matrix: prefetches never fault.)
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

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// One helper thread takes the second half of the work: one thread alone does not reach the memory
// bandwidth of this 2-core machine (GPT-2 124M's matrices: 37 ms a step alone, 20 with help; XLA's
// own matrix-vector kernel uses both cores too). It spins briefly between calls (the calls of a step
// come close together), then sleeps. Which half a thread computes never changes an output's bits.
typedef void (*Part)(const void* args, int half);  // half 0: the caller's, half 1: the helper's

struct Helper {
  std::mutex busy;  // one caller at a time; a second one computes alone
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<int> job{0}, done{0};
  Part part = nullptr;
  const void* args = nullptr;

  Helper() { std::thread([this] { loop(); }).detach(); }
  void loop() {
    int seen = 0;
    for (;;) {
      for (int spin = 0; spin < 4000 && job.load(std::memory_order_acquire) == seen; ++spin) relax();
      if (job.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return job.load(std::memory_order_acquire) != seen; });
      }
      seen = job.load(std::memory_order_acquire);
      part(args, 1);
      done.store(seen, std::memory_order_release);
    }
  }
};

std::atomic<int> g_threads{1};

Helper* helper() {
  static Helper* h = new Helper();  // never destroyed: XLA may call in until the process exits
  return h;
}

// Runs part(args, 0) here and part(args, 1) on the helper; both here if the work is small, there is
// one core, or another caller has the helper.
void split(Part part, const void* args, bool worth_it) {
  std::unique_lock<std::mutex> use;
  if (worth_it && g_threads.load() >= 2) use = std::unique_lock<std::mutex>(helper()->busy, std::try_to_lock);
  if (!use.owns_lock()) {
    part(args, 0);
    part(args, 1);
    return;
  }
  Helper* h = helper();
  h->part = part;
  h->args = args;
  const int id = h->job.load() + 1;
  {
    std::lock_guard<std::mutex> lock(h->mu);
    h->job.store(id, std::memory_order_release);
  }
  h->cv.notify_one();
  part(args, 0);
  while (h->done.load(std::memory_order_acquire) != id) relax();
}

struct MatvecArgs {
  const float* x;
  const float* w;
  float* out;
  int B, K, N;
};

void matvec_half(const void* p, int half) {
  const MatvecArgs& a = *static_cast<const MatvecArgs*>(p);
  const int mid = a.N / 2;
  if (half == 0) rows(a.x, a.w, a.out, a.B, a.K, a.N, 0, mid);
  else rows(a.x, a.w, a.out, a.B, a.K, a.N, mid, a.N);
}

// Decode attention of B rows, one (row, head) at a time, straight from the KV cache [S, H, C, D]:
// scores of cells 0..pos (no window, no mask: the cells a query may see are the only ones read, so the
// bits depend on neither the row count nor the compiled window), softmax, weighted sum of values.
struct AttentionArgs {
  const float* q;       // [B, H, D]
  const float* keys;    // [S, H, C, D]
  const float* values;  // [S, H, C, D]
  const int* slots;     // [B]
  const int* positions; // [B]
  float* out;           // [B, H, D]
  float* scratch;       // [B, H, C]
  int B, H, D, S, C;
};

void attend(const AttentionArgs& a, int task) {
  const int b = task / a.H, h = task % a.H, D = a.D;
  const int slot = a.slots[b] < 0 ? 0 : (a.slots[b] >= a.S ? a.S - 1 : a.slots[b]);
  const int last = a.positions[b] < 0 ? 0 : (a.positions[b] >= a.C ? a.C - 1 : a.positions[b]);
  const size_t head = (static_cast<size_t>(slot) * a.H + h) * a.C;
  const float* q = a.q + static_cast<size_t>(task) * D;
  float* score = a.scratch + static_cast<size_t>(task) * a.C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int dv = D - D % kLanes;
  float top = -INFINITY;
  for (int c = 0; c <= last; ++c) {
    const float* k = a.keys + (head + c) * D;
    v16 acc = {};
    for (int d = 0; d < dv; d += kLanes) acc += load(k + d) * load(q + d);
    score[c] = finish(acc, k, q, dv, D) * scale;
    top = score[c] > top ? score[c] : top;
  }
  float total = 0.f;
  for (int c = 0; c <= last; ++c) {
    score[c] = std::exp(score[c] - top);
    total += score[c];
  }
  float* o = a.out + static_cast<size_t>(task) * D;
  for (int d = 0; d < D; ++d) o[d] = 0.f;
  for (int c = 0; c <= last; ++c) {
    const float p = score[c] / total;
    const float* v = a.values + (head + c) * D;
    for (int d = 0; d < D; ++d) o[d] += p * v[d];
  }
}

void attention_half(const void* p, int half) {
  const AttentionArgs& a = *static_cast<const AttentionArgs*>(p);
  const int tasks = a.B * a.H, mid = tasks / 2;
  for (int t = half == 0 ? 0 : mid; t < (half == 0 ? mid : tasks); ++t) attend(a, t);
}

}  // namespace

// XLA's CPU custom-call ABI (API_VERSION_STATUS_RETURNING_UNIFIED, what TensorFlow's XlaCustomCallV2
// emits): inputs in order, one output buffer, and an opaque string of sizes written by tf_matvec.py from
// the static shapes it traced.

// in: x [B, K], w [N, K]; opaque "B K N"; out [B, N].
extern "C" __attribute__((visibility("default"))) void slm_matvec(void* out, const void** in, const char* opaque,
                                                                  size_t opaque_len, void* /*status*/) {
  int B = 0, K = 0, N = 0;
  const std::string sizes(opaque, opaque_len);
  if (std::sscanf(sizes.c_str(), "%d %d %d", &B, &K, &N) != 3) return;
  const MatvecArgs args{static_cast<const float*>(in[0]), static_cast<const float*>(in[1]), static_cast<float*>(out),
                        B, K, N};
  split(matvec_half, &args, N >= 2 * kBlockRows);
}

// in: q [B, H, D], keys and values [S, H, C, D], slots [B], positions [B]; opaque "B H D S C"; out [B, H, D].
extern "C" __attribute__((visibility("default"))) void slm_attention(void* out, const void** in, const char* opaque,
                                                                     size_t opaque_len, void* /*status*/) {
  int B = 0, H = 0, D = 0, S = 0, C = 0;
  const std::string sizes(opaque, opaque_len);
  if (std::sscanf(sizes.c_str(), "%d %d %d %d %d", &B, &H, &D, &S, &C) != 5) return;
  std::vector<float> scratch(static_cast<size_t>(B) * H * C);
  const AttentionArgs args{static_cast<const float*>(in[0]), static_cast<const float*>(in[1]),
                           static_cast<const float*>(in[2]), static_cast<const int*>(in[3]),
                           static_cast<const int*>(in[4]), static_cast<float*>(out), scratch.data(), B, H, D, S, C};
  long cells = 0;  // the work: cells read over all rows and heads
  for (int b = 0; b < B; ++b) cells += static_cast<long>(args.positions[b] + 1) * H;
  split(attention_half, &args, cells * D >= 64 * 1024);
}

extern "C" __attribute__((visibility("default"))) int slm_matvec_register(int threads) {
  g_threads.store(threads);
  auto* registry = xla::CustomCallTargetRegistry::Global();
  registry->Register("slm_matvec", reinterpret_cast<void*>(&slm_matvec), "Host");
  registry->Register("slm_attention", reinterpret_cast<void*>(&slm_attention), "Host");
  return 1;
}
