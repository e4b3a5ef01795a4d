//! The audit log: every event logged under the `audit` tracing target (logins accepted and
//! refused, containers created/started/stopped, forwards opened, reloads, admin actions) is
//! also written as one JSON object per line to `[admin] audit_log`.
//!
//! Each line holds `ts` (RFC 3339, UTC), `event` (the message), the event's fields, and the
//! fields of the spans it happened in (`conn`, `peer`, `user`), so a line stands alone. A line
//! is written with a single `write` on a file opened for appending, so lines never interleave
//! and a `logrotate` with `copytruncate` loses none.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The tracing target of audit events.
pub const TARGET: &str = "audit";

/// The open audit file, once the config named one.
static SINK: Mutex<Option<File>> = Mutex::new(None);

/// Opens (creating, appending) the audit file, readable by root alone (0600, also when it
/// existed with a wider mode: it names users, addresses and key fingerprints); later events
/// go there.
pub fn open(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    *SINK.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
    Ok(())
}

/// The layer that writes audit events to the file; install it once, in the subscriber.
#[derive(Debug, Default)]
pub struct AuditLayer;

/// Span fields kept for the events inside the span.
struct SpanFields(Map<String, Value>);

impl<S> tracing_subscriber::Layer<S> for AuditLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = JsonFields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields.0));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(SpanFields(map)) = ext.get_mut::<SpanFields>() {
            let mut fields = JsonFields(std::mem::take(map));
            values.record(&mut fields);
            *map = fields.0;
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut sink = SINK.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = sink.as_mut() else { return };
        let mut line = Map::new();
        line.insert(
            "ts".into(),
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(map)) = span.extensions().get::<SpanFields>() {
                    line.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        for (k, v) in fields.0 {
            let key = if k == "message" {
                "event".to_owned()
            } else {
                k
            };
            line.insert(key, v);
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        if let Err(e) = file.write_all(text.as_bytes()) {
            // Not through tracing: that would come back here.
            eprintln!("labgate: cannot write the audit log: {e}");
        }
    }
}

/// Collects tracing fields as JSON values.
#[derive(Default)]
struct JsonFields(Map<String, Value>);

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: those are written as text.
        let v = serde_json::Number::from_f64(value)
            .map_or_else(|| Value::from(value.to_string()), Value::Number);
        self.0.insert(field.name().into(), v);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn audit_events_become_json_lines_with_span_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // A file left world-readable by an older version is made root's alone.
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        open(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let subscriber = tracing_subscriber::registry().with(AuditLayer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn", conn = 7u64, user = tracing::field::Empty);
            span.record("user", "alice");
            let _e = span.enter();
            tracing::info!(target: "audit", fingerprint = %"SHA256:abc", ok = true, held_seconds = 12.5, "login accepted");
            tracing::info!(target: "labgate", "not an audit event");
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["event"], "login accepted");
        assert_eq!(v["user"], "alice");
        assert_eq!(v["conn"], 7);
        assert_eq!(v["fingerprint"], "SHA256:abc");
        assert_eq!(v["ok"], true);
        assert_eq!(v["held_seconds"], 12.5, "numbers stay numbers");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    }
}
