/* vsock-io: move a deterministic byte stream over one stream socket and report what
 * went through, for the vsock tests (static; runs in the guest and on the host).
 *
 *   vsock-io listen PORT ACTION              AF_VSOCK: accept one connection on PORT
 *   vsock-io connect CID PORT ACTION         AF_VSOCK: connect to CID:PORT
 *   vsock-io uds-listen PATH ACTION          AF_UNIX: accept one connection on PATH
 *                                            (the host end of a guest-initiated
 *                                            connection: PATH is uds_path_PORT)
 *   vsock-io uds-connect PATH PORT ACTION    AF_UNIX: the host-initiated side of
 *                                            Firecracker's protocol: "CONNECT PORT\n",
 *                                            then "OK HOSTPORT\n" from the VMM
 * ACTION:
 *   send N [SEED]    write N bytes of the pattern, shut down writing, wait for EOF
 *   recv             read until EOF
 *   echo             write back what is read until EOF
 * One line on stdout at the end: "sent|recv|echo bytes=N sha256=HEX" (sha256 of the
 * bytes sent, received or echoed); errors: one line on stderr, exit status 1.
 * `listen` prints "listening" on stdout once it listens (the test waits for it).
 *
 * The pattern (the same as tests/vsock_tool.pattern): byte i is T[i % 65521], where
 * T[k] is the top byte of the (k+1)th step of xorshift32 from
 * (0x9E3779B9 ^ SEED * 0x85EBCA6B) or 1 if that is 0. A prime period: a lost,
 * doubled or reordered packet shows in the hash.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
struct sockaddr_vm_ {  /* <linux/vm_sockets.h>, kept here so no kernel headers are needed */
    unsigned short svm_family;
    unsigned short svm_reserved1;
    unsigned int svm_port;
    unsigned int svm_cid;
    unsigned char svm_zero[4];
};

#define PERIOD 65521
static unsigned char table[PERIOD];

static void die(const char *what) {
    fprintf(stderr, "vsock-io: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fail(const char *what) {
    fprintf(stderr, "vsock-io: %s\n", what);
    exit(1);
}

/* ---- sha256 (FIPS 180-4) ---- */
typedef struct { uint32_t h[8]; uint64_t len; unsigned char buf[64]; size_t n; } sha256;
static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};
#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha_block(sha256 *s, const unsigned char *p) {
    uint32_t w[64], a, b, c, d, e, f, g, h;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3];
    e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
    s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

static void sha_init(sha256 *s) {
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, iv, sizeof iv);
    s->len = 0;
    s->n = 0;
}

static void sha_update(sha256 *s, const unsigned char *p, size_t len) {
    s->len += len;
    while (len) {
        if (s->n == 0 && len >= 64) {
            sha_block(s, p);
            p += 64;
            len -= 64;
            continue;
        }
        size_t k = 64 - s->n < len ? 64 - s->n : len;
        memcpy(s->buf + s->n, p, k);
        s->n += k;
        p += k;
        len -= k;
        if (s->n == 64) {
            sha_block(s, s->buf);
            s->n = 0;
        }
    }
}

static void sha_hex(sha256 *s, char out[65]) {
    uint64_t bits = s->len * 8;
    unsigned char pad = 0x80, zero = 0, lenb[8];
    sha_update(s, &pad, 1);
    while (s->n != 56)
        sha_update(s, &zero, 1);
    for (int i = 0; i < 8; i++)
        lenb[i] = (unsigned char)(bits >> (56 - 8 * i));
    sha_update(s, lenb, 8);
    for (int i = 0; i < 8; i++)
        sprintf(out + 8 * i, "%08x", s->h[i]);
}

/* ---- I/O ---- */
static void make_table(uint32_t seed) {
    uint32_t x = 0x9E3779B9u ^ (uint32_t)(seed * 0x85EBCA6Bu);
    if (!x)
        x = 1;
    for (int k = 0; k < PERIOD; k++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        table[k] = (unsigned char)(x >> 24);
    }
}

static void write_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            die("send");
        }
        p += k;
        n -= (size_t)k;
    }
}

static void report(const char *what, uint64_t n, sha256 *s) {
    char hex[65];
    sha_hex(s, hex);
    printf("%s bytes=%llu sha256=%s\n", what, (unsigned long long)n, hex);
    fflush(stdout);
}

static int run(int fd, int argc, char **argv) {
    static unsigned char buf[1 << 16];
    sha256 s;
    sha_init(&s);
    if (argc < 1)
        fail("no ACTION (send N [SEED] | recv | echo)");
    if (!strcmp(argv[0], "send")) {
        if (argc < 2)
            fail("send needs N");
        uint64_t total = strtoull(argv[1], NULL, 0), off = 0;
        make_table(argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 0) : 1);
        while (off < total) {
            size_t start = off % PERIOD;
            size_t n = PERIOD - start;
            if (n > total - off)
                n = (size_t)(total - off);
            sha_update(&s, table + start, n);
            write_all(fd, table + start, n);
            off += n;
        }
        if (shutdown(fd, SHUT_WR) < 0)
            die("shutdown");
        while (recv(fd, buf, sizeof buf, 0) > 0) /* until the peer closes */
            ;
        report("sent", total, &s);
        return 0;
    }
    int echo = !strcmp(argv[0], "echo");
    if (!echo && strcmp(argv[0], "recv"))
        fail("ACTION is send N [SEED], recv or echo");
    uint64_t total = 0;
    for (;;) {
        ssize_t k = recv(fd, buf, sizeof buf, 0);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            die("recv");
        }
        if (k == 0)
            break;
        sha_update(&s, buf, (size_t)k);
        total += (uint64_t)k;
        if (echo)
            write_all(fd, buf, (size_t)k);
    }
    report(echo ? "echo" : "recv", total, &s);
    return 0;
}

static int accept_one(int lfd) {
    printf("listening\n");
    fflush(stdout);
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        die("accept");
    close(lfd);
    return fd;
}

static void unix_addr(struct sockaddr_un *a, const char *path) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof a->sun_path)
        fail("socket path too long");
    strcpy(a->sun_path, path);
}

int main(int argc, char **argv) {
    if (argc < 3)
        fail("usage: vsock-io listen PORT | connect CID PORT | uds-listen PATH | "
             "uds-connect PATH PORT, then send N [SEED] | recv | echo");
    const char *mode = argv[1];
    int fd;
    if (!strcmp(mode, "listen") || !strcmp(mode, "connect")) {
        struct sockaddr_vm_ a;
        int listen_ = !strcmp(mode, "listen");
        if (!listen_ && argc < 4)
            fail("connect needs CID PORT");
        memset(&a, 0, sizeof a);
        a.svm_family = AF_VSOCK;
        a.svm_cid = listen_ ? 0xFFFFFFFFu : (unsigned)strtoul(argv[2], NULL, 0);
        a.svm_port = (unsigned)strtoul(argv[listen_ ? 2 : 3], NULL, 0);
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0)
            die("socket(AF_VSOCK)");
        if (listen_) {
            if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
                die("bind");
            if (listen(s, 16) < 0)
                die("listen");
            fd = accept_one(s);
        } else {
            if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
                die("connect");
            fd = s;
        }
        return run(fd, argc - (listen_ ? 3 : 4), argv + (listen_ ? 3 : 4));
    }
    if (!strcmp(mode, "uds-listen") || !strcmp(mode, "uds-connect")) {
        struct sockaddr_un a;
        int listen_ = !strcmp(mode, "uds-listen");
        if (!listen_ && argc < 4)
            fail("uds-connect needs PATH PORT");
        unix_addr(&a, argv[2]);
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (s < 0)
            die("socket(AF_UNIX)");
        if (listen_) {
            unlink(argv[2]);
            if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
                die("bind");
            if (listen(s, 16) < 0)
                die("listen");
            fd = accept_one(s);
            return run(fd, argc - 3, argv + 3);
        }
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
            die("connect");
        char line[32];
        int n = snprintf(line, sizeof line, "CONNECT %s\n", argv[3]);
        write_all(s, (unsigned char *)line, (size_t)n);
        /* the answer, byte by byte: what follows it is the stream */
        size_t got = 0;
        while (got < sizeof line - 1) {
            ssize_t k = recv(s, line + got, 1, 0);
            if (k <= 0)
                fail("the VMM closed the connection (no OK: nobody listens on that port?)");
            if (line[got++] == '\n')
                break;
        }
        line[got] = 0;
        if (strncmp(line, "OK ", 3))
            fail("no OK line from the VMM");
        return run(s, argc - 4, argv + 4);
    }
    fail("mode is listen, connect, uds-listen or uds-connect");
    return 1;
}
