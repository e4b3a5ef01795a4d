//! Forwarding targets: the admin's `allow` entries (`HOST:PORT`, CIDR, `[v6]:port`, `*`) and a
//! key's `permitopen="host:port"` values, then checks against them with a target taken from
//! the same input: never panics; a refused entry is an error naming it; what is accepted
//! prints back as an entry that parses to the same rule.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use labgate::config::policy::{AllowRule, ForwardPolicy, PermitOpen};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.lines();
    let target = lines.next().unwrap_or_default();
    let entries: Vec<&str> = lines.collect();

    let mut allow = Vec::new();
    for entry in &entries {
        match entry.parse::<AllowRule>() {
            Ok(rule) => {
                let again: AllowRule = rule.to_string().parse().expect("Display parses back");
                assert_eq!(again, rule, "{entry:?}");
                allow.push(rule);
            }
            Err(message) => assert!(message.contains("invalid forwarding target"), "{message}"),
        }
    }
    let policy = ForwardPolicy {
        allow,
        ..ForwardPolicy::default()
    };
    let (host, port) = target.rsplit_once(':').unwrap_or((target, "0"));
    let port: u16 = port.parse().unwrap_or(0);
    let ip = host
        .trim_matches(['[', ']'])
        .parse::<IpAddr>()
        .unwrap_or(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)));
    let own = [
        IpAddr::V4(Ipv4Addr::new(172, 18, 0, 2)),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    let _ = policy.check(host, ip, port, &own);
    let _ = PermitOpen::parse(entries.iter().copied()).check(host, port);
});
