//! What one client may make the gateway hold on one session channel: `env` requests (the
//! `-R` listeners of a connection are bounded in [`crate::forward`]). Each bound is checked where the request arrives (the
//! handler, which answers at once) and refused with the protocol's failure reply; the
//! excess is logged once, not once per request.
//!
//! The connection-wide bounds on logins are in [`crate::ssh::admission`].

/// `env` variables one session channel may set (sshd also stops accepting `env` requests
/// past a fixed count); more than clients send: `LANG`, a few `LC_*`, `GIT_PROTOCOL`.
pub const MAX_ENV_VARS: usize = 64;

/// Bytes of `env` (names plus values) one session channel may set.
pub const MAX_ENV_BYTES: usize = 64 << 10;

/// What [`EnvBudget::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvVerdict {
    /// Within the bounds: kept.
    Accept,
    /// Past a bound: refused. `first` is true for the channel's first refusal (the one to
    /// log).
    Refuse {
        /// Whether this is the first request of the channel refused by the bound.
        first: bool,
    },
}

/// The `env` a session channel has been given so far, against [`MAX_ENV_VARS`] and
/// [`MAX_ENV_BYTES`]. The handler (which answers each request) and the channel task (which
/// keeps the values) each hold one per channel and see the same requests in the same order,
/// so they agree on which are kept.
#[derive(Debug, Default, Clone)]
pub struct EnvBudget {
    /// Variables accepted.
    count: usize,
    /// Bytes of names and values accepted.
    bytes: usize,
    /// Whether a request has already been refused by the bound.
    exceeded: bool,
}

impl EnvBudget {
    /// Counts `name=value` if it fits; a variable too large for what is left is refused,
    /// and a smaller one after it may still fit.
    pub fn admit(&mut self, name: &str, value: &str) -> EnvVerdict {
        let size = name.len().saturating_add(value.len());
        if self.count < MAX_ENV_VARS && size <= MAX_ENV_BYTES.saturating_sub(self.bytes) {
            self.count += 1;
            self.bytes += size;
            return EnvVerdict::Accept;
        }
        let first = !self.exceeded;
        self.exceeded = true;
        EnvVerdict::Refuse { first }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_past_the_count_is_refused_and_only_the_first_refusal_says_so() {
        let mut b = EnvBudget::default();
        for i in 0..MAX_ENV_VARS {
            assert_eq!(b.admit(&format!("LC_{i}"), "x"), EnvVerdict::Accept);
        }
        assert_eq!(b.admit("LC_X", "x"), EnvVerdict::Refuse { first: true });
        for _ in 0..1000 {
            assert_eq!(b.admit("LC_X", "x"), EnvVerdict::Refuse { first: false });
        }
    }

    #[test]
    fn env_past_the_size_is_refused_and_a_smaller_one_may_still_fit() {
        let mut b = EnvBudget::default();
        let big = "v".repeat(40 << 10);
        assert_eq!(b.admit("LC_A", &big), EnvVerdict::Accept);
        assert_eq!(b.admit("LC_B", &big), EnvVerdict::Refuse { first: true });
        assert_eq!(b.admit("LC_C", "small"), EnvVerdict::Accept);
        // Exactly the rest fits; one byte more does not.
        let rest = MAX_ENV_BYTES - (4 + (40 << 10)) - (4 + 5) - 4;
        assert_eq!(
            b.admit("LC_D", &"v".repeat(rest + 1)),
            EnvVerdict::Refuse { first: false }
        );
        assert_eq!(b.admit("LC_D", &"v".repeat(rest)), EnvVerdict::Accept);
        assert_eq!(b.admit("L", ""), EnvVerdict::Refuse { first: false });
        // A value larger than the whole bound never fits.
        let mut b = EnvBudget::default();
        assert_eq!(
            b.admit("LC_A", &"v".repeat(MAX_ENV_BYTES)),
            EnvVerdict::Refuse { first: true }
        );
    }
}
