//! Showing an image pull to the session that waits for it.
//!
//! On a terminal, one line redraws in place (`\r`, clear line) on the channel's data; without
//! one, each step is a plain line on the channel's stderr (extended data), so the stdout of
//! `ssh alice@lab cat file` stays byte-exact.

use std::time::{Duration, Instant};

use russh::server::Msg;
use tokio::io::AsyncWriteExt;

use crate::runtime::PullProgress;

/// Least time between two redraws of the terminal line (steps are always drawn).
const REDRAW_EVERY: Duration = Duration::from_millis(100);

/// The pull progress view of one session channel.
pub struct ProgressView {
    /// Columns of the terminal, `None` without one.
    tty: Option<u16>,
    /// A terminal line is drawn and not yet ended.
    drawn: bool,
    last: Option<Instant>,
}

impl ProgressView {
    /// A view for a channel with a terminal of `tty` columns, or without one.
    pub fn new(tty: Option<u16>) -> Self {
        ProgressView {
            tty,
            drawn: false,
            last: None,
        }
    }

    /// The terminal now has `cols` columns (a window change while waiting).
    pub fn resize(&mut self, cols: u16) {
        if let Some(c) = self.tty.as_mut() {
            *c = cols;
        }
    }

    /// What to write for `p`, if anything: `(bytes, to stderr)`.
    pub fn render(&mut self, p: &PullProgress) -> Option<(Vec<u8>, bool)> {
        if let Some(cols) = self.tty {
            let due = self.last.is_none_or(|t| t.elapsed() >= REDRAW_EVERY);
            if !p.step && !due {
                return None;
            }
            self.last = Some(Instant::now());
            self.drawn = true;
            // Shorter than the terminal: a wrapped line could not be redrawn in place.
            let line: String = format!("labgate: {}", p.line)
                .chars()
                .take(usize::from(cols.max(2)) - 1)
                .collect();
            Some((format!("\r\x1b[K{line}").into_bytes(), false))
        } else if p.step {
            Some((format!("labgate: {}\n", p.line).into_bytes(), true))
        } else {
            None
        }
    }

    /// Writes `p` to the channel as [`ProgressView::render`] says.
    pub async fn show(&mut self, tx: &russh::ChannelWriteHalf<Msg>, p: &PullProgress) {
        if let Some((bytes, stderr)) = self.render(p) {
            write(tx, &bytes, stderr).await;
        }
    }

    /// Ends a drawn terminal line, so what follows starts on a line of its own.
    pub async fn finish(&mut self, tx: &russh::ChannelWriteHalf<Msg>) {
        if std::mem::take(&mut self.drawn) {
            write(tx, b"\r\n", false).await;
        }
    }
}

async fn write(tx: &russh::ChannelWriteHalf<Msg>, bytes: &[u8], stderr: bool) {
    let result = if stderr {
        let mut w = tx.make_writer_ext(Some(1));
        match w.write_all(bytes).await {
            Ok(()) => w.flush().await,
            Err(e) => Err(e),
        }
    } else {
        let mut w = tx.make_writer();
        match w.write_all(bytes).await {
            Ok(()) => w.flush().await,
            Err(e) => Err(e),
        }
    };
    if let Err(e) = result {
        tracing::debug!("pull progress not shown: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str, step: bool) -> PullProgress {
        PullProgress {
            line: line.into(),
            step,
        }
    }

    #[test]
    fn a_terminal_gets_one_redrawn_line_on_stdout() {
        let mut v = ProgressView::new(Some(80));
        let (bytes, stderr) = v.render(&p("pulling x: 0/1 layers", true)).unwrap();
        assert_eq!(bytes, b"\r\x1b[Klabgate: pulling x: 0/1 layers");
        assert!(!stderr);
        // A byte update right after a redraw waits for the next one.
        assert_eq!(v.render(&p("pulling x: 0/1 layers, 1 B", false)), None);
        assert!(v.render(&p("pulled x", true)).is_some());
    }

    #[test]
    fn the_terminal_line_never_wraps() {
        let mut v = ProgressView::new(Some(20));
        let (bytes, _) = v.render(&p(&"x".repeat(100), true)).unwrap();
        assert_eq!(bytes, b"\r\x1b[Klabgate: xxxxxxxxxx");
        v.resize(12);
        let (bytes, _) = v.render(&p(&"x".repeat(100), true)).unwrap();
        assert_eq!(bytes, b"\r\x1b[Klabgate: xx");
        // Without a terminal there is nothing to fit.
        let mut plain = ProgressView::new(None);
        plain.resize(12);
        let (bytes, _) = plain.render(&p(&"x".repeat(30), true)).unwrap();
        assert_eq!(bytes.len(), "labgate: ".len() + 30 + 1);
    }

    #[test]
    fn without_a_terminal_only_steps_go_to_stderr_as_lines() {
        let mut v = ProgressView::new(None);
        assert_eq!(v.render(&p("bytes", false)), None);
        let (bytes, stderr) = v.render(&p("pulling x: 1/2 layers", true)).unwrap();
        assert_eq!(bytes, b"labgate: pulling x: 1/2 layers\n");
        assert!(stderr);
    }
}
