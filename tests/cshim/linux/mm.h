#ifndef _SHIM_LINUX_MM_H
#define _SHIM_LINUX_MM_H
#include <stddef.h>
static inline void *memchr_inv(const void *p, int c, size_t n)
{
	const unsigned char *s = p;
	size_t i;

	for (i = 0; i < n; i++)
		if (s[i] != (unsigned char)c)
			return (void *)(s + i);
	return NULL;
}
#endif
