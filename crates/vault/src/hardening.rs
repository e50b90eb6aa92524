//! Process hardening at start: no core dumps, no ptrace attachment, memory kept out of swap.
//! Each step reports what it achieved; the status RPC shows the report to operators.

use rustix::mm::{mlockall, MlockAllFlags};
use rustix::process::{getrlimit, set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit};

/// What hardening achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HardeningReport {
    pub core_dumps_disabled: bool,
    pub ptrace_attach_blocked: bool,
    pub memory_locked: bool,
    /// Why memory is not locked; empty when it is.
    pub memory_lock_error: String,
}

/// Applies every hardening step the system allows and says what happened.
pub fn harden_process() -> HardeningReport {
    let core_dumps_disabled = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|err| tracing::error!(%err, "could not disable core dumps"))
    .is_ok();
    // A non-dumpable process writes no core file and cannot be ptrace-attached by other
    // processes of the same user, so card data and keys cannot be read out of its memory.
    let ptrace_attach_blocked = set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|err| tracing::error!(%err, "could not make the process non-dumpable"))
        .is_ok();
    let (memory_locked, memory_lock_error) = match lock_memory() {
        Ok(()) => (true, String::new()),
        Err(why) => {
            tracing::warn!(
                "MEMORY NOT LOCKED: {why}; secrets may be swapped to disk. Raise the memory-lock \
                 limit to unlimited (e.g. LimitMEMLOCK=infinity, or ulimit -l unlimited)."
            );
            (false, why)
        }
    };
    let report = HardeningReport {
        core_dumps_disabled,
        ptrace_attach_blocked,
        memory_locked,
        memory_lock_error,
    };
    tracing::info!(
        core_dumps_disabled = report.core_dumps_disabled,
        ptrace_attach_blocked = report.ptrace_attach_blocked,
        memory_locked = report.memory_locked,
        "process hardening applied"
    );
    report
}

fn lock_memory() -> Result<(), String> {
    // Only with no memory-lock limit: with `MCL_FUTURE`, any allocation past a finite limit
    // would fail and abort the process, and how much the vault allocates depends on its load.
    let limit = getrlimit(Resource::Memlock);
    if let Some(current) = limit.current {
        return Err(format!("the memory-lock limit is {current} bytes, not unlimited"));
    }
    mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE).map_err(|err| format!("mlockall failed: {err}"))
}

/// Whether this binary was built without optimisations and with debug assertions.
pub const fn is_debug_build() -> bool {
    cfg!(debug_assertions)
}
