// glibc's allocator settings for Swift: <malloc.h> is not part of the Glibc module, and its M_* settings are macros
// Swift does not import, so they are wrapped here.
#ifndef CIRCUIT_CMALLOC_SHIM_H
#define CIRCUIT_CMALLOC_SHIM_H

#include <malloc.h>

/// Allocations of `bytes` or more are mapped on their own (M_MMAP_THRESHOLD); 1 on success.
static inline int circuit_malloc_set_mmap_threshold(int bytes) { return mallopt(M_MMAP_THRESHOLD, bytes); }

/// Free memory at a heap's top past `bytes` goes back to the kernel (M_TRIM_THRESHOLD); 1 on success.
static inline int circuit_malloc_set_trim_threshold(int bytes) { return mallopt(M_TRIM_THRESHOLD, bytes); }

/// Gives back to the kernel the free pages inside every heap and the free top of the main one (not the free top of
/// the other heaps, the arenas glibc gives threads); 1 if any was released.
static inline int circuit_malloc_trim(void) { return malloc_trim(0); }

#endif
