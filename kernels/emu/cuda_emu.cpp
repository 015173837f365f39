/* Runtime of the CPU emulation of CUDA (see cuda_emu.h): one OS thread per CUDA thread of a
 * block, blocks run one after another; futex barriers for __syncthreads and warp collectives;
 * shared-memory regions with per-byte race shadows; tensor-core and cp.async emulation. */
#include "emu/cuda_emu.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

namespace qlemu {
namespace {

constexpr uint16_t kNone = 0xFFFF;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSlotBytes = 64;
constexpr unsigned kMaxThreads = 1024;
constexpr uint32_t kMaxDynamicSmem = 227 * 1024;
constexpr int kPollMs = 50;

/* Race shadow of one shared byte: its last writer and a summary of its readers since then, each
 * with the __syncthreads epoch and the warp-collective epoch of the access. */
struct Shadow {
  uint32_t w_bep, w_wep, r_bep, r_wep;
  uint16_t w_tid, r_tid1, r_tid2, r_warp; /* r_warp: the readers' common warp, or kNone */
};

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int src_bytes;
};

void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
  timespec ts{0, kPollMs * 1000000L};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, &ts, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

struct Warp {
  std::mutex m;
  std::atomic<uint32_t> gen{1}; /* completed collectives + 1; its parity picks the slot bank */
  std::atomic<uint32_t> readers[2] = {{0}, {0}};
  uint32_t arrived = 0, phase_mask = 0, exited = 0, existing = 0;
  unsigned char slots[2][32][kSlotBytes];
};

/* Options for the next launch made from the calling thread (set through the C API). */
struct Options {
  bool set = false;
  bool race_check = true;
  uint32_t watchdog_ms = 10000;
};
thread_local Options next_options;

std::mutex launch_mutex;
uint64_t launch_counter = 0;

}  // namespace

struct Region {
  std::string name;
  unsigned char* base;
  size_t bytes;
  std::vector<Shadow> shadow;
  /* Per byte, the cp.async copies into it not yet retired by their issuing thread's wait (with
   * the race check only, as `shadow`). Any other access to such a byte is a race on the GPU. */
  std::vector<uint8_t> cp_pending;
};

namespace {

struct Launch {
  QlLaunchConfig cfg;
  const void* params;
  void (*body)(const void*);
  uint32_t nthreads, nwarps;
  uint64_t nblocks;
  bool race_check;
  std::chrono::milliseconds watchdog;
  uint64_t serial;

  std::mutex err_m;
  std::string error;
  std::atomic<bool> abort{false};

  std::atomic<uint32_t> go{0}; /* start gate: 1 = run, 2 = thread creation failed */

  std::mutex bar_m;
  uint32_t arrived = 0, live = 0;
  std::atomic<uint32_t> bar_gen{1};

  std::mutex end_m;
  uint32_t ended = 0;
  bool stop = false;
  std::atomic<uint32_t> end_gen{0};

  std::vector<std::unique_ptr<Warp>> warps;

  std::mutex shm_m;
  std::vector<std::unique_ptr<Region>> regions;
  Region* dyn = nullptr;
  std::vector<unsigned char> dyn_storage;
};

struct ThreadState {
  Launch* L = nullptr;
  uint32_t tid = 0, warp = 0, lane = 0;
  uint32_t bep = 0, wep = 0;
  std::vector<Copy> cp_open;
  std::deque<std::vector<Copy>> cp_groups;
  alignas(16) unsigned char exchange_copy[32][kSlotBytes];
};
thread_local ThreadState* tls = nullptr;

std::string thread_str(const Launch& L, uint32_t tid) {
  const uint32_t bx = L.cfg.block[0], by = L.cfg.block[1];
  return "thread (" + std::to_string(tid % bx) + "," + std::to_string(tid / bx % by) + "," +
         std::to_string(tid / (bx * by)) + ")";
}
std::string here() {
  const Launch& L = *tls->L;
  return thread_str(L, tls->tid) + " of block (" + std::to_string(blockIdx.x) + "," +
         std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
}

void wake_everyone(Launch& L) {
  futex_wake_all(L.bar_gen);
  for (auto& w : L.warps) futex_wake_all(w->gen);
}

/* Records the launch's first fault and makes every thread unwind at its next sync or access. */
void report(Launch& L, const std::string& msg) {
  {
    std::lock_guard<std::mutex> g(L.err_m);
    if (L.error.empty()) L.error = msg;
  }
  L.abort.store(true);
  wake_everyone(L);
}

[[noreturn]] void fault(const std::string& msg) {
  report(*tls->L, msg + " [" + here() + "]");
  throw Abort{};
}

void check_abort() {
  if (tls->L->abort.load(std::memory_order_relaxed)) throw Abort{};
}

/* Waits until `word` leaves `seen`; unwinds if the launch faults, and faults after the watchdog. */
void wait_while(std::atomic<uint32_t>& word, uint32_t seen, const char* what) {
  Launch& L = *tls->L;
  const auto start = std::chrono::steady_clock::now();
  while (word.load(std::memory_order_acquire) == seen) {
    check_abort();
    if (std::chrono::steady_clock::now() - start > L.watchdog) {
      fault(std::string("deadlock: waited more than ") + std::to_string(L.watchdog.count()) + " ms at " + what);
    }
    futex_wait(word, seen);
  }
}

std::string hex(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

/* Checks an access of `n` bytes at `off` in `r` by the calling thread against the shadow and
 * records it; on a race returns false with the other access described in `conflict`. A conflict
 * is an access by another thread in the same __syncthreads epoch, unless both are in one warp and
 * a warp collective separates them (the warp epochs are per warp, so a collective on a subset of
 * lanes counts for all of them: an approximation that can miss a race, never invent one).
 * Caller holds shm_m. */
bool race_check_locked(Region& r, size_t off, size_t n, bool write, std::string* conflict) {
  const ThreadState& ts = *tls;
  const uint16_t tid = static_cast<uint16_t>(ts.tid);
  const uint16_t warp = static_cast<uint16_t>(ts.warp);
  for (size_t b = off; b < off + n; ++b) {
    Shadow& s = r.shadow[b];
    if (s.w_bep == ts.bep && s.w_tid != tid && !(s.w_tid / 32 == warp && s.w_wep < ts.wep)) {
      *conflict = std::string(write ? "writes" : "reads") + " it after " + thread_str(*ts.L, s.w_tid) + " wrote it";
      return false;
    }
    if (write && s.r_bep == ts.bep) {
      const uint16_t other = s.r_tid1 != tid ? s.r_tid1 : s.r_tid2;
      if (other != kNone && !(s.r_warp == warp && s.r_wep < ts.wep)) {
        *conflict = "writes it after " + thread_str(*ts.L, other) + " read it";
        return false;
      }
    }
    if (write) {
      s.w_bep = ts.bep;
      s.w_wep = ts.wep;
      s.w_tid = tid;
      s.r_bep = 0;
    } else if (s.r_bep != ts.bep) {
      s.r_bep = ts.bep;
      s.r_wep = ts.wep;
      s.r_tid1 = tid;
      s.r_tid2 = kNone;
      s.r_warp = warp;
    } else {
      if (tid != s.r_tid1 && s.r_tid2 == kNone) s.r_tid2 = tid;
      if (s.r_warp != warp) s.r_warp = kNone;
      s.r_wep = std::max(s.r_wep, ts.wep);
    }
  }
  return true;
}

void race_check(Region& r, size_t off, size_t n, bool write, const std::string& what) {
  Launch& L = *tls->L;
  if (!L.race_check) return;
  std::string conflict;
  bool ok;
  {
    std::lock_guard<std::mutex> g(L.shm_m);
    ok = race_check_locked(r, off, n, write, &conflict);
  }
  if (!ok) {
    fault("data race on shared memory " + what + ": " + thread_str(L, tls->tid) + " " + conflict +
          " in the same __syncthreads interval with no barrier (or warp sync, within a warp) between");
  }
}

Region* add_region(Launch& L, const std::string& name, unsigned char* base, size_t bytes) {
  std::unique_ptr<Region> r(new Region{name, base, bytes, {}, {}});
  if (L.race_check) {
    r->shadow.assign(bytes, Shadow{0, 0, 0, 0, kNone, kNone, kNone, kNone});
    r->cp_pending.assign(bytes, 0);
  }
  /* Shared memory starts undefined on the GPU: NaN-filled here so that uninitialized reads show. */
  std::memset(base, 0xFF, bytes);
  L.regions.push_back(std::move(r));
  return L.regions.back().get();
}

/* Finds the region holding [p, p + n) for the raw accesses of ldmatrix and cp.async. */
Region* region_of(const void* p, size_t n, size_t* off, const char* what) {
  Launch& L = *tls->L;
  const unsigned char* q = static_cast<const unsigned char*>(p);
  std::lock_guard<std::mutex> g(L.shm_m);
  for (auto& r : L.regions) {
    if (q >= r->base && q < r->base + r->bytes) {
      *off = static_cast<size_t>(q - r->base);
      if (*off + n > r->bytes) {
        fault(std::string(what) + " accesses " + std::to_string(n) + " bytes at byte offset " +
              std::to_string(*off) + " of shared array `" + r->name + "` (" + std::to_string(r->bytes) +
              " bytes): out of bounds");
      }
      return r.get();
    }
  }
  fault(std::string(what) + ": address is not inside any shared array of this launch");
}

/* Whether bytes [off, off + n) of `r` are the destination of a cp.async that its thread has not
 * yet waited for (the caller holds `shm_m`): on the GPU the copy may land before or after. */
bool cp_pending_locked(const Region& r, size_t off, size_t n) {
  for (size_t b = off; b < off + n; ++b) {
    if (r.cp_pending[b] != 0) return true;
  }
  return false;
}

[[noreturn]] void cp_pending_fault(const std::string& what) {
  fault("shared memory " + what + " is accessed by " + thread_str(*tls->L, tls->tid) +
        " while a cp.async into it is in flight (before cp.async.wait_group retires it)");
}

/* Counts a cp.async into bytes [off, off + 16) of `r` in flight (+1) or landed (-1). */
void cp_pending_add(Region& r, size_t off, int delta) {
  Launch& L = *tls->L;
  if (!L.race_check) return;
  std::lock_guard<std::mutex> g(L.shm_m);
  for (size_t b = off; b < off + 16; ++b) r.cp_pending[b] = static_cast<uint8_t>(r.cp_pending[b] + delta);
}

/* `r`'s name and the byte offset and instruction of an access, for fault messages. */
std::string access_str(const Region& r, size_t off, const char* what) {
  return "`" + r.name + "` (byte offset " + std::to_string(off) + ", by " + what + ")";
}

void raw_access(const void* p, size_t n, bool write, const char* what) {
  size_t off = 0;
  Region* r = region_of(p, n, &off, what);
  if (r->cp_pending.empty()) {
    race_check(*r, off, n, write, access_str(*r, off, what));
    return;
  }
  bool pending;
  {
    std::lock_guard<std::mutex> g(tls->L->shm_m);
    pending = cp_pending_locked(*r, off, n);
  }
  if (pending) cp_pending_fault(access_str(*r, off, what));
  race_check(*r, off, n, write, access_str(*r, off, what));
}

void perform_copies(std::vector<Copy>& copies) {
  for (const Copy& c : copies) {
    size_t off = 0;
    Region* r = region_of(c.dst, 16, &off, "cp.async");
    cp_pending_add(*r, off, -1);
    raw_access(c.dst, 16, true, "cp.async");
    std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
    std::memset(c.dst + c.src_bytes, 0, static_cast<size_t>(16 - c.src_bytes));
  }
  copies.clear();
}

/* A thread's kernel body returned (or unwound): it counts as arrived at every later barrier. */
void thread_exit() {
  Launch& L = *tls->L;
  {
    std::lock_guard<std::mutex> g(L.bar_m);
    --L.live;
    if (L.arrived > 0 && L.arrived >= L.live) {
      L.arrived = 0;
      L.bar_gen.fetch_add(1, std::memory_order_release);
      futex_wake_all(L.bar_gen);
    }
  }
  Warp& w = *L.warps[tls->warp];
  const uint32_t bit = 1u << tls->lane;
  bool waited_on;
  {
    std::lock_guard<std::mutex> g(w.m);
    w.exited |= bit;
    waited_on = w.arrived != 0 && (w.phase_mask & bit);
  }
  if (waited_on && !L.abort.load()) {
    report(L, "lane " + std::to_string(tls->lane) + " of warp " + std::to_string(tls->warp) +
                  " exited while other lanes wait for it in a warp collective [" + here() + "]");
  }
}

/* Block-end rendezvous; the last thread to arrive resets the block state. Returns false when the
 * launch has faulted and no further block should run. */
bool block_end() {
  Launch& L = *tls->L;
  uint32_t seen;
  {
    std::lock_guard<std::mutex> g(L.end_m);
    seen = L.end_gen.load();
    if (++L.ended == L.nthreads) {
      L.ended = 0;
      {
        std::lock_guard<std::mutex> b(L.bar_m);
        L.live = L.nthreads;
        L.arrived = 0;
        L.bar_gen.fetch_add(1); /* a new block is a new race epoch */
      }
      for (auto& w : L.warps) {
        w->arrived = 0;
        w->phase_mask = 0;
        w->exited = 0;
      }
      L.stop = L.abort.load();
      L.end_gen.store(seen + 1, std::memory_order_release);
      futex_wake_all(L.end_gen);
      return !L.stop;
    }
  }
  const auto start = std::chrono::steady_clock::now();
  bool reported = false;
  while (L.end_gen.load(std::memory_order_acquire) == seen) {
    if (!reported && std::chrono::steady_clock::now() - start > L.watchdog) {
      reported = true;
      report(L, "deadlock: block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                    std::to_string(blockIdx.z) + ") did not finish within " + std::to_string(L.watchdog.count()) +
                    " ms of its first thread (a thread is stuck outside any barrier)");
    }
    futex_wait(L.end_gen, seen);
  }
  std::lock_guard<std::mutex> g(L.end_m);
  return !L.stop;
}

struct ThreadArg {
  Launch* L;
  uint32_t tid;
};

void* thread_main(void* arg) {
  ThreadState ts;
  Launch& L = *static_cast<ThreadArg*>(arg)->L;
  ts.L = &L;
  ts.tid = static_cast<ThreadArg*>(arg)->tid;
  ts.warp = ts.tid / 32;
  ts.lane = ts.tid % 32;
  tls = &ts;
  const uint32_t bx = L.cfg.block[0], by = L.cfg.block[1];
  threadIdx = uint3{ts.tid % bx, ts.tid / bx % by, ts.tid / (bx * by)};
  while (L.go.load(std::memory_order_acquire) == 0) futex_wait(L.go, 0);
  if (L.go.load() != 1) return nullptr;

  const uint64_t gx = L.cfg.grid[0], gy = L.cfg.grid[1];
  for (uint64_t b = 0; b < L.nblocks; ++b) {
    blockIdx = uint3{static_cast<unsigned>(b % gx), static_cast<unsigned>(b / gx % gy),
                     static_cast<unsigned>(b / (gx * gy))};
    ts.bep = L.bar_gen.load(std::memory_order_acquire);
    ts.wep = L.warps[ts.warp]->gen.load(std::memory_order_acquire);
    try {
      L.body(L.params);
      cp_async_wait_all(); /* copies still queued at exit land before the block ends */
    } catch (const Abort&) {
    } catch (const std::exception& e) {
      report(L, std::string("C++ exception in kernel: ") + e.what() + " [" + here() + "]");
    } catch (...) {
      report(L, "unknown C++ exception in kernel [" + here() + "]");
    }
    ts.cp_open.clear();
    ts.cp_groups.clear();
    thread_exit();
    if (!block_end()) break;
  }
  tls = nullptr;
  return nullptr;
}

void write_err(char* err, size_t err_len, const std::string& msg) {
  if (err == nullptr || err_len == 0) return;
  const size_t n = std::min(msg.size(), err_len - 1);
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

std::string validate(const QlLaunchConfig* cfg) {
  if (cfg == nullptr) return "null launch configuration";
  for (int i = 0; i < 3; ++i) {
    if (cfg->grid[i] == 0 || cfg->block[i] == 0) return "grid and block dimensions must be non-zero";
  }
  const uint64_t threads = uint64_t{cfg->block[0]} * cfg->block[1] * cfg->block[2];
  if (threads > kMaxThreads) return "block of " + std::to_string(threads) + " threads exceeds 1024";
  if (cfg->block[2] > 64) return "block.z exceeds 64";
  if (cfg->grid[0] > 0x7FFFFFFFu || cfg->grid[1] > 65535 || cfg->grid[2] > 65535) return "grid dimension out of range";
  if (cfg->dynamic_smem_bytes > kMaxDynamicSmem) return "dynamic shared memory exceeds 227 KiB";
  return "";
}

bool env_race_check() {
  const char* v = std::getenv("QLORA_EMU_RACECHECK");
  return !(v != nullptr && std::strcmp(v, "0") == 0);
}

int32_t run_launch(const QlLaunchConfig* cfg, const void* params, char* err, size_t err_len,
                   void (*body)(const void*)) {
  const Options opts = next_options;
  next_options = Options{};
  const std::string bad = validate(cfg);
  if (!bad.empty()) {
    write_err(err, err_len, "invalid launch: " + bad);
    return 2;
  }

  std::lock_guard<std::mutex> serial(launch_mutex);
  Launch L;
  L.cfg = *cfg;
  L.params = params;
  L.body = body;
  L.nthreads = cfg->block[0] * cfg->block[1] * cfg->block[2];
  L.nwarps = (L.nthreads + 31) / 32;
  L.nblocks = uint64_t{cfg->grid[0]} * cfg->grid[1] * cfg->grid[2];
  L.race_check = opts.set ? opts.race_check : env_race_check();
  L.watchdog = std::chrono::milliseconds(opts.watchdog_ms);
  L.serial = ++launch_counter;
  L.live = L.nthreads;
  for (uint32_t w = 0; w < L.nwarps; ++w) {
    L.warps.emplace_back(new Warp);
    const uint32_t lanes = std::min<uint32_t>(32, L.nthreads - 32 * w);
    L.warps.back()->existing = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1u;
  }
  /* 16-byte alignment like the GPU's dynamic shared memory (vector is new[]-aligned to 16). */
  L.dyn_storage.assign(std::max<size_t>(cfg->dynamic_smem_bytes, 16), 0);
  L.dyn = add_region(L, "dynamic shared memory", L.dyn_storage.data(), cfg->dynamic_smem_bytes);
  blockDim = dim3(cfg->block[0], cfg->block[1], cfg->block[2]);
  gridDim = dim3(cfg->grid[0], cfg->grid[1], cfg->grid[2]);

  std::vector<ThreadArg> args(L.nthreads);
  std::vector<pthread_t> threads;
  threads.reserve(L.nthreads);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, kStackBytes);
  for (uint32_t t = 0; t < L.nthreads; ++t) {
    args[t] = {&L, t};
    pthread_t th;
    if (pthread_create(&th, &attr, thread_main, &args[t]) != 0) {
      L.error = "could not start " + std::to_string(L.nthreads) + " emulated threads";
      break;
    }
    threads.push_back(th);
  }
  pthread_attr_destroy(&attr);
  L.go.store(threads.size() == L.nthreads ? 1 : 2, std::memory_order_release);
  futex_wake_all(L.go);
  for (pthread_t th : threads) pthread_join(th, nullptr);

  if (!L.error.empty()) {
    write_err(err, err_len, L.error);
    return 1;
  }
  return 0;
}

}  // namespace

void register_static(std::atomic<uint64_t>& launch_serial, ArrayDesc& desc) {
  Launch& L = *tls->L;
  if (launch_serial.load(std::memory_order_acquire) == L.serial) return;
  std::lock_guard<std::mutex> g(L.shm_m);
  if (launch_serial.load(std::memory_order_relaxed) == L.serial) return;
  desc.region = add_region(L, desc.name, desc.base, desc.elem_bytes * desc.count);
  launch_serial.store(L.serial, std::memory_order_release);
}

Region* dynamic_shared(const char* name, unsigned char** base, size_t* bytes) {
  Launch& L = *tls->L;
  {
    std::lock_guard<std::mutex> g(L.shm_m);
    if (L.dyn->name == "dynamic shared memory") L.dyn->name = name;
  }
  *base = L.dyn->base;
  *bytes = L.dyn->bytes;
  return L.dyn;
}

void* element_access(const ArrayDesc& a, std::ptrdiff_t row, std::ptrdiff_t col, bool write) {
  check_abort();
  std::ptrdiff_t lin;
  std::string what;
  if (a.cols != 0) {
    if (row < 0 || row >= static_cast<std::ptrdiff_t>(a.rows) || col < 0 || col >= static_cast<std::ptrdiff_t>(a.cols)) {
      fault("out-of-bounds shared memory access `" + std::string(a.name) + "[" + std::to_string(row) + "][" +
            std::to_string(col) + "]` (shape [" + std::to_string(a.rows) + "][" + std::to_string(a.cols) + "])");
    }
    lin = row * static_cast<std::ptrdiff_t>(a.cols) + col;
  } else {
    if (row < 0 || row >= static_cast<std::ptrdiff_t>(a.count)) {
      fault("out-of-bounds shared memory access `" + std::string(a.name) + "[" + std::to_string(row) + "]` (" +
            std::to_string(a.count) + " elements)");
    }
    lin = row;
  }
  const size_t off = static_cast<size_t>(lin) * a.elem_bytes;
  if (tls->L->race_check && a.region != nullptr) {
    const size_t region_off = static_cast<size_t>(a.base - a.region->base) + off;
    std::string conflict;
    bool ok, pending;
    {
      std::lock_guard<std::mutex> g(tls->L->shm_m);
      pending = cp_pending_locked(*a.region, region_off, a.elem_bytes);
      ok = pending || race_check_locked(*a.region, region_off, a.elem_bytes, write, &conflict);
    }
    if (pending) {
      const std::string idx = a.cols != 0 ? "[" + std::to_string(row) + "][" + std::to_string(col) + "]"
                                          : "[" + std::to_string(row) + "]";
      cp_pending_fault("`" + std::string(a.name) + idx + "`");
    }
    if (!ok) {
      const std::string idx = a.cols != 0 ? "[" + std::to_string(row) + "][" + std::to_string(col) + "]"
                                          : "[" + std::to_string(row) + "]";
      fault("data race on shared memory `" + std::string(a.name) + idx + "`: " + thread_str(*tls->L, tls->tid) +
            " " + conflict + " in the same __syncthreads interval with no barrier (or warp sync, within a warp) between");
    }
  }
  return a.base + off;
}

void syncthreads() {
  Launch& L = *tls->L;
  check_abort();
  uint32_t seen;
  {
    std::lock_guard<std::mutex> g(L.bar_m);
    seen = L.bar_gen.load();
    if (++L.arrived >= L.live) {
      L.arrived = 0;
      L.bar_gen.store(seen + 1, std::memory_order_release);
      futex_wake_all(L.bar_gen);
      tls->bep = seen + 1;
      return;
    }
  }
  wait_while(L.bar_gen, seen, "__syncthreads");
  tls->bep = seen + 1;
}

const unsigned char* warp_exchange(uint32_t mask, const void* mine, size_t bytes, uint32_t* effective) {
  ThreadState& ts = *tls;
  Launch& L = *ts.L;
  Warp& w = *L.warps[ts.warp];
  check_abort();
  const uint32_t bit = 1u << ts.lane;
  const uint32_t eff = mask & w.existing;
  if (!(eff & bit)) fault("warp collective with mask " + hex(mask) + " that does not name the calling lane");
  const auto start = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> g(w.m);
  /* A bank is reused two collectives later; with masks that skip a slow lane, wait until the
   * lanes of the earlier collective on this bank have copied their data out. */
  while (w.readers[w.gen.load() & 1].load() != 0) {
    g.unlock();
    check_abort();
    if (std::chrono::steady_clock::now() - start > L.watchdog) fault("deadlock in a warp collective");
    sched_yield();
    g.lock();
  }
  if (eff & w.exited) {
    g.unlock();
    fault("warp collective with mask " + hex(mask) + " names a lane that has exited (exited lanes " +
          hex(w.exited) + ")");
  }
  if (w.arrived == 0) {
    w.phase_mask = eff;
  } else if (w.phase_mask != eff) {
    const uint32_t other = w.phase_mask;
    g.unlock();
    fault("lanes of warp " + std::to_string(ts.warp) + " reached a warp collective with different masks (" +
          hex(other) + " and " + hex(eff) + ")");
  }
  const uint32_t seen = w.gen.load();
  const uint32_t bank = seen & 1;
  if (bytes != 0) std::memcpy(w.slots[bank][ts.lane], mine, bytes);
  w.arrived |= bit;
  if (w.arrived == w.phase_mask) {
    w.arrived = 0;
    w.readers[bank].store(static_cast<uint32_t>(__builtin_popcount(eff)));
    w.gen.store(seen + 1, std::memory_order_release);
    g.unlock();
    futex_wake_all(w.gen);
  } else {
    g.unlock();
    wait_while(w.gen, seen, "a warp collective (__syncwarp, shuffle, vote, ldmatrix or mma)");
  }
  if (bytes != 0) {
    for (int l = 0; l < 32; ++l) {
      if (eff >> l & 1u) std::memcpy(ts.exchange_copy[l], w.slots[bank][l], bytes);
    }
  }
  w.readers[bank].fetch_sub(1, std::memory_order_release);
  ts.wep = seen + 1;
  if (effective != nullptr) *effective = eff;
  return &ts.exchange_copy[0][0];
}

uint32_t active_mask() {
  Launch& L = *tls->L;
  Warp& w = *L.warps[tls->warp];
  std::lock_guard<std::mutex> g(w.m);
  return w.existing & ~w.exited;
}

unsigned lane_id() { return tls->lane; }

void fail(const char* what) { fault(what); }

/* D = A·B + C for one warp, PTX ISA layouts of mma.m16n8k16.row.col.f32.bf16.bf16.f32 (see
 * docs/ARCHITECTURE.md, "Tensor-core fragments"): bf16 products are exact in f32 and are
 * accumulated in f32 in k order onto C. The tensor cores may order or round the accumulation
 * differently, by a few ulp. */
void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  struct Fragments {
    uint32_t a[4], b[2];
  } mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  const float cin[4] = {c[0], c[1], c[2], c[3]};
  uint32_t eff = 0;
  const unsigned char* all = warp_exchange(0xFFFFFFFFu, &mine, sizeof mine, &eff);
  if (eff != 0xFFFFFFFFu) fault("mma.sync needs all 32 lanes of the warp");
  auto half_of = [&](int lane, int reg, int i) {
    Fragments f;
    std::memcpy(&f, all + kSlotBytes * lane, sizeof f);
    const uint32_t word = reg == 0 ? f.a[i >> 1] : f.b[i >> 1];
    return bf16_bits_to_f32(static_cast<uint16_t>(word >> (16 * (i & 1))));
  };
  auto A = [&](int r, int k) {
    return half_of((r & 7) * 4 + (k & 7) / 2, 0, (k & 1) | (r >= 8 ? 2 : 0) | (k >= 8 ? 4 : 0));
  };
  auto B = [&](int k, int n) { return half_of(n * 4 + (k & 7) / 2, 1, (k & 1) | (k >= 8 ? 2 : 0)); };
  const int g = static_cast<int>(tls->lane) >> 2, t = static_cast<int>(tls->lane) & 3;
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
    float acc = cin[i];
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
    d[i] = acc;
  }
}

/* ldmatrix.sync.aligned.m8n8.x{count}[.trans].shared.b16: lanes 8j..8j+7 give the row addresses
 * of matrix j; each lane gets row lane/4, columns 2(lane%4) and +1 of each matrix (of its
 * transpose with .trans), lower column in the low half. */
void ldmatrix(uint32_t* r, int count, bool trans, const void* row_ptr) {
  const uint32_t lane = tls->lane;
  if (lane < 8u * static_cast<uint32_t>(count)) {
    if (reinterpret_cast<uintptr_t>(row_ptr) % 16 != 0) fault("ldmatrix row address is not 16-byte aligned");
    size_t off = 0;
    region_of(row_ptr, 16, &off, "ldmatrix");
  }
  uint32_t eff = 0;
  const unsigned char* all = warp_exchange(0xFFFFFFFFu, &row_ptr, sizeof row_ptr, &eff);
  if (eff != 0xFFFFFFFFu) fault("ldmatrix needs all 32 lanes of the warp");
  auto row_of = [&](uint32_t l) {
    const unsigned char* p;
    std::memcpy(&p, all + kSlotBytes * l, sizeof p);
    return p;
  };
  for (int j = 0; j < count; ++j) {
    uint32_t word = 0;
    for (uint32_t e = 0; e < 2; ++e) {
      const unsigned char* src = trans ? row_of(8 * j + 2 * (lane % 4) + e) + 2 * (lane / 4)
                                       : row_of(8 * j + lane / 4) + 2 * (2 * (lane % 4) + e);
      raw_access(src, 2, false, "ldmatrix");
      uint16_t v;
      std::memcpy(&v, src, 2);
      word |= static_cast<uint32_t>(v) << (16 * e);
    }
    r[j] = word;
  }
}

/* cp.async is made as asynchronous as the PTX ISA allows: copies wait in per-thread commit
 * groups and land only when a wait retires their group (or the thread exits). Until then (with
 * the race check) any access to the destination bytes, by any thread, is reported: on the GPU it
 * may see or overwrite either side of the copy. */
void cp_async(void* smem_dst, const void* gmem_src, int src_bytes) {
  check_abort();
  if (src_bytes < 0 || src_bytes > 16) fault("cp.async source size " + std::to_string(src_bytes) + " is outside 0..16");
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0) fault("cp.async shared destination is not 16-byte aligned");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0) {
    fault("cp.async global source is not 16-byte aligned");
  }
  size_t off = 0;
  Region* r = region_of(smem_dst, 16, &off, "cp.async");
  /* A second copy into bytes still in flight is a race like any other access. */
  if (!r->cp_pending.empty()) {
    bool pending;
    {
      std::lock_guard<std::mutex> g(tls->L->shm_m);
      pending = cp_pending_locked(*r, off, 16);
    }
    if (pending) cp_pending_fault(access_str(*r, off, "cp.async"));
  }
  cp_pending_add(*r, off, +1);
  tls->cp_open.push_back(Copy{static_cast<unsigned char*>(smem_dst), static_cast<const unsigned char*>(gmem_src), src_bytes});
}

void cp_async_commit() {
  tls->cp_groups.push_back(std::move(tls->cp_open));
  tls->cp_open.clear();
}

void cp_async_wait(int pending_groups) {
  check_abort();
  while (tls->cp_groups.size() > static_cast<size_t>(std::max(pending_groups, 0))) {
    perform_copies(tls->cp_groups.front());
    tls->cp_groups.pop_front();
  }
}

void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait(0);
}

int32_t launch(const QlLaunchConfig* cfg, const void* params, char* err, size_t err_len,
               void (*body)(const void*)) {
  try {
    return run_launch(cfg, params, err, err_len, body);
  } catch (const std::exception& e) {
    write_err(err, err_len, std::string("emulator failure: ") + e.what());
  } catch (...) {
    write_err(err, err_len, "emulator failure");
  }
  return 3;
}

}  // namespace qlemu

/* Options for the next launch made from the calling thread: race checking (overrides
 * QLORA_EMU_RACECHECK) and the deadlock watchdog in milliseconds. */
extern "C" void qlemu_set_launch_options(int32_t race_check, uint32_t watchdog_ms) {
  qlemu::next_options = qlemu::Options{true, race_check != 0, watchdog_ms};
}
