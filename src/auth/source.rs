//! Where a key may be used from: the `from="pattern-list"` key option and a certificate's
//! `source-address` critical option, matched against the client's IP address.
//!
//! `from=` follows sshd's address list rules: comma-separated entries, each an address, a CIDR
//! network (`10.0.0.0/8`) or a wildcard pattern (`192.168.1.*`, `?` matches one character),
//! optionally negated with `!`. A negated entry that matches refuses the key whatever else
//! matches; otherwise one positive match is needed. labgate does no reverse DNS (sshd's
//! `UseDNS` is off by default too), so host name patterns are compared with the address text
//! and only ever match through wildcards like `*`. `source-address` takes addresses and CIDR
//! networks only, as sshd does.

use std::net::IpAddr;

use ipnet::IpNet;

/// One entry of a pattern list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// An address or network (`127.0.0.1`, `10.0.0.0/8`).
    Net(IpNet),
    /// Anything else, matched as a wildcard pattern against the address text.
    Wildcard(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    negated: bool,
    pattern: Pattern,
}

/// A parsed `from=` or `source-address` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceList {
    /// The list as written, for log messages.
    text: String,
    /// Whether it is a `from=` list (else a `source-address`), for log messages.
    from: bool,
    entries: Vec<Entry>,
}

/// Why a pattern list is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// An empty entry (`a,,b`, `!`, or an empty list).
    #[error("empty entry in address list {0:?}")]
    Empty(String),
    /// A network whose address has bits set beyond its prefix (`10.0.0.1/8`), which sshd
    /// refuses as an inconsistent mask, or a prefix length out of range.
    #[error("{0:?} is not a valid network (address/prefix, host bits zero)")]
    BadNetwork(String),
    /// A `source-address` entry that is not an address or network.
    #[error("{0:?} is not an address or network (source-address takes no wildcards)")]
    NotAnAddress(String),
}

impl SourceList {
    /// Parses a `from=` pattern list: addresses, networks and wildcard patterns, `!` negates.
    pub fn parse_patterns(text: &str) -> Result<SourceList, SourceError> {
        Self::parse(text, true)
    }

    /// Parses a certificate's `source-address` list: addresses and networks only.
    pub fn parse_networks(text: &str) -> Result<SourceList, SourceError> {
        Self::parse(text, false)
    }

    fn parse(text: &str, wildcards: bool) -> Result<SourceList, SourceError> {
        let mut entries = Vec::new();
        for raw in text.split(',') {
            let (negated, body) = match raw.strip_prefix('!') {
                Some(rest) if wildcards => (true, rest),
                _ => (false, raw),
            };
            if body.is_empty() {
                return Err(SourceError::Empty(text.to_owned()));
            }
            let pattern = match parse_net(body)? {
                Some(net) => Pattern::Net(net),
                None if wildcards => Pattern::Wildcard(body.to_ascii_lowercase()),
                None => return Err(SourceError::NotAnAddress(body.to_owned())),
            };
            entries.push(Entry { negated, pattern });
        }
        Ok(SourceList {
            text: text.to_owned(),
            from: wildcards,
            entries,
        })
    }

    /// Whether `ip` is allowed: no negated entry matches and at least one entry matches.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let text = ip.to_string();
        let mut allowed = false;
        for entry in &self.entries {
            let hit = match &entry.pattern {
                Pattern::Net(net) => net.contains(&ip),
                Pattern::Wildcard(p) => wildcard_match(p.as_bytes(), text.as_bytes()),
            };
            if hit && entry.negated {
                return false;
            }
            allowed |= hit;
        }
        allowed
    }

    /// The list as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The option it came from: `from` or `source-address`.
    pub fn option(&self) -> &'static str {
        if self.from { "from" } else { "source-address" }
    }
}

/// An address (a /32 or /128) or a network with its host bits zero; `None` when `s` is not
/// written as either (it is then a wildcard pattern or a host name).
fn parse_net(s: &str) -> Result<Option<IpNet>, SourceError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Some(IpNet::from(ip.to_canonical())));
    }
    let Some((addr, len)) = s.split_once('/') else {
        return Ok(None);
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return Ok(None);
    };
    let bad = || SourceError::BadNetwork(s.to_owned());
    let len: u8 = len.parse().map_err(|_| bad())?;
    let net = IpNet::new(addr.to_canonical(), len).map_err(|_| bad())?;
    if net.network() != net.addr() {
        return Err(bad());
    }
    Ok(Some(net))
}

/// sshd's `match_pattern`: `*` matches any run of characters, `?` exactly one.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn allows(list: &str, addr: &str) -> bool {
        SourceList::parse_patterns(list).unwrap().allows(ip(addr))
    }

    #[test]
    fn addresses_networks_and_wildcards_match_the_client_address() {
        assert!(allows("127.0.0.1", "127.0.0.1"));
        assert!(!allows("127.0.0.1", "127.0.0.2"));
        assert!(allows("10.0.0.0/8", "10.200.3.4"));
        assert!(!allows("10.0.0.0/8", "127.0.0.1"));
        assert!(allows("192.168.1.*", "192.168.1.77"));
        assert!(!allows("192.168.1.*", "192.168.10.7"));
        assert!(allows("10.0.0.?", "10.0.0.7"));
        assert!(!allows("10.0.0.?", "10.0.0.17"));
        assert!(allows("*", "2001:db8::1"));
        assert!(allows("2001:db8::/32", "2001:db8:1::5"));
        assert!(allows("fe80::1,10.0.0.0/8", "10.1.1.1"));
    }

    #[test]
    fn a_matching_negation_refuses_whatever_else_matches() {
        assert!(!allows("!127.0.0.1,*", "127.0.0.1"));
        assert!(!allows("*,!127.0.0.1", "127.0.0.1"));
        assert!(allows("!127.0.0.1,*", "10.0.0.1"));
        assert!(!allows("!10.0.0.0/8,10.1.2.3", "10.1.2.3"));
        // A negation alone never allows anything.
        assert!(!allows("!10.0.0.0/8", "127.0.0.1"));
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_patterns() {
        assert!(allows("127.0.0.0/8", "::ffff:127.0.0.1"));
        assert!(allows("127.0.0.1", "::ffff:127.0.0.1"));
    }

    #[test]
    fn host_names_do_not_match_addresses() {
        assert!(!allows("localhost", "127.0.0.1"));
        assert!(!allows("*.example.com", "127.0.0.1"));
    }

    #[test]
    fn bad_lists_are_errors() {
        for bad in ["", "a,,b", "!", "10.0.0.1/8", "10.0.0.0/33", "10.0.0.0/x"] {
            assert!(SourceList::parse_patterns(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            SourceList::parse_networks("10.0.0.*"),
            Err(SourceError::NotAnAddress(_))
        ));
        let nets = SourceList::parse_networks("10.0.0.0/8,192.168.0.1").unwrap();
        assert!(nets.allows(ip("192.168.0.1")));
        assert!(!nets.allows(ip("192.168.0.2")));
        assert_eq!(nets.as_str(), "10.0.0.0/8,192.168.0.1");
    }

    #[test]
    fn wildcards_follow_match_pattern() {
        assert!(wildcard_match(b"*", b""));
        assert!(wildcard_match(b"a*b*c", b"axxbyyc"));
        assert!(!wildcard_match(b"a*b*c", b"axxbyy"));
        assert!(wildcard_match(b"**", b"abc"));
        assert!(!wildcard_match(b"abc", b"abcd"));
    }
}
