//! User names (the SSH login name, untrusted): never panics, and whatever is accepted follows
//! the rule `[a-z_][a-z0-9_-]{0,31}`, so it is safe in a container name and a path.

#![no_main]

use labgate::auth::Username;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    match Username::parse(name) {
        Ok(user) => {
            let s = user.as_str();
            assert_eq!(s, name);
            assert!((1..=32).contains(&s.len()), "{s:?}");
            let mut chars = s.chars();
            let first = chars.next().unwrap_or('!');
            assert!(first.is_ascii_lowercase() || first == '_', "{s:?}");
            assert!(
                chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'),
                "{s:?}"
            );
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
