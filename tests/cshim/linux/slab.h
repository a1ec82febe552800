#ifndef _SHIM_LINUX_SLAB_H
#define _SHIM_LINUX_SLAB_H
#include <stdlib.h>
#define GFP_KERNEL 0
#define GFP_KERNEL_ACCOUNT 0
extern int shim_allocs;
static inline void *kvmalloc(size_t n, int gfp) { (void)gfp; shim_allocs++; return malloc(n); }
static inline void kvfree(void *p) { if (p) shim_allocs--; free(p); }
#endif
