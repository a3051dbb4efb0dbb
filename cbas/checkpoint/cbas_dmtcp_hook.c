/*
 * CBAS post-checkpoint hook, a DMTCP plugin (loaded with dmtcp_launch --with-plugin).
 *
 * At DMTCP_EVENT_RESUME the checkpoint images are written and the application's threads are
 * still suspended. The hook connects to the unix socket named by CBAS_HOOK_SOCKET, says the
 * checkpoint is written, and blocks until the CBAS worker answers: meanwhile the worker reads a
 * consistent state (and can start a volume snapshot). Then the application resumes.
 *
 * At DMTCP_EVENT_RESTART (memory restored, the application's threads not yet running) it calls
 * the socket named in dmtcp_restart's environment the same way, saying "restarted": a normal
 * restart is answered at once; a validation restart is never answered, the worker kills it.
 *
 * It acts only on the events it needs, with plain system calls: calling system() at RESUME hangs
 * a DMTCP 4 job, and a plugin doing stdio at every event crashed jobs at start.
 * After a restart the environment is the one saved in the image, so the socket path is read
 * again from dmtcp_restart's environment. dmtcp_get_restart_env() of DMTCP 4.2 and 5.0 finds only
 * the FIRST variable of that environment (it bounds its scan by sizeof a pointer), and the
 * worker's /bin/sh gate reorders the environment: so where it is not found, the socket is the
 * worker's fixed place for it, ../hook/hook.sock from the folder dmtcp_restart runs in (the job's
 * working folder; DMTCP does not restore the old working folder unless asked to).
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include "dmtcp.h"

#define CBAS_SOCKET_VARIABLE "CBAS_HOOK_SOCKET"
#define CBAS_SOCKET_BESIDE_WORK "../hook/hook.sock"

static char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static int socket_path_known = 0;

static void
remember_socket_path(const char *path)
{
  if (path != NULL && strlen(path) < sizeof(socket_path)) {
    strcpy(socket_path, path);
    socket_path_known = 1;
  }
}

static void
tell_worker_and_wait(const char *message, size_t length)
{
  struct sockaddr_un address;
  char reply[16];
  int fd;

  if (!socket_path_known) {
    remember_socket_path(getenv(CBAS_SOCKET_VARIABLE));
  }
  if (!socket_path_known) {
    return;
  }
  fd = socket(AF_UNIX, SOCK_STREAM, 0);
  if (fd < 0) {
    return;
  }
  memset(&address, 0, sizeof(address));
  address.sun_family = AF_UNIX;
  strcpy(address.sun_path, socket_path);
  if (connect(fd, (struct sockaddr *)&address, sizeof(address)) == 0) {
    if (write(fd, message, length) == (ssize_t)length) {
      /* blocks until the worker has what it needs; EOF or an error also lets the job go */
      while (read(fd, reply, sizeof(reply)) < 0) {
      }
    }
  }
  close(fd);
}

/*
 * DMTCP 5.0 decides which signal its sigaction() wrapper keeps from the program by parsing
 * DMTCP_SIGCKPT on the first call, and falls back to SIGUSR2 when errno happens to be set then
 * (it never clears it): the JVM, whose SIGUSR2 handler is then refused, prints a warning. Making
 * that first call here, with errno clear, settles it on the signal the worker chose.
 */
static void
settle_checkpoint_signal(void)
{
  struct sigaction current;

  errno = 0;
  sigaction(SIGCHLD, NULL, &current);
}

static void
cbas_event_hook(DmtcpEvent_t event, DmtcpEventData_t *data)
{
  (void)data;
  switch (event) {
  case DMTCP_EVENT_INIT:
    settle_checkpoint_signal();
    break;
  case DMTCP_EVENT_RESUME: {
    static const char written[] = "checkpoint-written\n";
    tell_worker_and_wait(written, sizeof(written) - 1);
    break;
  }
  case DMTCP_EVENT_RESTART: {
    static const char restarted[] = "restarted\n";
    char path[sizeof(socket_path)];
    char beside[PATH_MAX];
    if (dmtcp_get_restart_env(CBAS_SOCKET_VARIABLE, path, sizeof(path)) == RESTART_ENV_SUCCESS) {
      remember_socket_path(path);
    } else if (realpath(CBAS_SOCKET_BESIDE_WORK, beside) != NULL) {
      remember_socket_path(beside);
    }
    tell_worker_and_wait(restarted, sizeof(restarted) - 1);
    break;
  }
  default:
    break;
  }
}

DmtcpPluginDescriptor_t cbas_hook_plugin = {
  DMTCP_PLUGIN_API_VERSION,
  DMTCP_PACKAGE_VERSION,
  "cbas_hook",
  "CBAS",
  "cbas@localhost",
  "Tells the CBAS worker when checkpoint images are written, and waits for it",
  cbas_event_hook
};

DMTCP_DECL_PLUGIN(cbas_hook_plugin);
