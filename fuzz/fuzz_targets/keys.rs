//! Key files (`keys/NAME.pub`, authorized_keys format) and their options field on arbitrary
//! text: never panics; each refused line is reported with its file, line number and a message.

#![no_main]

use std::path::Path;

use labgate::auth::keys::{KeyFile, KeyOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = KeyFile::parse(Path::new("/keys/alice.pub"), text);
    let lines = text.lines().count();
    for e in &file.errors {
        assert!(e.line >= 1 && e.line <= lines, "{e}");
        assert!(!e.message.is_empty());
        assert!(e.to_string().starts_with("/keys/alice.pub:"), "{e}");
    }
    for key in &file.keys {
        let _ = key.options();
        let _ = key.fingerprint();
    }
    // The options field alone (what precedes the key type on a line).
    let _ = KeyOptions::parse(text);
});
