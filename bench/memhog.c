/*
 * memhog: hold N MiB of touched memory and keep proving that it is intact.
 *
 *   memhog MIB [SEED]
 *
 * Every 4 KiB page is filled with 64-bit words derived from (seed, page index, word
 * index). Then, every ~100 ms, a rolling slice of the pages (32 MiB) is re-verified and a
 * line is printed:
 *
 *   ok round=K mib=N pass=P gap_ms=G
 *
 * pass counts complete verifications of all pages; gap_ms is the longest wall-clock gap
 * between two rounds seen since the last line (a checkpoint/restore shows up here as the
 * application-observed freeze). SIGUSR1 asks for a full verification at the next round.
 * A bad word prints "CORRUPT page=P word=W" and exits with status 2.
 * stdout is flushed after every line (it is a pipe to a log in a container).
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))
#define SLICE_PAGES (32UL * 256UL) /* 32 MiB per round */

static volatile sig_atomic_t full_requested;

static void on_usr1(int sig) {
    (void)sig;
    full_requested = 1;
}

static inline uint64_t mix(uint64_t x) { /* splitmix64 finaliser */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static inline uint64_t word_at(uint64_t seed, uint64_t page, uint64_t w) {
    /* One mix per page, then a cheap per-word step: fast to fill and to check, and
     * different for every page, every word and every seed. */
    uint64_t base = mix(seed ^ (page * 0x100000001b3ULL));
    return base ^ (w * 0x9e3779b97f4a7c15ULL) ^ (page << 20);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static int check_page(const uint64_t *mem, uint64_t seed, uint64_t page) {
    const uint64_t *p = mem + page * WORDS;
    for (uint64_t w = 0; w < WORDS; w++) {
        if (p[w] != word_at(seed, page, w)) {
            printf("CORRUPT page=%lu word=%lu\n", (unsigned long)page, (unsigned long)w);
            fflush(stdout);
            return 0;
        }
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: memhog MIB [SEED]\n");
        return 1;
    }
    unsigned long mib = strtoul(argv[1], NULL, 10);
    uint64_t seed = argc > 2 ? strtoull(argv[2], NULL, 10) : 0x6d656d686f67ULL;
    uint64_t pages = (uint64_t)mib * 256;
    if (mib == 0) {
        fprintf(stderr, "memhog: MIB must be > 0\n");
        return 1;
    }
    uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("memhog: mmap");
        return 1;
    }
    signal(SIGUSR1, on_usr1);
    for (uint64_t page = 0; page < pages; page++) {
        uint64_t *p = mem + page * WORDS;
        for (uint64_t w = 0; w < WORDS; w++)
            p[w] = word_at(seed, page, w);
    }
    printf("filled mib=%lu pages=%lu\n", mib, (unsigned long)pages);
    fflush(stdout);

    uint64_t next = 0, pass = 0, round = 0;
    double last = now_ms(), gap = 0;
    struct timespec tick = {0, 100 * 1000 * 1000};
    for (;;) {
        uint64_t todo = SLICE_PAGES;
        if (full_requested) {
            full_requested = 0;
            next = 0;
            todo = pages;
        }
        while (todo-- > 0) {
            if (!check_page(mem, seed, next))
                return 2;
            if (++next == pages) {
                next = 0;
                pass++;
                break; /* a pass ends a round: pass numbers are exact */
            }
        }
        round++;
        double t = now_ms();
        if (t - last > gap)
            gap = t - last;
        last = t;
        printf("ok round=%lu mib=%lu pass=%lu gap_ms=%.0f\n", (unsigned long)round, mib,
               (unsigned long)pass, gap);
        fflush(stdout);
        gap = 0;
        nanosleep(&tick, NULL);
        /* The sleep is part of the gap measurement: a normal gap is ~100 ms + work. */
        double after = now_ms();
        if (after - last > gap)
            gap = after - last;
        last = after;
    }
}
