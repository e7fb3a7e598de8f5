//! The service definition, the local development fabric and the Kubernetes
//! rendering (issue 6). Not built yet: this crate holds no code so far.
