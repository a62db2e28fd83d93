// ms_diffusion's CPU kernels: oneDNN primitives with the layouts oneDNN picks (format_tag::any, the
// blocked nChw16c / nChw8c layouts PyTorch's CPU convolutions run on), behind MindSpore's "aot" Custom
// operator interface. MindSpore's own CPU convolution asks oneDNN for plain NCHW, which selects its
// slow gemm-based kernels; the whole gain here is the layout choice.
//
// Every entry point has MindSpore's aot signature: inputs then outputs in `params`, fp32, NCHW. The
// last input of each is an int64 vector of the convolution's settings (see ConvSpec). Primitives are
// built once per (shapes, settings) and kept; execution runs on our own small thread pool, because the
// libdnnl.so.3 MindSpore ships (the one loaded in the process, so the one we link) is a threadpool build.
#include <dnnl.hpp>
#include <dnnl_threadpool.h>
#include <dnnl_threadpool_iface.hpp>

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Thread pool: n - 1 workers plus the calling thread. One parallel_for at a time (a mutex), since
// MindSpore may launch independent kernels from several threads.
class Pool : public dnnl::threadpool_interop::threadpool_iface {
 public:
  explicit Pool(int n) : n_(n < 1 ? 1 : n) {
    for (int t = 1; t < n_; ++t) workers_.emplace_back([this] { Work(); });
  }
  // Workers inherit the affinity of the thread that built the pool (possibly a pinned MindSpore
  // thread); let them run on any core of the process.
  void Unpin(const cpu_set_t &set) {
    for (auto &w : workers_) pthread_setaffinity_np(w.native_handle(), sizeof(set), &set);
  }
  ~Pool() override {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto &w : workers_) w.join();
  }
  int get_num_threads() const override { return n_; }
  bool get_in_parallel() const override { return inside_; }
  uint64_t get_flags() const override { return 0; }

  void parallel_for(int n, const std::function<void(int, int)> &fn) override {
    if (n <= 0) return;
    if (n == 1 || n_ == 1 || inside_) {
      for (int i = 0; i < n; ++i) fn(i, n);
      return;
    }
    std::lock_guard<std::mutex> serial(submit_);
    {
      std::lock_guard<std::mutex> lock(m_);
      fn_ = &fn;
      total_ = n;
      next_.store(0);
      done_ = 0;
      ++generation_;
    }
    cv_.notify_all();
    RunShare();
    std::unique_lock<std::mutex> lock(m_);
    finished_.wait(lock, [this] { return done_ == total_; });
    fn_ = nullptr;
  }

 private:
  void RunShare() {
    inside_ = true;
    int count = 0;
    for (int i = next_.fetch_add(1); i < total_; i = next_.fetch_add(1)) {
      (*fn_)(i, total_);
      ++count;
    }
    inside_ = false;
    if (count) {
      std::lock_guard<std::mutex> lock(m_);
      done_ += count;
      if (done_ == total_) finished_.notify_all();
    }
  }
  void Work() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(m_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (fn_ == nullptr) continue;
      }
      RunShare();
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex submit_, m_;
  std::condition_variable cv_, finished_;
  const std::function<void(int, int)> *fn_ = nullptr;
  std::atomic<int> next_{0};
  int total_ = 0, done_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  static thread_local bool inside_;
};
thread_local bool Pool::inside_ = false;

// The cores the process may use: the main thread's affinity (getpid()), not the calling thread's --
// MindSpore pins its graph-mode actor threads, and a pool sized or placed by theirs runs on one core.
bool ProcessCpus(cpu_set_t *set) { return sched_getaffinity(getpid(), sizeof(*set), set) == 0 && CPU_COUNT(set) > 0; }

// Threads: MS_DIFFUSION_KERNEL_THREADS (ms_diffusion.kernels sets it from Python's view of the process),
// else the cores this process may run on. Not OMP_NUM_THREADS: MindSpore's runtime sets it to 1 for
// itself, in the C environment only.
int PoolSize() {
  const char *env = std::getenv("MS_DIFFUSION_KERNEL_THREADS");
  if (env && std::atoi(env) > 0) return std::atoi(env);
  cpu_set_t set;
  if (ProcessCpus(&set)) return CPU_COUNT(&set);
  int n = static_cast<int>(std::thread::hardware_concurrency());
  return n < 1 ? 1 : n;
}

struct Runtime {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  Pool pool{PoolSize()};
  dnnl::stream stream;
  Runtime() {
    cpu_set_t cpus;
    if (ProcessCpus(&cpus)) pool.Unpin(cpus);
    dnnl_stream_t s = nullptr;
    dnnl_threadpool_interop_stream_create(&s, engine.get(), &pool);
    stream = dnnl::stream(s);
  }
};

Runtime &Rt() {
  static Runtime rt;
  return rt;
}

// ---------------------------------------------------------------------------------------------
// Convolution settings, the op's last input: stride h, w; padding top, left, bottom, right;
// dilation h, w (1 = none); groups.
struct ConvSpec {
  int64_t stride[2], pad_l[2], pad_r[2], dilation[2], groups;
  explicit ConvSpec(const int64_t *p)
      : stride{p[0], p[1]}, pad_l{p[2], p[3]}, pad_r{p[4], p[5]}, dilation{p[6], p[7]}, groups(p[8]) {}
};

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;
using dims = dnnl::memory::dims;

dims Dims(const int64_t *s, int n) { return dims(s, s + n); }

// Weights (O, C/g, kh, kw) as oneDNN sees them: plain OIHW, or GOIHW when grouped.
dims WeightDims(const dims &w, int64_t g) {
  if (g == 1) return w;
  return {g, w[0] / g, w[1], w[2], w[3]};
}
tag WeightTag(int64_t g) { return g == 1 ? tag::oihw : tag::goihw; }

std::string Key(const char *op, std::initializer_list<const dims *> shapes, const ConvSpec &c) {
  std::string k(op);
  for (const dims *d : shapes) {
    k += '|';
    for (auto v : *d) k += std::to_string(v) + ',';
  }
  const int64_t s[] = {c.stride[0], c.stride[1], c.pad_l[0], c.pad_l[1], c.pad_r[0], c.pad_r[1],
                       c.dilation[0], c.dilation[1], c.groups};
  k += '|';
  for (auto v : s) k += std::to_string(v) + ',';
  return k;
}

// A user tensor (plain layout, MindSpore's buffer) and the layout the primitive wants. When they
// differ the data goes through a reorder into a per-thread scratch buffer.
struct Operand {
  dnnl::memory::desc user, inner;
  dnnl::reorder to_inner, to_user;  // built when the layouts differ
  bool same = true;
  void Init(const dnnl::memory::desc &u, const dnnl::memory::desc &i, bool input) {
    user = u;
    inner = i;
    same = (u == i);
    if (same) return;
    auto &e = Rt().engine;
    if (input)
      to_inner = dnnl::reorder(dnnl::reorder::primitive_desc(e, u, e, i));
    else
      to_user = dnnl::reorder(dnnl::reorder::primitive_desc(e, i, e, u));
  }
};

// Scratch buffers reused across calls (per thread, per slot): no allocation or fresh pages per step.
// Buffers above kKeepBytes are released after the call (TrimScratch): a 512x512 VAE decode should not
// keep hundreds of MB alive, and at that size a fresh allocation costs little next to the work.
constexpr size_t kKeepBytes = size_t(32) << 20;
struct Buffer {
  std::unique_ptr<char[]> data;  // uninitialised: every byte is written before it is read
  size_t size = 0;
};
thread_local Buffer scratch[8];

void *Scratch(int slot, size_t bytes) {
  auto &b = scratch[slot];
  if (b.size < bytes + 64) {
    b.data.reset(new char[bytes + 64]);
    b.size = bytes + 64;
  }
  auto p = reinterpret_cast<uintptr_t>(b.data.get());
  return reinterpret_cast<void *>((p + 63) & ~uintptr_t(63));
}

void TrimScratch() {
  for (auto &b : scratch)
    if (b.size > kKeepBytes) {
      b.data.reset();
      b.size = 0;
    }
}

// Wraps a user pointer; reorders inputs into scratch (slot) when the primitive's layout differs.
dnnl::memory In(Operand &o, void *ptr, int slot) {
  auto &rt = Rt();
  dnnl::memory user(o.user, rt.engine, ptr);
  if (o.same) return user;
  dnnl::memory inner(o.inner, rt.engine, Scratch(slot, o.inner.get_size()));
  o.to_inner.execute(rt.stream, user, inner);
  return inner;
}
dnnl::memory OutInner(Operand &o, void *ptr, int slot) {
  auto &rt = Rt();
  if (o.same) return dnnl::memory(o.user, rt.engine, ptr);
  return dnnl::memory(o.inner, rt.engine, Scratch(slot, o.inner.get_size()));
}
void OutFinish(Operand &o, dnnl::memory &inner, void *ptr) {
  if (o.same) return;
  auto &rt = Rt();
  dnnl::memory user(o.user, rt.engine, ptr);
  o.to_user.execute(rt.stream, inner, user);
}

// 1x1 convolutions (attention projections, skips) are matrix products on NCHW already: blocked layouts
// only add reorders of (often large) outputs there, so they keep MindSpore's plain layout (oneDNN then
// runs them as GEMMs). A fixed rule, not a timing: the same shapes must always take the same kernel.
bool Plain1x1(const dims &w, const ConvSpec &c) {
  return w[2] == 1 && w[3] == 1 && c.stride[0] == 1 && c.stride[1] == 1 && c.pad_l[0] == 0 && c.pad_l[1] == 0 &&
         c.pad_r[0] == 0 && c.pad_r[1] == 0 && c.groups == 1;
}

dnnl::memory::desc Plain(const dims &d) {
  return dnnl::memory::desc(d, dt::f32, d.size() == 4 ? tag::nchw : tag::x);
}

// A convolution as the primitives should see it: activation and weight descriptors (layouts left to
// oneDNN, or plain for 1x1), the bias, MindSpore's weight layout, and the geometry in oneDNN's terms.
struct ConvDescs {
  dnnl::memory::desc x, w, y, bias, user_w;
  dims strides, dilates, pad_l, pad_r;
  ConvDescs(const dims &xs, const dims &ws, const dims &ys, const ConvSpec &c)
      : bias(Plain({ws[0]})),
        user_w(WeightDims(ws, c.groups), dt::f32, WeightTag(c.groups)),
        strides{c.stride[0], c.stride[1]},
        dilates{c.dilation[0] - 1, c.dilation[1] - 1},
        pad_l{c.pad_l[0], c.pad_l[1]},
        pad_r{c.pad_r[0], c.pad_r[1]} {
    const bool plain = Plain1x1(ws, c);
    x = dnnl::memory::desc(xs, dt::f32, plain ? tag::nchw : tag::any);
    y = dnnl::memory::desc(ys, dt::f32, plain ? tag::nchw : tag::any);
    w = dnnl::memory::desc(WeightDims(ws, c.groups), dt::f32, plain ? WeightTag(c.groups) : tag::any);
  }
};

constexpr auto kDirect = dnnl::algorithm::convolution_direct;

dnnl::convolution_forward::primitive_desc ForwardPd(const ConvDescs &d, bool bias) {
  auto &e = Rt().engine;
  const auto train = dnnl::prop_kind::forward_training;
  if (bias)
    return {e, train, kDirect, d.x, d.w, d.bias, d.y, d.strides, d.dilates, d.pad_l, d.pad_r};
  return {e, train, kDirect, d.x, d.w, d.y, d.strides, d.dilates, d.pad_l, d.pad_r};
}

struct Fwd {
  dnnl::convolution_forward prim;
  Operand x, w, y;
};
struct BwdData {
  dnnl::convolution_backward_data prim;
  Operand dy, w, dx;
};
struct BwdWeights {
  dnnl::convolution_backward_weights prim;
  Operand x, dy, dw;
};

// Primitives are built once per (kind, shapes, settings) and kept for the life of the process.
std::mutex cache_mutex;

template <typename T, typename Make>
std::shared_ptr<T> Cached(const std::string &key, Make make) {
  static std::unordered_map<std::string, std::shared_ptr<T>> cache;
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto &slot = cache[key];
  if (!slot) slot = make();
  return slot;
}

std::shared_ptr<Fwd> GetFwd(const dims &x, const dims &w, const dims &y, const ConvSpec &c, bool bias) {
  return Cached<Fwd>(Key(bias ? "fwd_b" : "fwd", {&x, &w, &y}, c), [&] {
    auto f = std::make_shared<Fwd>();
    ConvDescs d(x, w, y, c);
    auto pd = ForwardPd(d, bias);
    f->prim = dnnl::convolution_forward(pd);
    f->x.Init(Plain(x), pd.src_desc(), true);
    f->w.Init(d.user_w, pd.weights_desc(), true);
    f->y.Init(Plain(y), pd.dst_desc(), false);
    return f;
  });
}

std::shared_ptr<BwdData> GetBwdData(const dims &x, const dims &w, const dims &y, const ConvSpec &c) {
  return Cached<BwdData>(Key("bwd_data", {&x, &w, &y}, c), [&] {
    auto b = std::make_shared<BwdData>();
    ConvDescs d(x, w, y, c);
    dnnl::convolution_backward_data::primitive_desc pd(Rt().engine, kDirect, d.x, d.w, d.y, d.strides, d.dilates,
                                                       d.pad_l, d.pad_r, ForwardPd(d, false));
    b->prim = dnnl::convolution_backward_data(pd);
    b->dy.Init(Plain(y), pd.diff_dst_desc(), true);
    b->w.Init(d.user_w, pd.weights_desc(), true);
    b->dx.Init(Plain(x), pd.diff_src_desc(), false);
    return b;
  });
}

std::shared_ptr<BwdWeights> GetBwdWeights(const dims &x, const dims &w, const dims &y, const ConvSpec &c,
                                          bool bias) {
  return Cached<BwdWeights>(Key(bias ? "bwd_w_b" : "bwd_w", {&x, &w, &y}, c), [&] {
    auto b = std::make_shared<BwdWeights>();
    ConvDescs d(x, w, y, c);
    auto hint = ForwardPd(d, bias);
    using Pd = dnnl::convolution_backward_weights::primitive_desc;
    auto &e = Rt().engine;
    Pd pd = bias ? Pd(e, kDirect, d.x, d.w, d.bias, d.y, d.strides, d.dilates, d.pad_l, d.pad_r, hint)
                 : Pd(e, kDirect, d.x, d.w, d.y, d.strides, d.dilates, d.pad_l, d.pad_r, hint);
    b->prim = dnnl::convolution_backward_weights(pd);
    b->x.Init(Plain(x), pd.src_desc(), true);
    b->dy.Init(Plain(y), pd.diff_dst_desc(), true);
    b->dw.Init(d.user_w, pd.diff_weights_desc(), false);
    return b;
  });
}

bool AllF32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam - 1; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "int64") != 0) return false;
  return true;
}

// MS_DIFFUSION_KERNEL_PROFILE=1: time per entry point and shape, printed to stderr at exit (bench/kernels.py).
struct Profile {
  bool on = std::getenv("MS_DIFFUSION_KERNEL_PROFILE") != nullptr;
  std::mutex m;
  std::unordered_map<std::string, std::pair<int64_t, double>> t;
  ~Profile() {
    if (!on) return;
    std::vector<std::pair<std::string, std::pair<int64_t, double>>> rows(t.begin(), t.end());
    std::sort(rows.begin(), rows.end(), [](auto &a, auto &b) { return a.second.second > b.second.second; });
    for (auto &r : rows)
      std::fprintf(stderr, "kernel-profile %10.1f ms %7lld calls  %s\n", r.second.second * 1e3,
                   static_cast<long long>(r.second.first), r.first.c_str());
  }
};
Profile &Prof() {
  static Profile p;
  return p;
}
std::string ShapeKey(const char *name, int nparam, int *ndims, int64_t **shapes) {
  std::string k(name);
  for (int i = 0; i < nparam; ++i) {
    k += ' ';
    for (int d = 0; d < ndims[i]; ++d) k += (d ? "x" : "") + std::to_string(shapes[i][d]);
  }
  return k;
}
struct Timer;
thread_local const Timer *current = nullptr;   // the entry point running on this thread (error messages)

struct Timer {
  const char *name;
  int nparam;
  int *ndims;
  int64_t **shapes;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  Timer(const char *n, int np, int *nd, int64_t **sh) : name(n), nparam(np), ndims(nd), shapes(sh) {}
  ~Timer() {
    current = nullptr;
    auto &p = Prof();
    if (!p.on) return;
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::lock_guard<std::mutex> lock(p.m);
    auto &e = p.t[ShapeKey(name, nparam, ndims, shapes)];
    e.first += 1;
    e.second += dt;
  }
};

// Runs an entry point's body; a failure is reported with the operation and its shapes, and returns 1,
// which MindSpore turns into an error.

template <typename F>
int Guard(F &&body) {
  try {
    body();
    TrimScratch();
    return 0;
  } catch (const dnnl::error &e) {
    std::fprintf(stderr, "ms_diffusion kernel %s: oneDNN error %d: %s\n",
                 current ? ShapeKey(current->name, current->nparam, current->ndims, current->shapes).c_str() : "",
                 static_cast<int>(e.status), e.what());
  } catch (const std::exception &e) {
    std::fprintf(stderr, "ms_diffusion kernel %s: %s\n",
                 current ? ShapeKey(current->name, current->nparam, current->ndims, current->shapes).c_str() : "",
                 e.what());
  }
  return 1;
}

void Conv2dForward(void **params, int64_t **shapes, bool bias) {
  // inputs: x (N,C,H,W), w (O,C/g,kh,kw), [b (O)], spec; output: y (N,O,Ho,Wo)
  int spec_i = bias ? 3 : 2, y_i = spec_i + 1;
  ConvSpec c(static_cast<const int64_t *>(params[spec_i]));
  dims x = Dims(shapes[0], 4), w = Dims(shapes[1], 4), y = Dims(shapes[y_i], 4);
  auto f = GetFwd(x, w, y, c, bias);
  auto &rt = Rt();
  auto xm = In(f->x, params[0], 0);
  auto wm = In(f->w, params[1], 1);
  auto ym = OutInner(f->y, params[y_i], 2);
  std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym}};
  if (bias) args[DNNL_ARG_BIAS] = dnnl::memory(Plain({w[0]}), rt.engine, params[2]);
  f->prim.execute(rt.stream, args);
  OutFinish(f->y, ym, params[y_i]);
  rt.stream.wait();
}

// ---------------------------------------------------------------------------------------------
// GroupNorm on NCHW, written by hand (oneDNN's group normalization is newer than the headers we
// build against, and on plain NCHW it has no fast path). Sums per channel in eight float lanes, across
// channels and samples in double, always in the same order: results do not depend on the thread count.
// Work is split over (n, group) pairs, or (n, channel) pairs.
void ParallelRange(int64_t total, const std::function<void(int64_t, int64_t)> &body) {
  auto &pool = Rt().pool;
  int n = pool.get_num_threads();
  if (total < 2 || n == 1) {
    body(0, total);
    return;
  }
  if (n > total) n = static_cast<int>(total);
  pool.parallel_for(n, [&](int i, int k) { body(total * i / k, total * (i + 1) / k); });
}

// Reductions over a row in 8 interleaved lanes (vectorised; a fixed order, so results do not vary).
inline float RowMax(const float *x, int64_t n, float init) {
  float m[8] = {init, init, init, init, init, init, init, init};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
  for (; j < n; ++j) m[0] = x[j] > m[0] ? x[j] : m[0];
  for (int l = 1; l < 8; ++l) m[0] = m[l] > m[0] ? m[l] : m[0];
  return m[0];
}
inline float RowDot(const float *x, const float *y, int64_t n) {   // y == nullptr: the sum of x
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) s[l] += x[j + l] * (y ? y[j + l] : 1.0f);
  float tail = 0.0f;
  for (; j < n; ++j) tail += x[j] * (y ? y[j] : 1.0f);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}
// sum((x - mean)^2): eight float lanes, the tail and the lanes then summed in double.
inline double RowSquaredDeviation(const float *x, int64_t n, float mean) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += (x[j + l] - mean) * (x[j + l] - mean);
  double sum = 0.0;
  for (; j < n; ++j) sum += (x[j] - mean) * (x[j] - mean);
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  return sum;
}

struct GnShape {
  int64_t n, c, hw, groups, cpg;
  GnShape(const int64_t *x, int nd, int64_t g) : n(x[0]), c(x[1]), hw(1), groups(g), cpg(x[1] / g) {
    for (int i = 2; i < nd; ++i) hw *= x[i];
  }
};

void GnForward(const GnShape &s, const float *x, const float *gamma, const float *beta, float eps,
                      float *y, float *mean_out, float *rstd_out) {
  ParallelRange(s.n * s.groups, [&](int64_t lo, int64_t hi) {
    for (int64_t ng = lo; ng < hi; ++ng) {
      const int64_t g = ng % s.groups, m = s.cpg * s.hw;
      const float *xs = x + ng * m;
      double sum = 0.0, sq = 0.0;   // per channel in float lanes, across channels in double
      for (int64_t cc = 0; cc < s.cpg; ++cc) sum += RowDot(xs + cc * s.hw, nullptr, s.hw);
      const double mean = sum / m;
      const float mean_f = static_cast<float>(mean);
      for (int64_t cc = 0; cc < s.cpg; ++cc) sq += RowSquaredDeviation(xs + cc * s.hw, s.hw, mean_f);
      const double rstd = 1.0 / std::sqrt(sq / m + eps);
      const int64_t n = ng / s.groups;
      for (int64_t cc = 0; cc < s.cpg; ++cc) {   // per channel (N, C): output shapes independent of groups
        mean_out[n * s.c + g * s.cpg + cc] = static_cast<float>(mean);
        rstd_out[n * s.c + g * s.cpg + cc] = static_cast<float>(rstd);
      }
      float *ys = y + ng * m;
      for (int64_t cc = 0; cc < s.cpg; ++cc) {
        const int64_t ch = g * s.cpg + cc;
        const float a = static_cast<float>(rstd * gamma[ch]);
        const float b = static_cast<float>(beta[ch] - mean * rstd * gamma[ch]);
        const float *xc = xs + cc * s.hw;
        float *yc = ys + cc * s.hw;
        for (int64_t i = 0; i < s.hw; ++i) yc[i] = xc[i] * a + b;
      }
    }
  });
}

void GnBackward(const GnShape &s, const float *dy, const float *x, const float *mean, const float *rstd,
                       const float *gamma, float *dx, float *dgamma, float *dbeta) {
  // per (n, channel): sum(dy * x) and sum(dy)
  std::vector<double> ds(s.n * s.c), db(s.n * s.c);
  ParallelRange(s.n * s.c, [&](int64_t lo, int64_t hi) {
    for (int64_t nc = lo; nc < hi; ++nc) {
      const float *d = dy + nc * s.hw, *xs = x + nc * s.hw;
      ds[nc] = RowDot(d, xs, s.hw);
      db[nc] = RowDot(d, nullptr, s.hw);
    }
  });
  for (int64_t ch = 0; ch < s.c; ++ch) {
    double dg = 0.0, dbt = 0.0;
    for (int64_t n = 0; n < s.n; ++n) {
      const int64_t nc = n * s.c + ch;
      dg += (ds[nc] - static_cast<double>(mean[nc]) * db[nc]) * rstd[nc];
      dbt += db[nc];
    }
    dgamma[ch] = static_cast<float>(dg);
    dbeta[ch] = static_cast<float>(dbt);
  }
  ParallelRange(s.n * s.groups, [&](int64_t lo, int64_t hi) {
    for (int64_t ng = lo; ng < hi; ++ng) {
      const int64_t n = ng / s.groups, g = ng % s.groups, m = s.cpg * s.hw;
      const double mu = mean[n * s.c + g * s.cpg], r = rstd[n * s.c + g * s.cpg];
      double s1 = 0.0, s2 = 0.0;   // sum(dy * gamma), sum(dy * gamma * xhat)
      for (int64_t cc = 0; cc < s.cpg; ++cc) {
        const int64_t ch = g * s.cpg + cc, nc = n * s.c + ch;
        s1 += gamma[ch] * db[nc];
        s2 += gamma[ch] * (ds[nc] - mu * db[nc]) * r;
      }
      const double k1 = s1 / m, k2 = s2 / m;
      for (int64_t cc = 0; cc < s.cpg; ++cc) {
        const int64_t ch = g * s.cpg + cc;
        // dx = r * (dy * gamma - k1 - xhat * k2), xhat = (x - mu) * r
        const float a = static_cast<float>(r * gamma[ch]);
        const float b = static_cast<float>(r * r * k2);
        const float c0 = static_cast<float>(-r * k1 + mu * r * r * k2);
        const float *d = dy + (ng * m) + cc * s.hw, *xs = x + (ng * m) + cc * s.hw;
        float *o = dx + (ng * m) + cc * s.hw;
        for (int64_t i = 0; i < s.hw; ++i) o[i] = d[i] * a - xs[i] * b + c0;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// lucidrains' RMSNorm over channels of NCHW, with the Block's optional modulation and SiLU fused in:
//   u = x / max(||x||_C, 1e-12),  v = u * g * sqrt(C),  z = v * (scale + 1) + shift,  y = silu(z) or z
// g (C), scale / shift (N, C) or absent. Saves inv = 1 / max(||x||, 1e-12) per (n, position) for the
// backward. Work is split over the batch; sums run in a fixed order.
struct RmsShape {
  int64_t n, c, hw;
  RmsShape(const int64_t *x, int nd) : n(x[0]), c(x[1]), hw(1) {
    for (int i = 2; i < nd; ++i) hw *= x[i];
  }
};
constexpr int64_t kTile = 64;   // positions processed together (their channel sums side by side)

// exp written so that loops over it vectorise (libm's expf is a scalar call per element, and so is
// nearbyint without -ffast-math): 2^n * e^r, n = round(x / ln2) by the 1.5 * 2^23 trick, |r| <= ln2 / 2,
// a degree-6 polynomial; within 2 ulp of expf over the float range used here.
inline float FastExp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  constexpr float kShift = 12582912.0f;   // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float shifted = x * 1.44269504088896341f + kShift;
  const float n = shifted - kShift;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;   // the integer n, as a float exponent
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float Sigmoid(float z) { return 1.0f / (1.0f + FastExp(-z)); }

void RmsForward(const RmsShape &s, const float *x, const float *g, const float *scale, const float *shift,
                bool silu, float *y, float *inv) {
  const float sc = std::sqrt(static_cast<float>(s.c));
  ParallelRange(s.n, [&](int64_t lo, int64_t hi) {
    float ss[kTile];
    for (int64_t n = lo; n < hi; ++n) {
      const float *xn = x + n * s.c * s.hw;
      float *yn = y + n * s.c * s.hw;
      for (int64_t t0 = 0; t0 < s.hw; t0 += kTile) {
        const int64_t m = std::min(kTile, s.hw - t0);
        for (int64_t i = 0; i < m; ++i) ss[i] = 0.0f;
        for (int64_t ch = 0; ch < s.c; ++ch) {
          const float *xc = xn + ch * s.hw + t0;
          for (int64_t i = 0; i < m; ++i) ss[i] += xc[i] * xc[i];
        }
        float *iv = inv + n * s.hw + t0;
        for (int64_t i = 0; i < m; ++i) iv[i] = 1.0f / std::max(std::sqrt(ss[i]), 1e-12f);
        for (int64_t ch = 0; ch < s.c; ++ch) {
          const float a = g[ch] * sc * (scale ? scale[n * s.c + ch] + 1.0f : 1.0f);
          const float b = shift ? shift[n * s.c + ch] : 0.0f;
          const float *xc = xn + ch * s.hw + t0;
          float *yc = yn + ch * s.hw + t0;
          if (silu) {
            for (int64_t i = 0; i < m; ++i) {
              const float z = xc[i] * iv[i] * a + b;
              yc[i] = z * Sigmoid(z);
            }
          } else {
            for (int64_t i = 0; i < m; ++i) yc[i] = xc[i] * iv[i] * a + b;
          }
        }
      }
    }
  });
}

// One channel of a tile of the backward (the products of one position do not depend on other positions,
// so the loop vectorises): dz = dL/dz, t_* the per-position terms of dscale, dshift and dg, dot += du * u.
template <bool kSilu>
inline void RmsBackwardTile(int64_t m, const float *__restrict xc, const float *__restrict dyc,
                            const float *__restrict iv, float k, float a, float b, float *__restrict dzc,
                            float *__restrict dot, float *__restrict t_sc, float *__restrict t_sh,
                            float *__restrict t_g) {
  for (int64_t i = 0; i < m; ++i) {
    const float u = xc[i] * iv[i];
    const float v = u * a;
    float d = dyc[i];
    if (kSilu) {
      const float z = v * k + b, sg = Sigmoid(z);
      d *= sg * (1.0f + z * (1.0f - sg));
    }
    t_sh[i] = d;
    t_sc[i] = d * v;
    const float dv = d * k;
    t_g[i] = dv * u;
    const float du = dv * a;
    dzc[i] = du;
    dot[i] += du * u;
  }
}

// Outputs dx (x's shape), dg (C), dscale and dshift (N, C; written when scale is given).
void RmsBackward(const RmsShape &s, const float *dy, const float *x, const float *inv, const float *g,
                 const float *scale, const float *shift, bool silu, float *dx, float *dg, float *dscale,
                 float *dshift) {
  const float sc = std::sqrt(static_cast<float>(s.c));
  std::vector<double> dg_part(s.n * s.c, 0.0);   // per sample, summed over the batch in order below
  ParallelRange(s.n, [&](int64_t lo, int64_t hi) {
    float dot[kTile];
    std::vector<float> dz(s.c * kTile);
    for (int64_t n = lo; n < hi; ++n) {
      const float *xn = x + n * s.c * s.hw, *dyn = dy + n * s.c * s.hw;
      float *dxn = dx + n * s.c * s.hw;
      double *dgn = dg_part.data() + n * s.c;
      std::vector<double> dsc(s.c, 0.0), dsh(s.c, 0.0);
      for (int64_t t0 = 0; t0 < s.hw; t0 += kTile) {
        const int64_t m = std::min(kTile, s.hw - t0);
        const float *iv = inv + n * s.hw + t0;
        for (int64_t i = 0; i < m; ++i) dot[i] = 0.0f;
        // dz = dL/dz; du = dz * (scale + 1) * g * sqrt(C); dot = sum_c du * u
        for (int64_t ch = 0; ch < s.c; ++ch) {
          const float k = scale ? scale[n * s.c + ch] + 1.0f : 1.0f;
          const float a = g[ch] * sc;
          const float b = shift ? shift[n * s.c + ch] : 0.0f;
          const float *xc = xn + ch * s.hw + t0, *dyc = dyn + ch * s.hw + t0;
          float *dzc = dz.data() + ch * kTile;
          float t_sc[kTile], t_sh[kTile], t_g[kTile];
          (silu ? RmsBackwardTile<true> : RmsBackwardTile<false>)(m, xc, dyc, iv, k, a, b, dzc, dot, t_sc, t_sh, t_g);
          const double acc_sc = RowDot(t_sc, nullptr, m), acc_sh = RowDot(t_sh, nullptr, m),
                       acc_g = RowDot(t_g, nullptr, m);
          dsc[ch] += acc_sc;
          dsh[ch] += acc_sh;
          dgn[ch] += acc_g * sc;
        }
        for (int64_t ch = 0; ch < s.c; ++ch) {
          const float *xc = xn + ch * s.hw + t0, *dzc = dz.data() + ch * kTile;
          float *dxc = dxn + ch * s.hw + t0;
          for (int64_t i = 0; i < m; ++i) {
            // the clamp (norm below 1e-12) makes inv a constant: no projection term
            const bool clamped = iv[i] >= 1e12f;
            const float u = xc[i] * iv[i];
            dxc[i] = iv[i] * (dzc[i] - (clamped ? 0.0f : u * dot[i]));
          }
        }
      }
      if (scale) {
        for (int64_t ch = 0; ch < s.c; ++ch) {
          dscale[n * s.c + ch] = static_cast<float>(dsc[ch]);
          dshift[n * s.c + ch] = static_cast<float>(dsh[ch]);
        }
      }
    }
  });
  for (int64_t ch = 0; ch < s.c; ++ch) {
    double acc = 0.0;
    for (int64_t n = 0; n < s.n; ++n) acc += dg_part[n * s.c + ch];
    dg[ch] = static_cast<float>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Linear attention (Shen et al.; lucidrains' LinearAttention and the MindSpore tutorial's), the part
// between the qkv projection and the output projection, per (batch, head):
//   p = softmax over features of q (D x N),  k' = softmax over positions of [mem_k | k] (D x T, T = M + N),
//   v' = [mem_v | v] (E x T),  context = k' v'^T * v_scale (D x E),  out = context^T p * scale (E x N)
// qkv (B, 3 H D, N) as the 1x1 projection writes it; mem (2, H, D, M) or none. v_scale is 1, or 1 / N
// (the tutorial divides v by the positions). The products go to oneDNN's sgemm, one (batch, head) per task
// (sequential inside): results do not depend on the thread count. The backward recomputes p, k' and the
// context instead of keeping them.
struct LinAttnShape {
  int64_t b, heads, d, n, m;   // d: features per head (q, k and v alike)
  int64_t T() const { return m + n; }
  int64_t Channels() const { return heads * d; }
};

void Sgemm(char ta, char tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
           const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
  if (dnnl_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) != dnnl_success)
    throw std::runtime_error("oneDNN sgemm failed");
}

// p = softmax over rows (the D features) of q, for every column: vectorised along the columns.
void SoftmaxColumns(const float *q, int64_t rows, int64_t cols, float *p, float *colmax, float *colsum) {
  std::copy(q, q + cols, colmax);
  for (int64_t r = 1; r < rows; ++r)
    for (int64_t i = 0; i < cols; ++i) colmax[i] = std::max(colmax[i], q[r * cols + i]);
  std::fill(colsum, colsum + cols, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < cols; ++i) {
      const float e = FastExp(q[r * cols + i] - colmax[i]);
      p[r * cols + i] = e;
      colsum[i] += e;
    }
  for (int64_t i = 0; i < cols; ++i) colsum[i] = 1.0f / colsum[i];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < cols; ++i) p[r * cols + i] *= colsum[i];
}

// One row: y = softmax([a (na) | b (nb)]).
void SoftmaxRow(const float *a, int64_t na, const float *b, int64_t nb, float *y) {
  const float mx = RowMax(b, nb, RowMax(a, na, -INFINITY));
  for (int64_t j = 0; j < na; ++j) y[j] = FastExp(a[j] - mx);
  for (int64_t j = 0; j < nb; ++j) y[na + j] = FastExp(b[j] - mx);
  const float inv = 1.0f / RowDot(y, nullptr, na + nb);
  for (int64_t j = 0; j < na + nb; ++j) y[j] *= inv;
}

// Per-task buffers: p (D x N), k' (D x T), context (D x E), two D-or-N-long temporaries.
struct LinAttnWork {
  std::vector<float> p, ks, ctx, tmp1, tmp2;
  explicit LinAttnWork(const LinAttnShape &s)
      : p(s.d * s.n), ks(s.d * s.T()), ctx(s.d * s.d), tmp1(std::max(s.n, s.d)), tmp2(std::max(s.n, s.d)) {}
};

// p, k' and the context of one (batch, head); returns q, k, v of it inside qkv.
void LinAttnPrepare(const LinAttnShape &s, const float *qkv, const float *mem, int64_t bh, float v_scale,
                    LinAttnWork &w, const float **q, const float **k, const float **v) {
  const int64_t b = bh / s.heads, h = bh % s.heads, hd = s.Channels();
  *q = qkv + (b * 3 * hd + h * s.d) * s.n;
  *k = *q + hd * s.n;
  *v = *k + hd * s.n;
  const float *mk = mem ? mem + h * s.d * s.m : nullptr, *mv = mem ? mem + (s.heads + h) * s.d * s.m : nullptr;
  SoftmaxColumns(*q, s.d, s.n, w.p.data(), w.tmp1.data(), w.tmp2.data());
  for (int64_t r = 0; r < s.d; ++r)
    SoftmaxRow(mk ? mk + r * s.m : nullptr, s.m, *k + r * s.n, s.n, w.ks.data() + r * s.T());
  // context = k'[:, :M] mem_v^T + k'[:, M:] v^T
  float beta = 0.0f;
  if (s.m > 0) {
    Sgemm('N', 'T', s.d, s.d, s.m, v_scale, w.ks.data(), s.T(), mv, s.m, 0.0f, w.ctx.data(), s.d);
    beta = 1.0f;
  }
  Sgemm('N', 'T', s.d, s.d, s.n, v_scale, w.ks.data() + s.m, s.T(), *v, s.n, beta, w.ctx.data(), s.d);
}

void LinAttnForward(const LinAttnShape &s, const float *qkv, const float *mem, float scale, float v_scale,
                    float *out) {
  ParallelRange(s.b * s.heads, [&](int64_t lo, int64_t hi) {
    LinAttnWork w(s);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const float *q, *k, *v;
      LinAttnPrepare(s, qkv, mem, bh, v_scale, w, &q, &k, &v);
      float *o = out + bh * s.d * s.n;   // (b, h) -> channels h*D .. of batch b: contiguous
      Sgemm('T', 'N', s.d, s.n, s.d, scale, w.ctx.data(), s.d, w.p.data(), s.n, 0.0f, o, s.n);
    }
  });
}

// dqkv (B, 3 H D, N); dmem (2, H, D, M) summed over the batch in a fixed order.
void LinAttnBackward(const LinAttnShape &s, const float *dout, const float *qkv, const float *mem, float scale,
                     float v_scale, float *dqkv, float *dmem) {
  const int64_t T = s.T(), hd = s.Channels();
  std::vector<float> dmem_part(s.m > 0 ? s.b * s.heads * 2 * s.d * s.m : 0);
  ParallelRange(s.b * s.heads, [&](int64_t lo, int64_t hi) {
    LinAttnWork w(s);
    std::vector<float> dctx(s.d * s.d), dp(s.d * s.n), dks(s.d * T);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / s.heads, h = bh % s.heads;
      const float *q, *k, *v;
      LinAttnPrepare(s, qkv, mem, bh, v_scale, w, &q, &k, &v);
      const float *dy = dout + bh * s.d * s.n;
      float *dq = dqkv + (b * 3 * hd + h * s.d) * s.n, *dk = dq + hd * s.n, *dv = dk + hd * s.n;
      // out = ctx^T p * scale: d(ctx) = p dy^T * scale, dp = ctx dy * scale
      Sgemm('N', 'T', s.d, s.d, s.n, scale, w.p.data(), s.n, dy, s.n, 0.0f, dctx.data(), s.d);
      Sgemm('N', 'N', s.d, s.n, s.d, scale, w.ctx.data(), s.d, dy, s.n, 0.0f, dp.data(), s.n);
      // softmax over the features: dq = p * (dp - sum_d p dp)
      float *dot = w.tmp1.data();
      std::fill(dot, dot + s.n, 0.0f);
      for (int64_t r = 0; r < s.d; ++r)
        for (int64_t i = 0; i < s.n; ++i) dot[i] += w.p[r * s.n + i] * dp[r * s.n + i];
      for (int64_t r = 0; r < s.d; ++r)
        for (int64_t i = 0; i < s.n; ++i) dq[r * s.n + i] = w.p[r * s.n + i] * (dp[r * s.n + i] - dot[i]);
      // ctx = k' v'^T * v_scale: dk' = dctx v' * v_scale, dv' = dctx^T k' * v_scale
      const float *mv = s.m > 0 ? mem + (s.heads + h) * s.d * s.m : nullptr;
      float *dmk = s.m > 0 ? dmem_part.data() + bh * 2 * s.d * s.m : nullptr, *dmv = dmk ? dmk + s.d * s.m : nullptr;
      if (s.m > 0) {
        Sgemm('N', 'N', s.d, s.m, s.d, v_scale, dctx.data(), s.d, mv, s.m, 0.0f, dks.data(), T);
        Sgemm('T', 'N', s.d, s.m, s.d, v_scale, dctx.data(), s.d, w.ks.data(), T, 0.0f, dmv, s.m);
      }
      Sgemm('N', 'N', s.d, s.n, s.d, v_scale, dctx.data(), s.d, v, s.n, 0.0f, dks.data() + s.m, T);
      Sgemm('T', 'N', s.d, s.n, s.d, v_scale, dctx.data(), s.d, w.ks.data() + s.m, T, 0.0f, dv, s.n);
      // softmax over the positions, row by row: dk = k' * (dk' - sum_j k' dk')
      for (int64_t r = 0; r < s.d; ++r) {
        const float *y = w.ks.data() + r * T, *g = dks.data() + r * T;
        const float acc = RowDot(y, g, T);
        for (int64_t j = 0; j < s.m; ++j) dmk[r * s.m + j] = y[j] * (g[j] - acc);
        for (int64_t j = 0; j < s.n; ++j) dk[r * s.n + j] = y[s.m + j] * (g[s.m + j] - acc);
      }
    }
  });
  if (s.m == 0) return;
  const int64_t per = s.d * s.m;
  for (int64_t h = 0; h < s.heads; ++h)
    for (int kv = 0; kv < 2; ++kv) {
      float *o = dmem + (kv * s.heads + h) * per;
      std::fill(o, o + per, 0.0f);
      for (int64_t b = 0; b < s.b; ++b) {
        const float *part = dmem_part.data() + (b * s.heads + h) * 2 * per + kv * per;
        for (int64_t j = 0; j < per; ++j) o[j] += part[j];
      }
    }
}

// ---------------------------------------------------------------------------------------------
// y[a, m, n, :] = x[a, n, m, :]: the middle axes of a 4-d tensor (A, N, M, D) swapped -- attention's head split
// and merge (D = head width), channels-first <-> channels-last (D = 1). Its own backward. MindSpore's Transpose
// keeps 8 bytes per element for as long as a compiled graph lives; this keeps nothing.
void SwapAxes12(const int64_t *s, const float *x, float *y) {
  const int64_t a = s[0], n = s[1], m = s[2], d = s[3];
  if (d > 1) {
    ParallelRange(a * m, [&](int64_t lo, int64_t hi) {
      for (int64_t am = lo; am < hi; ++am) {
        const float *src = x + ((am / m) * n * m + am % m) * d;
        float *dst = y + am * n * d;
        for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * d, src + i * m * d, d * sizeof(float));
      }
    });
    return;
  }
  constexpr int64_t T = 32;   // a plain 2-d transpose of each (N, M) matrix, tile by tile
  const int64_t mt = (m + T - 1) / T;
  ParallelRange(a * mt, [&](int64_t lo, int64_t hi) {
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t ia = job / mt, m0 = (job % mt) * T, m1 = std::min(m, m0 + T);
      const float *src = x + ia * n * m;
      float *dst = y + ia * n * m;
      for (int64_t n0 = 0; n0 < n; n0 += T) {
        const int64_t n1 = std::min(n, n0 + T);
        for (int64_t j = m0; j < m1; ++j)
          for (int64_t i = n0; i < n1; ++i) dst[j * n + i] = src[i * m + j];
      }
    }
  });
}

}  // namespace

extern "C" {

// The library's version of the interface: Python checks it matches what it was written for.
int MsdKernelsAbi() { return 3; }

// An entry point with MindSpore's aot signature whose body is one expression: it is timed
// (MS_DIFFUSION_KERNEL_PROFILE) and names itself in error messages.
#define MSD_ENTRY(name, ...)                                                                               \
  int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) { \
    Timer timer{#name, nparam, ndims, shapes};                                                             \
    current = &timer;                                                                                      \
    return __VA_ARGS__;                                                                                    \
  }

// y = conv(x, w) + b; y = conv(x, w)
static int Conv2dForwardEntry(int nparam, void **params, int64_t **shapes, const char **dtypes, bool bias) {
  if (nparam != (bias ? 5 : 4) || !AllF32(nparam, dtypes)) return 1;
  return Guard([&] { Conv2dForward(params, shapes, bias); });
}
MSD_ENTRY(Conv2dBias, Conv2dForwardEntry(nparam, params, shapes, dtypes, true))
MSD_ENTRY(Conv2d, Conv2dForwardEntry(nparam, params, shapes, dtypes, false))

// MindSpore keeps one shape-inference function per Custom function name, but a forward convolution's
// output shape depends on its settings: each distinct setting (stride, padding, ...) gets its own
// name, Conv2d_<k> / Conv2dBias_<k>, k two octal digits 00 to 77 (ms_diffusion.kernels.conv assigns them).
#define MSD_CONV_ALIAS(k)                                                                                 \
  int Conv2d_##k(int n, void **p, int *nd, int64_t **sh, const char **dt, void *st, void *ex) {           \
    return Conv2d(n, p, nd, sh, dt, st, ex);                                                              \
  }                                                                                                       \
  int Conv2dBias_##k(int n, void **p, int *nd, int64_t **sh, const char **dt, void *st, void *ex) {       \
    return Conv2dBias(n, p, nd, sh, dt, st, ex);                                                          \
  }
#define MSD_CONV_ALIAS8(k) \
  MSD_CONV_ALIAS(k##0) MSD_CONV_ALIAS(k##1) MSD_CONV_ALIAS(k##2) MSD_CONV_ALIAS(k##3) \
  MSD_CONV_ALIAS(k##4) MSD_CONV_ALIAS(k##5) MSD_CONV_ALIAS(k##6) MSD_CONV_ALIAS(k##7)
MSD_CONV_ALIAS8(0) MSD_CONV_ALIAS8(1) MSD_CONV_ALIAS8(2) MSD_CONV_ALIAS8(3)
MSD_CONV_ALIAS8(4) MSD_CONV_ALIAS8(5) MSD_CONV_ALIAS8(6) MSD_CONV_ALIAS8(7)
int MsdConvAliases() { return 64; }

// inputs: dy (N,O,Ho,Wo), w, x (shape only), spec; output: dx (N,C,H,W)
static int Conv2dBackwardDataEntry(int nparam, void **params, int64_t **shapes, const char **dtypes) {
  if (nparam != 5 || !AllF32(nparam, dtypes)) return 1;
  return Guard([&] {
    ConvSpec c(static_cast<const int64_t *>(params[3]));
    dims y = Dims(shapes[0], 4), w = Dims(shapes[1], 4), x = Dims(shapes[2], 4);
    auto b = GetBwdData(x, w, y, c);
    auto &rt = Rt();
    auto dym = In(b->dy, params[0], 0);
    auto wm = In(b->w, params[1], 1);
    auto dxm = OutInner(b->dx, params[4], 2);
    b->prim.execute(rt.stream, {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_SRC, dxm}});
    OutFinish(b->dx, dxm, params[4]);
    rt.stream.wait();
  });
}

MSD_ENTRY(Conv2dBackwardData, Conv2dBackwardDataEntry(nparam, params, shapes, dtypes))

// inputs: x, dy, w (shape only), spec; outputs: dw (O, C/g, kh, kw) [, db (O)]
static int Conv2dBackwardWeightsEntry(int nparam, void **params, int64_t **shapes, bool bias) {
  if (nparam != (bias ? 6 : 5)) return 1;
  return Guard([&] {
    ConvSpec c(static_cast<const int64_t *>(params[3]));
    dims x = Dims(shapes[0], 4), y = Dims(shapes[1], 4), w = Dims(shapes[2], 4);
    auto b = GetBwdWeights(x, w, y, c, bias);
    auto &rt = Rt();
    auto xm = In(b->x, params[0], 0);
    auto dym = In(b->dy, params[1], 1);
    auto dwm = OutInner(b->dw, params[4], 2);
    std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym},
                                               {DNNL_ARG_DIFF_WEIGHTS, dwm}};
    if (bias) args[DNNL_ARG_DIFF_BIAS] = dnnl::memory(Plain({w[0]}), rt.engine, params[5]);
    b->prim.execute(rt.stream, args);
    OutFinish(b->dw, dwm, params[4]);
    rt.stream.wait();
  });
}

MSD_ENTRY(Conv2dBackwardWeightsBias, Conv2dBackwardWeightsEntry(nparam, params, shapes, true))
MSD_ENTRY(Conv2dBackwardWeights, Conv2dBackwardWeightsEntry(nparam, params, shapes, false))

// Settings that hold non-integers ([groups, eps], [heads, scale, ...]) arrive as int64 tensors carrying float64
// bit patterns (kernels.float_settings): mixed precision (to_float) casts floating-point tensors inside a cell,
// which turned a float64 spec into float32 and read as doubles gave garbage (a zero divisor: SIGFPE).
static const double *FloatSpec(void *param, const char *dtype) {
  if (std::strcmp(dtype, "int64") != 0) throw std::runtime_error("kernel settings must be int64 (float64 bits)");
  return static_cast<const double *>(param);
}

// GroupNorm forward. inputs: x (N, C, *), gamma (C), beta (C), spec [groups, eps] (FloatSpec);
// outputs: y (x's shape), mean (N, C), rstd (N, C) (each group's statistics repeated over its channels)
static int GroupNormEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 7 || std::strcmp(dtypes[0], "float32") != 0) return 1;
  return Guard([&] {
    const double *spec = FloatSpec(params[3], dtypes[3]);
    GnShape s(shapes[0], ndims[0], static_cast<int64_t>(spec[0]));
    GnForward(s, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                     static_cast<const float *>(params[2]), static_cast<float>(spec[1]),
                     static_cast<float *>(params[4]), static_cast<float *>(params[5]),
                     static_cast<float *>(params[6]));
  });
}

MSD_ENTRY(GroupNorm, GroupNormEntry(nparam, params, ndims, shapes, dtypes))

// GroupNorm backward. inputs: dy, x, mean, rstd, gamma, spec; outputs: dx, dgamma, dbeta
static int GroupNormBackwardEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 9 || std::strcmp(dtypes[0], "float32") != 0) return 1;
  return Guard([&] {
    const double *spec = FloatSpec(params[5], dtypes[5]);
    GnShape s(shapes[1], ndims[1], static_cast<int64_t>(spec[0]));
    GnBackward(s, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                      static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
                      static_cast<const float *>(params[4]), static_cast<float *>(params[6]),
                      static_cast<float *>(params[7]), static_cast<float *>(params[8]));
  });
}

MSD_ENTRY(GroupNormBackward, GroupNormBackwardEntry(nparam, params, ndims, shapes, dtypes))

// RMSNorm (+ SiLU). inputs: x (N, C, *), g (C), spec int64 [silu]; outputs: y (x's shape), inv (N, positions).
// RmsNormMod adds the modulation: inputs x, g, scale (N, C), shift (N, C), spec. (Separate entry points:
// MindSpore keys a Custom operator's registration by its function.)
static int RmsForwardEntry(int nparam, void **params, int64_t **shapes, int *ndims, const char **dtypes, bool mod) {
  if (nparam != (mod ? 7 : 5) || std::strcmp(dtypes[0], "float32") != 0) return 1;
  return Guard([&] {
    const int spec_i = mod ? 4 : 2;
    const bool silu = static_cast<const int64_t *>(params[spec_i])[0] != 0;
    RmsShape s(shapes[0], ndims[0]);
    auto f = [&](int i) { return static_cast<const float *>(params[i]); };
    RmsForward(s, f(0), f(1), mod ? f(2) : nullptr, mod ? f(3) : nullptr, silu,
               static_cast<float *>(params[spec_i + 1]), static_cast<float *>(params[spec_i + 2]));
  });
}

// inputs: dy, x, inv, g, [scale, shift], spec; outputs: dx, dg, [dscale, dshift]
static int RmsBackwardEntry(int nparam, void **params, int64_t **shapes, int *ndims, const char **dtypes, bool mod) {
  if (nparam != (mod ? 11 : 7) || std::strcmp(dtypes[0], "float32") != 0) return 1;
  return Guard([&] {
    const int spec_i = mod ? 6 : 4;
    const bool silu = static_cast<const int64_t *>(params[spec_i])[0] != 0;
    RmsShape s(shapes[1], ndims[1]);
    auto f = [&](int i) { return static_cast<const float *>(params[i]); };
    auto o = [&](int i) { return static_cast<float *>(params[i]); };
    RmsBackward(s, f(0), f(1), f(2), f(3), mod ? f(4) : nullptr, mod ? f(5) : nullptr, silu, o(spec_i + 1),
                o(spec_i + 2), mod ? o(spec_i + 3) : nullptr, mod ? o(spec_i + 4) : nullptr);
  });
}

MSD_ENTRY(RmsNorm, RmsForwardEntry(nparam, params, shapes, ndims, dtypes, false))
MSD_ENTRY(RmsNormMod, RmsForwardEntry(nparam, params, shapes, ndims, dtypes, true))
MSD_ENTRY(RmsNormBackward, RmsBackwardEntry(nparam, params, shapes, ndims, dtypes, false))
MSD_ENTRY(RmsNormModBackward, RmsBackwardEntry(nparam, params, shapes, ndims, dtypes, true))

// Linear attention core. inputs: qkv (B, 3 H D, h, w), [mem (2, H, D, M)], spec [heads, scale,
// v by positions (0 / 1)] (FloatSpec); output: out (B, H D, h, w). LinearAttentionMem takes the memory key/values.
static int LinAttnEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool mem,
                        bool backward) {
  const int inputs = (mem ? 3 : 2) + (backward ? 1 : 0), outputs = backward ? (mem ? 2 : 1) : 1;
  if (nparam != inputs + outputs || std::strcmp(dtypes[0], "float32") != 0) return 1;
  return Guard([&] {
    const int x = backward ? 1 : 0;   // the backward's first input is dout
    const double *spec = FloatSpec(params[inputs - 1], dtypes[inputs - 1]);
    LinAttnShape s;
    s.b = shapes[x][0];
    s.heads = static_cast<int64_t>(spec[0]);
    s.n = 1;
    for (int i = 2; i < ndims[x]; ++i) s.n *= shapes[x][i];
    s.d = shapes[x][1] / (3 * s.heads);
    s.m = mem ? shapes[x + 1][3] : 0;
    if (s.d * 3 * s.heads != shapes[x][1]) throw std::runtime_error("qkv channels are not 3 * heads * dim_head");
    const float scale = static_cast<float>(spec[1]), v_scale = spec[2] != 0.0 ? 1.0f / s.n : 1.0f;
    auto f = [&](int i) { return static_cast<const float *>(params[i]); };
    const float *mem_p = mem ? f(x + 1) : nullptr;
    if (backward)
      LinAttnBackward(s, f(0), f(1), mem_p, scale, v_scale, static_cast<float *>(params[inputs]),
                      mem ? static_cast<float *>(params[inputs + 1]) : nullptr);
    else
      LinAttnForward(s, f(0), mem_p, scale, v_scale, static_cast<float *>(params[inputs]));
  });
}

MSD_ENTRY(LinearAttention, LinAttnEntry(nparam, params, ndims, shapes, dtypes, false, false))
MSD_ENTRY(LinearAttentionMem, LinAttnEntry(nparam, params, ndims, shapes, dtypes, true, false))
MSD_ENTRY(LinearAttentionBackward, LinAttnEntry(nparam, params, ndims, shapes, dtypes, false, true))
MSD_ENTRY(LinearAttentionMemBackward, LinAttnEntry(nparam, params, ndims, shapes, dtypes, true, true))

// inputs: x (A, N, M, D) float32; output: (A, M, N, D)
static int SwapAxesEntry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 2 || ndims[0] != 4 || std::strcmp(dtypes[0], "float32") != 0) return 1;
  return Guard([&] { SwapAxes12(shapes[0], static_cast<const float *>(params[0]), static_cast<float *>(params[1])); });
}
MSD_ENTRY(SwapAxes12, SwapAxesEntry(nparam, params, ndims, shapes, dtypes))

}  // extern "C"
