//! `Config::parse` on any UTF-8: an error or a config, never a panic; a
//! config that parses can be summarised and warned about.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text, "fuzz.yaml") {
        Ok(config) => {
            let _ = config.summary();
            let _ = config.warnings();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
