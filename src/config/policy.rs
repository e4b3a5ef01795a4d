//! Which forwarding targets a user may reach: pure decisions, no I/O.
//!
//! By default a forward reaches only the user's own container: its loopback (where Jupyter and
//! TensorBoard listen) and its own addresses. Everything else (the host, other users'
//! containers, the LAN, the internet) is refused unless the admin lists it in `allow`, and a
//! key's `permitopen=` options narrow it further.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// One `allow` entry: `HOST:PORT`, where HOST is an IP address, a CIDR block or a host name,
/// in brackets for IPv6, and PORT is a number or `*`. A name matches a request that names it
/// and an address the *gateway* resolves it to (never what the container's own `/etc/hosts`,
/// which the user may write, says it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    host: HostPattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Net(IpNet),
    Name(String),
}

impl FromStr for AllowRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid forwarding target {s:?}: write HOST:PORT, e.g. \"10.0.0.5:5432\", \"10.0.0.0/24:*\", \"[fd00::1]:22\" or \"db.lab:5432\""
            )
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
            (h, p)
        } else {
            s.rsplit_once(':').ok_or_else(bad)?
        };
        let port = match port {
            "*" => None,
            p => Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?),
        };
        let host = if let Ok(net) = host.parse::<IpNet>() {
            HostPattern::Net(net)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            HostPattern::Net(IpNet::from(ip))
        } else if !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        {
            HostPattern::Name(host.to_ascii_lowercase())
        } else {
            return Err(bad());
        };
        Ok(AllowRule { host, port })
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = self.port.map_or("*".to_owned(), |p| p.to_string());
        match &self.host {
            HostPattern::Net(n) if n.addr().is_ipv6() => write!(f, "[{n}]:{port}"),
            HostPattern::Net(n) => write!(f, "{n}:{port}"),
            HostPattern::Name(n) => write!(f, "{n}:{port}"),
        }
    }
}

impl AllowRule {
    /// Whether the rule allows `ip:port`, asked for as `requested`, which the gateway
    /// resolves to `vouched`.
    fn matches(&self, requested: &str, ip: IpAddr, port: u16, vouched: &[IpAddr]) -> bool {
        let port_ok = self.port.is_none_or(|p| p == port);
        let host_ok = match &self.host {
            HostPattern::Net(net) => net.contains(&ip),
            HostPattern::Name(_) => self.names(requested) && vouched.contains(&ip),
        };
        port_ok && host_ok
    }

    /// Whether this is a name rule for `requested`.
    fn names(&self, requested: &str) -> bool {
        matches!(&self.host, HostPattern::Name(name) if requested.eq_ignore_ascii_case(name))
    }
}

/// A user's forwarding switches and allowed extra targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardPolicy {
    /// `-L`/`-D` (direct-tcpip).
    pub local: bool,
    /// `-R` (tcpip-forward).
    pub remote: bool,
    /// Unix socket forwards (direct-streamlocal).
    pub unix: bool,
    /// Targets outside the container the admin allows.
    pub allow: Vec<AllowRule>,
}

impl Default for ForwardPolicy {
    fn default() -> Self {
        ForwardPolicy {
            local: true,
            remote: true,
            unix: true,
            allow: Vec::new(),
        }
    }
}

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The kind of forward is switched off for this user (config or key option).
    #[error("{0} forwarding is disabled for this user")]
    Disabled(&'static str),
    /// The address is outside the user's container and not allowed.
    #[error("{host} ({ip}) port {port} is outside your container and not allowed")]
    Outside {
        /// As the client asked.
        host: String,
        /// What it resolved to.
        ip: IpAddr,
        /// Port.
        port: u16,
    },
    /// The key's `permitopen=` options do not include the target.
    #[error("{host}:{port} is not in this key's permitopen list")]
    NotPermitted {
        /// As the client asked.
        host: String,
        /// Port.
        port: u16,
    },
    /// The key's `permitlisten=` options do not include this `-R` listener.
    #[error("{host}:{port} is not in this key's permitlisten list")]
    ListenNotPermitted {
        /// As the client asked.
        host: String,
        /// Port.
        port: u32,
    },
    /// The connection holds as many `-R` listeners as one connection may.
    #[error("{0} remote forwards are open on this connection (the most one connection may hold)")]
    TooManyListeners(usize),
}

impl ForwardPolicy {
    /// Whether an allow rule names `requested` for `port`: then the gateway resolves the name
    /// itself and passes what it found to [`ForwardPolicy::check`] as `vouched`.
    pub fn names(&self, requested: &str, port: u16) -> bool {
        self.allow
            .iter()
            .any(|r| r.names(requested) && r.port.is_none_or(|p| p == port))
    }

    /// Decides whether `ip:port` (resolved from `requested` in the container) may be reached
    /// from inside the container whose own addresses are `own`; `vouched` are the addresses
    /// the gateway's own resolver gives for `requested` (for rules that name hosts).
    pub fn check(
        &self,
        requested: &str,
        ip: IpAddr,
        port: u16,
        own: &[IpAddr],
        vouched: &[IpAddr],
    ) -> Result<(), Denied> {
        let inside = ip.is_loopback() || ip.is_unspecified() || own.contains(&ip);
        if inside
            || self
                .allow
                .iter()
                .any(|r| r.matches(requested, ip, port, vouched))
        {
            Ok(())
        } else {
            Err(Denied::Outside {
                host: requested.to_owned(),
                ip,
                port,
            })
        }
    }
}

/// `permitopen="host:port"` entries of a key: when present, only those targets may be opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PermitOpen(Vec<(String, Option<u16>)>);

impl PermitOpen {
    /// Parses the values of a key's `permitopen` options (`host:port`, port may be `*`).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        PermitOpen(
            values
                .into_iter()
                .filter_map(|v| {
                    let (h, p) = match v.strip_prefix('[') {
                        Some(rest) => rest.split_once("]:")?,
                        None => v.rsplit_once(':')?,
                    };
                    let port = if p == "*" {
                        None
                    } else {
                        Some(p.parse().ok()?)
                    };
                    Some((h.to_ascii_lowercase(), port))
                })
                .collect(),
        )
    }

    /// Whether the key restricts targets at all.
    pub fn is_restricted(&self) -> bool {
        !self.0.is_empty()
    }

    /// Checks `host:port` as the client wrote it (OpenSSH matches names literally too).
    pub fn check(&self, host: &str, port: u16) -> Result<(), Denied> {
        if !self.is_restricted()
            || self.0.iter().any(|(h, p)| {
                (h == "*" || host.eq_ignore_ascii_case(h)) && p.is_none_or(|p| p == port)
            })
        {
            Ok(())
        } else {
            Err(Denied::NotPermitted {
                host: host.to_owned(),
                port,
            })
        }
    }
}

/// Where a `-R` listener binds inside the container, as sshd does with `GatewayPorts no`:
/// on the loopback (`127.0.0.1`, or `::1` when the client names an IPv6 address) whatever
/// address the client asks for (`""`, which `ssh -R :PORT` and `-R '*:PORT'` send,
/// `localhost`, `0.0.0.0`, `::`, a host name), so a forwarded port is reachable from the
/// container only. The one exception is an address the key's `permitlisten` names itself
/// (`named`, see [`crate::auth::KeyOptions::names_listen_address`]): then the address as the
/// client wrote it; `Err` with the name when that is not an IP address.
pub fn listen_ip(address: &str, named: bool) -> Result<IpAddr, String> {
    let host = address.trim_start_matches('[').trim_end_matches(']');
    let asked = match host {
        "" | "*" => Ok(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        h if h.eq_ignore_ascii_case("localhost") => Ok(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        h => h.parse::<IpAddr>().map_err(|_| address.to_owned()),
    };
    match asked {
        Ok(ip) if named => Ok(ip),
        Err(name) if named => Err(name),
        Ok(IpAddr::V6(_)) => Ok(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)),
        _ => Ok(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_listeners_bind_the_loopback_unless_the_key_names_the_address() {
        for asked in [
            "",
            "*",
            "localhost",
            "0.0.0.0",
            "127.0.0.1",
            "172.30.0.5",
            "lab.example",
        ] {
            assert_eq!(listen_ip(asked, false), Ok(ip("127.0.0.1")), "{asked:?}");
        }
        for asked in ["::", "[::]", "::1", "fd00::5"] {
            assert_eq!(listen_ip(asked, false), Ok(ip("::1")), "{asked:?}");
        }
        assert_eq!(listen_ip("0.0.0.0", true), Ok(ip("0.0.0.0")));
        assert_eq!(listen_ip("[::]", true), Ok(ip("::")));
        assert_eq!(listen_ip("172.30.0.5", true), Ok(ip("172.30.0.5")));
        assert_eq!(
            listen_ip("lab.example", true),
            Err("lab.example".to_owned())
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_containers_own_loopback_and_addresses_are_always_reachable() {
        let p = ForwardPolicy::default();
        let own = [ip("172.30.0.5")];
        for target in ["127.0.0.1", "127.0.0.53", "::1", "0.0.0.0", "172.30.0.5"] {
            assert!(
                p.check("x", ip(target), 8888, &own, &[]).is_ok(),
                "{target}"
            );
        }
    }

    #[test]
    fn the_host_other_containers_and_the_lan_are_refused_by_default() {
        let p = ForwardPolicy::default();
        let own = [ip("172.30.0.5")];
        for target in [
            "172.30.0.1",
            "172.30.0.6",
            "172.17.0.1",
            "10.0.0.5",
            "192.168.1.10",
            "8.8.8.8",
            "fd00::1",
        ] {
            let e = p.check(target, ip(target), 22, &own, &[]).unwrap_err();
            assert!(matches!(e, Denied::Outside { .. }), "{target}");
        }
    }

    #[test]
    fn allow_rules_open_exactly_what_they_say() {
        let p = ForwardPolicy {
            allow: vec![
                "10.0.0.5:5432".parse().unwrap(),
                "192.168.7.0/24:*".parse().unwrap(),
                "[fd00::1]:22".parse().unwrap(),
                "db.lab:3306".parse().unwrap(),
            ],
            ..Default::default()
        };
        assert!(p.check("10.0.0.5", ip("10.0.0.5"), 5432, &[], &[]).is_ok());
        assert!(p.check("10.0.0.5", ip("10.0.0.5"), 5433, &[], &[]).is_err());
        assert!(p.check("x", ip("192.168.7.200"), 1, &[], &[]).is_ok());
        assert!(p.check("x", ip("192.168.8.1"), 1, &[], &[]).is_err());
        assert!(p.check("fd00::1", ip("fd00::1"), 22, &[], &[]).is_ok());
        // A name rule: the name, and an address the gateway resolves it to.
        let vouched = [ip("10.9.9.9")];
        assert!(p.names("DB.lab", 3306) && !p.names("DB.lab", 3307) && !p.names("other", 3306));
        assert!(
            p.check("DB.lab", ip("10.9.9.9"), 3306, &[], &vouched)
                .is_ok()
        );
        assert!(
            p.check("other", ip("10.9.9.9"), 3306, &[], &vouched)
                .is_err()
        );
        // What the container says the name is counts for nothing by itself: an address the
        // gateway does not give for it (the host's bridge address in the user's /etc/hosts),
        // or a name the gateway cannot resolve at all, is refused.
        assert!(
            p.check("db.lab", ip("172.30.0.1"), 3306, &[], &vouched)
                .is_err()
        );
        assert!(p.check("db.lab", ip("10.9.9.9"), 3306, &[], &[]).is_err());
    }

    #[test]
    fn allow_rules_parse_and_print_and_reject_nonsense() {
        for ok in [
            "10.0.0.5:5432",
            "10.0.0.0/24:*",
            "[fd00::1]:22",
            "db.lab:5432",
        ] {
            let r: AllowRule = ok.parse().unwrap();
            let back = r.to_string();
            assert_eq!(back.parse::<AllowRule>().unwrap(), r, "{ok} -> {back}");
        }
        for bad in [
            "10.0.0.5", "host:", ":22", "h:0", "h:70000", "a b:1", "[::1:22",
        ] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn permitopen_limits_targets_as_written() {
        let none = PermitOpen::parse([]);
        assert!(none.check("anything", 1).is_ok());
        let p = PermitOpen::parse(["localhost:8888", "127.0.0.1:*", "[::1]:6006"]);
        assert!(p.check("localhost", 8888).is_ok());
        assert!(p.check("localhost", 8889).is_err());
        assert!(p.check("127.0.0.1", 1234).is_ok());
        assert!(p.check("::1", 6006).is_ok());
        assert!(p.check("10.0.0.1", 8888).is_err());
    }
}
