// Kill test for io::save_adapter (issue 18, defect 8): a child process saves two different
// adapters alternately into one folder, 200 times, while the parent SIGKILLs it at random
// (seeded) moments; after every kill the folder must load as exactly one of the two adapters
// (config and tensors from the same save), never a mix, never missing.
//   kill_saves SCRATCH_DIR [KILLS=200] [SEED=18]
// Exit 0 on success; 1 with a one-line reason on the first bad folder.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "peft/io/adapter_file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"

namespace fs = std::filesystem;

namespace {

/// Adapter `which` (0 or 1): two tensors filled from `which`, and a config naming it.
std::vector<peft::NamedParameter<float>> adapter_tensors(int which) {
  std::vector<peft::NamedParameter<float>> params;
  for (int k = 0; k < 2; ++k) {
    peft::Tensor<float> t(peft::Shape{4, 8});
    for (std::size_t i = 0; i < t.values().size(); ++i)
      t.values()[i] = static_cast<float>(1000 * which + 100 * k) + static_cast<float>(i);
    params.push_back(
        {"base_model.model.m" + std::to_string(k) + ".weight", peft::Var<float>(std::move(t))});
  }
  return params;
}

nlohmann::json adapter_config(int which) { return {{"peft_type", "LORA"}, {"which", which}}; }

/// Which adapter the folder holds whole (0 or 1); throws with the reason otherwise.
int loaded_adapter(const fs::path& dir) {
  const nlohmann::json config = peft::io::load_json(dir / "adapter_config.json");
  const int which = config.at("which").get<int>();
  const peft::io::SafetensorsFile file =
      peft::io::SafetensorsFile::open(dir / "adapter_model.safetensors");
  const auto expected = adapter_tensors(which);
  for (const auto& p : expected) {
    const std::vector<float> stored = file.read<float>(p.name, p.var.shape());
    const auto& values = p.var.value().values();
    if (!std::equal(stored.begin(), stored.end(), values.begin(), values.end()))
      throw std::runtime_error("tensors of '" + p.name + "' are not those of adapter " +
                               std::to_string(which) + " (a mix of two saves)");
  }
  if (file.tensors().size() != expected.size())
    throw std::runtime_error("the tensor file holds extra tensors");
  return which;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: kill_saves SCRATCH_DIR [KILLS] [SEED]\n");
    return 2;
  }
  const fs::path scratch = argv[1];
  const int kills = argc > 2 ? std::atoi(argv[2]) : 200;
  const unsigned seed = argc > 3 ? static_cast<unsigned>(std::atoi(argv[3])) : 18u;
  const fs::path dir = scratch / "adapter";
  fs::remove_all(scratch);
  fs::create_directories(scratch);
  peft::io::save_adapter(dir, adapter_config(0), adapter_tensors(0));

  // How long one save takes here, so that kills land inside saves, not only between them.
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 5; ++i)
    peft::io::save_adapter(dir, adapter_config(i % 2), adapter_tensors(i % 2));
  const auto save_us =
      std::max<long>(50, static_cast<long>(std::chrono::duration_cast<std::chrono::microseconds>(
                                               std::chrono::steady_clock::now() - start)
                                               .count() /
                                           5));

  std::mt19937 rng(seed);
  int seen[2] = {0, 0};
  for (int round = 0; round < kills; ++round) {
    const pid_t child = ::fork();
    if (child < 0) {
      std::perror("fork");
      return 1;
    }
    if (child == 0) {
      // 200 saves alternating the two adapters (the kill usually comes long before the end).
      try {
        for (int i = 0; i < 200; ++i)
          peft::io::save_adapter(dir, adapter_config((round + i) % 2),
                                 adapter_tensors((round + i) % 2));
      } catch (const std::exception& e) {
        std::fprintf(stderr, "child: %s\n", e.what());
        ::_exit(3);
      }
      ::_exit(0);
    }
    std::uniform_int_distribution<long> delay(0, 3 * save_us);
    std::this_thread::sleep_for(std::chrono::microseconds(delay(rng)));
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 3) {
      std::fprintf(stderr, "kill_saves: round %d: a save failed in the child\n", round);
      return 1;
    }
    try {
      ++seen[loaded_adapter(dir)];
    } catch (const std::exception& e) {
      std::fprintf(stderr, "kill_saves: round %d: %s does not load as either adapter: %s\n", round,
                   dir.c_str(), e.what());
      return 1;
    }
  }
  std::printf(
      "kill_saves: %d kills (one save ~%ld us), folder loaded as adapter 0 %d times, "
      "as adapter 1 %d times\n",
      kills, save_us, seen[0], seen[1]);
  fs::remove_all(scratch);
  return 0;
}
