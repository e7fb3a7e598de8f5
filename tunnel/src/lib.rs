//! The TCP tunnel (issue 3): forwards connections from listening endpoints to
//! targets, in the spirit of rinetd, on the shared role runtime in `common`.
//! Not built yet: this crate holds no forwarding code so far.
