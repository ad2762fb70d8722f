/* rayrl sandbox agent: pid 1 of a bubblewrap sandbox, driven by the host over one socket.
 *
 * The host (rayrl/sandbox/bwrap.py) starts `bwrap ... /.rayrl/agent` with fds 0, 1 and 2 on one
 * end of a socketpair. The agent moves the socket to a private close-on-exec fd, points 0/1/2 at
 * /dev/null, writes the 8-byte magic "RAYRLAG1" and then serves one request at a time.
 *
 * Frames, both ways: u32 length (little-endian, counts the type byte and the payload), u8 type,
 * payload. Integers are little-endian; a "str" is u32 length + bytes.
 *
 *   host -> agent                                    agent -> host
 *   'P' ping                                         'P' pong
 *   'E' exec (see handle_exec)                       'Z' exec result
 *   'W' write files: u32 n, n x (str path, str data) 'O' ok | 'F' i32 errno, str message
 *   'R' read file: str path, u64 max bytes           'D' data | 'F' ...
 *   'X' reset: kill all, empty /work /tmp /dev/shm,  'O' ok | 'F' ...
 *       then write files like 'W'
 *
 * Every command runs in a new session with its own rlimits; when it ends (exit or timeout) the
 * agent SIGKILLs every other process of the pid namespace (kill(-1) from pid 1 spares only
 * itself) and reaps them, so nothing a command spawned or daemonized outlives it.
 *
 * Built by rayrl.sandbox.bwrap.agent_path() with gcc; keep it dependency-free C99 + Linux.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "RAYRLAG1"
#define MAX_FRAME (1u << 31)
#define CHUNK 65536
#define MAX_DEPTH 4096

extern char **environ;
static int S = -1;            /* the socket to the host */

/* ------------------------------------------------------------------ io */

static int read_full(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r; n -= (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t r = write(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r; n -= (size_t)r;
    }
    return 0;
}

typedef struct { char *p; size_t len, cap; } buf_t;

static void b_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) _exit(70);            /* out of memory: the host sees EOF, an infra error */
    b->p = p; b->cap = cap;
}
static void b_put(buf_t *b, const void *d, size_t n) { b_reserve(b, n); memcpy(b->p + b->len, d, n); b->len += n; }
static void b_u8(buf_t *b, uint8_t v) { b_put(b, &v, 1); }
static void b_u32(buf_t *b, uint32_t v) { b_put(b, &v, 4); }   /* x86/arm little-endian hosts */
static void b_i32(buf_t *b, int32_t v) { b_put(b, &v, 4); }
static void b_u64(buf_t *b, uint64_t v) { b_put(b, &v, 8); }
static void b_str(buf_t *b, const void *d, size_t n) { b_u32(b, (uint32_t)n); b_put(b, d, n); }
static void b_free(buf_t *b) { free(b->p); b->p = NULL; b->len = b->cap = 0; }

/* a frame under construction: 4 bytes reserved for the length */
static void f_begin(buf_t *b, char type) { b->len = 0; b_u32(b, 0); b_u8(b, (uint8_t)type); }
static void f_send(buf_t *b) {
    uint32_t n = (uint32_t)(b->len - 4);
    memcpy(b->p, &n, 4);
    if (write_full(S, b->p, b->len) < 0) _exit(0);   /* host gone */
}

static void send_simple(char type) { buf_t b = {0}; f_begin(&b, type); f_send(&b); b_free(&b); }
static void send_error(int err, const char *fmt, const char *arg) {
    char msg[4200];
    snprintf(msg, sizeof msg, fmt, arg, strerror(err));
    buf_t b = {0}; f_begin(&b, 'F'); b_i32(&b, err); b_str(&b, msg, strlen(msg)); f_send(&b); b_free(&b);
}

typedef struct { const char *p; size_t left; int bad; } cur_t;
static const char *c_take(cur_t *c, size_t n) {
    if (c->bad || c->left < n) { c->bad = 1; return NULL; }
    const char *p = c->p; c->p += n; c->left -= n; return p;
}
static uint32_t c_u32(cur_t *c) { uint32_t v = 0; const char *p = c_take(c, 4); if (p) memcpy(&v, p, 4); return v; }
static uint64_t c_u64(cur_t *c) { uint64_t v = 0; const char *p = c_take(c, 8); if (p) memcpy(&v, p, 8); return v; }
/* a NUL-terminated copy of a str field */
static char *c_cstr(cur_t *c, size_t *len) {
    uint32_t n = c_u32(c);
    const char *p = c_take(c, n);
    if (!p) return NULL;
    char *s = malloc((size_t)n + 1);
    if (!s) _exit(70);
    memcpy(s, p, n); s[n] = 0;
    if (len) *len = n;
    return s;
}
static const char *c_bytes(cur_t *c, size_t *len) { uint32_t n = c_u32(c); *len = n; return c_take(c, n); }

static uint64_t now_ns(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ processes */

/* SIGKILL every process of the namespace but us, and reap them all. If `main` is reaped here,
 * its status goes to *main_status and *main_done is set. */
static struct rusage main_ru;   /* resource usage of the last command's main process */

static void kill_all(pid_t main, int *main_status, int *main_done) {
    for (;;) {
        kill(-1, SIGKILL);
        int st; struct rusage ru;
        pid_t p = wait4(-1, &st, 0, &ru);
        if (p < 0) {
            if (errno == EINTR) continue;
            break;                  /* ECHILD: nobody left */
        }
        if (p == main && main_done && !*main_done) { *main_status = st; *main_done = 1; main_ru = ru; }
        while ((p = wait4(-1, &st, WNOHANG, &ru)) > 0)
            if (p == main && main_done && !*main_done) { *main_status = st; *main_done = 1; main_ru = ru; }
        if (p < 0 && errno == ECHILD) break;
    }
}

static void set_limit(int res, uint64_t soft, uint64_t hard) {
    struct rlimit rl = { (rlim_t)soft, (rlim_t)hard };
    setrlimit(res, &rl);
}

static void nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

typedef struct { buf_t data; size_t cap; int truncated; int fd; } capture_t;

/* read what is available; returns 0 at EOF / error (fd closed), 1 when nothing more is ready.
 * Without `drain`, a short read ends the call (poll tells us when there is more). */
static int capture_read(capture_t *c, char *scratch, int drain) {
    for (;;) {
        ssize_t r = read(c->fd, scratch, CHUNK);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) return 1;
        if (r <= 0) { close(c->fd); c->fd = -1; return 0; }
        size_t keep = 0;
        if (c->data.len < c->cap) {
            keep = c->cap - c->data.len;
            if (keep > (size_t)r) keep = (size_t)r;
            b_put(&c->data, scratch, keep);
        }
        if (keep < (size_t)r) c->truncated = 1;
        if (!drain && r < CHUNK) return 1;
    }
}

/* 'E': u32 timeout_ms, u32 flags (1 = argv, else shell string in argv[0]),
 *      u64 cpu_s, as_bytes, nproc, fsize_bytes, nofile (0 = leave as is), u64 output_bytes,
 *      u32 argc + argc x str, u32 envc + envc x str ("K=V"), str cwd, str stdin
 * 'Z': u8 flags (1 exited, 2 signaled, 4 timed out, 8 stdout truncated, 16 stderr truncated),
 *      i32 exit code, i32 signal, u64 duration_ns, u64 cpu_ns (all processes of the command),
 *      u64 maxrss_kb (main process), str stdout, str stderr */
static void handle_exec(cur_t *c) {
    uint32_t timeout_ms = c_u32(c), flags = c_u32(c);
    uint64_t rl_cpu = c_u64(c), rl_as = c_u64(c), rl_nproc = c_u64(c), rl_fsize = c_u64(c),
             rl_nofile = c_u64(c), outcap = c_u64(c);
    uint32_t argc = c_u32(c);
    if (c->bad || argc == 0 || argc > 65536) { send_error(EINVAL, "bad exec request%s: %s", ""); return; }
    char **argv = calloc(argc + 4, sizeof *argv);
    for (uint32_t i = 0; i < argc; i++) argv[i] = c_cstr(c, NULL);
    uint32_t envc = c_u32(c);
    if (envc > 65536) c->bad = 1;
    char **envp = calloc((c->bad ? 0 : envc) + 1, sizeof *envp);
    for (uint32_t i = 0; !c->bad && i < envc; i++) envp[i] = c_cstr(c, NULL);
    char *cwd = c_cstr(c, NULL);
    size_t in_len = 0; const char *in_data = c_bytes(c, &in_len);
    if (c->bad) {
        send_error(EINVAL, "bad exec request%s: %s", "");
        goto out_free;
    }

    int pin[2], pout[2], perr[2];
    if (pipe2(pin, O_CLOEXEC) || pipe2(pout, O_CLOEXEC) || pipe2(perr, O_CLOEXEC)) {
        send_error(errno, "pipe%s: %s", ""); goto out_free;
    }
    struct rusage ru0, ru1; getrusage(RUSAGE_CHILDREN, &ru0);
    memset(&main_ru, 0, sizeof main_ru);
    uint64_t t0 = now_ns();
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(pin[0]); close(pin[1]); close(pout[0]); close(pout[1]); close(perr[0]); close(perr[1]);
        send_error(e, "fork%s: %s", ""); goto out_free;
    }
    if (pid == 0) {
        setsid();
        sigset_t none; sigemptyset(&none); sigprocmask(SIG_SETMASK, &none, NULL);
        for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
        dup2(pin[0], 0); dup2(pout[1], 1); dup2(perr[1], 2);
        /* pipes and socket are close-on-exec anyway; this is belt and braces */
#ifdef SYS_close_range
        if (syscall(SYS_close_range, 3, ~0u, 0) != 0)
#endif
            for (int fd = 3; fd < 1024; fd++) close(fd);
        int oom = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (oom >= 0) { (void)!write(oom, "1000", 4); close(oom); }
        if (chdir(cwd) != 0) { dprintf(2, "rayrl-agent: chdir %s: %s\n", cwd, strerror(errno)); _exit(126); }
        if (rl_cpu) set_limit(RLIMIT_CPU, rl_cpu, rl_cpu + 1);
        if (rl_as) set_limit(RLIMIT_AS, rl_as, rl_as);
        if (rl_nproc) set_limit(RLIMIT_NPROC, rl_nproc, rl_nproc);
        if (rl_fsize) set_limit(RLIMIT_FSIZE, rl_fsize, rl_fsize);
        if (rl_nofile) set_limit(RLIMIT_NOFILE, rl_nofile, rl_nofile);
        set_limit(RLIMIT_CORE, 0, 0);
        environ = envp;
        if (flags & 1) {
            execvp(argv[0], argv);
        } else {
            char *sh[] = { "sh", "-c", argv[0], NULL };
            execve("/bin/sh", sh, envp);
        }
        dprintf(2, "rayrl-agent: exec %s: %s\n", (flags & 1) ? argv[0] : "/bin/sh", strerror(errno));
        _exit(127);
    }
    close(pin[0]); close(pout[1]); close(perr[1]);
    int infd = pin[1];
    if (in_len == 0) { close(infd); infd = -1; } else nonblock(infd);
    capture_t out = { {0}, (size_t)outcap, 0, pout[0] }, err = { {0}, (size_t)outcap, 0, perr[0] };
    nonblock(out.fd); nonblock(err.fd);
#ifdef SYS_pidfd_open
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);   /* readable when the child exits */
#else
    int pidfd = -1;
#endif
    char *scratch = malloc(CHUNK);
    size_t in_off = 0;
    int status = 0, done = 0, timed_out = 0;
    uint64_t deadline = t0 + (uint64_t)timeout_ms * 1000000ull;

    while (!done) {
        uint64_t now = now_ns();
        if (now >= deadline) { timed_out = 1; break; }
        uint64_t left_ms = (deadline - now + 999999) / 1000000;
        int wait_ms = left_ms > 3600000 ? 3600000 : (int)left_ms;
        struct pollfd pf[4]; int n = 0, i_out = -1, i_err = -1, i_in = -1, i_pid = -1;
        if (out.fd >= 0) { i_out = n; pf[n].fd = out.fd; pf[n].events = POLLIN; n++; }
        if (err.fd >= 0) { i_err = n; pf[n].fd = err.fd; pf[n].events = POLLIN; n++; }
        if (infd >= 0) { i_in = n; pf[n].fd = infd; pf[n].events = POLLOUT; n++; }
        if (pidfd >= 0) { i_pid = n; pf[n].fd = pidfd; pf[n].events = POLLIN; n++; }
        else if (wait_ms > 20) wait_ms = 20;       /* no pidfd: poll waitpid */
        int r = poll(pf, (nfds_t)n, wait_ms);
        if (r < 0 && errno != EINTR) break;
        if (r > 0) {
            if (i_out >= 0 && pf[i_out].revents) capture_read(&out, scratch, 0);
            if (i_err >= 0 && pf[i_err].revents) capture_read(&err, scratch, 0);
            if (i_in >= 0 && pf[i_in].revents) {
                if (pf[i_in].revents & (POLLERR | POLLHUP)) { close(infd); infd = -1; }
                else {
                    size_t left = in_len - in_off, chunk = left < CHUNK ? left : CHUNK;
                    ssize_t w = write(infd, in_data + in_off, chunk);
                    if (w > 0) in_off += (size_t)w;
                    else if (w < 0 && errno != EAGAIN && errno != EINTR) { close(infd); infd = -1; }
                    if (infd >= 0 && in_off >= in_len) { close(infd); infd = -1; }
                }
            }
        }
        if (pidfd < 0 || (i_pid >= 0 && pf[i_pid].revents)) {
            pid_t p = wait4(pid, &status, WNOHANG, &main_ru);
            if (p == pid) done = 1;
        }
    }
    if (!done) kill(-pid, SIGKILL);
    /* the command is over: nothing it started may survive it */
    kill_all(pid, &status, &done);
    uint64_t t1 = now_ns();
    if (infd >= 0) close(infd);
    if (pidfd >= 0) close(pidfd);
    /* every writer is dead: drain what is left in the pipes */
    while (out.fd >= 0 || err.fd >= 0) {
        if (out.fd >= 0 && capture_read(&out, scratch, 1) == 1) { close(out.fd); out.fd = -1; }
        if (err.fd >= 0 && capture_read(&err, scratch, 1) == 1) { close(err.fd); err.fd = -1; }
    }
    free(scratch);
    getrusage(RUSAGE_CHILDREN, &ru1);
    uint64_t cpu_ns =
        ((uint64_t)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (uint64_t)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec)) * 1000000000ull
        + (uint64_t)((ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec)) * 1000ull;

    buf_t b = {0};
    f_begin(&b, 'Z');
    uint8_t fl = 0; int32_t code = 0, sig = 0;
    if (done && WIFEXITED(status)) { fl |= 1; code = WEXITSTATUS(status); }
    else if (done && WIFSIGNALED(status)) { fl |= 2; sig = WTERMSIG(status); }
    if (timed_out) fl |= 4;
    if (out.truncated) fl |= 8;
    if (err.truncated) fl |= 16;
    b_u8(&b, fl); b_i32(&b, code); b_i32(&b, sig); b_u64(&b, t1 - t0); b_u64(&b, cpu_ns);
    b_u64(&b, (uint64_t)main_ru.ru_maxrss);
    b_str(&b, out.data.p ? out.data.p : "", out.data.len);
    b_str(&b, err.data.p ? err.data.p : "", err.data.len);
    b_free(&out.data); b_free(&err.data);
    f_send(&b);
    b_free(&b);
out_free:
    for (uint32_t i = 0; i < argc; i++) free(argv[i]);
    free(argv);
    for (uint32_t i = 0; envp && envp[i]; i++) free(envp[i]);
    free(envp);
    free(cwd);
}

/* ------------------------------------------------------------------ files */

static char *full_path(const char *p) {
    char *out;
    if (p[0] == '/') out = strdup(p);
    else if (asprintf(&out, "/work/%s", p) < 0) out = NULL;
    if (!out) _exit(70);
    return out;
}

static int mkdirs_for(char *path) {      /* mkdir -p dirname(path) */
    for (char *s = path + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        int r = mkdir(path, 0755);
        int e = errno;
        *s = '/';
        if (r != 0 && e != EEXIST) { errno = e; return -1; }
    }
    return 0;
}

static int write_one(const char *rel, const char *data, size_t len) {
    char *p = full_path(rel);
    int fd = -1, rc = -1;
    if (mkdirs_for(p) == 0) {
        fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_NONBLOCK | O_CLOEXEC, 0644);
        struct stat st;
        if (fd >= 0 && fstat(fd, &st) == 0 && !S_ISREG(st.st_mode)) errno = EINVAL;
        else if (fd >= 0 && write_full(fd, data, len) == 0) rc = 0;
    }
    int e = errno;
    if (fd >= 0 && close(fd) != 0 && rc == 0) { e = errno; rc = -1; }
    if (rc != 0) send_error(e, "write %s: %s", p);
    free(p);
    return rc;
}

static void handle_write(cur_t *c) {
    uint32_t n = c_u32(c);
    for (uint32_t i = 0; i < n; i++) {
        char *path = c_cstr(c, NULL);
        size_t len = 0; const char *data = c_bytes(c, &len);
        if (c->bad || !path) { free(path); send_error(EINVAL, "bad write request%s: %s", ""); return; }
        int rc = write_one(path, data, len);
        free(path);
        if (rc != 0) return;
    }
    send_simple('O');
}

/* 'R': str path, u64 max_bytes */
static void handle_read(cur_t *c) {
    char *rel = c_cstr(c, NULL);
    uint64_t max = c_u64(c);
    if (!rel || c->bad) { free(rel); send_error(EINVAL, "bad read request%s: %s", ""); return; }
    char *p = full_path(rel); free(rel);
    /* O_NONBLOCK: a FIFO planted by a command must not wedge us */
    int fd = open(p, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) { send_error(errno, "read %s: %s", p); if (fd >= 0) close(fd); free(p); return; }
    int bad = S_ISDIR(st.st_mode) ? EISDIR : !S_ISREG(st.st_mode) ? EINVAL
              : (uint64_t)st.st_size > max ? EFBIG : 0;
    if (bad) { close(fd); send_error(bad, "read %s: %s", p); free(p); return; }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    buf_t b = {0};
    f_begin(&b, 'D');
    for (;;) {
        b_reserve(&b, CHUNK);
        ssize_t r = read(fd, b.p + b.len, CHUNK);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { int e = errno; close(fd); b_free(&b); send_error(e, "read %s: %s", p); free(p); return; }
        if (r == 0) break;
        b.len += (size_t)r;
        if (b.len - 5 > max || b.len > MAX_FRAME - 16) { close(fd); b_free(&b); send_error(EFBIG, "read %s: %s", p); free(p); return; }
    }
    close(fd);
    f_send(&b); b_free(&b); free(p);
}

/* empty the directory open at dfd (not the directory itself) */
static int empty_dir(int dfd, int depth) {
    if (depth > MAX_DEPTH) { errno = ELOOP; return -1; }
    fchmod(dfd, 0700);
    int dup = fcntl(dfd, F_DUPFD_CLOEXEC, 0);
    DIR *d = dup >= 0 ? fdopendir(dup) : NULL;
    if (!d) { if (dup >= 0) close(dup); return -1; }
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *n = e->d_name;
        if (n[0] == '.' && (!n[1] || (n[1] == '.' && !n[2]))) continue;
        if (unlinkat(dfd, n, 0) == 0) continue;
        struct stat st;
        if (fstatat(dfd, n, &st, AT_SYMLINK_NOFOLLOW) != 0) { if (errno != ENOENT) rc = -1; continue; }
        if (!S_ISDIR(st.st_mode)) { rc = -1; continue; }
        fchmodat(dfd, n, 0700, 0);
        int sub = openat(dfd, n, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (sub < 0) { rc = -1; continue; }
        if (empty_dir(sub, depth + 1) != 0) rc = -1;
        close(sub);
        if (unlinkat(dfd, n, AT_REMOVEDIR) != 0) rc = -1;
    }
    closedir(d);
    return rc;
}

static int is_empty(int dfd) {
    lseek(dfd, 0, SEEK_SET);                /* the dup shares the offset */
    int dup = fcntl(dfd, F_DUPFD_CLOEXEC, 0);
    DIR *d = dup >= 0 ? fdopendir(dup) : NULL;
    if (!d) { if (dup >= 0) close(dup); return 0; }
    struct dirent *e; int empty = 1;
    while (empty && (e = readdir(d))) {
        const char *n = e->d_name;
        if (!(n[0] == '.' && (!n[1] || (n[1] == '.' && !n[2])))) empty = 0;
    }
    closedir(d);
    return empty;
}

static void handle_reset(cur_t *c) {
    kill_all(-1, NULL, NULL);
    const char *dirs[] = { "/work", "/tmp", "/dev/shm" };
    for (int i = 0; i < 3; i++) {
        chmod(dirs[i], 0700);           /* a command may have taken our permissions away */
        int fd = open(dirs[i], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) { if (errno == ENOENT) continue; send_error(errno, "reset %s: %s", dirs[i]); return; }
        int rc = 0, e = 0;
        for (int pass = 0; pass < 4; pass++) {      /* readdir may miss entries while we delete */
            lseek(fd, 0, SEEK_SET);
            rc = empty_dir(fd, 0); e = errno;
            if (rc == 0 && is_empty(fd)) break;
            if (rc == 0) { rc = -1; e = ENOTEMPTY; }
        }
        fchmod(fd, i == 0 ? 0755 : 01777);
        close(fd);
        if (rc != 0) { send_error(e, "reset %s: %s", dirs[i]); return; }
    }
    handle_write(c);
}

/* ------------------------------------------------------------------ main */

int main(void) {
    prctl(PR_SET_DUMPABLE, 0);           /* commands (same uid) may not ptrace or read our fds */
    signal(SIGPIPE, SIG_IGN);
    S = fcntl(0, F_DUPFD_CLOEXEC, 3);
    if (S < 0) return 71;
    int nul = open("/dev/null", O_RDWR);
    if (nul >= 0) { dup2(nul, 0); dup2(nul, 1); dup2(nul, 2); if (nul > 2) close(nul); }
    if (write_full(S, MAGIC, 8) < 0) return 0;
    for (;;) {
        uint32_t len;
        if (read_full(S, &len, 4) < 0) return 0;        /* host closed: done */
        if (len < 1 || len > MAX_FRAME) return 72;
        char *req = malloc(len);
        if (!req) return 70;
        if (read_full(S, req, len) < 0) return 0;
        cur_t c = { req + 1, len - 1, 0 };
        switch (req[0]) {
        case 'P': send_simple('P'); break;
        case 'E': handle_exec(&c); break;
        case 'W': handle_write(&c); break;
        case 'R': handle_read(&c); break;
        case 'X': handle_reset(&c); break;
        default: free(req); return 73;
        }
        free(req);
    }
}
