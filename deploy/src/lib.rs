//! The service definition, the local development fabric and the cluster
//! manifests.
//!
//! - [`definition`]: reading and checking `deploy/service.yaml`;
//! - [`programs`]: what the definition knows of each program;
//! - [`fabric`]: `deploy run`, every instance on one machine behind the
//!   tunnel's balancer;
//! - [`render`]: Kubernetes manifests (with Kustomize) and a compose file;
//! - [`parent_death`]: instances that die with the fabric (the workspace's
//!   one `unsafe` block).

pub mod definition;
pub mod fabric;
pub mod parent_death;
pub mod programs;
pub mod render;

/// The program's name: its configuration prefix is `DEPLOY_`.
pub const PROGRAM: &str = "deploy";

/// The definition used when none is named.
pub const DEFAULT_DEFINITION: &str = "deploy/service.yaml";
