//! Fuzzes `fuzz::client_hello`; see its documentation for what is checked.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::client_hello(data));
