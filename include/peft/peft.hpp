#pragma once
// The one public entry point of the peft library.
#include "peft/core/error.hpp"
