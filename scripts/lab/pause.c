/* The node lab's sandbox ("pause") image: the process that holds a Pod's namespaces. No registry is reachable, so
 * containerd's sandbox_image must be a local image; this one is a static binary in a FROM scratch image
 * (scripts/lab/build-pod-images.sh). It does nothing but wait: it ends on SIGTERM or SIGINT (as the kubelet stops a
 * sandbox) and reaps children, since it is PID 1 of a Pod that shares its PID namespace. */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction on_stop = {.sa_handler = stop};
  struct sigaction on_child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
  if (sigaction(SIGTERM, &on_stop, NULL) || sigaction(SIGINT, &on_stop, NULL) ||
      sigaction(SIGCHLD, &on_child, NULL)) {
    return 1;
  }
  for (;;) {
    pause();
  }
}
