//! Configuration: the TOML file and the environment, parsed once into validated types.
//!
//! [`Config::load`] is the only way in. It reads the file, overlays secrets from the environment
//! (`UBSYNC_UNITALK_API_KEY`, `UBSYNC_BITRIX24_CLIENT_SECRET`, `UBSYNC_BITRIX24_WEBHOOK_URL`),
//! rejects unknown keys, and checks every value, reporting *all* problems at once, each naming its
//! key and saying how to fix it. Nothing downstream re-validates or reads the environment. Relative
//! paths are resolved against the config file's directory, never the working directory (under
//! systemd that is `/`). Secrets are [`SecretString`]s, so `Debug` cannot print them.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use chrono_tz::Tz;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::timezone::local_to_utc;

mod raw;
mod rules;
mod validate;
mod webhooks;

use raw::RawConfig;
use validate::Validator;

/// Environment variable that may carry the Unitalk API key instead of the file.
pub const ENV_UNITALK_API_KEY: &str = "UBSYNC_UNITALK_API_KEY";
/// The Unitalk webhook path secret, from the environment.
pub const ENV_UNITALK_WEBHOOK_SECRET: &str = "UBSYNC_UNITALK_WEBHOOK_SECRET";
/// Environment variable that may carry the Bitrix24 application's client secret.
pub const ENV_BITRIX24_CLIENT_SECRET: &str = "UBSYNC_BITRIX24_CLIENT_SECRET";
/// Environment variable that may carry the Bitrix24 incoming webhook URL.
pub const ENV_BITRIX24_WEBHOOK_URL: &str = "UBSYNC_BITRIX24_WEBHOOK_URL";

/// The validated configuration of one ubsync instance.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration was read from.
    pub source: PathBuf,
    pub unitalk: UnitalkConfig,
    pub bitrix24: Bitrix24Config,
    pub state: StateConfig,
    pub sync: SyncConfig,
    pub tasks: TasksConfig,
    /// The daemon's schedule file (absolute).
    pub schedule_file: PathBuf,
    /// Whether `[schedule] file` was set; without it a missing file means the built-in schedule.
    pub schedule_explicit: bool,
    /// `/healthz` answers 503 when the last successful sync pass is older than this.
    pub health_max_age: Duration,
    /// The daemon's inbound routes.
    pub http: HttpConfig,
    /// How recordings reach Bitrix24.
    pub recordings: RecordingsConfig,
    /// Business rules (`[rules]`).
    pub rules: crate::rules::Rules,
    /// Events in (`[webhooks]`).
    pub webhooks: WebhooksConfig,
}

/// Events in: Unitalk's call webhooks, and Bitrix24's click-to-call and callback events.
#[derive(Debug, Clone)]
pub struct WebhooksConfig {
    /// Handle the telephony events (click-to-call, callbacks, uninstall).
    pub bitrix24_events: bool,
    /// Online (Bitrix24 POSTs to `bitrix24_handler`) or offline (`event.offline.get`, no inbound
    /// address needed).
    pub bitrix24_offline: bool,
    /// The public address Bitrix24 posts events to (behind the reverse proxy).
    pub bitrix24_handler: Option<Url>,
    /// The application token events must carry when the install callback did not store one.
    pub application_token: Option<SecretString>,
    /// A click with no matching Unitalk call after this long is finished as cancelled.
    pub click_ttl: Duration,
    /// Who takes a CRM callback request whose entity has no responsible.
    pub callback_user_id: Option<i64>,
    /// The secret in `POST /unitalk/webhook/<secret>` (Unitalk does not sign payloads: the path
    /// is the credential). `None`: the route is not served.
    pub unitalk_secret: Option<SecretString>,
    /// The webhook call field that is the history record's `id` (`dbid` by default).
    pub unitalk_id_field: String,
    /// Calls seen by both paths are the same call when they start within this many seconds.
    pub twin_slack_secs: i64,
}

/// How a recording reaches Bitrix24 (telephony mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// Bitrix24 downloads Unitalk's link itself (`RECORD_URL`).
    #[default]
    Link,
    /// ubsync downloads the link, checks it is a non-empty mp3/wav and uploads the file
    /// (`FILE_CONTENT`): for links that need the API key or expire.
    Upload,
}

#[derive(Debug, Clone)]
pub struct RecordingsConfig {
    pub delivery: Delivery,
    /// Largest recording ubsync uploads; a larger one is quarantined with the reason.
    pub max_bytes: u64,
    /// Send the Unitalk API key (`Authorization`) when downloading a recording.
    pub send_api_key: bool,
}

impl Default for RecordingsConfig {
    fn default() -> Self {
        Self {
            delivery: Delivery::Link,
            max_bytes: 50 * 1024 * 1024,
            send_api_key: false,
        }
    }
}

/// What the daemon serves beyond `/healthz` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct HttpConfig {
    /// Serve the local application's install callback (`POST /install`) on `run --listen`.
    /// Off by default: the install route is never exposed implicitly beside `/metrics`.
    pub install: bool,
}

#[derive(Debug, Clone)]
pub struct UnitalkConfig {
    pub base_url: Url,
    pub api_key: SecretString,
    /// Zone of the wall-clock dates Unitalk sends and expects.
    pub timezone: Tz,
    pub request_timeout: Duration,
    /// Page size for `/history/get` (Unitalk rejects more than 1000).
    pub page_size: u32,
    /// First delay before retrying a failed request.
    pub retry_base_delay: Duration,
    /// Plain `http://` accepted for a non-loopback `base_url` (`unitalk.allow_insecure_http`).
    pub allow_insecure_http: bool,
    /// The history field that identifies a call (`id`; a documented record also has `dbid`).
    pub call_id_field: String,
}

/// How ubsync writes to Bitrix24.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// OAuth local application: `telephony.externalCall.register`/`finish`.
    Telephony,
    /// Incoming webhook: `crm.activity.add`.
    Activity,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Telephony => "telephony",
            Mode::Activity => "activity",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Bitrix24Config {
    pub mode: Mode,
    /// The portal's address, e.g. `https://example.bitrix24.ua`. Required in telephony mode.
    pub portal_url: Option<Url>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub oauth_url: Url,
    /// Incoming webhook; required in activity mode.
    pub webhook_url: Option<WebhookUrl>,
    /// Leaky bucket capacity (50 on most plans, 250 on Enterprise).
    pub burst: NonZeroU32,
    /// Leaky bucket drain rate per second (2 on most plans, 5 on Enterprise).
    pub per_second: NonZeroU32,
    /// Hard cap on requests in any 10-second window.
    pub max_per_10s: NonZeroU32,
    /// Bitrix24 user that gets calls and tasks when no operator matches.
    pub default_user_id: Option<u64>,
    pub request_timeout: Duration,
    /// First delay before retrying a request the portal refused or could not take.
    pub retry_base_delay: Duration,
    /// Operating-time budget per method per 10 minutes, in seconds (§2.2).
    pub operating_limit: f64,
    /// The portal's time zone, used for human-readable times in task descriptions.
    pub timezone: Tz,
    /// Plain `http://` accepted for non-loopback portal, OAuth and webhook URLs, and for
    /// redirects between them (`bitrix24.allow_insecure_http`). Off by default.
    pub allow_insecure_http: bool,
}

impl Bitrix24Config {
    /// The portal's origin (`https://portal.bitrix24.ua`), for links to CRM cards. Never a
    /// path: a webhook's path holds its code.
    pub fn portal_origin(&self) -> Option<String> {
        let u = match (self.mode, &self.portal_url, &self.webhook_url) {
            (Mode::Telephony, Some(u), _) => u.clone(),
            (_, _, Some(w)) => w.expose(),
            (_, Some(u), None) => u.clone(),
            _ => return None,
        };
        Some(u.origin().ascii_serialization()).filter(|o| o != "null")
    }

    /// The portal's base address in whichever mode is configured, for display.
    pub fn portal_display(&self) -> String {
        match (self.mode, &self.portal_url, &self.webhook_url) {
            (Mode::Telephony, Some(u), _) => u.to_string(),
            (_, _, Some(w)) => w.redacted(),
            (_, Some(u), None) => u.to_string(),
            _ => "(none)".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    /// The SQLite file, absolute.
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Where the very first pass starts; `None` means a day before the first pass.
    pub start: Option<DateTime<Utc>>,
    pub lookback: Duration,
    pub settle: Duration,
    pub max_window: Duration,
    /// ISO 3166 country used to read national phone numbers.
    pub default_country: phonenumber::country::Id,
    pub skip_internal: bool,
    pub add_to_chat: bool,
    /// How long an answered call without a recording link is re-checked for one.
    pub recording_wait: Duration,
    /// The longest call ubsync expects; the long-call sweep covers this much history.
    pub max_call_duration: Duration,
    /// How often the long-call sweep re-pulls `[now − max_call_duration, cursor − lookback)`.
    pub sweep_every: Duration,
    /// Push once this many new or changed calls are staged (bounds memory on large ranges).
    pub stage_limit: u32,
    /// At most this many narrow re-pulls for awaited recordings per pass.
    pub recording_repulls: u32,
    /// How long a CRM entity found for a number is used without asking Bitrix24 again.
    pub crm_cache: Duration,
    /// Failed batch requests in a row a pass survives (it probes what may have run and goes
    /// on) before it stops with exit 75. 0: stop at the first failure.
    pub max_consecutive_failures: u32,
    /// Telephony mode: a link known when the call is finished goes in `finish`'s `RECORD_URL`
    /// (two commands per call instead of three). Bitrix24 documents the parameter as
    /// deprecated and reports no error when its download fails, so the file is proven from the
    /// call statistics `record_check_after` later, and the link sent again with attachRecord
    /// when it is not there (a portal that downloads none goes back to attachRecord for all).
    pub record_url_on_finish: bool,
    /// How long after `finish` carried a link the statistics are read for the file (0: in the
    /// same pass, right after the push, so a pass ends with every recording proven or re-sent).
    pub record_check_after: Duration,
}

#[derive(Debug, Clone)]
pub struct TasksConfig {
    pub enabled: bool,
    pub title: crate::rules::Template,
    /// The task's description; `None` is the built-in call summary.
    pub description: Option<crate::rules::Template>,
    pub deadline_minutes: u32,
    /// A second missed call from a client with an open task comments on it instead.
    pub one_per_client: bool,
    /// An answered call with the client (either way) completes the client's open task.
    pub close_on_callback: bool,
}

/// A webhook URL: its path carries a secret code, so it only ever prints redacted.
#[derive(Clone)]
pub struct WebhookUrl {
    url: SecretString,
    redacted: String,
}

impl WebhookUrl {
    /// Parses and checks the `/rest/<user>/<code>/` shape.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut url = Url::parse(raw.trim()).map_err(|e| format!("not a URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "is a `{}:` URL; it must be an https:// address",
                url.scheme()
            ));
        }
        let segments: Vec<String> = url
            .path_segments()
            .map(|s| s.filter(|p| !p.is_empty()).map(str::to_string).collect())
            .unwrap_or_default();
        if segments.len() != 3 || segments[0] != "rest" || segments[1].parse::<u64>().is_err() {
            return Err("expected the form https://<portal>/rest/<user_id>/<code>/".into());
        }
        url.set_path(&format!("/rest/{}/{}/", segments[1], segments[2]));
        url.set_query(None);
        let redacted = format!(
            "{}://{}/rest/{}/***/",
            url.scheme(),
            url.host_str().unwrap_or(""),
            segments[1]
        );
        let redacted = match url.port() {
            Some(p) => redacted.replacen(
                url.host_str().unwrap_or(""),
                &format!("{}:{p}", url.host_str().unwrap_or("")),
                1,
            ),
            None => redacted,
        };
        Ok(Self {
            url: SecretString::from(url.to_string()),
            redacted,
        })
    }

    /// The real URL, for building requests only.
    pub fn expose(&self) -> Url {
        Url::parse(self.url.expose_secret()).expect("validated at parse time")
    }

    /// The URL with its code masked, safe for logs.
    /// The webhook's secret code (the path segment after the user id).
    pub fn code(&self) -> &str {
        self.url
            .expose_secret()
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("")
    }

    pub fn redacted(&self) -> String {
        self.redacted.clone()
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}; pass --config PATH or set UBSYNC_CONFIG (see ubsync.example.toml)")]
    Read { path: PathBuf, reason: String },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", .problems.len(), render(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<KeyProblem>,
    },
}

/// One invalid or missing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyProblem {
    /// Dotted path, e.g. `bitrix24.client_id`.
    pub key: String,
    pub problem: String,
    pub fix: String,
}

fn render(problems: &[KeyProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - `{}`: {}; {}", p.key, p.problem, p.fix))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// The keys this error is about, for tests and tooling.
    pub fn keys(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { problems, .. } => {
                problems.iter().map(|p| p.key.clone()).collect()
            }
            _ => Vec::new(),
        }
    }
}

// ---- raw, as written in the file ------------------------------------------------------------

/// The environment variables config reads, passed in so tests need not mutate the process
/// environment.
#[derive(Debug, Default, Clone)]
pub struct Env(pub BTreeMap<String, String>);

impl Env {
    /// The secrets-related variables of the real process environment.
    pub fn from_process() -> Self {
        let mut m = BTreeMap::new();
        for k in [
            ENV_UNITALK_API_KEY,
            ENV_BITRIX24_CLIENT_SECRET,
            ENV_BITRIX24_WEBHOOK_URL,
            "CREDENTIALS_DIRECTORY",
            "STATE_DIRECTORY",
        ] {
            if let Ok(v) = std::env::var(k) {
                if !v.is_empty() {
                    m.insert(k.to_string(), v);
                }
            }
        }
        Self(m)
    }

    fn get(&self, k: &str) -> Option<String> {
        self.0.get(k).cloned()
    }
}

impl Config {
    /// Tells [`crate::redact`] every configured secret, so none ever leaves the process.
    fn register_secrets(&self) {
        crate::redact::register(self.unitalk.api_key.expose_secret());
        if let Some(s) = &self.bitrix24.client_secret {
            crate::redact::register(s.expose_secret());
        }
        if let Some(w) = &self.bitrix24.webhook_url {
            crate::redact::register(w.code());
            crate::redact::register(w.url.expose_secret());
        }
        if let Some(s) = &self.webhooks.unitalk_secret {
            crate::redact::register(s.expose_secret());
        }
        if let Some(s) = &self.webhooks.application_token {
            crate::redact::register(s.expose_secret());
        }
    }

    /// Reads, overlays the environment, and validates.
    pub fn load(path: &Path, env: &Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, path, env)
    }

    /// Validates `text` as if read from `path` (relative paths resolve against its directory).
    pub fn parse(text: &str, path: &Path, env: &Env) -> Result<Config, ConfigError> {
        // Unknown keys are collected, not fatal one at a time: every problem is reported at once.
        let mut unknown = Vec::new();
        let raw: RawConfig = toml::Deserializer::parse(text)
            .and_then(|de| serde_ignored::deserialize(de, |key| unknown.push(key.to_string())))
            .map_err(|e| syntax_error(text, path, &e))?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let base_dir = std::path::absolute(&base_dir).unwrap_or(base_dir);
        let mut v = Validator::default();
        for key in &unknown {
            v.fail(
                key,
                "unknown key",
                "remove it or fix its spelling (ubsync.example.toml lists every key)",
            );
        }
        let cfg = v.config(raw, env, &base_dir, path);
        if v.problems.is_empty() {
            let cfg = cfg.expect("no problems means a config");
            cfg.register_secrets();
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems: v.problems,
            })
        }
    }
}

/// Turns a TOML error into one line that names the offending key as `section.key`.
fn syntax_error(text: &str, path: &Path, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_string();
    let Some(span) = e.span() else {
        return ConfigError::Syntax {
            path: path.to_path_buf(),
            message,
        };
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    // The span points at the key for unknown fields and at the value for bad types; the key is
    // whatever stands before `=` on that line.
    let line_text = text.lines().nth(line - 1).unwrap_or("");
    let key = match line_text.split_once('=') {
        Some((k, _)) => k.trim().trim_matches('"').to_string(),
        None => text[span.clone()].trim().trim_matches('"').to_string(),
    };
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let full_key = match section {
        Some(s) if !key.is_empty() && !key.starts_with('[') => format!("{s}.{key}"),
        _ => key,
    };
    let fix = if message.starts_with("unknown field") {
        "remove it or fix its spelling (ubsync.example.toml lists every key)"
    } else {
        "fix the value (ubsync.example.toml shows the expected form)"
    };
    ConfigError::Syntax {
        path: path.to_path_buf(),
        message: format!("line {line}: key `{full_key}`: {message}; {fix}"),
    }
}

/// A point in time as users write it (`sync.start`, `--from`): RFC 3339, or a wall-clock
/// date or date-time in Unitalk's zone.
pub fn parse_start(raw: &str, tz: Tz) -> Option<DateTime<Utc>> {
    let raw = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.with_timezone(&Utc));
    }
    let naive = NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S"))
        .ok()
        .or_else(|| {
            NaiveDate::parse_from_str(raw, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })?;
    Some(local_to_utc(naive, tz))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL_WEBHOOK: &str = r#"
[unitalk]
api_key = "k"
[bitrix24]
mode = "activity"
webhook_url = "https://p.bitrix24.ua/rest/1/abcdef123/"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/ubsync/ubsync.toml"), &Env::default())
    }

    #[test]
    fn minimal_activity_config_gets_safe_defaults() {
        let c = parse(MINIMAL_WEBHOOK).unwrap();
        assert_eq!(c.bitrix24.mode, Mode::Activity);
        assert_eq!(c.bitrix24.burst.get(), 50);
        assert_eq!(c.bitrix24.per_second.get(), 2);
        assert_eq!(c.unitalk.timezone, chrono_tz::Europe::Kyiv);
        assert_eq!(c.state.path, PathBuf::from("/etc/ubsync/state/ubsync.db"));
        assert_eq!(c.sync.lookback, Duration::from_secs(600));
        assert!(c.sync.start.is_none());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let c = parse(MINIMAL_WEBHOOK).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("abcdef123"), "{dbg}");
        assert!(dbg.contains("/rest/1/***/"));
    }

    #[test]
    fn environment_overrides_file_secrets() {
        let mut env = Env::default();
        env.0.insert(
            ENV_BITRIX24_WEBHOOK_URL.into(),
            "https://q.bitrix24.ua/rest/7/zzz/".into(),
        );
        let c = Config::parse(MINIMAL_WEBHOOK, Path::new("x.toml"), &env).unwrap();
        assert_eq!(
            c.bitrix24.webhook_url.unwrap().expose().as_str(),
            "https://q.bitrix24.ua/rest/7/zzz/"
        );
    }
}
