//! Fuzzes `fuzz::proxy_header`; see its documentation for what is checked.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::proxy_header(data));
