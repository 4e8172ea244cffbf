// HOTLOOP_CLONES: compile a function for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the baseline, picked at
// load time (GCC >= 11 on x86-64 Linux; elsewhere, or with -DHOTLOOP_NO_CLONES, one baseline build).
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 11 && !defined(HOTLOOP_NO_CLONES)
#define HOTLOOP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOTLOOP_CLONES
#endif
