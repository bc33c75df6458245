#include <iostream>
#include "greeting.h"
int main() { std::cout << greeting("hoard") << std::endl; return 0; }
