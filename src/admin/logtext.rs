//! The text log's field formatting: every field value and message is written through
//! [`Escaped`], so a string a client chose (a login name before authentication, a
//! certificate's key id, a command, a forward's host or path, a subsystem or env name) can
//! never end a log line early, forge the next one, or drive the admin's terminal.
//!
//! The escaping is done once, here, for every field of every event and span, rather than at
//! each call site, so a log line added later is covered too. The JSON audit log
//! ([`super::audit`]) keeps the values as they were: JSON escapes them itself.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Characters of one field value kept in the text log; the rest is cut and counted.
pub const MAX_FIELD_CHARS: usize = 2048;

/// A string as the text log shows it: control characters (C0, DEL, C1), Unicode line and
/// paragraph separators and bidirectional overrides escaped as Rust writes them (`\n`, `\r`,
/// `\t`, `\u{1b}`), at most [`MAX_FIELD_CHARS`] characters (then `…(N more chars)`).
/// Backslashes and quotes are left as they are: a field's `Debug` form (a quoted string) has
/// escaped them already, and escaping them again would double every backslash of a path.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

/// Whether the text log writes `c` escaped.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(MAX_FIELD_CHARS) {
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if needs_escape(c) => write!(f, "{}", c.escape_unicode())?,
                c => f.write_char(c)?,
            }
        }
        let rest = chars.count();
        if rest > 0 {
            write!(f, "…({rest} more chars)")?;
        }
        Ok(())
    }
}

/// The text log's [`FormatFields`]: `name=value` separated by spaces, the message alone, as
/// tracing's default formatter writes them, each value through [`Escaped`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes one event's or span's fields.
struct TextVisitor<'w> {
    /// Where the line is written.
    writer: Writer<'w>,
    /// No field written yet (no separating space).
    first: bool,
    /// The first write error.
    result: fmt::Result,
}

impl TextVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if name == "message" {
            write!(self.writer, "{sep}{}", Escaped(value))
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(self.writer, "{sep}{name}={}", Escaped(value))
        };
    }
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, value);
        } else {
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(e) = source {
            text.push_str(": ");
            text.push_str(&e.to_string());
            source = e.source();
        }
        self.write(field, &text);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn control_characters_are_escaped_and_the_rest_is_kept() {
        let shown = |s: &str| Escaped(s).to_string();
        assert_eq!(
            shown("a\nb\rc\td\u{1b}[2Je\u{7f}\u{85}"),
            r"a\nb\rc\td\u{1b}[2Je\u{7f}\u{85}"
        );
        assert_eq!(shown("x\u{2028}y\u{202e}z"), r"x\u{2028}y\u{202e}z");
        assert_eq!(
            shown(r#"C:\dir "q" é ünï 日本"#),
            r#"C:\dir "q" é ünï 日本"#
        );
        let long = "a".repeat(MAX_FIELD_CHARS + 10);
        assert_eq!(
            shown(&long),
            format!("{}…(10 more chars)", "a".repeat(MAX_FIELD_CHARS))
        );
    }

    /// A writer into a shared buffer, for a subscriber under test.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_forged_line_in_any_field_stays_on_its_own_line() {
        let buf = Buffer::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .fmt_fields(TextFields)
                .with_writer(move || out.clone()),
        );
        let forged = "x\n2030-01-01T00:00:00Z  INFO login accepted user=root";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn", user = %forged);
            let _e = span.enter();
            tracing::info!(user = %forged, name = forged, n = 3, "login refused: {forged}");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let escaped = r"x\n2030-01-01T00:00:00Z  INFO login accepted user=root";
        assert!(
            text.contains(&format!("conn{{user={escaped}}}")),
            "span field: {text}"
        );
        assert!(
            text.contains(&format!("login refused: {escaped} ")),
            "{text}"
        );
        assert!(text.contains(&format!(" user={escaped} ")), "{text}");
        assert!(text.contains(&format!(" name=\"{escaped}\" ")), "{text}");
        assert!(text.trim_end().ends_with(" n=3"), "{text}");
    }
}
