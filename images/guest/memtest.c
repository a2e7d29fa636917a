/*
 * memtest: the guest-side memory workload of the Splitvisor guest images.
 *
 * Why C and not Rust: this program runs inside the *guest* (a stock Debian
 * kernel booted by vmm), not in the workspace. It is one small file built with
 * `gcc -static -O2` by images/build, so it needs no Rust target, no cargo and no
 * libc of the guest (the guest initramfs has only busybox). It is a test
 * program: simple, deterministic and loud when something is wrong.
 *
 * Usage:
 *   memtest SIZE_MB [THREADS] [SEED]
 *       mmap SIZE_MB MiB of anonymous memory and check it in four passes:
 *         1. write pattern A to every 64-bit word, pages in ascending order
 *         2. read back and verify pattern A, ascending
 *         3. rewrite every word with pattern B, pages in a random (seeded)
 *            permutation order
 *         4. read back and verify pattern B, ascending; sum pattern B
 *       Every page is really touched in every pass: with a guest of 512 MiB
 *       RAM over a 32 MiB local cache, a 256-384 MiB run makes the VMM evict
 *       pages (dirty: written back to the memory node) and fetch them again.
 *       THREADS (default 1) splits the region into contiguous slices, one per
 *       thread, so that several vCPUs fault at once. The checksum depends on
 *       SIZE_MB and SEED only, not on THREADS or the page order.
 *       Prints `memtest: ok size_mb=N threads=T checksum=HEX ms=...` and exits
 *       0, or prints the first bad address (offset, expected, found) and exits 1.
 *   memtest gen SIZE_MB [SEED]
 *       write SIZE_MB MiB of deterministic pseudo-random bytes to stdout (used
 *       by the disk workload to write files of known content).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS_PER_PAGE (PAGE / sizeof(uint64_t))

/* splitmix64 finaliser: a good 64-bit mix, so every word's value depends on
 * its index, the seed and the pass. */
static inline uint64_t mix64(uint64_t z)
{
	z += 0x9e3779b97f4a7c15ull;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static inline uint64_t pattern(uint64_t seed, uint64_t pass, uint64_t word)
{
	return mix64(word ^ (seed << 1) ^ (pass * 0x632be59bd9b4e019ull));
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

struct slice {
	uint64_t *base;        /* start of the whole region */
	uint64_t first_page;   /* this thread's pages: [first_page, end_page) */
	uint64_t end_page;
	uint64_t seed;
	uint64_t sum;          /* sum of pattern B over this slice (pass 4) */
	int bad;               /* 1 if a mismatch was found */
	uint64_t bad_word;     /* index of the first bad word */
	uint64_t bad_expected, bad_found;
	int bad_pass;
};

/* The whole region is shared by all threads; a barrier keeps the passes in
 * step so that "pass N" in a failure report means the same for everyone. */
static pthread_barrier_t barrier;

static void fail_word(struct slice *s, int pass, uint64_t w, uint64_t expected, uint64_t found)
{
	if (!s->bad) {
		s->bad = 1;
		s->bad_pass = pass;
		s->bad_word = w;
		s->bad_expected = expected;
		s->bad_found = found;
	}
}

static void *run_slice(void *arg)
{
	struct slice *s = arg;
	uint64_t *m = s->base;
	uint64_t npages = s->end_page - s->first_page;

	/* pass 1: write pattern A, ascending */
	for (uint64_t p = s->first_page; p < s->end_page; p++)
		for (uint64_t i = 0; i < WORDS_PER_PAGE; i++) {
			uint64_t w = p * WORDS_PER_PAGE + i;
			m[w] = pattern(s->seed, 1, w);
		}
	pthread_barrier_wait(&barrier);

	/* pass 2: verify pattern A, ascending */
	for (uint64_t p = s->first_page; p < s->end_page && !s->bad; p++)
		for (uint64_t i = 0; i < WORDS_PER_PAGE; i++) {
			uint64_t w = p * WORDS_PER_PAGE + i;
			uint64_t e = pattern(s->seed, 1, w);
			if (m[w] != e) {
				fail_word(s, 2, w, e, m[w]);
				break;
			}
		}
	pthread_barrier_wait(&barrier);

	/* pass 3: rewrite with pattern B, pages in a seeded random order
	 * (Fisher-Yates shuffle of this slice's page indices). */
	uint32_t *order = malloc(npages * sizeof(uint32_t));
	if (!order) {
		fail_word(s, 3, 0, 0, 0);
	} else {
		for (uint64_t k = 0; k < npages; k++)
			order[k] = (uint32_t)k;
		uint64_t st = s->seed ^ (s->first_page * 0x2545f4914f6cdd1dull);
		for (uint64_t k = npages; k > 1; k--) {
			st = mix64(st);
			uint64_t j = st % k;
			uint32_t t = order[k - 1];
			order[k - 1] = order[j];
			order[j] = t;
		}
		for (uint64_t k = 0; k < npages; k++) {
			uint64_t p = s->first_page + order[k];
			for (uint64_t i = 0; i < WORDS_PER_PAGE; i++) {
				uint64_t w = p * WORDS_PER_PAGE + i;
				m[w] = pattern(s->seed, 2, w);
			}
		}
		free(order);
	}
	pthread_barrier_wait(&barrier);

	/* pass 4: verify pattern B, ascending, and sum it for the checksum */
	uint64_t sum = 0;
	for (uint64_t p = s->first_page; p < s->end_page; p++)
		for (uint64_t i = 0; i < WORDS_PER_PAGE; i++) {
			uint64_t w = p * WORDS_PER_PAGE + i;
			uint64_t e = pattern(s->seed, 2, w);
			uint64_t v = m[w];
			if (v != e)
				fail_word(s, 4, w, e, v);
			sum += v;
		}
	s->sum = sum;
	return NULL;
}

static int gen(uint64_t size_mb, uint64_t seed)
{
	static uint64_t buf[1 << 14]; /* 128 KiB */
	uint64_t words = size_mb * (1024 * 1024 / sizeof(uint64_t));
	uint64_t w = 0;
	while (w < words) {
		size_t n = 0;
		for (; n < sizeof(buf) / sizeof(buf[0]) && w < words; n++, w++)
			buf[n] = pattern(seed, 7, w);
		size_t len = n * sizeof(uint64_t);
		const char *p = (const char *)buf;
		while (len) {
			ssize_t r = write(1, p, len);
			if (r < 0) {
				if (errno == EINTR)
					continue;
				perror("memtest gen: write");
				return 1;
			}
			p += r;
			len -= (size_t)r;
		}
	}
	return 0;
}

static uint64_t parse_u64(const char *s, const char *what)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || *end || end == s) {
		fprintf(stderr, "memtest: bad %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "gen") == 0) {
		if (argc < 3) {
			fprintf(stderr, "usage: memtest gen SIZE_MB [SEED]\n");
			return 2;
		}
		return gen(parse_u64(argv[2], "size"), argc > 3 ? parse_u64(argv[3], "seed") : 1);
	}
	if (argc < 2) {
		fprintf(stderr, "usage: memtest SIZE_MB [THREADS] [SEED] | memtest gen SIZE_MB [SEED]\n");
		return 2;
	}
	uint64_t size_mb = parse_u64(argv[1], "size");
	uint64_t threads = argc > 2 ? parse_u64(argv[2], "threads") : 1;
	uint64_t seed = argc > 3 ? parse_u64(argv[3], "seed") : 0x5eed;
	if (size_mb == 0 || threads == 0 || threads > 64) {
		fprintf(stderr, "memtest: size must be > 0 and threads in 1..64\n");
		return 2;
	}
	uint64_t bytes = size_mb << 20;
	uint64_t npages = bytes / PAGE;
	if (threads > npages)
		threads = npages;

	uint64_t t0 = now_ms();
	/* MAP_POPULATE deliberately not used: pass 1 does the first touch. */
	uint64_t *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED) {
		fprintf(stderr, "memtest: mmap %" PRIu64 " MiB: %s\n", size_mb, strerror(errno));
		return 1;
	}
	/* No transparent huge pages: we want 4 KiB guest pages, as a guest
	 * workload would mostly have. */
	madvise(m, bytes, MADV_NOHUGEPAGE);

	struct slice *sl = calloc(threads, sizeof(*sl));
	pthread_t *tid = calloc(threads, sizeof(*tid));
	if (!sl || !tid) {
		fprintf(stderr, "memtest: out of memory\n");
		return 1;
	}
	pthread_barrier_init(&barrier, NULL, (unsigned)threads);
	for (uint64_t t = 0; t < threads; t++) {
		sl[t].base = m;
		sl[t].first_page = npages * t / threads;
		sl[t].end_page = npages * (t + 1) / threads;
		sl[t].seed = seed;
	}
	for (uint64_t t = 1; t < threads; t++)
		if (pthread_create(&tid[t], NULL, run_slice, &sl[t])) {
			fprintf(stderr, "memtest: pthread_create failed\n");
			return 1;
		}
	run_slice(&sl[0]);
	for (uint64_t t = 1; t < threads; t++)
		pthread_join(tid[t], NULL);

	uint64_t sum = 0;
	int bad = 0;
	for (uint64_t t = 0; t < threads; t++) {
		sum += sl[t].sum;
		if (sl[t].bad) {
			bad = 1;
			uint64_t off = sl[t].bad_word * sizeof(uint64_t);
			printf("memtest: FAIL pass=%d first_bad_addr=%p offset=0x%" PRIx64
			       " page=%" PRIu64 " expected=0x%016" PRIx64 " found=0x%016" PRIx64 "\n",
			       sl[t].bad_pass, (void *)((char *)m + off), off, off / PAGE,
			       sl[t].bad_expected, sl[t].bad_found);
		}
	}
	uint64_t ms = now_ms() - t0;
	if (bad)
		return 1;
	printf("memtest: ok size_mb=%" PRIu64 " threads=%" PRIu64 " pages=%" PRIu64
	       " passes=4 checksum=%016" PRIx64 " ms=%" PRIu64 "\n",
	       size_mb, threads, npages, sum, ms);
	return 0;
}
