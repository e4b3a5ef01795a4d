//! The config parser on arbitrary text: never panics; a refusal is an error with a message
//! that names the file.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/labgate-fuzz/labgate.toml");
    if let Err(e) = labgate::config::parse(path, text) {
        let message = e.to_string();
        assert!(message.contains("labgate.toml"), "{message}");
    }
});
