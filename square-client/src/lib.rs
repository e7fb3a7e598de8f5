//! The square service's client library and command-line client (issue 4).
//! Not built yet: this crate holds no client code so far.
