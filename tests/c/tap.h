/* SPDX-License-Identifier: GPL-2.0 */
/* A minimal TAP producer for the user-space unit tests of generated C. */
#ifndef _TESTS_TAP_H
#define _TESTS_TAP_H
#include <stdarg.h>
#include <stdio.h>

static int tests_run, tests_failed;

static void ok(int cond, const char *fmt, ...)
{
	va_list ap;

	tests_run++;
	if (!cond)
		tests_failed++;
	printf("%s %d - ", cond ? "ok" : "not ok", tests_run);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}

static int tap_done(void)
{
	printf("1..%d\n", tests_run);
	return tests_failed ? 1 : 0;
}
#endif
