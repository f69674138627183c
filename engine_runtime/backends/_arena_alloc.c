/* A bump allocator over one reserved CUDA virtual range, plugged into PyTorch's
 * CUDAPluggableAllocator so that a CUDA graph's private memory pool lives at known,
 * stable addresses. Python sets the range before each capture (under a lock) and
 * reads the high-water mark after; freeing is a no-op because the range's physical
 * memory is mapped and unmapped as a whole by engine_runtime.memory.arena.
 * No CUDA headers are needed: addresses are plain integers here. */
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

static uintptr_t g_base = 0;
static size_t g_size = 0;
static size_t g_offset = 0;
static size_t g_high = 0;

void ebb_arena_set(uintptr_t base, size_t size) {
    g_base = base;
    g_size = size;
    g_offset = 0;
    g_high = 0;
}

size_t ebb_arena_high(void) { return g_high; }

void *ebb_arena_alloc(ssize_t size, int device, void *stream) {
    (void)device;
    (void)stream;
    /* 512-byte alignment, as cudaMalloc's 256 at least; PyTorch asks in 2 MiB segments mostly. */
    size_t aligned = ((size_t)size + 511u) & ~(size_t)511u;
    if (g_base == 0 || g_offset + aligned > g_size) {
        return NULL; /* PyTorch turns this into an out-of-memory error: never alias. */
    }
    void *ptr = (void *)(g_base + g_offset);
    g_offset += aligned;
    if (g_offset > g_high) {
        g_high = g_offset;
    }
    return ptr;
}

void ebb_arena_free(void *ptr, ssize_t size, int device, void *stream) {
    (void)ptr;
    (void)size;
    (void)device;
    (void)stream;
}
