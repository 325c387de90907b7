/* The sandbox ("pause") process for the containerd baseline in cri_lifecycle.py: containerd's
 * CRI needs a sandbox image and the machines have no route to registry.k8s.io. Like the upstream
 * pause, it holds the pod's namespaces and does nothing until SIGTERM or SIGINT; as PID 1 of
 * the pod's PID namespace it also reaps zombies. Built with gcc -static so the image needs no
 * libc. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig) {
    (void)sig;
    _exit(0);
}

static void on_child(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction stop = {.sa_handler = on_stop};
    struct sigaction child = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    sigaction(SIGTERM, &stop, NULL);
    sigaction(SIGINT, &stop, NULL);
    sigaction(SIGCHLD, &child, NULL);
    for (;;) {
        pause();
    }
}
