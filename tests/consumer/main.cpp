// Built against the installed package by tests/consumer/run_consumer_test.cmake.
#include <iostream>
#include <peft/peft.hpp>
#include <string>

int main() {
  try {
    throw peft::ConfigError("consumer check");
  } catch (const peft::Error& e) {
    if (std::string(e.what()) != "consumer check") {
      std::cerr << "unexpected message: " << e.what() << "\n";
      return 1;
    }
  }
  std::cout << "consumer ok\n";
  return 0;
}
