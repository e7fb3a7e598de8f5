//! Running under systemd: the listening sockets it passes ([`activation`])
//! and the notifications it listens for ([`notify`]). Both are read from
//! the environment once, by [`take_environment`], and are inert when the
//! program runs without a service manager.

pub mod activation;
pub mod notify;

/// Takes what the service manager passed in the environment (the sockets
/// of `LISTEN_FDS`, the `NOTIFY_SOCKET` address) and removes those
/// variables, so a child process does not act on them. Call it first thing
/// in `main`, before any thread starts: changing the environment is safe
/// only then. (Anything that needs them before takes them then, all the
/// same.)
pub fn take_environment() {
    activation::take();
    notify::take();
}
