#!/usr/bin/env bash
# Installs what building and testing peft needs on Debian 12, with apt-get. Idempotent, and quick
# when everything is there already (no apt-get update then). Runs as root, or through sudo.
set -euo pipefail

# Exactly what the build finds (CMakeLists.txt, tests/, benchmarks/): nothing else. The build
# calls neither git nor pkg-config, and links no BLAS (Eigen's own products; docs/performance.md).
packages=(
  g++ make cmake                  # toolchain (OpenMP comes with g++: libgomp)
  libeigen3-dev                   # tensors and kernels
  nlohmann-json3-dev              # config.json, safetensors headers
  libre2-dev                      # target_modules / layers_pattern / rank_pattern regexes, matched
                                  # in linear time (std::regex hangs or crashes on hostile ones)
  doctest-dev                     # tests
  libbenchmark-dev                # benchmarks
  clang libclang-rt-14-dev        # fuzz/ harnesses: clang 14 with libFuzzer and its sanitizers
  libomp-14-dev                   # OpenMP for clang builds (the fuzz/ harnesses link peft::peft)
  libopenmpi-dev openmpi-bin      # data-parallel `peft train` under mpirun (docs/distributed.md)
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root (or install sudo)" >&2; exit 1; }
  as_root=(sudo)
fi

echo "install-deps: installing ${missing[*]}"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes \
  apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
echo "install-deps: done"
