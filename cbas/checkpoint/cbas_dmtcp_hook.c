/*
 * CBAS post-checkpoint hook, a DMTCP plugin (loaded with dmtcp_launch --with-plugin).
 *
 * At DMTCP_EVENT_RESUME the checkpoint images are written and the application's threads are
 * still suspended. The hook connects to the unix socket named by CBAS_HOOK_SOCKET, says the
 * checkpoint is written, and blocks until the CBAS worker answers: meanwhile the worker reads a
 * consistent state (and can start a volume snapshot). Then the application resumes.
 *
 * It acts only on the events it needs, with plain system calls: calling system() at RESUME hangs
 * a DMTCP 4 job, and a plugin doing stdio at every event crashed jobs at start.
 * After a restart the environment is the one saved in the image, so the socket path is read
 * again from dmtcp_restart's environment.
 */
#include <string.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include "dmtcp.h"

#define CBAS_SOCKET_VARIABLE "CBAS_HOOK_SOCKET"

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
tell_worker_and_wait(void)
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
    static const char message[] = "checkpoint-written\n";
    if (write(fd, message, sizeof(message) - 1) == (ssize_t)(sizeof(message) - 1)) {
      /* blocks until the worker has what it needs; EOF or an error also lets the job go */
      while (read(fd, reply, sizeof(reply)) < 0) {
      }
    }
  }
  close(fd);
}

static void
cbas_event_hook(DmtcpEvent_t event, DmtcpEventData_t *data)
{
  (void)data;
  switch (event) {
  case DMTCP_EVENT_RESUME:
    tell_worker_and_wait();
    break;
  case DMTCP_EVENT_RESTART: {
    char path[sizeof(socket_path)];
    if (dmtcp_get_restart_env(CBAS_SOCKET_VARIABLE, path, sizeof(path)) == RESTART_ENV_SUCCESS) {
      remember_socket_path(path);
    }
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
