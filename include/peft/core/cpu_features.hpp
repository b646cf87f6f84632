#pragma once
// Which instruction-set paths this CPU and this operating system allow, found at run time, so
// that one binary (built without -mavx512bf16 or -mamx-*) picks the fastest correct kernel for
// the frozen-weight products (core/ops/frozen_gemm.hpp) on whichever machine it runs.
//
// A feature counts only when three things hold: CPUID says the CPU has it, XCR0 (read with
// XGETBV) says the OS saves its registers on a context switch, and, for AMX, Linux has granted
// this process the tile data state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)):
// without that grant the first tile instruction faults. docs/performance.md, "Frozen-weight
// kernels", describes the dispatch.
//
// The environment variable PEFT_CPU_KERNELS=portable|avx512bf16|amx forces a path (tests, and
// comparing paths on one machine); kernel entry points also take the path as an argument. A
// forced path the machine cannot run is a ConfigError, never an illegal instruction.
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "peft/core/error.hpp"

namespace peft::cpu {

/// The implementation of a frozen-weight product.
enum class KernelPath {
  portable,    ///< plain C++ and Eigen: correct on every CPU
  avx512bf16,  ///< AVX-512F/BW/VL + AVX512_BF16 (vdpbf16ps): Zen 4/5, Cooper Lake, Sapphire Rapids
  amx,         ///< AMX-TILE + AMX-BF16 tiles (Sapphire Rapids and later), on top of avx512bf16
};

inline std::string_view to_string(KernelPath path) {
  switch (path) {
    case KernelPath::portable:
      return "portable";
    case KernelPath::avx512bf16:
      return "avx512bf16";
    case KernelPath::amx:
      return "amx";
  }
  return "unknown";
}

/// "portable", "avx512bf16" or "amx"; anything else is a ConfigError naming `source` (where the
/// text came from, e.g. "PEFT_CPU_KERNELS").
inline KernelPath parse_kernel_path(std::string_view text, std::string_view source) {
  if (text == "portable") return KernelPath::portable;
  if (text == "avx512bf16") return KernelPath::avx512bf16;
  if (text == "amx") return KernelPath::amx;
  throw ConfigError(std::string(source) + ": kernel path '" + std::string(text) +
                    "', expected one of portable, avx512bf16, amx");
}

/// What CPUID, XCR0 and the kernel say. `*_usable()` combine them into what may run.
struct CpuFeatures {
  // CPUID
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512_bf16 = false;
  bool amx_tile = false, amx_bf16 = false;
  // XCR0: the OS saves opmask + ZMM state (bits 1, 2, 5, 6, 7) / tile config + data (17, 18)
  bool os_avx512 = false, os_amx = false;
  // Linux granted this process the AMX tile data state (ARCH_REQ_XCOMP_PERM)
  bool amx_permitted = false;
  // Why AMX is off when the CPU has it (the permission request's error), else empty.
  std::string amx_note;

  bool avx512_usable() const { return avx512f && avx512bw && avx512vl && os_avx512; }
  bool avx512bf16_usable() const { return avx512_usable() && avx512_bf16; }
  bool amx_usable() const {
    return avx512bf16_usable() && amx_tile && amx_bf16 && os_amx && amx_permitted;
  }
};

namespace detail {

#if defined(__x86_64__)
// XGETBV(0) without the -mxsave target flag: the instruction's bytes, after checking OSXSAVE.
inline std::uint64_t read_xcr0() {
  std::uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<std::uint64_t>(edx) << 32) | eax;
}
#endif

// Linux x86-64 arch_prctl codes (asm/prctl.h) and the XSAVE feature number of AMX tile data.
inline constexpr long kArchGetXcompPerm = 0x1022;
inline constexpr long kArchReqXcompPerm = 0x1023;
inline constexpr long kXfeatureXtiledata = 18;

/// Asks Linux for the AMX tile data state. Returns "" when granted, else why not (one line).
inline std::string request_amx_permission() {
#if defined(__linux__) && defined(__x86_64__)
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    const int error = errno;
    // EINVAL: a kernel older than 5.16 (no dynamic XSTATE) or no AMX support in the kernel;
    // ENOSPC: the signal stack (sigaltstack) is too small for the tile state.
    return std::string("arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed: ") +
           std::strerror(error) + (error == EINVAL ? " (kernel without AMX support, < 5.16)" : "");
  }
  // Confirm the grant: the permitted mask must now hold the tile data bit.
  std::uint64_t permitted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &permitted) != 0 ||
      (permitted & (std::uint64_t(1) << kXfeatureXtiledata)) == 0) {
    return "arch_prctl(ARCH_GET_XCOMP_PERM) does not list XFEATURE_XTILEDATA after the request";
  }
  return "";
#else
  return "AMX needs Linux on x86-64 (arch_prctl)";
#endif
}

}  // namespace detail

/// Detects the features now (no caching). Requests the AMX permission when the CPU and the OS
/// have AMX; the grant is process-wide and idempotent.
inline CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid(1, eax, ebx, ecx, edx);
  const bool osxsave = (ecx >> 27) & 1u;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const unsigned max_subleaf = eax;
  f.avx512f = (ebx >> 16) & 1u;
  f.avx512bw = (ebx >> 30) & 1u;
  f.avx512vl = (ebx >> 31) & 1u;
  f.amx_bf16 = (edx >> 22) & 1u;
  f.amx_tile = (edx >> 24) & 1u;
  if (max_subleaf >= 1) {
    __cpuid_count(7, 1, eax, ebx, ecx, edx);
    f.avx512_bf16 = (eax >> 5) & 1u;
  }
  if (osxsave) {
    const std::uint64_t xcr0 = detail::read_xcr0();
    f.os_avx512 = (xcr0 & 0xe6) == 0xe6;
    f.os_amx = (xcr0 & 0x60000) == 0x60000;
  }
  if (f.amx_tile && f.amx_bf16 && f.os_amx) {
    f.amx_note = detail::request_amx_permission();
    f.amx_permitted = f.amx_note.empty();
  }
#endif
  return f;
}

/// The features of this machine, detected once per process (a function-local static).
inline const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect_cpu_features();
  return features;
}

/// "" when `path` can run with `f`, else what it lacks (for error messages).
inline std::string missing_for(KernelPath path, const CpuFeatures& f) {
  std::string missing;
  const auto need = [&](bool ok, std::string_view what) {
    if (!ok) missing += (missing.empty() ? "" : ", ") + std::string(what);
  };
  if (path == KernelPath::portable) return missing;
  need(f.avx512f, "avx512f");
  need(f.avx512bw, "avx512bw");
  need(f.avx512vl, "avx512vl");
  need(f.avx512_bf16, "avx512_bf16");
  need(f.os_avx512 || !(f.avx512f), "OS support for AVX-512 state (XCR0)");
  if (path == KernelPath::amx) {
    need(f.amx_tile, "amx-tile");
    need(f.amx_bf16, "amx-bf16");
    need(f.os_amx || !(f.amx_tile && f.amx_bf16), "OS support for AMX state (XCR0)");
    if (f.amx_tile && f.amx_bf16 && f.os_amx && !f.amx_permitted) need(false, f.amx_note);
  }
  return missing;
}

/// The fastest path `f` allows: amx, then avx512bf16, then portable.
inline KernelPath best_kernel_path(const CpuFeatures& f) {
  if (f.amx_usable()) return KernelPath::amx;
  if (f.avx512bf16_usable()) return KernelPath::avx512bf16;
  return KernelPath::portable;
}

/// Throws ConfigError, naming `source`, when `path` cannot run on a machine with `f`.
inline void check_kernel_path(KernelPath path, const CpuFeatures& f, std::string_view source) {
  const std::string missing = missing_for(path, f);
  if (!missing.empty()) {
    throw ConfigError(std::string(source) + ": kernel path '" + std::string(to_string(path)) +
                      "' cannot run on this CPU, which lacks " + missing +
                      "; expected a path it supports (best here: " +
                      std::string(to_string(best_kernel_path(f))) + ")");
  }
}

/// The path for `override_text` (PEFT_CPU_KERNELS's value; null or empty: none) on a machine
/// with `f`: the override, checked, else the best path.
inline KernelPath choose_kernel_path(const char* override_text, const CpuFeatures& f) {
  if (override_text == nullptr || *override_text == '\0') return best_kernel_path(f);
  const KernelPath path = parse_kernel_path(override_text, "PEFT_CPU_KERNELS");
  check_kernel_path(path, f, "PEFT_CPU_KERNELS");
  return path;
}

/// The path kernels use by default: PEFT_CPU_KERNELS if set (checked), else the best this
/// machine allows. Decided once per process; an invalid PEFT_CPU_KERNELS throws ConfigError on
/// every call.
inline KernelPath kernel_path() {
  static const KernelPath path =
      choose_kernel_path(std::getenv("PEFT_CPU_KERNELS"), cpu_features());
  return path;
}

}  // namespace peft::cpu
