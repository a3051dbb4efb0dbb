"""The declarations of DMTCP's dmtcp.h that cbas/checkpoint/cbas_dmtcp_hook.c uses, as the fake
DMTCP's include/dmtcp.h, so the product's hook build (build_hook) runs where DMTCP is absent. Names,
types and signatures are those of DMTCP 4.2.0's and the 5.0 head's header (the event enum is cut
short: the fake never loads the library, it only looks in it for the hook's message)."""

STUB_HEADER = """\
#ifndef FAKE_DMTCP_H
#define FAKE_DMTCP_H
#include <stddef.h>
#ifndef DMTCP_PACKAGE_VERSION
#define DMTCP_PACKAGE_VERSION "fake"
#endif
#define DMTCP_PLUGIN_API_VERSION "3"
#ifdef __cplusplus
# define EXTERNC extern "C"
#else
# define EXTERNC
#endif
typedef enum eDmtcpEvent {
  DMTCP_EVENT_INIT, DMTCP_EVENT_EXIT, DMTCP_EVENT_PRESUSPEND, DMTCP_EVENT_PRECHECKPOINT,
  DMTCP_EVENT_RESUME, DMTCP_EVENT_RESTART, DMTCP_EVENT_RUNNING, nDmtcpEvents
} DmtcpEvent_t;
typedef union _DmtcpEventData_t { struct { int isRestart; } resumeUserThreadInfo; } DmtcpEventData_t;
typedef struct {
  const char *pluginApiVersion;
  const char *dmtcpVersion;
  const char *pluginName;
  const char *authorName;
  const char *authorEmail;
  const char *description;
  void (*event_hook)(const DmtcpEvent_t event, DmtcpEventData_t *data);
} DmtcpPluginDescriptor_t;
typedef enum eDmtcpGetRestartEnvErr {
  RESTART_ENV_SUCCESS = 0, RESTART_ENV_NOTFOUND = -1, RESTART_ENV_TOOLONG = -2,
  RESTART_ENV_DMTCP_BUF_TOO_SMALL = -3, RESTART_ENV_INTERNAL_ERROR = -4, RESTART_ENV_NULL_PTR = -5
} DmtcpGetRestartEnvErr_t;
DmtcpGetRestartEnvErr_t dmtcp_get_restart_env(const char *name, char *value, size_t maxvaluelen);
void dmtcp_register_plugin(DmtcpPluginDescriptor_t descr) __attribute((weak));
#define DMTCP_DECL_PLUGIN(descr) \\
  EXTERNC void dmtcp_initialize_plugin() { dmtcp_register_plugin(descr); }
#endif
"""
