// compare_adapters A.safetensors B.safetensors TOLERANCE: the same tensor names and shapes, and
// every entry within TOLERANCE · (1 + |b|) of the other; prints the largest such difference.
// Exit 0 when they agree, 1 when not, 2 on a usage or file error. For tests/mpi/mpi_train.sh.
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
    double worst = 0;
    std::size_t entries = 0;
    for (std::size_t i = 0; i < a.tensors().size(); ++i) {
      const auto& ta = a.tensors()[i];
      const auto& tb = b.tensors()[i];
      if (ta.name != tb.name || ta.shape != tb.shape) {
        std::cout << "different tensors: " << ta.name << " and " << tb.name << '\n';
        return 1;
      }
      const auto va = a.read<float>(ta.name), vb = b.read<float>(tb.name);
      for (std::size_t j = 0; j < va.size(); ++j)
        worst = std::max(worst, std::abs(double(va[j]) - double(vb[j])) / (1 + std::abs(double(vb[j]))));
      entries += va.size();
    }
    std::cout << "compared " << a.tensors().size() << " tensors, " << entries
              << " entries: largest relative difference " << worst << " (tolerance " << tolerance
              << ")\n";
    return worst <= tolerance ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "compare_adapters: " << e.what() << '\n';
    return 2;
  }
}
