#pragma once
// Tensor: a dense, row-major, contiguous n-d array of a scalar type on a backend.
//
// The tensor owns its storage (value semantics: a copy is a deep copy, a move is free). CPU math
// goes through Eigen maps of the storage (see `matrix()`), so there is one memory layout for
// every op. The backend parameter lets a CUDA specialisation slot in without touching call
// sites: code that names `Tensor<T, B>` keeps compiling when `B` becomes `backend::Cuda`.
#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <new>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace peft {

namespace backend {
/// Host memory, Eigen kernels (with OpenMP threads).
struct Cpu {};
/// Device memory, CUDA kernels (see include/peft/backend/cuda/).
struct Cuda {};
}  // namespace backend

using Shape = std::vector<std::int64_t>;

/// Alignment of every tensor's storage, in bytes: a cache line, and one AVX-512 packet.
inline constexpr std::size_t tensor_alignment = 64;

/// Buffers of at least huge_page_threshold bytes (a step's logits and their gradient; smaller
/// activations stay on 4 KiB pages, where a partly used huge page would count whole in the
/// resident size) are aligned to huge_page_bytes and offered to Linux as transparent huge pages
/// (madvise MADV_HUGEPAGE, which Debian's default THP mode "madvise" waits for): one page fault
/// per 2 MiB instead of 512 (docs/performance.md, "The bf16 step on AMX", has the measured gain
/// and why the threshold is 32 MiB).
inline constexpr std::size_t huge_page_bytes = std::size_t(2) << 20;
inline constexpr std::size_t huge_page_threshold = std::size_t(32) << 20;

/// A std::allocator that returns `Alignment`-aligned storage.
///
/// Why: Eigen's vectorised reductions (sum, dot, norms) on a Map peel leading elements up to the
/// first packet-aligned address, so the summation order -- and the last bit of the result --
/// follows the heap address. std::vector's 16-byte alignment hides that under SSE2 but not
/// with AVX (32 bytes) or AVX-512 (64). With every buffer aligned to 64 bytes, the peel depends
/// only on shapes and offsets, and native builds are bit-reproducible run to run.
template <class T, std::size_t Alignment = tensor_alignment>
struct AlignedAllocator {
  static_assert(Alignment >= alignof(T) && (Alignment & (Alignment - 1)) == 0,
                "AlignedAllocator: Alignment must be a power of two no smaller than alignof(T)");
  using value_type = T;
  template <class U>
  struct rebind {
    using other = AlignedAllocator<U, Alignment>;
  };

  AlignedAllocator() noexcept = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U, Alignment>&) noexcept {}

  T* allocate(std::size_t n) {
    if (n > std::size_t(-1) / sizeof(T)) throw std::bad_array_new_length();
    const std::size_t bytes = n * sizeof(T);
    if (bytes < huge_page_threshold)
      return static_cast<T*>(::operator new(bytes, std::align_val_t(Alignment)));
    void* p = ::operator new(bytes, std::align_val_t(huge_page_bytes));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Advice only: where Linux declines (THP off, no huge page free) the pages stay 4 KiB.
    (void)::madvise(p, bytes / huge_page_bytes * huge_page_bytes, MADV_HUGEPAGE);
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (n * sizeof(T) < huge_page_threshold)
      ::operator delete(p, std::align_val_t(Alignment));
    else
      ::operator delete(p, std::align_val_t(huge_page_bytes));
  }

  template <class U>
  bool operator==(const AlignedAllocator<U, Alignment>&) const noexcept {
    return true;
  }
};

/// Host storage of tensors and of the ops' scratch buffers (64-byte aligned; see AlignedAllocator).
template <class T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

/// "[2, 3, 4]": shapes in error messages.
inline std::string shape_string(const Shape& shape) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

/// Number of elements of a shape; throws on a negative extent.
inline std::int64_t shape_numel(const Shape& shape) {
  std::int64_t n = 1;
  for (std::int64_t extent : shape) {
    if (extent < 0) throw ShapeError("negative extent in shape " + shape_string(shape));
    n *= extent;
  }
  return n;
}

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixMap = Eigen::Map<RowMatrix<T>>;
template <class T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>>;
template <class T>
using VectorMap = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>;
template <class T>
using ConstVectorMap = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>;

template <class T, class Backend = backend::Cpu>
class Tensor;

/// The CPU tensor. Storage is an AlignedVector<T> (64-byte aligned); shape is a vector of
/// extents (row-major).
template <class T>
class Tensor<T, backend::Cpu> {
  static_assert(std::is_floating_point_v<T>, "peft::Tensor holds float or double");

 public:
  using Scalar = T;
  using Backend = backend::Cpu;

  Tensor() = default;
  explicit Tensor(Shape shape) : shape_(std::move(shape)), data_(shape_numel(shape_), T(0)) {}
  Tensor(Shape shape, T fill) : shape_(std::move(shape)), data_(shape_numel(shape_), fill) {}
  Tensor(Shape shape, AlignedVector<T> values)
      : shape_(std::move(shape)), data_(std::move(values)) {
    check_value_count();
  }
  /// Copies `values` into aligned storage.
  Tensor(Shape shape, const std::vector<T>& values)
      : shape_(std::move(shape)), data_(values.begin(), values.end()) {
    check_value_count();
  }
  Tensor(Shape shape, std::initializer_list<T> values)
      : shape_(std::move(shape)), data_(values.begin(), values.end()) {
    check_value_count();
  }

  static Tensor zeros(Shape shape) { return Tensor(std::move(shape)); }
  static Tensor filled(Shape shape, T value) { return Tensor(std::move(shape), value); }

  const Shape& shape() const { return shape_; }
  std::int64_t dim(std::size_t axis) const { return shape_.at(axis); }
  std::size_t rank() const { return shape_.size(); }
  std::int64_t numel() const { return static_cast<std::int64_t>(data_.size()); }
  bool empty() const { return data_.empty() && shape_.empty(); }

  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }
  AlignedVector<T>& values() { return data_; }
  const AlignedVector<T>& values() const { return data_; }
  /// A copy of the values in a plain std::vector (for APIs that want one).
  std::vector<T> to_vector() const { return std::vector<T>(data_.begin(), data_.end()); }
  T& operator[](std::int64_t i) { return data_[static_cast<std::size_t>(i)]; }
  const T& operator[](std::int64_t i) const { return data_[static_cast<std::size_t>(i)]; }

  /// Rows = product of all leading extents, columns = the last extent.
  std::int64_t rows() const {
    return shape_.empty() ? 1 : numel() / std::max<std::int64_t>(cols(), 1);
  }
  std::int64_t cols() const { return shape_.empty() ? 1 : shape_.back(); }

  /// The tensor as a [rows, cols] row-major Eigen matrix (no copy).
  MatrixMap<T> matrix() { return MatrixMap<T>(data_.data(), rows(), cols()); }
  ConstMatrixMap<T> matrix() const { return ConstMatrixMap<T>(data_.data(), rows(), cols()); }
  VectorMap<T> vector() { return VectorMap<T>(data_.data(), numel()); }
  ConstVectorMap<T> vector() const { return ConstVectorMap<T>(data_.data(), numel()); }

  /// Same storage, new shape with the same element count.
  void reshape(Shape shape) {
    if (shape_numel(shape) != numel())
      throw ShapeError("cannot reshape " + shape_string(shape_) + " to " + shape_string(shape));
    shape_ = std::move(shape);
  }
  void fill(T value) { std::fill(data_.begin(), data_.end(), value); }
  void set_zero() { fill(T(0)); }

  template <class U>
  Tensor<U> cast() const {
    return Tensor<U>(shape_, AlignedVector<U>(data_.begin(), data_.end()));
  }

 private:
  void check_value_count() const {
    if (static_cast<std::int64_t>(data_.size()) != shape_numel(shape_))
      throw ShapeError("tensor of shape " + shape_string(shape_) + " given " +
                       std::to_string(data_.size()) + " values");
  }

  Shape shape_;
  AlignedVector<T> data_;
};

/// Throws a ShapeError naming `what` unless `t` has exactly `expected` shape.
template <class T>
void require_shape(const Tensor<T>& t, const Shape& expected, const std::string& what) {
  if (t.shape() != expected)
    throw ShapeError(what + ": shape " + shape_string(t.shape()) + ", expected " +
                     shape_string(expected));
}

}  // namespace peft
