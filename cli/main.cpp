#include <peft/peft.hpp>
#include <iostream>
int main() { std::cout << "peft\n"; return 0; }
