#ifndef _SHIM_LINUX_UACCESS_H
#define _SHIM_LINUX_UACCESS_H
#include <string.h>
#include <assert.h>
#include <stddef.h>
#define __user
/* bytes of user memory that can be accessed before a fault (default: all) */
extern size_t shim_user_limit;
extern int shim_user_copies_in, shim_user_copies_out;
static inline unsigned long copy_from_user(void *to, const void *from, unsigned long n)
{
	shim_user_copies_in++;
	if (n > shim_user_limit)
		return n;
	memcpy(to, from, n);
	return 0;
}
static inline unsigned long copy_to_user(void *to, const void *from, unsigned long n)
{
	shim_user_copies_out++;
	if (n > shim_user_limit)
		return n;
	memcpy(to, from, n);
	return 0;
}
#endif
