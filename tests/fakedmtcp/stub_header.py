"""The few declarations of DMTCP's header that cbas/checkpoint/cbas_dmtcp_hook.c uses, written by the
fake DMTCP fixture next to its tools so the hook's build path runs in CI; DMTCP itself brings
the real header."""

STUB_HEADER = """\
#ifndef FAKE_DMTCP_H
#define FAKE_DMTCP_H
#include <stddef.h>
#define DMTCP_PLUGIN_API_VERSION "3"
#define DMTCP_PACKAGE_VERSION "fake"
typedef enum { DMTCP_EVENT_INIT, DMTCP_EVENT_PRECHECKPOINT, DMTCP_EVENT_RESUME, DMTCP_EVENT_RESTART } DmtcpEvent_t;
typedef union { int unused; } DmtcpEventData_t;
typedef struct {
  const char *pluginApiVersion, *dmtcpVersion, *pluginName, *authorName, *authorEmail, *description;
  void (*event_hook)(const DmtcpEvent_t event, DmtcpEventData_t *data);
} DmtcpPluginDescriptor_t;
typedef enum { RESTART_ENV_SUCCESS = 0 } DmtcpGetRestartEnvErr_t;
DmtcpGetRestartEnvErr_t dmtcp_get_restart_env(const char *name, char *value, size_t maxvaluelen);
#define DMTCP_DECL_PLUGIN(descr) void dmtcp_initialize_plugin(void) {}
#endif
"""
