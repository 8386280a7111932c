/*
 * simple_loop: a counter for checkpoint/restore demos and tests.
 *
 * Prints "count N pid P" once a second (N from 1, or from argv[1]) and flushes stdout
 * after every line, so a reader sees each line as soon as it is written. After a
 * restore the count continues where the checkpoint stopped it, which is what the
 * process-engine tests look for.
 *
 * Build: gcc -O2 -Wall -o simple_loop examples/simple_loop.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	unsigned long count = argc > 1 ? strtoul(argv[1], NULL, 10) : 1;
	double interval = argc > 2 ? atof(argv[2]) : 1.0;

	for (;; count++) {
		printf("count %lu pid %d\n", count, (int)getpid());
		fflush(stdout);
		usleep((useconds_t)(interval * 1e6));
	}
	return 0;
}
