//! Instances die with the fabric, even when the fabric itself is killed
//! with SIGKILL and cannot stop them: each instance asks the kernel for
//! SIGKILL when its parent dies (`PR_SET_PDEATHSIG`).
//!
//! The request has to be made by the child itself, between `fork` and
//! `exec`, which only a `pre_exec` hook can do; that hook is `unsafe`
//! because it runs in a copy of a multi-threaded process where only
//! async-signal-safe calls are sound. This module is the one place of the
//! workspace allowed to use `unsafe`, for that hook alone.
//!
//! The kernel sends the signal when the *thread* that forked the child
//! ends, not the process: callers spawn from a thread that lives as long as
//! the fabric (see `fabric::Spawner`).

#![allow(unsafe_code)]

use std::io;

use nix::errno::Errno;
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use nix::unistd::{getpid, getppid};
use tokio::process::Command;

/// Makes the process `command` starts get SIGKILL when this process (more
/// exactly: the thread that spawns it) ends.
pub fn die_with_parent(command: &mut Command) {
    let parent = getpid();
    // SAFETY: the hook makes two system calls (prctl, getppid) and builds
    // an `io::Error` from a raw errno; none allocates, locks or touches
    // state shared with other threads, so it is async-signal-safe as a
    // `pre_exec` hook must be.
    unsafe {
        command.pre_exec(move || {
            set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The parent may have died between fork and prctl, when no
            // signal would come any more: then the child is the orphan of
            // someone else and must not start.
            if getppid() != parent {
                return Err(io::Error::from(Errno::ESRCH));
            }
            Ok(())
        });
    }
}
