//! `control::parse_str` on arbitrary UTF-8: it reports errors, it never panics. Host names
//! are not looked up: a fuzzer must not send DNS queries.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = portrelay::control::parse_str_with("fuzz.toml", text, portrelay::control::Dns::Offline);
});
