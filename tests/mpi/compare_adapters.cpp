// compare_adapters A.safetensors B.safetensors TOLERANCE: the same tensor names and shapes, and
// ||A − B|| ≤ TOLERANCE · ||B|| over all their entries (the norm, not the largest entry: fp32
// runs that differ in summation order differ most in the few entries whose gradient is near
// AdamW's epsilon; docs/distributed.md, "How exact"); prints both. Exit 0 when they agree, 1
// when not, 2 on a usage or file error. For tests/mpi/mpi_train.sh.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <string>

#include "peft/io/safetensors.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: compare_adapters A.safetensors B.safetensors TOLERANCE\n";
    return 2;
  }
  try {
    const auto a = peft::io::SafetensorsFile::open(argv[1]);
    const auto b = peft::io::SafetensorsFile::open(argv[2]);
    const double tolerance = std::stod(argv[3]);
    if (a.tensors().size() != b.tensors().size()) {
      std::cout << "different tensor counts: " << a.tensors().size() << " and "
                << b.tensors().size() << '\n';
      return 1;
    }
    double worst = 0, diff2 = 0, norm2 = 0;
    std::size_t entries = 0;
    for (std::size_t i = 0; i < a.tensors().size(); ++i) {
      const auto& ta = a.tensors()[i];
      const auto& tb = b.tensors()[i];
      if (ta.name != tb.name || ta.shape != tb.shape) {
        std::cout << "different tensors: " << ta.name << " and " << tb.name << '\n';
        return 1;
      }
      const auto va = a.read<float>(ta.name), vb = b.read<float>(tb.name);
      for (std::size_t j = 0; j < va.size(); ++j) {
        const double d = double(va[j]) - double(vb[j]);
        worst = std::max(worst, std::abs(d));
        diff2 += d * d;
        norm2 += double(vb[j]) * double(vb[j]);
      }
      entries += va.size();
    }
    const double relative = norm2 > 0 ? std::sqrt(diff2 / norm2) : std::sqrt(diff2);
    std::cout << "compared " << a.tensors().size() << " tensors, " << entries
              << " entries: difference " << relative << " of the norm (tolerance " << tolerance
              << "), " << worst << " at most in an entry\n";
    return relative <= tolerance ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "compare_adapters: " << e.what() << '\n';
    return 2;
  }
}
