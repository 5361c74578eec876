// The host SIMT runtime behind simt.h: fibers, the scheduler and its checks.
//
// A launch runs in waves of CTAs (as many as fit kWaveThreads threads); the threads
// of a wave are fibers on one OS thread, in one pool. A fiber runs until it reaches
// a barrier, a warp-synchronous call, an atomic or a fence, or its end, then
// switches back to the scheduler, which completes barriers and warp calls once
// every participant has arrived and picks the next fiber to run: in order (seed 0;
// fibers are released in reverse and taken from the back) or at random (any other
// seed). With a seed, a barrier also leaves one of its threads behind now and then
// (one release in four): left-behind threads run one at a time, oldest first, only
// when no other thread of the wave can, so their CTAs stall at their next barrier
// while other CTAs run on. That exposes what uniform picks rarely do: a CTA telling
// other CTAs (an atomic) that it is done before all its threads have written.
#include "simt/simt.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#else
#define SIMT_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace simt {

uint64_t launch_seed = 0;

namespace detail {

uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

namespace {

constexpr size_t kStackBytes = 256 << 10;  // per fiber; ASan frames are large
constexpr size_t kGuardBytes = 4096;        // an inaccessible page below each stack
constexpr unsigned kWaveThreads = 16384;    // threads of the CTAs that run interleaved

enum class State { Runnable, AtBarrier, AtWarpOp, Exited };

struct SharedBlock {
  const void* tag;
  void* memory;
};

struct Cta {
  uint3 idx{};
  unsigned first_fiber = 0;  // its threads are fibers[first_fiber, first_fiber + threads_per_cta)
  unsigned at_barrier = 0, exited = 0;
  std::vector<uint32_t> warp_waiting;  // per warp: lanes waiting in a warp call
  std::vector<SharedBlock> shared_blocks;
};

struct Fiber {
  Cta* cta = nullptr;
  unsigned index = 0;  // linear thread index in the CTA
  uint3 idx{};
  State state = State::Runnable;
  const char* site = nullptr;  // the barrier, or the warp call's name
  uint32_t mask = 0;
  WarpComplete complete = nullptr;
  void* args = nullptr;
  char* stack = nullptr;  // lowest byte of the stack
#if defined(__x86_64__)
  void* sp = nullptr;  // saved stack pointer while switched out
#else
  ucontext_t context;
#endif
  void* fake_stack = nullptr;  // ASan's bookkeeping across switches
};

// The launch being run.
const char* kernel_name = nullptr;
void (*kernel_body)(void*) = nullptr;
void* kernel_context = nullptr;
std::vector<Cta> ctas;       // the wave
std::vector<Fiber> fibers;   // the wave's threads
std::vector<Fiber*> runnable;
std::vector<Fiber*> left_behind;  // run only when nothing in `runnable` can
Fiber* current = nullptr;
unsigned threads_per_cta = 0;
std::mt19937_64 rng;
bool shuffle_order = false;

// The scheduler's side of the switches.
#if defined(__x86_64__)
void* scheduler_sp = nullptr;
#else
ucontext_t scheduler_context;
#endif
const void* scheduler_stack_bottom = nullptr;
size_t scheduler_stack_size = 0;

std::vector<char*> stacks;  // reused by every wave
uint16_t fragment_layouts[3][256];

}  // namespace

[[noreturn]] void fail(const char* format, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "simt: %s", kernel_name ? kernel_name : "(no kernel)");
  if (current) {
    const uint3 b = current->cta->idx;
    std::fprintf(stderr, ", CTA (%u, %u, %u), thread (%u, %u, %u)", b.x, b.y, b.z, current->idx.x, current->idx.y,
                 current->idx.z);
  }
  std::fprintf(stderr, ": ");
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::_Exit(3);
}

unsigned lane_id() { return current->index % 32; }

const uint16_t* fragment_layout(int use) { return fragment_layouts[use]; }

}  // namespace detail
}  // namespace simt

// ----- Context switches ------------------------------------------------------------

using simt::detail::Fiber;

extern "C" void simt_fiber_main(Fiber* fiber);

#if defined(__x86_64__)
// simt_switch(save, next): pushes the callee-saved registers and the SSE / x87
// control words, saves the stack pointer to *save, loads `next`, pops the same
// from there and returns into that context. simt_fiber_start is where a new
// fiber's first switch returns to, with its Fiber* in r12.
extern "C" void simt_switch(void** save, void* next);
asm(R"(
  .text
  .globl simt_switch
  .type simt_switch, @function
simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_switch, .-simt_switch

  .globl simt_fiber_start
  .type simt_fiber_start, @function
simt_fiber_start:
  movq %r12, %rdi
  call simt_fiber_main@PLT
  ud2
  .size simt_fiber_start, .-simt_fiber_start
)");
extern "C" void simt_fiber_start();
#endif

namespace simt {
namespace detail {
namespace {

#if SIMT_ASAN
#define SIMT_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define SIMT_FINISH_SWITCH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define SIMT_START_SWITCH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define SIMT_FINISH_SWITCH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#endif

void prepare_stack(Fiber& fiber) {
#if defined(__x86_64__)
  // The frame simt_switch pops: control words, r15..r12, rbx, rbp, then the return address.
  auto* top = reinterpret_cast<uint64_t*>(fiber.stack + kStackBytes);
  uint64_t* sp = top - 8;
  const uint32_t control[2] = {0x1F80, 0x037F};  // default MXCSR and x87 control word
  std::memcpy(&sp[0], control, sizeof control);
  sp[1] = 0;                                     // r15
  sp[2] = 0;                                     // r14
  sp[3] = 0;                                     // r13
  sp[4] = reinterpret_cast<uint64_t>(&fiber);    // r12: simt_fiber_start's argument
  sp[5] = 0;                                     // rbx
  sp[6] = 0;                                     // rbp
  sp[7] = reinterpret_cast<uint64_t>(&simt_fiber_start);
  fiber.sp = sp;
#else
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = fiber.stack;
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = nullptr;
  makecontext(&fiber.context, reinterpret_cast<void (*)()>(&simt_fiber_main), 1, &fiber);
#endif
}

void switch_to(Fiber& fiber) {
  void* fake_stack = nullptr;
  SIMT_START_SWITCH(&fake_stack, fiber.stack, kStackBytes);
#if defined(__x86_64__)
  simt_switch(&scheduler_sp, fiber.sp);
#else
  swapcontext(&scheduler_context, &fiber.context);
#endif
  SIMT_FINISH_SWITCH(fake_stack, nullptr, nullptr);
}

}  // namespace

// Called on the fiber's stack: back to the scheduler until it resumes this fiber.
void switch_to_scheduler(Fiber& fiber, bool exiting) {
  SIMT_START_SWITCH(exiting ? nullptr : &fiber.fake_stack, scheduler_stack_bottom, scheduler_stack_size);
#if defined(__x86_64__)
  simt_switch(&fiber.sp, scheduler_sp);
#else
  swapcontext(&fiber.context, &scheduler_context);
#endif
  SIMT_FINISH_SWITCH(fiber.fake_stack, &scheduler_stack_bottom, &scheduler_stack_size);
}

}  // namespace detail
}  // namespace simt

// A fiber's whole life. It keeps no addressable locals, so a finished fiber's
// stack holds no ASan poison and can be reused without clearing.
extern "C" void simt_fiber_main(Fiber* fiber) {
  using namespace simt::detail;
  SIMT_FINISH_SWITCH(nullptr, &scheduler_stack_bottom, &scheduler_stack_size);
  kernel_body(kernel_context);
  fiber->state = simt::detail::State::Exited;
  switch_to_scheduler(*fiber, /*exiting=*/true);
  fail("a finished fiber was resumed");
}

namespace simt {
namespace detail {
namespace {

void ensure_stacks(size_t count) {
  while (stacks.size() < count) {
    void* memory = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) fail("cannot map a fiber stack");
    mprotect(memory, kGuardBytes, PROT_NONE);  // overflow faults instead of corrupting the next stack
    stacks.push_back(static_cast<char*>(memory) + kGuardBytes);
  }
}

Fiber* take_runnable() {
  if (runnable.empty()) {  // the longest left-behind thread moves on; the others stay behind
    runnable.push_back(left_behind.front());
    left_behind.erase(left_behind.begin());
  }
  if (shuffle_order) std::swap(runnable[size_t(rng() % runnable.size())], runnable.back());
  Fiber* fiber = runnable.back();
  runnable.pop_back();
  return fiber;
}

void release(Fiber& fiber) {
  fiber.state = State::Runnable;
  runnable.push_back(&fiber);
}

Fiber& thread_of(const Cta& cta, unsigned index) { return fibers[cta.first_fiber + index]; }

std::string describe_thread(const Fiber& fiber) {
  char text[64];
  std::snprintf(text, sizeof text, "thread (%u, %u, %u)", fiber.idx.x, fiber.idx.y, fiber.idx.z);
  return text;
}

// Every thread of the CTA that has not exited waits at a barrier.
void complete_barrier(Cta& cta) {
  const Fiber* first = nullptr;
  const Fiber* gone = nullptr;
  for (unsigned t = 0; t < threads_per_cta; ++t) {
    const Fiber& f = thread_of(cta, t);
    if (f.state == State::Exited && !gone) gone = &f;
    if (f.state != State::AtBarrier) continue;
    if (!first) first = &f;
    if (std::strcmp(f.site, first->site) != 0) {
      fail("barrier divergence: %s waits at __syncthreads() at %s, %s at %s", describe_thread(*first).c_str(),
           first->site, describe_thread(f).c_str(), f.site);
    }
  }
  if (gone) {
    fail("barrier divergence: %u threads wait at __syncthreads() at %s, but %u have exited (first: %s)",
         cta.at_barrier, first->site, cta.exited, describe_thread(*gone).c_str());
  }
  cta.at_barrier = 0;
  for (unsigned t = threads_per_cta; t-- > 0;) {
    if (thread_of(cta, t).state == State::AtBarrier) release(thread_of(cta, t));
  }
  if (shuffle_order && rng() % 4 == 0) {  // leave one of them behind
    std::swap(runnable[runnable.size() - 1 - size_t(rng() % threads_per_cta)], runnable.back());
    left_behind.push_back(runnable.back());
    runnable.pop_back();
  }
}

void arrive_at_warp_call(Fiber& fiber) {
  Cta& cta = *fiber.cta;
  const unsigned warp = fiber.index / 32, lane = fiber.index % 32;
  const unsigned lanes = std::min(32u, threads_per_cta - warp * 32);
  const uint32_t existing = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1;
  if (!(fiber.mask >> lane & 1)) fail("%s: mask 0x%08x leaves out the calling lane %u", fiber.site, fiber.mask, lane);
  if (fiber.mask & ~existing) {
    fail("%s: mask 0x%08x names lanes of warp %u that do not exist (it has %u threads)", fiber.site, fiber.mask, warp,
         lanes);
  }
  cta.warp_waiting[warp] |= 1u << lane;
  if ((cta.warp_waiting[warp] & fiber.mask) != fiber.mask) return;

  void* args[32] = {};
  for (unsigned l = 0; l < 32; ++l) {
    if (!(fiber.mask >> l & 1)) continue;
    const Fiber& other = thread_of(cta, warp * 32 + l);
    if (other.complete != fiber.complete || other.mask != fiber.mask) {
      fail("warp %u: lane %u is in %s with mask 0x%08x, lane %u in %s with mask 0x%08x", warp, lane, fiber.site,
           fiber.mask, l, other.site, other.mask);
    }
    args[l] = other.args;
  }
  fiber.complete(args, fiber.mask);
  cta.warp_waiting[warp] &= ~fiber.mask;
  for (unsigned l = 32; l-- > 0;) {
    if (fiber.mask >> l & 1) release(thread_of(cta, warp * 32 + l));
  }
}

[[noreturn]] void report_deadlock(const Cta& cta) {
  std::string waiting;
  for (unsigned t = 0; t < threads_per_cta; ++t) {
    const Fiber& f = thread_of(cta, t);
    if (f.state == State::Exited) continue;
    char text[200];
    std::snprintf(text, sizeof text, "\n  %s (warp %u, lane %u) waits in %s%s", describe_thread(f).c_str(), t / 32,
                  t % 32, f.state == State::AtBarrier ? "__syncthreads() at " : "", f.site);
    waiting += text;
    if (f.state == State::AtWarpOp) {
      std::snprintf(text, sizeof text, " (mask 0x%08x)", f.mask);
      waiting += text;
    }
  }
  current = nullptr;
  fail("deadlock in CTA (%u, %u, %u): %u of %u threads have exited, the others can never continue:%s", cta.idx.x,
       cta.idx.y, cta.idx.z, cta.exited, threads_per_cta, waiting.c_str());
}

// Runs the CTAs `wave` (linear block indices) interleaved, to the end.
void run_wave(const uint64_t* wave, size_t count) {
  ctas.resize(count);
  runnable.clear();
  for (size_t w = 0; w < count; ++w) {
    Cta& cta = ctas[w];
    const uint64_t c = wave[w];
    cta.idx = make_uint3(unsigned(c % grid_dim.x), unsigned(c / grid_dim.x % grid_dim.y),
                         unsigned(c / (uint64_t(grid_dim.x) * grid_dim.y)));
    cta.first_fiber = unsigned(w * threads_per_cta);
    cta.at_barrier = cta.exited = 0;
    cta.warp_waiting.assign((threads_per_cta + 31) / 32, 0u);
    for (unsigned t = 0; t < threads_per_cta; ++t) {
      Fiber& f = thread_of(cta, t);
      f = Fiber{};
      f.cta = &cta;
      f.index = t;
      f.idx = make_uint3(t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y));
      f.stack = stacks[cta.first_fiber + t];
      prepare_stack(f);
    }
  }
  for (size_t f = count * threads_per_cta; f-- > 0;) release(fibers[f]);

  while (!runnable.empty() || !left_behind.empty()) {
    Fiber& fiber = *take_runnable();
    current = &fiber;
    thread_idx = fiber.idx;
    block_idx = fiber.cta->idx;
    switch_to(fiber);
    Cta& cta = *fiber.cta;
    switch (fiber.state) {
      case State::Runnable:  // yielded at an atomic or a fence
        release(fiber);
        break;
      case State::Exited:
        ++cta.exited;
        break;
      case State::AtBarrier:
        ++cta.at_barrier;
        break;
      case State::AtWarpOp:
        arrive_at_warp_call(fiber);
        break;
    }
    if (cta.at_barrier > 0 && cta.at_barrier + cta.exited == threads_per_cta) complete_barrier(cta);
  }
  for (const Cta& cta : ctas) {
    if (cta.exited != threads_per_cta) report_deadlock(cta);
  }
  current = nullptr;
  for (Cta& cta : ctas) {
    for (const SharedBlock& block : cta.shared_blocks) std::free(block.memory);
    cta.shared_blocks.clear();
  }
}

}  // namespace

void sync_threads(const char* site) {
  Fiber& fiber = *current;
  fiber.state = State::AtBarrier;
  fiber.site = site;
  switch_to_scheduler(fiber, /*exiting=*/false);
}

void warp_sync_op(const char* name, uint32_t mask, WarpComplete complete, void* args) {
  Fiber& fiber = *current;
  fiber.state = State::AtWarpOp;
  fiber.site = name;
  fiber.mask = mask;
  fiber.complete = complete;
  fiber.args = args;
  switch_to_scheduler(fiber, /*exiting=*/false);
}

void yield_to_other_threads() {
  if (current) switch_to_scheduler(*current, /*exiting=*/false);  // stays Runnable
}

void* shared_block(const void* tag, size_t size, size_t alignment) {
  if (!current) fail("shared memory used outside a kernel");
  std::vector<SharedBlock>& blocks = current->cta->shared_blocks;
  for (const SharedBlock& block : blocks) {
    if (block.tag == tag) return block.memory;
  }
  void* memory = nullptr;
  if (posix_memalign(&memory, std::max(alignment, sizeof(void*)), size) != 0) fail("cannot allocate shared memory");
  std::memset(memory, 0xFF, size);  // NaN floats, all-ones integers: reading what nothing wrote shows up
  blocks.push_back({tag, memory});
  return memory;
}

void complete_shuffle(void* const* args, uint32_t mask) {
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1)) continue;
    auto* mine = static_cast<ShuffleArgs*>(args[lane]);
    if (mine->source < 0 || mine->source >= 32 || !(mask >> mine->source & 1)) {
      fail("a shuffle: lane %u reads lane %d, which is not in the mask 0x%08x", lane, mine->source, mask);
    }
    mine->result = static_cast<ShuffleArgs*>(args[mine->source])->value;
  }
}

void complete_ballot(void* const* args, uint32_t mask) {
  uint32_t votes = 0;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if ((mask >> lane & 1) && static_cast<BallotArgs*>(args[lane])->predicate) votes |= 1u << lane;
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (mask >> lane & 1) static_cast<BallotArgs*>(args[lane])->result = votes;
  }
}

void run_grid(const char* kernel, dim3 grid, dim3 block, uint64_t seed, void (*body)(void*), void* context) {
  kernel_name = kernel;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) {
    fail("invalid launch: block (%u, %u, %u)", block.x, block.y, block.z);
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    fail("invalid launch: grid (%u, %u, %u)", grid.x, grid.y, grid.z);
  }
  kernel_body = body;
  kernel_context = context;
  block_dim = block;
  grid_dim = grid;
  threads_per_cta = unsigned(threads);
  shuffle_order = seed != 0;
  rng.seed(seed);
  for (auto& layout : fragment_layouts) {
    for (int i = 0; i < 256; ++i) layout[i] = uint16_t(i);
    if (shuffle_order) std::shuffle(std::begin(layout), std::end(layout), rng);
  }

  const uint64_t count = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> blocks(count);
  for (uint64_t c = 0; c < count; ++c) blocks[c] = c;
  if (shuffle_order) std::shuffle(blocks.begin(), blocks.end(), rng);
  const size_t wave = std::max<size_t>(1, std::min<uint64_t>(count, kWaveThreads / threads_per_cta));
  ensure_stacks(wave * threads_per_cta);
  fibers.assign(wave * threads_per_cta, Fiber{});
  ctas.reserve(wave);  // fibers point at their Cta: no reallocation while a wave runs
  for (uint64_t first = 0; first < count; first += wave) {
    run_wave(blocks.data() + first, size_t(std::min<uint64_t>(wave, count - first)));
  }
  kernel_name = nullptr;
}

}  // namespace detail
}  // namespace simt
