#ifndef _SHIM_LINUX_BUG_H
#define _SHIM_LINUX_BUG_H
extern int shim_warnings;
#define WARN_ON_ONCE(c) ({ int __c = !!(c); if (__c) shim_warnings++; __c; })
#endif
