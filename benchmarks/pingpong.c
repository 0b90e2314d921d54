/* Raw socket ping-pong, the floor under an RPC round trip (bench_rpc.py).
 *
 * bench_rpc.py compiles this at run time (cc -O2 -shared -fPIC) and calls it
 * through ctypes (which releases the GIL), on a connected blocking socket:
 *
 *   pinger (serve=0): per iteration write `size` bytes, read `size` bytes back;
 *   server (serve=1): per iteration read `size` bytes, write them back.
 *
 * lat_us, when not NULL, receives each iteration's time in microseconds
 * (CLOCK_MONOTONIC). Returns 0, or an errno (ECONNRESET when the peer closed).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static int transfer(int fd, char* buf, int size, int out) {
  int done = 0;
  while (done < size) {
    ssize_t n = out ? write(fd, buf + done, size - done) : read(fd, buf + done, size - done);
    if (n > 0) {
      done += (int)n;
    } else if (n == 0) {
      return ECONNRESET;
    } else if (errno != EINTR) {
      return errno;
    }
  }
  return 0;
}

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int pingpong(int fd, int iters, int size, int serve, double* lat_us) {
  char* buf = calloc(size > 0 ? size : 1, 1);
  if (buf == NULL) return ENOMEM;
  int err = 0;
  for (int i = 0; i < iters && err == 0; i++) {
    double t0 = now_us();
    if (!serve) err = transfer(fd, buf, size, 1);
    if (err == 0) err = transfer(fd, buf, size, 0);
    if (err == 0 && serve) err = transfer(fd, buf, size, 1);
    if (lat_us != NULL) lat_us[i] = now_us() - t0;
  }
  free(buf);
  return err;
}
