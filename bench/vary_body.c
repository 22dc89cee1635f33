/* LD_PRELOAD shim for h2load (bench/h2load.py): h2load 1.52 posts one data file (-d) for every request, reading it
 * with pread at each request. This gives each request its own task and step: in what a pread of the file returns,
 * the 9 bytes "#########" become a per-process counter (zero-padded) and "&&&&" the counter modulo VARY_TASKS
 * (default 1000). Bytes are replaced in place, so the body's length (and its protobuf and gRPC framing) is unchanged.
 * At exit the number of bodies varied is written to the file VARY_COUNT_FILE names, if set.
 * Build: cc -O2 -shared -fPIC -o vary_body.so vary_body.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

static atomic_ulong counter;

static void fill(char *at, size_t width, unsigned long value) {
    char digits[32];
    snprintf(digits, sizeof digits, "%0*lu", (int)width, value);
    memcpy(at, digits + strlen(digits) - width, width); /* the low digits if the value is wider */
}

static void vary(char *buf, ssize_t n) {
    static const char step[] = "#########", task[] = "&&&&";
    char *s = memmem(buf, n, step, sizeof step - 1);
    if (s == NULL) return;
    unsigned long value = atomic_fetch_add(&counter, 1);
    static long tasks = 0;
    if (tasks == 0) {
        const char *env = getenv("VARY_TASKS");
        tasks = env ? atol(env) : 1000;
        if (tasks <= 0) tasks = 1;
    }
    fill(s, sizeof step - 1, value);
    char *t = memmem(buf, n, task, sizeof task - 1);
    if (t != NULL) fill(t, sizeof task - 1, value % (unsigned long)tasks);
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("VARY_COUNT_FILE");
    if (path == NULL) return;
    FILE *out = fopen(path, "w");
    if (out == NULL) return;
    fprintf(out, "%lu\n", (unsigned long)atomic_load(&counter));
    fclose(out);
}

typedef ssize_t (*pread_fn)(int, void *, size_t, off_t);

static ssize_t call(const char *name, int fd, void *buf, size_t count, off_t offset) {
    pread_fn real = (pread_fn)dlsym(RTLD_NEXT, name);
    ssize_t n = real(fd, buf, count, offset);
    if (n > 0 && offset == 0) vary(buf, n);
    return n;
}

ssize_t pread(int fd, void *buf, size_t count, off_t offset) { return call("pread", fd, buf, count, offset); }
ssize_t pread64(int fd, void *buf, size_t count, off_t offset) { return call("pread64", fd, buf, count, offset); }
