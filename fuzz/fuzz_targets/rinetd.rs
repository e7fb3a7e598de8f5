//! Fuzzes `fuzz::rinetd`; see its documentation for what is checked.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::rinetd(data));
