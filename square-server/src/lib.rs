//! The square service (issue 4): one number per line in, its exact square per
//! line out. Not built yet: this crate holds no service code so far.
