#ifndef _SHIM_LINUX_LIMITS_H
#define _SHIM_LINUX_LIMITS_H
#include_next <linux/limits.h>
#include <stdint.h>
#define U64_MAX UINT64_MAX
#endif
