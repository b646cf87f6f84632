#pragma once
// Error types thrown by the library. Library code throws; it never exits.
#include <stdexcept>
#include <string>

namespace peft {

/// Base of every error the library throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A file (safetensors, JSON config) is missing, malformed or does not match what was expected.
/// The message names the file, and where it applies the tensor and what was expected.
class FileError : public Error {
 public:
  using Error::Error;
};

/// Tensor shapes that do not fit an operation or a module; the message names both shapes.
class ShapeError : public Error {
 public:
  using Error::Error;
};

/// A configuration value is invalid or unsupported.
class ConfigError : public Error {
 public:
  using Error::Error;
};

/// What a model's base format cannot do: a method or an operation that needs the dense fp32
/// weight (DoRA's norms, a selective method's sparse delta, merging) on a base held in bf16,
/// fp16 or NF4. A ConfigError, so code that catches those keeps working; `peft parity
/// --base-dtype` reports such a case as skipped, with this message.
class BaseFormatError : public ConfigError {
 public:
  using ConfigError::ConfigError;
};

}  // namespace peft
