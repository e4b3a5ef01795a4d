//! What a key may do: the `authorized_keys` options of a key line (sshd's AUTHORIZED_KEYS
//! FILE FORMAT), parsed into [`KeyOptions`], and the checks made when the key is used.
//!
//! Honoured: `restrict` (everything below off unless re-enabled), `no-pty`/`pty`,
//! `no-port-forwarding`/`port-forwarding`, `no-agent-forwarding`/`agent-forwarding`,
//! `permitopen="host:port"`, `permitlisten="[host:]port"`, `from="pattern-list"`,
//! `command="..."` (forced command) and `expiry-time="YYYYMMDD[HHMM[SS]][Z]"`.
//! Accepted without effect, as with sshd's defaults: `environment=` (sshd's
//! `PermitUserEnvironment no`), `no-user-rc`/`user-rc` (no `~/.ssh/rc` is run),
//! `no-X11-forwarding`/`X11-forwarding` (no X11 forwarding is served), `tunnel=` (no tun
//! forwarding is served), `no-touch-required`. Anything else (a misspelled name,
//! `cert-authority`, `principals=`, `verify-required`, a value that does not parse, an
//! unquoted value) makes the whole line unusable, as sshd skips such a line.

use std::net::IpAddr;
use std::time::SystemTime;

use chrono::{Local, NaiveDate, TimeZone};

use super::source::SourceList;

/// The options of one key (or certificate), as sshd reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOptions {
    /// False under `no-port-forwarding`, or `restrict` without `port-forwarding`.
    pub port_forwarding: bool,
    /// Values of `permitopen="host:port"` options; empty means no restriction.
    pub permit_open: Vec<String>,
    /// Values of `permitlisten="[host:]port"` options; empty means no restriction.
    pub permit_listen: Vec<String>,
    /// False under `no-agent-forwarding`, or `restrict` without `agent-forwarding`.
    pub agent_forwarding: bool,
    /// False under `no-pty`, or `restrict` without `pty`: pty requests are refused and the
    /// session runs without a terminal.
    pub pty: bool,
    /// `from="..."`: the client addresses the key may be used from.
    pub from: Option<SourceList>,
    /// `command="..."`: run instead of whatever the client asks for.
    pub command: Option<String>,
    /// `expiry-time="..."`: the key is refused from this instant on.
    pub expires: Option<SystemTime>,
}

impl Default for KeyOptions {
    /// A key line without options: everything allowed.
    fn default() -> Self {
        KeyOptions {
            port_forwarding: true,
            permit_open: Vec::new(),
            permit_listen: Vec::new(),
            agent_forwarding: true,
            pty: true,
            from: None,
            command: None,
            expires: None,
        }
    }
}

/// Why an options field is not valid; the key line is then skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// A name sshd does not know (or a misspelling).
    #[error("unknown key option {0:?}")]
    Unknown(String),
    /// A name sshd knows that labgate does not implement; accepting it would grant more than
    /// the admin wrote.
    #[error("key option {0:?} is not supported by labgate{1}")]
    Unsupported(String, &'static str),
    /// A flag given a value, or a valued option without one.
    #[error("key option {0:?} {1}")]
    Shape(String, &'static str),
    /// The value is not in double quotes, or the quotes do not close.
    #[error("key option {0:?}: the value must be in double quotes")]
    Quoting(String),
    /// An option that may appear only once appears again.
    #[error("key option {0:?} given more than once")]
    Repeated(String),
    /// The value does not parse.
    #[error("key option {name}=\"{value}\": {reason}")]
    Value {
        /// The option.
        name: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a key that matched may not be used for this login.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UseRefusal {
    /// The client's address is not in `from=` (or the certificate's `source-address`).
    #[error("client address {ip} is not permitted by {option}=\"{patterns}\"")]
    NotFromHere {
        /// `from`, or `source-address` for a certificate.
        option: &'static str,
        /// The client's address.
        ip: IpAddr,
        /// The pattern list.
        patterns: String,
    },
    /// `expiry-time` has passed.
    #[error("key expired (expiry-time {})", humantime::format_rfc3339_seconds(*.0))]
    Expired(SystemTime),
}

impl KeyOptions {
    /// Parses an options field (`restrict,pty,from="10.0.0.0/8"`). Option names are
    /// case-insensitive; values must be in double quotes.
    pub fn parse(field: &str) -> Result<KeyOptions, OptionError> {
        let mut p = Parser::default();
        if field.is_empty() {
            return Ok(p.out);
        }
        for opt in split_options(field) {
            match opt.split_once('=') {
                Some((name, v)) => p.valued(name, dequote(name, v)?)?,
                None => p.flag(opt)?,
            }
        }
        Ok(p.finish())
    }

    /// Checks the options that decide whether the key may be used at all: `from=` against
    /// the client's address and `expiry-time` against `now`.
    pub fn authorize(&self, ip: IpAddr, now: SystemTime) -> Result<(), UseRefusal> {
        if let Some(from) = &self.from
            && !from.allows(ip)
        {
            return Err(UseRefusal::NotFromHere {
                option: from.option(),
                ip,
                patterns: from.as_str().to_owned(),
            });
        }
        // sshd refuses once the expiry time is strictly in the past.
        match self.expires {
            Some(at) if now > at => Err(UseRefusal::Expired(at)),
            _ => Ok(()),
        }
    }

    /// Whether `permitlisten=` allows a `-R` listener on `host:port` as the client asked
    /// for it (`ssh -R 8080:...` asks for `localhost`). An entry without a host allows the
    /// port on the loopback names a client sends by default; `*` matches any host or port.
    pub fn permits_listen(&self, host: &str, port: u32) -> bool {
        self.permit_listen.is_empty()
            || self.permit_listen.iter().any(|entry| {
                let (h, p) = split_host_port(entry).unwrap_or(("", entry));
                let port_ok = p == "*" || p.parse::<u32>().is_ok_and(|p| p == port);
                let host_ok = match h {
                    "" => matches!(host, "" | "localhost" | "127.0.0.1" | "::1"),
                    "*" => true,
                    h => h.eq_ignore_ascii_case(host.trim_start_matches('[').trim_end_matches(']')),
                };
                port_ok && host_ok
            })
    }
}

impl KeyOptions {
    /// Whether a `permitlisten=` entry names the address `host` itself (an entry with a host
    /// that is neither empty nor `*`) for `port`: the admin's leave for a `-R` listener on
    /// that address instead of the container's loopback (see
    /// [`crate::config::policy::listen_ip`]).
    pub fn names_listen_address(&self, host: &str, port: u32) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        !host.is_empty()
            && self.permit_listen.iter().any(|entry| {
                let Some((h, p)) = split_host_port(entry) else {
                    return false;
                };
                let port_ok = p == "*" || p.parse::<u32>().is_ok_and(|p| p == port);
                !matches!(h, "" | "*") && h.eq_ignore_ascii_case(host) && port_ok
            })
    }
}

/// Option names that take no value.
const FLAGS: &[&str] = &[
    "restrict",
    "no-pty",
    "pty",
    "no-port-forwarding",
    "port-forwarding",
    "no-agent-forwarding",
    "agent-forwarding",
    "no-user-rc",
    "user-rc",
    "no-x11-forwarding",
    "x11-forwarding",
    "no-touch-required",
    "verify-required",
    "cert-authority",
];

/// Option names that take a quoted value.
const VALUED: &[&str] = &[
    "permitopen",
    "permitlisten",
    "from",
    "command",
    "expiry-time",
    "environment",
    "tunnel",
    "principals",
];

/// The options read so far; `restrict` and its re-enabling flags are settled at the end, so
/// their order does not matter.
#[derive(Default)]
struct Parser {
    out: KeyOptions,
    restrict: bool,
    /// `pty`, `port-forwarding`, `agent-forwarding` seen.
    reenabled: (bool, bool, bool),
}

impl Parser {
    fn flag(&mut self, raw: &str) -> Result<(), OptionError> {
        let name = raw.to_ascii_lowercase();
        match name.as_str() {
            "restrict" => self.restrict = true,
            "no-pty" => self.out.pty = false,
            "pty" => self.reenabled.0 = true,
            "no-port-forwarding" => self.out.port_forwarding = false,
            "port-forwarding" => self.reenabled.1 = true,
            "no-agent-forwarding" => self.out.agent_forwarding = false,
            "agent-forwarding" => self.reenabled.2 = true,
            // Nothing they govern is served: no ~/.ssh/rc, no X11, no FIDO touch check.
            "no-user-rc" | "user-rc" | "no-x11-forwarding" | "x11-forwarding"
            | "no-touch-required" => {}
            "cert-authority" => return Err(unsupported_ca(name)),
            "verify-required" => {
                return Err(OptionError::Unsupported(
                    name,
                    " (FIDO user verification is not checked)",
                ));
            }
            n if VALUED.contains(&n) => {
                return Err(OptionError::Shape(name, "needs a value (name=\"value\")"));
            }
            _ => return Err(OptionError::Unknown(raw.to_owned())),
        }
        Ok(())
    }

    fn valued(&mut self, raw: &str, value: String) -> Result<(), OptionError> {
        let name = raw.to_ascii_lowercase();
        let bad = |reason: String| OptionError::Value {
            name: name.clone(),
            value: value.clone(),
            reason,
        };
        match name.as_str() {
            "permitopen" => self.out.permit_open.push(check_permit(&name, value, true)?),
            "permitlisten" => self
                .out
                .permit_listen
                .push(check_permit(&name, value, false)?),
            "from" => {
                let list = SourceList::parse_patterns(&value).map_err(|e| bad(e.to_string()))?;
                set_once(&mut self.out.from, list, &name)?;
            }
            "command" => set_once(&mut self.out.command, value, &name)?,
            "expiry-time" => {
                let at = parse_expiry(&value).map_err(bad)?;
                // sshd keeps the earliest of several.
                self.out.expires = Some(self.out.expires.map_or(at, |e| e.min(at)));
            }
            // Accepted and ignored, as sshd does under `PermitUserEnvironment no`.
            "environment" => {
                if !value
                    .split_once('=')
                    .is_some_and(|(k, _)| valid_env_name(k))
                {
                    return Err(bad("expected NAME=value".into()));
                }
            }
            // No tun forwarding is served.
            "tunnel" => {
                if value.parse::<u32>().is_err() {
                    return Err(bad("expected a tunnel device number".into()));
                }
            }
            "principals" => return Err(unsupported_ca(name)),
            n if FLAGS.contains(&n) => return Err(OptionError::Shape(name, "takes no value")),
            _ => return Err(OptionError::Unknown(raw.to_owned())),
        }
        Ok(())
    }

    fn finish(mut self) -> KeyOptions {
        if self.restrict {
            let (pty, port, agent) = self.reenabled;
            self.out.pty &= pty;
            self.out.port_forwarding &= port;
            self.out.agent_forwarding &= agent;
        }
        self.out
    }
}

fn unsupported_ca(name: String) -> OptionError {
    OptionError::Unsupported(
        name,
        ": trust a certificate authority with [server] trusted_user_ca_keys",
    )
}

fn set_once<T>(slot: &mut Option<T>, value: T, name: &str) -> Result<(), OptionError> {
    if slot.is_some() {
        return Err(OptionError::Repeated(name.to_owned()));
    }
    *slot = Some(value);
    Ok(())
}

/// `host:port` or `[v6]:port` → `(host, port)`; `None` without a colon.
fn split_host_port(v: &str) -> Option<(&str, &str)> {
    match v.strip_prefix('[') {
        Some(rest) => rest.split_once("]:"),
        None => v.rsplit_once(':'),
    }
}

/// Validates a `permitopen` (`host:port`) or `permitlisten` (`[host:]port`) value; the port is
/// a number or `*`.
fn check_permit(name: &str, value: String, host_required: bool) -> Result<String, OptionError> {
    let (host, port) = match split_host_port(&value) {
        Some(hp) => hp,
        None if !host_required => ("*", value.as_str()),
        None => ("", ""),
    };
    let port_ok = port == "*" || port.parse::<u16>().is_ok_and(|p| p != 0 || !host_required);
    if host.is_empty() || !port_ok {
        let reason = if host_required {
            "expected host:port (port a number or *)"
        } else {
            "expected [host:]port (port a number or *)"
        };
        return Err(OptionError::Value {
            name: name.to_owned(),
            value,
            reason: reason.into(),
        });
    }
    Ok(value)
}

fn valid_env_name(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// sshd's `opt_dequote`: the value must be in double quotes; `\"` stands for a quote.
fn dequote(name: &str, raw: &str) -> Result<String, OptionError> {
    let bad = || OptionError::Quoting(name.to_ascii_lowercase());
    let inner = raw.strip_prefix('"').ok_or_else(bad)?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.as_str().starts_with('"') => {
                out.push('"');
                chars.next();
            }
            '"' if chars.as_str().is_empty() => return Ok(out),
            '"' => return Err(bad()),
            c => out.push(c),
        }
    }
    Err(bad())
}

/// Splits an options field at commas outside double quotes (`\"` does not end a quote).
pub(super) fn split_options(field: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in field.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&field[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&field[start..]);
    parts
}

/// The end of the options field at the start of a key line: the first blank outside double
/// quotes. `None` when the quotes never close.
pub(super) fn options_end(line: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// sshd's `parse_absolute_time`: `YYYYMMDD`, `YYYYMMDDHHMM` or `YYYYMMDDHHMMSS`, in the
/// system's local time zone, or in UTC with a trailing `Z`.
pub fn parse_expiry(s: &str) -> Result<SystemTime, String> {
    let (digits, utc) = match s.strip_suffix(['Z', 'z']) {
        Some(d) => (d, true),
        None => (s, false),
    };
    if !matches!(digits.len(), 8 | 12 | 14) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(
            "expected YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS, optionally ending in Z (UTC)"
                .into(),
        );
    }
    let num = |r: std::ops::Range<usize>| digits.get(r).and_then(|d| d.parse::<u32>().ok());
    let field = |r: std::ops::Range<usize>| num(r).unwrap_or(0);
    let year = i32::try_from(field(0..4)).map_err(|_| "year out of range".to_owned())?;
    let naive = NaiveDate::from_ymd_opt(year, field(4..6), field(6..8))
        .and_then(|d| d.and_hms_opt(field(8..10), field(10..12), field(12..14)))
        .ok_or_else(|| "not a valid date and time".to_owned())?;
    let at = if utc {
        naive.and_utc()
    } else {
        Local
            .from_local_datetime(&naive)
            .earliest()
            .ok_or_else(|| "that local time does not exist (daylight saving gap)".to_owned())?
            .to_utc()
    };
    Ok(SystemTime::from(at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn p(field: &str) -> KeyOptions {
        KeyOptions::parse(field).unwrap_or_else(|e| panic!("{field:?}: {e}"))
    }

    #[test]
    fn no_options_allow_everything() {
        let o = p("");
        assert_eq!(o, KeyOptions::default());
        assert!(o.pty && o.port_forwarding && o.agent_forwarding);
        assert!(
            o.authorize("10.1.2.3".parse().unwrap(), SystemTime::now())
                .is_ok()
        );
    }

    #[test]
    fn restrict_turns_everything_off_unless_re_enabled_in_any_order() {
        let o = p("restrict");
        assert!(!o.pty && !o.port_forwarding && !o.agent_forwarding);
        let o = p("pty,restrict");
        assert!(o.pty && !o.port_forwarding && !o.agent_forwarding);
        let o = p("restrict,port-forwarding,agent-forwarding");
        assert!(!o.pty && o.port_forwarding && o.agent_forwarding);
        // A no- option wins over its re-enabling twin.
        let o = p("no-pty,pty");
        assert!(!o.pty);
        assert!(!p("NO-PTY").pty);
        assert!(!p("restrict,no-agent-forwarding,agent-forwarding").agent_forwarding);
    }

    #[test]
    fn values_are_dequoted_and_split_outside_quotes() {
        let o = p(
            r#"command="echo \"a,b\" c",permitopen="localhost:8888",permitopen="[::1]:6006",no-pty"#,
        );
        assert_eq!(o.command.as_deref(), Some(r#"echo "a,b" c"#));
        assert_eq!(o.permit_open, vec!["localhost:8888", "[::1]:6006"]);
        assert!(o.port_forwarding && !o.pty);
        let o = p(r#"permitlisten="8080",permitlisten="*:9000""#);
        assert_eq!(o.permit_listen, vec!["8080", "*:9000"]);
    }

    #[test]
    fn bad_fields_name_the_problem() {
        use OptionError::*;
        type Expect = fn(&OptionError) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("no-ptty", |e| matches!(e, Unknown(n) if n == "no-ptty")),
            ("restrict,", |e| matches!(e, Unknown(n) if n.is_empty())),
            ("command=echo", |e| matches!(e, Quoting(_))),
            (r#"command="echo"#, |e| matches!(e, Quoting(_))),
            (r#"command="a"b""#, |e| matches!(e, Quoting(_))),
            (r#"command="a",command="b""#, |e| matches!(e, Repeated(_))),
            (r#"from="a",from="b""#, |e| matches!(e, Repeated(_))),
            (r#"from="10.0.0.1/8""#, |e| matches!(e, Value { .. })),
            (r#"no-pty="yes""#, |e| matches!(e, Shape(..))),
            ("command", |e| matches!(e, Shape(..))),
            (r#"permitopen="8888""#, |e| matches!(e, Value { .. })),
            (r#"permitopen="host:http""#, |e| matches!(e, Value { .. })),
            (r#"permitlisten="host:""#, |e| matches!(e, Value { .. })),
            (r#"expiry-time="2026-01-01""#, |e| matches!(e, Value { .. })),
            (r#"environment="=x""#, |e| matches!(e, Value { .. })),
            (r#"tunnel="x""#, |e| matches!(e, Value { .. })),
            ("cert-authority", |e| matches!(e, Unsupported(..))),
            (r#"principals="alice""#, |e| matches!(e, Unsupported(..))),
            ("verify-required", |e| matches!(e, Unsupported(..))),
        ];
        for (field, expected) in cases {
            match KeyOptions::parse(field) {
                Ok(o) => panic!("{field:?} parsed: {o:?}"),
                Err(e) => assert!(expected(&e), "{field:?}: {e}"),
            }
        }
    }

    #[test]
    fn accepted_options_without_effect() {
        let o =
            p(r#"environment="FOO=bar",no-user-rc,no-X11-forwarding,tunnel="0",no-touch-required"#);
        assert_eq!(o, KeyOptions::default());
    }

    #[test]
    fn from_is_checked_against_the_client_address() {
        let o = p(r#"from="10.0.0.0/8,!10.9.9.9""#);
        let now = SystemTime::now();
        assert!(o.authorize("10.1.1.1".parse().unwrap(), now).is_ok());
        let refused = o.authorize("10.9.9.9".parse().unwrap(), now).unwrap_err();
        assert!(refused.to_string().contains("10.9.9.9"), "{refused}");
        assert!(matches!(
            o.authorize("127.0.0.1".parse().unwrap(), now),
            Err(UseRefusal::NotFromHere { .. })
        ));
    }

    #[test]
    fn expiry_time_formats() {
        let utc = |s| parse_expiry(s).unwrap().duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(utc("20260102Z"), Duration::from_secs(1_767_312_000));
        assert_eq!(
            utc("202601020304Z"),
            Duration::from_secs(1_767_312_000 + 3 * 3600 + 4 * 60)
        );
        assert_eq!(
            utc("20260102030405z"),
            Duration::from_secs(1_767_312_000 + 11_045)
        );
        // Local time: within a day of the UTC reading, whatever the zone.
        let local = utc("20260102");
        assert!(local.abs_diff(utc("20260102Z")) <= Duration::from_secs(26 * 3600));
        for bad in [
            "",
            "2026010",
            "202601021",
            "20261301",
            "20260230",
            "20260102250000",
            "2026010203046",
            "2026-01-02",
            "20260102ZZ",
            "Z",
            "+0260102",
        ] {
            assert!(parse_expiry(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_expired_key_is_refused_and_the_earliest_expiry_wins() {
        let o = p(r#"expiry-time="20300101Z",expiry-time="20200101Z""#);
        let ip = "127.0.0.1".parse().unwrap();
        assert!(matches!(
            o.authorize(ip, SystemTime::now()),
            Err(UseRefusal::Expired(_))
        ));
        let o = p(r#"expiry-time="20300101Z""#);
        let before = parse_expiry("20291231235959Z").unwrap();
        assert!(o.authorize(ip, before).is_ok());
        let at = parse_expiry("20300101Z").unwrap();
        assert!(o.authorize(ip, at).is_ok());
        assert!(o.authorize(ip, at + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn only_an_entry_with_that_very_address_names_a_listen_address() {
        let o = p(
            r#"permitlisten="0.0.0.0:9000",permitlisten="[::]:*",permitlisten="*:7000",permitlisten="8080""#,
        );
        assert!(o.names_listen_address("0.0.0.0", 9000));
        assert!(!o.names_listen_address("0.0.0.0", 9001));
        assert!(o.names_listen_address("::", 1));
        assert!(o.names_listen_address("[::]", 1));
        // A pattern or a bare port is not the admin naming an address.
        assert!(!o.names_listen_address("0.0.0.0", 7000));
        assert!(!o.names_listen_address("", 8080));
        assert!(!o.names_listen_address("*", 7000));
        assert!(!p("").names_listen_address("0.0.0.0", 1));
    }

    #[test]
    fn permitlisten_matches_like_the_client_asks() {
        let o = p(r#"permitlisten="8080",permitlisten="0.0.0.0:9000",permitlisten="*:7000""#);
        assert!(o.permits_listen("localhost", 8080));
        assert!(o.permits_listen("", 8080));
        assert!(!o.permits_listen("0.0.0.0", 8080));
        assert!(o.permits_listen("0.0.0.0", 9000));
        assert!(!o.permits_listen("localhost", 9000));
        assert!(o.permits_listen("anything", 7000));
        assert!(!o.permits_listen("localhost", 6000));
        assert!(p("").permits_listen("0.0.0.0", 1));
    }

    #[test]
    fn options_end_at_the_first_blank_outside_quotes() {
        let line = r#"command="echo a b",no-pty ssh-ed25519 AAAA"#;
        let end = options_end(line).unwrap();
        assert_eq!(&line[..end], r#"command="echo a b",no-pty"#);
        assert_eq!(options_end(r#"command="echo a b ssh-ed25519 AAAA"#), None);
    }
}
