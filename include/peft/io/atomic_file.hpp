#pragma once
// Safe file access, the one place the library writes files and opens untrusted ones for reading.
//
// Writes: write_file_atomically puts the bytes under a temporary name created exclusively in the
// target folder (O_CREAT | O_EXCL | O_NOFOLLOW, random suffix: a file or symlink planted there is
// never followed or reused), fsyncs them, renames the temporary over the target and fsyncs the
// folder, so a reader (or a crash) sees the old file or the new one, never a prefix, and the new
// one survives a power loss once the call returns. replace_directory_atomically does the same for
// a whole folder (an adapter: config and tensors must never mix two saves): it fills a new folder
// beside the target and swaps the two with one rename (Linux renameat2 RENAME_EXCHANGE).
//
// Reads: read_regular_file opens without blocking (a FIFO would block a plain open), checks on
// the open descriptor that it is a regular file (no FIFO, device such as /dev/zero, directory)
// and that its size is under the caller's bound, and only then allocates.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <new>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/printable.hpp"

namespace peft::io {

/// Marks the temporary files and folders of the writers below: `.<target>.peft-tmp-<random>`.
/// The leading dot and the marker keep them apart from anything a loader looks for.
inline constexpr std::string_view kTemporaryMarker = ".peft-tmp-";
/// The previous folder while a non-exchanging replacement is in progress (see
/// replace_directory_atomically): `.<target>.peft-old-<random>`.
inline constexpr std::string_view kPreviousMarker = ".peft-old-";

namespace detail {

/// Owns a POSIX descriptor.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd = -1) : fd_(fd) {}
  FileDescriptor(FileDescriptor&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  FileDescriptor& operator=(FileDescriptor&& other) noexcept {
    if (this != &other) {
      if (fd_ >= 0) ::close(fd_);
      fd_ = other.fd_;
      other.fd_ = -1;
    }
    return *this;
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  /// Closes now and reports close's own error (NFS reports write errors there).
  int close() {
    const int result = fd_ >= 0 ? ::close(fd_) : 0;
    fd_ = -1;
    return result;
  }

 private:
  int fd_;
};

inline std::string errno_text(int error) { return std::generic_category().message(error); }

/// 16 hex digits from the OS entropy source: temporary names nobody can predict and plant.
inline std::string random_suffix() {
  std::random_device device;
  const std::uint64_t value = (std::uint64_t{device()} << 32) ^ std::uint64_t{device()};
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(16, '0');
  for (int i = 0; i < 16; ++i) out[static_cast<std::size_t>(i)] = kHex[(value >> (4 * i)) & 0xf];
  return out;
}

/// The folder holding `path` ("." for a bare name).
inline std::filesystem::path parent_folder(const std::filesystem::path& path) {
  const std::filesystem::path parent = path.parent_path();
  return parent.empty() ? std::filesystem::path(".") : parent;
}

/// `path` without a trailing separator, so that filename() is the last component.
inline std::filesystem::path without_trailing_separator(const std::filesystem::path& path) {
  std::filesystem::path out = path.lexically_normal();
  if (out.filename().empty() && out.has_parent_path() && out != out.root_path())
    out = out.parent_path();
  return out;
}

inline std::filesystem::path sibling_name(const std::filesystem::path& target,
                                          std::string_view marker) {
  // Appended piece by piece: GCC 12 warns falsely about `"." + std::string` at -O3 (PR 105329).
  std::string name = ".";
  name += target.filename().string();
  name += marker;
  name += random_suffix();
  return parent_folder(target) / name;
}

/// fsync of a folder, so the names it holds (a rename's result) reach the disk.
inline void fsync_folder(const std::filesystem::path& folder) {
  FileDescriptor fd(::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0)
    throw FileError(printable(folder.string()) +
                    ": cannot open the folder to sync it: " + errno_text(errno));
  // Some file systems cannot sync a folder (EINVAL); there is nothing more to do on them.
  if (::fsync(fd.get()) != 0 && errno != EINVAL && errno != EROFS)
    throw FileError(printable(folder.string()) + ": cannot sync the folder: " + errno_text(errno));
}

inline void write_all(int fd, const std::uint8_t* data, std::size_t size, const std::string& name) {
  while (size > 0) {
    const ::ssize_t written = ::write(fd, data, size);
    if (written < 0) {
      if (errno == EINTR) continue;
      throw FileError(printable(name) + ": write failed: " + errno_text(errno));
    }
    data += written;
    size -= static_cast<std::size_t>(written);
  }
}

/// Copies `from` into `to` (which must not exist): hard links where the file system allows them
/// (no data is copied), a plain copy otherwise; folders recursively, symlinks as symlinks.
inline void carry_entry(const std::filesystem::path& from, const std::filesystem::path& to) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::copy(from, to,
           fs::copy_options::recursive | fs::copy_options::create_hard_links |
               fs::copy_options::copy_symlinks,
           ec);
  if (!ec) return;
  fs::remove_all(to, ec);
  fs::copy(from, to, fs::copy_options::recursive | fs::copy_options::copy_symlinks, ec);
  if (ec)
    throw FileError(printable(to.string()) + ": cannot carry " + printable(from.string()) +
                    " over into the new folder: " + ec.message());
}

/// renameat2(RENAME_EXCHANGE): swaps two existing names at once. Returns 0 or an errno value.
inline int exchange_names(const std::filesystem::path& a, const std::filesystem::path& b) {
#if defined(__linux__) && defined(RENAME_EXCHANGE)
  if (::renameat2(AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), RENAME_EXCHANGE) == 0) return 0;
  return errno;
#else
  (void)a;
  (void)b;
  return ENOSYS;
#endif
}

}  // namespace detail

/// Writes `bytes` to `path` atomically and durably (see the top of this file). The folder must
/// exist. Throws FileError naming the file; on failure the temporary is removed and any previous
/// file under `path` is left as it was.
inline void write_file_atomically(const std::filesystem::path& path,
                                  std::span<const std::uint8_t> bytes) {
  const std::filesystem::path target = detail::without_trailing_separator(path);
  const std::string name = target.string();
  std::filesystem::path temporary;
  detail::FileDescriptor fd;
  for (int attempt = 0; attempt < 16 && fd.get() < 0; ++attempt) {
    temporary = detail::sibling_name(target, kTemporaryMarker);
    fd = detail::FileDescriptor(
        ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (fd.get() < 0 && errno != EEXIST)
      throw FileError(printable(name) + ": cannot create a temporary file in " +
                      printable(detail::parent_folder(target).string()) + ": " +
                      detail::errno_text(errno));
  }
  if (fd.get() < 0)
    throw FileError(printable(name) + ": cannot find a free temporary name beside it");
  try {
    detail::write_all(fd.get(), bytes.data(), bytes.size(), temporary.string());
    if (::fsync(fd.get()) != 0)
      throw FileError(printable(temporary.string()) +
                      ": cannot sync: " + detail::errno_text(errno));
    if (fd.close() != 0)
      throw FileError(printable(temporary.string()) +
                      ": write failed at close: " + detail::errno_text(errno));
    // rename replaces the name itself: a symlink planted under `path` is replaced, not followed.
    if (::rename(temporary.c_str(), target.c_str()) != 0)
      throw FileError(printable(name) + ": cannot rename " + printable(temporary.string()) +
                      " into place: " + detail::errno_text(errno));
  } catch (...) {
    ::unlink(temporary.c_str());
    throw;
  }
  detail::fsync_folder(detail::parent_folder(target));
}

inline void write_file_atomically(const std::filesystem::path& path, std::string_view text) {
  write_file_atomically(path, std::span<const std::uint8_t>(
                                  reinterpret_cast<const std::uint8_t*>(text.data()), text.size()));
}

/// Replaces the folder `dir` as a whole: `fill` writes the new content into an empty temporary
/// folder beside `dir` (same parent, so the same file system); entries of the old folder that
/// `fill` did not write are carried over (hard links), then the two folders are swapped with
/// renameat2(RENAME_EXCHANGE) and the old one is removed. A kill at any moment leaves `dir` as
/// the old folder or the new one, whole; what it leaves besides is a hidden
/// `.<dir>.peft-tmp-<random>` folder, removed by the next replacement of `dir`.
///
/// Fallback, where the file system cannot exchange names (EINVAL, ENOSYS): `dir` is renamed to
/// `.<dir>.peft-old-<random>`, the new folder to `dir`. A kill between those two renames leaves
/// no `dir`, and the old folder under its hidden name: the next replacement of `dir` puts it
/// back first (nothing ever loads a mix).
///
/// Parents are created. Throws FileError naming `dir`; on failure `dir` is untouched.
inline void replace_directory_atomically(
    const std::filesystem::path& dir,
    const std::function<void(const std::filesystem::path& new_folder)>& fill) {
  namespace fs = std::filesystem;
  const fs::path target = detail::without_trailing_separator(dir);
  const std::string name = printable(target.string());
  const fs::path parent = detail::parent_folder(target);
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw FileError(printable(parent.string()) + ": cannot create folder: " + ec.message());

  // Leftovers of earlier, interrupted replacements of this same folder.
  const std::string own_prefix = "." + target.filename().string();
  bool exists = fs::exists(fs::symlink_status(target, ec));
  for (const fs::directory_entry& entry : fs::directory_iterator(parent, ec)) {
    const std::string entry_name = entry.path().filename().string();
    if (entry_name.rfind(own_prefix, 0) != 0) continue;
    const std::string_view rest = std::string_view(entry_name).substr(own_prefix.size());
    if (rest.rfind(kTemporaryMarker, 0) == 0) {
      std::error_code ignored;
      fs::remove_all(entry.path(), ignored);
    } else if (rest.rfind(kPreviousMarker, 0) == 0 && !exists) {
      // An interrupted fallback swap: the old folder goes back under its name.
      if (::rename(entry.path().c_str(), target.c_str()) == 0) exists = true;
    }
  }
  if (exists && !fs::is_directory(target, ec))
    throw FileError(name + ": exists and is not a folder");

  fs::path fresh;
  for (int attempt = 0; attempt < 16 && fresh.empty(); ++attempt) {
    fs::path candidate = detail::sibling_name(target, kTemporaryMarker);
    if (::mkdir(candidate.c_str(), 0755) == 0) {
      fresh = candidate;
    } else if (errno != EEXIST) {
      throw FileError(name + ": cannot create a temporary folder in " + printable(parent.string()) +
                      ": " + detail::errno_text(errno));
    }
  }
  if (fresh.empty()) throw FileError(name + ": cannot find a free temporary folder name");

  try {
    fill(fresh);
    if (exists) {
      for (const fs::directory_entry& entry : fs::directory_iterator(target)) {
        const fs::path carried = fresh / entry.path().filename();
        if (!fs::exists(fs::symlink_status(carried, ec)))
          detail::carry_entry(entry.path(), carried);
      }
    }
    detail::fsync_folder(fresh);
    if (!exists) {
      if (::rename(fresh.c_str(), target.c_str()) != 0)
        throw FileError(name +
                        ": cannot rename the new folder into place: " + detail::errno_text(errno));
      detail::fsync_folder(parent);
      return;
    }
    const int exchange_error = detail::exchange_names(fresh, target);
    if (exchange_error == 0) {
      detail::fsync_folder(parent);
      fs::remove_all(fresh, ec);  // now the old folder
      return;
    }
    if (exchange_error != EINVAL && exchange_error != ENOSYS && exchange_error != ENOTSUP)
      throw FileError(
          name + ": cannot swap the new folder into place: " + detail::errno_text(exchange_error));
    const fs::path previous = detail::sibling_name(target, kPreviousMarker);
    if (::rename(target.c_str(), previous.c_str()) != 0)
      throw FileError(name + ": cannot move the old folder aside: " + detail::errno_text(errno));
    if (::rename(fresh.c_str(), target.c_str()) != 0) {
      const int error = errno;
      ::rename(previous.c_str(), target.c_str());
      throw FileError(name +
                      ": cannot rename the new folder into place: " + detail::errno_text(error));
    }
    detail::fsync_folder(parent);
    fs::remove_all(previous, ec);
  } catch (...) {
    fs::remove_all(fresh, ec);
    throw;
  }
}

/// An open regular file and its size, checked on the descriptor.
struct OpenedFile {
  detail::FileDescriptor fd;
  std::uint64_t size = 0;
};

/// Opens `path` for reading, refusing anything but a regular file of at most `max_bytes`: a
/// missing file, a FIFO, a device (/dev/zero), a folder or a file over the bound is a FileError
/// naming the file, raised before anything is allocated or read. The open does not block on a
/// FIFO (O_NONBLOCK), and the checks are made on the open descriptor, so the file cannot be
/// swapped between check and read. `what` names the bound in the message ("text file").
inline OpenedFile open_regular_file(const std::filesystem::path& path, std::uint64_t max_bytes,
                                    std::string_view what = "file") {
  const std::string name = printable(path.string());
  detail::FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno == ENOENT || errno == ENOTDIR) throw FileError(name + ": file not found");
    throw FileError(name + ": cannot open for reading: " + detail::errno_text(errno));
  }
  struct stat info {};
  if (::fstat(fd.get(), &info) != 0)
    throw FileError(name + ": cannot read its size: " + detail::errno_text(errno));
  if (!S_ISREG(info.st_mode)) {
    const char* kind = S_ISDIR(info.st_mode)    ? "a folder"
                       : S_ISFIFO(info.st_mode) ? "a FIFO"
                       : S_ISCHR(info.st_mode)  ? "a character device"
                       : S_ISBLK(info.st_mode)  ? "a block device"
                       : S_ISSOCK(info.st_mode) ? "a socket"
                                                : "not a plain file";
    throw FileError(name + ": not a regular file (" + kind + ")");
  }
  const auto size = static_cast<std::uint64_t>(info.st_size);
  if (size > max_bytes)
    throw FileError(name + ": " + std::string(what) + " of " + std::to_string(size) +
                    " bytes is over the limit of " + std::to_string(max_bytes) + " bytes");
  return {std::move(fd), size};
}

/// The whole content of the regular file `path`, at most `max_bytes` long (open_regular_file's
/// checks, then one allocation of the file's size).
inline std::vector<std::uint8_t> read_regular_file(const std::filesystem::path& path,
                                                   std::uint64_t max_bytes,
                                                   std::string_view what = "file") {
  const std::string name = printable(path.string());
  OpenedFile file = open_regular_file(path, max_bytes, what);
  const std::uint64_t size = file.size;
  const detail::FileDescriptor& fd = file.fd;
  std::vector<std::uint8_t> bytes;
  try {
    bytes.resize(static_cast<std::size_t>(size));
  } catch (const std::bad_alloc&) {
    throw FileError(name + ": file of " + std::to_string(size) + " bytes does not fit in memory");
  }
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ::ssize_t got = ::read(fd.get(), bytes.data() + done, bytes.size() - done);
    if (got < 0) {
      if (errno == EINTR) continue;
      throw FileError(name + ": read error: " + detail::errno_text(errno));
    }
    if (got == 0) break;
    done += static_cast<std::size_t>(got);
  }
  if (done != bytes.size())
    throw FileError(name + ": read " + std::to_string(done) + " of " + std::to_string(size) +
                    " bytes (file changed or read error)");
  return bytes;
}

}  // namespace peft::io
