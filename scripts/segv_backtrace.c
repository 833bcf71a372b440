// Prints the native stack of a SIGSEGV/SIGABRT to stderr, for GPU machines without gdb (issue 24: every
// C++ ValueError thrown by an extension launcher crashed the process on the H100; Python's faulthandler
// shows only the Python frames). Built and preloaded by scripts/gpu_stage_b_and_test.sh diag:
//   gcc -shared -fPIC -O1 -o /tmp/segv_backtrace.so scripts/segv_backtrace.c
//   LD_PRELOAD=/tmp/segv_backtrace.so python3 -m pytest -p no:faulthandler ...
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void report(int sig) {
  void* frames[64];
  const char* head = sig == SIGSEGV ? "\n[segv_backtrace] SIGSEGV, native stack:\n"
                                    : "\n[segv_backtrace] SIGABRT, native stack:\n";
  write(2, head, strlen(head));
  int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, 2);  // async-signal-safe enough for a post-mortem: no malloc
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  static char stack[1 << 16];  // the handler runs on its own stack: the crash may be a stack overflow
  stack_t ss = {.ss_sp = stack, .ss_size = sizeof stack, .ss_flags = 0};
  sigaltstack(&ss, 0);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = report;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, 0);
  sigaction(SIGABRT, &sa, 0);
}
