//! The role runtime every program here shares.
//!
//! - [`config`]: layered configuration (defaults < YAML file < environment <
//!   flags) with the origin of every value and every error reported at once;
//! - [`settings`]: the setting types (durations, CIDR lists, listen
//!   addresses) and the serving and logging settings all programs have;
//! - [`endpoint`]: named endpoints and binding them with errors that say what
//!   to do;
//! - [`serve`]: the accept loop with a connection cap, access lists, a span
//!   per connection and graceful shutdown;
//! - [`limits`]: per-source limits (connections at once and a rate from one
//!   address or prefix) in a bounded table;
//! - [`runtime`]: the tokio runtimes the programs and their threads run on;
//! - [`yaml`]: YAML read into a tree that knows where every node is;
//! - [`proxy`]: the PROXY protocol, read from balancers and written to
//!   targets, so servers see their real clients;
//! - [`tls`]: TLS configurations read from PEM files, every bad file named;
//! - [`systemd`]: socket activation and readiness notification;
//! - [`telemetry`], [`signal`], [`cli`]: logging, shutdown signals, and the
//!   flags every program has.

pub mod cli;
pub mod config;
pub mod discovery;
pub mod endpoint;
pub mod fabric;
pub mod files;
pub mod limits;
pub mod proxy;
pub mod runtime;
pub mod serve;
pub mod settings;
pub mod signal;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod yaml;
