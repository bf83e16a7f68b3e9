//! The last line of defence for secrets and terminals.
//!
//! Secrets are `SecretString`s inside ubsync and error paths strip URLs, but an upstream can echo
//! a token back in an error description, and a dependency can log a URL at trace level. So every
//! secret ubsync knows (the Unitalk key, the client secret, the webhook code, OAuth tokens, the
//! application token) is registered here when it is loaded or minted, and every byte that leaves
//! the process for a human or a file — log lines, error messages, the store's run log, reports —
//! passes [`redact`] first. [`printable`] escapes control characters from upstream data (ids,
//! names) so no escape sequence reaches an admin's terminal.

use std::borrow::Cow;
use std::io::{self, Write};
use std::sync::RwLock;

/// Secrets shorter than this are not registered (they would mangle ordinary text).
const MIN_SECRET_LEN: usize = 6;
/// What a secret is replaced with.
pub const MASK: &str = "[redacted]";

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers a secret: from now on it never leaves the process unmasked.
pub fn register(secret: &str) {
    let s = secret.trim();
    if s.len() < MIN_SECRET_LEN {
        return;
    }
    let mut all = SECRETS.write().unwrap_or_else(|p| p.into_inner());
    if !all.iter().any(|k| k == s) {
        all.push(s.to_string());
        // Longest first, so a secret containing another is masked whole.
        all.sort_by_key(|k| std::cmp::Reverse(k.len()));
    }
}

/// `text` with every registered secret (and its percent-encoded form) masked.
pub fn redact(text: &str) -> Cow<'_, str> {
    let all = SECRETS.read().unwrap_or_else(|p| p.into_inner());
    let mut out = Cow::Borrowed(text);
    for s in all.iter() {
        if out.contains(s.as_str()) {
            out = Cow::Owned(out.replace(s.as_str(), MASK));
        }
        let encoded: String = form_urlencoded::byte_serialize(s.as_bytes()).collect();
        if encoded != *s && out.contains(encoded.as_str()) {
            out = Cow::Owned(out.replace(encoded.as_str(), MASK));
        }
    }
    out
}

/// `text` with control characters (ESC, BEL, OSC introducers, C1 controls, DEL) escaped as
/// `\u{..}`, keeping newlines and tabs: safe to print on a terminal.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A one-line value from upstream made safe to print: secrets masked, controls (newlines too)
/// escaped.
pub fn field(text: &str) -> String {
    printable(&redact(text)).replace('\n', "\\n")
}

/// Writes human output to stdout, masked and escaped. A closed pipe (`ubsync status | head`) is
/// not an error worth a panic: the rest is dropped.
pub fn say(text: &str) {
    let safe = printable(&redact(text)).into_owned();
    let mut out = io::stdout().lock();
    let _ = out.write_all(safe.as_bytes());
    let _ = out.write_all(b"\n");
}

/// Writes one line to stderr, redacted and printable; a closed stderr is not an error.
pub fn complain(text: &str) {
    let mut safe = printable(&redact(text)).into_owned();
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // journald: an error, whatever the unit's default priority.
        safe.insert_str(0, "<3>");
    }
    let mut err = io::stderr().lock();
    let _ = err.write_all(safe.as_bytes());
    let _ = err.write_all(b"\n");
}

/// [`say`] with `format!` arguments.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::redact::say(&format!($($arg)*)) };
}

/// A `tracing_subscriber` writer for stderr that masks secrets in every log line. Under journald
/// (`syslog_priorities`), each line starts with its syslog priority (`<3>` error, `<4>` warning,
/// `<6>` info, `<7>` debug), which journald reads, so `journalctl -p warning` works.
#[derive(Clone, Copy, Default)]
pub struct RedactingStderr {
    pub syslog_priorities: bool,
}

pub struct LineWriter {
    buf: Vec<u8>,
    prefix: Option<&'static str>,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let text = redact(&String::from_utf8_lossy(&self.buf)).into_owned();
        let out = match self.prefix {
            None => text,
            Some(p) => text
                .split_inclusive('\n')
                .map(|line| format!("{p}{line}"))
                .collect(),
        };
        write_stderr(out.as_bytes());
    }
}

/// The progress bar on the terminal, if one is shown: log lines are printed above it.
static BAR: std::sync::Mutex<Option<indicatif::ProgressBar>> = std::sync::Mutex::new(None);

/// Shows log lines above `bar` until it is cleared with `None`.
pub fn set_progress_bar(bar: Option<indicatif::ProgressBar>) {
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

fn write_stderr(bytes: &[u8]) {
    let bar = BAR.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match bar {
        Some(b) => b.suspend(|| {
            let _ = io::stderr().lock().write_all(bytes);
        }),
        None => {
            let _ = io::stderr().lock().write_all(bytes);
        }
    }
}

/// The syslog priority prefix of a tracing level.
pub fn syslog_prefix(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => "<3>",
        tracing::Level::WARN => "<4>",
        tracing::Level::INFO => "<6>",
        _ => "<7>",
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactingStderr {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            buf: Vec::with_capacity(256),
            prefix: None,
        }
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LineWriter {
            buf: Vec::with_capacity(256),
            prefix: self.syslog_priorities.then(|| syslog_prefix(meta.level())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_are_masked_plain_and_percent_encoded() {
        register("s3cr3t/webhook+code");
        register("abc");
        assert_eq!(
            redact("at /rest/1/s3cr3t/webhook+code/batch"),
            "at /rest/1/[redacted]/batch"
        );
        assert_eq!(redact("auth=s3cr3t%2Fwebhook%2Bcode"), "auth=[redacted]");
        assert_eq!(redact("abc stays"), "abc stays", "too short to register");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("ok\ttab\nline"), "ok\ttab\nline");
        assert_eq!(printable("a\u{1b}]0;pwn\u{7}b"), "a\\u{1b}]0;pwn\\u{7}b");
        assert_eq!(printable("c1\u{9b}31m"), "c1\\u{9b}31m");
        assert_eq!(field("two\nlines"), "two\\nlines");
    }
}
