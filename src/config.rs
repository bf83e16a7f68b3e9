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
use serde::Deserialize;
use url::Url;

use crate::timezone::local_to_utc;

/// Environment variable that may carry the Unitalk API key instead of the file.
pub const ENV_UNITALK_API_KEY: &str = "UBSYNC_UNITALK_API_KEY";
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
    pub activity: ActivityConfig,
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
    pub crm_create: bool,
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
    /// (two commands per call instead of three). Off by default: Bitrix24 documents the
    /// parameter as deprecated and reports no error when its download fails.
    pub record_url_on_finish: bool,
}

#[derive(Debug, Clone)]
pub struct ActivityConfig {
    /// Create a lead for numbers no CRM entity has (activity mode).
    pub create_leads: bool,
    pub lead_title: String,
}

#[derive(Debug, Clone)]
pub struct TasksConfig {
    pub enabled: bool,
    pub title: String,
    pub deadline_minutes: u32,
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

#[derive(Debug, Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    unitalk: RawUnitalk,
    #[serde(default)]
    bitrix24: RawBitrix24,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    sync: RawSync,
    #[serde(default)]
    activity: RawActivity,
    #[serde(default)]
    tasks: RawTasks,
    #[serde(default)]
    schedule: RawSchedule,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    recordings: RawRecordings,
}

#[derive(Debug, Deserialize, Default)]
struct RawRecordings {
    delivery: Option<String>,
    max_megabytes: Option<i64>,
    send_api_key: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
struct RawHttp {
    install: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
struct RawSchedule {
    file: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct RawHealth {
    max_age: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct RawUnitalk {
    base_url: Option<String>,
    api_key: Option<String>,
    api_key_file: Option<String>,
    timezone: Option<String>,
    request_timeout: Option<String>,
    page_size: Option<i64>,
    retry_base_delay: Option<String>,
    allow_insecure_http: Option<bool>,
    call_id_field: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct RawBitrix24 {
    mode: Option<String>,
    portal_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_file: Option<String>,
    oauth_url: Option<String>,
    webhook_url: Option<String>,
    webhook_url_file: Option<String>,
    burst: Option<i64>,
    per_second: Option<i64>,
    max_per_10s: Option<i64>,
    default_user_id: Option<i64>,
    request_timeout: Option<String>,
    retry_base_delay: Option<String>,
    operating_limit: Option<i64>,
    timezone: Option<String>,
    allow_insecure_http: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
struct RawState {
    path: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct RawSync {
    start: Option<String>,
    lookback: Option<String>,
    settle: Option<String>,
    max_window: Option<String>,
    default_country: Option<String>,
    skip_internal: Option<bool>,
    crm_create: Option<bool>,
    add_to_chat: Option<bool>,
    recording_wait: Option<String>,
    max_call_duration: Option<String>,
    sweep_every: Option<String>,
    stage_limit: Option<i64>,
    recording_repulls: Option<i64>,
    max_consecutive_failures: Option<i64>,
    crm_cache: Option<String>,
    record_url_on_finish: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
struct RawActivity {
    create_leads: Option<bool>,
    lead_title: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct RawTasks {
    enabled: Option<bool>,
    title: Option<String>,
    deadline_minutes: Option<i64>,
}

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

/// Where a secret comes from, strongest first: its environment variable, the `*_file` key, a
/// systemd credential (`LoadCredential=<name>:...`, read from `$CREDENTIALS_DIRECTORY/<name>`),
/// then the inline key. Returns the value, or a problem reading a named file.
fn secret_source(
    env: &Env,
    var: &str,
    file_key: Option<String>,
    credential: &str,
    inline: Option<String>,
) -> Result<Option<String>, String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    if let Some(v) = env.get(var) {
        return Ok(Some(v));
    }
    if let Some(f) = file_key.filter(|f| !f.trim().is_empty()) {
        return read(Path::new(f.trim())).map(Some);
    }
    if let Some(dir) = env.get("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&dir).join(credential);
        if path.exists() {
            // An empty credential is a placeholder (LoadCredential= needs every file to exist).
            let v = read(&path)?;
            if !v.is_empty() {
                return Ok(Some(v));
            }
        }
    }
    Ok(inline)
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

#[derive(Default)]
struct Validator {
    problems: Vec<KeyProblem>,
}

impl Validator {
    fn fail(&mut self, key: &str, problem: impl Into<String>, fix: impl Into<String>) {
        self.problems.push(KeyProblem {
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        });
    }

    fn url(
        &mut self,
        key: &str,
        raw: Option<String>,
        default: Option<&str>,
        allow_http: (&str, bool),
    ) -> Option<Url> {
        let raw = raw.or(default.map(str::to_string))?;
        match Url::parse(raw.trim()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                self.url_is_safe(key, &u, allow_http).then_some(u)
            }
            Ok(u) => {
                self.fail(
                    key,
                    format!("`{}` is not an https URL", crate::redact::field(&raw)),
                    "write it as https://host/...",
                );
                let _ = u;
                None
            }
            Err(e) => {
                self.fail(
                    key,
                    format!("`{}` is not a URL ({e})", crate::redact::field(&raw)),
                    "write it as https://host/...",
                );
                None
            }
        }
    }

    /// Refuses user names and passwords in a URL, and plain http to anything but loopback
    /// unless `allow_http.1` (the key named by `allow_http.0`) says so.
    fn url_is_safe(&mut self, key: &str, u: &Url, (allow_key, allow): (&str, bool)) -> bool {
        if !u.username().is_empty() || u.password().is_some() {
            self.fail(
                key,
                "carries a user name or password",
                "remove the `user:password@` part; ubsync authenticates with its own keys",
            );
            return false;
        }
        if u.scheme() == "http" && !allow && !crate::bitrix24::redirect::is_loopback(u) {
            self.fail(
                key,
                format!(
                    "uses plain http to {}: keys and call data would travel unencrypted",
                    u.host_str().unwrap_or("")
                ),
                format!("use https://, or set {allow_key} = true if the network path is trusted"),
            );
            return false;
        }
        true
    }

    fn tz(&mut self, key: &str, raw: Option<String>, default: &str) -> Tz {
        let raw = raw.unwrap_or_else(|| default.to_string());
        match raw.parse::<Tz>() {
            Ok(tz) => tz,
            Err(_) => {
                self.fail(
                    key,
                    format!("`{raw}` is not an IANA time zone"),
                    "use a name such as \"Europe/Kyiv\"",
                );
                Tz::UTC
            }
        }
    }

    /// A duration within `[min, max]` (written like the bounds in the message).
    fn duration(
        &mut self,
        key: &str,
        raw: Option<String>,
        default: &str,
        (min, max): (&str, &str),
    ) -> Duration {
        let raw = raw.unwrap_or_else(|| default.to_string());
        let bound = |b: &str| humantime::parse_duration(b).expect("static bound");
        match humantime::parse_duration(raw.trim()) {
            Ok(d) if d < bound(min) || d > bound(max) => {
                self.fail(
                    key,
                    format!("`{raw}` is out of range"),
                    format!("use a duration from {min} to {max} (default \"{default}\")"),
                );
                humantime::parse_duration(default).expect("static default")
            }
            Ok(d) => d,
            Err(e) => {
                self.fail(
                    key,
                    format!("`{raw}` is not a duration ({e})"),
                    "write it like \"90s\", \"10m\" or \"1h\"",
                );
                Duration::from_secs(1)
            }
        }
    }

    fn recordings(&mut self, r: &RawRecordings, mode: Mode) -> RecordingsConfig {
        let delivery = match r.delivery.as_deref().unwrap_or("link") {
            "link" => Delivery::Link,
            "upload" if mode == Mode::Telephony => Delivery::Upload,
            "upload" => {
                self.fail(
                    "recordings.delivery",
                    "\"upload\" attaches files to telephony calls, which activity mode does not register",
                    "use \"link\" in activity mode (the activity's description carries the link)",
                );
                Delivery::Link
            }
            other => {
                self.fail(
                    "recordings.delivery",
                    format!("`{other}` is not a delivery"),
                    "use \"link\" (Bitrix24 downloads RECORD_URL) or \"upload\" (ubsync downloads and uploads the file)",
                );
                Delivery::Link
            }
        };
        let max_bytes = u64::from(
            self.positive("recordings.max_megabytes", r.max_megabytes, 50, 1024)
                .get(),
        ) * 1024
            * 1024;
        RecordingsConfig {
            delivery,
            max_bytes,
            send_api_key: r.send_api_key.unwrap_or(false),
        }
    }

    fn positive(&mut self, key: &str, raw: Option<i64>, default: u32, max: u32) -> NonZeroU32 {
        let v = raw.unwrap_or(default as i64);
        if v < 1 || v > max as i64 {
            self.fail(
                key,
                format!("{v} is out of range"),
                format!("use a whole number from 1 to {max}"),
            );
            return NonZeroU32::new(default).expect("defaults are non-zero");
        }
        NonZeroU32::new(v as u32).expect("checked above")
    }

    fn config(
        &mut self,
        raw: RawConfig,
        env: &Env,
        base_dir: &Path,
        source: &Path,
    ) -> Option<Config> {
        // Unitalk.
        let unitalk_http = raw.unitalk.allow_insecure_http.unwrap_or(false);
        let base_url = self.url(
            "unitalk.base_url",
            raw.unitalk.base_url,
            Some("https://api.unitalk.cloud/api"),
            ("unitalk.allow_insecure_http", unitalk_http),
        );
        let api_key = match secret_source(
            env,
            ENV_UNITALK_API_KEY,
            raw.unitalk.api_key_file,
            "unitalk_api_key",
            raw.unitalk.api_key,
        ) {
            Ok(v) => v.filter(|k| !k.trim().is_empty()),
            Err(e) => {
                self.fail(
                    "unitalk.api_key_file",
                    e,
                    "point it at a readable file holding only the key",
                );
                None
            }
        };
        if api_key.is_none()
            && !self
                .problems
                .iter()
                .any(|p| p.key == "unitalk.api_key_file")
        {
            self.fail(
                "unitalk.api_key",
                "missing",
                format!("set it, or the environment variable {ENV_UNITALK_API_KEY} (Unitalk cabinet: Integrations → API → Generate API Key)"),
            );
        }
        let unitalk_tz = self.tz("unitalk.timezone", raw.unitalk.timezone, "Europe/Kyiv");
        let unitalk_timeout = self.duration(
            "unitalk.request_timeout",
            raw.unitalk.request_timeout,
            "30s",
            ("100ms", "10m"),
        );
        let page_size = self
            .positive("unitalk.page_size", raw.unitalk.page_size, 1000, 1000)
            .get();
        let unitalk_retry = self.duration(
            "unitalk.retry_base_delay",
            raw.unitalk.retry_base_delay,
            "1s",
            ("1ms", "5m"),
        );

        let call_id_field = raw
            .unitalk
            .call_id_field
            .map(|f| f.trim().to_string())
            .unwrap_or_else(|| "id".into());
        if call_id_field.is_empty()
            || !call_id_field
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.fail(
                "unitalk.call_id_field",
                format!("`{call_id_field}` is not a field name"),
                "use \"id\" (the default) or \"dbid\"",
            );
        }

        // Bitrix24.
        let b = raw.bitrix24;
        let b24_http = b.allow_insecure_http.unwrap_or(false);
        let b24_allow = ("bitrix24.allow_insecure_http", b24_http);
        let mode = match b.mode.as_deref().unwrap_or("telephony") {
            "telephony" => Mode::Telephony,
            "activity" => Mode::Activity,
            other => {
                self.fail(
                    "bitrix24.mode",
                    format!("unknown mode `{other}`"),
                    "use \"telephony\" (OAuth local application) or \"activity\" (incoming webhook)",
                );
                Mode::Telephony
            }
        };
        let portal_url = self.url("bitrix24.portal_url", b.portal_url, None, b24_allow);
        let oauth_url = self.url(
            "bitrix24.oauth_url",
            b.oauth_url,
            Some("https://oauth.bitrix.info"),
            b24_allow,
        );
        let client_id = b.client_id.filter(|s| !s.trim().is_empty());
        let client_secret = match secret_source(
            env,
            ENV_BITRIX24_CLIENT_SECRET,
            b.client_secret_file,
            "bitrix24_client_secret",
            b.client_secret,
        ) {
            Ok(v) => v.filter(|s| !s.trim().is_empty()).map(SecretString::from),
            Err(e) => {
                self.fail(
                    "bitrix24.client_secret_file",
                    e,
                    "point it at a readable file holding only the secret",
                );
                None
            }
        };
        let webhook_raw = match secret_source(
            env,
            ENV_BITRIX24_WEBHOOK_URL,
            b.webhook_url_file,
            "bitrix24_webhook_url",
            b.webhook_url,
        ) {
            Ok(v) => v.filter(|s| !s.trim().is_empty()),
            Err(e) => {
                self.fail(
                    "bitrix24.webhook_url_file",
                    e,
                    "point it at a readable file holding only the URL",
                );
                None
            }
        };
        let webhook_url = match webhook_raw {
            Some(raw) => match WebhookUrl::parse(&raw) {
                Ok(w) if self.url_is_safe("bitrix24.webhook_url", &w.expose(), b24_allow) => {
                    Some(w)
                }
                Ok(_) => None,
                Err(e) => {
                    self.fail("bitrix24.webhook_url", e, "copy the URL of an incoming webhook from Developer resources → Other → Incoming webhook");
                    None
                }
            },
            None => None,
        };
        match mode {
            Mode::Telephony => {
                let why = "mode = \"telephony\" needs an OAuth local application";
                if portal_url.is_none() {
                    self.fail(
                        "bitrix24.portal_url",
                        format!("missing; {why}"),
                        "set it to your portal's address, e.g. https://example.bitrix24.ua",
                    );
                }
                if client_id.is_none() {
                    self.fail("bitrix24.client_id", format!("missing; {why}"), "create a server-side local application (Developer resources → Other → Local application) and copy its client_id");
                }
                if client_secret.is_none()
                    && !self
                        .problems
                        .iter()
                        .any(|p| p.key == "bitrix24.client_secret_file")
                {
                    self.fail(
                        "bitrix24.client_secret",
                        format!("missing; {why}"),
                        format!("copy the local application's client_secret, or set {ENV_BITRIX24_CLIENT_SECRET}"),
                    );
                }
            }
            Mode::Activity => {
                if webhook_url.is_none()
                    && !self
                        .problems
                        .iter()
                        .any(|p| p.key.starts_with("bitrix24.webhook_url"))
                {
                    self.fail(
                        "bitrix24.webhook_url",
                        "missing; mode = \"activity\" writes through an incoming webhook",
                        format!("create one with scopes crm, task, user (Developer resources → Other → Incoming webhook), or set {ENV_BITRIX24_WEBHOOK_URL}"),
                    );
                }
            }
        }
        let burst = self.positive("bitrix24.burst", b.burst, 50, 10_000);
        let per_second = self.positive("bitrix24.per_second", b.per_second, 2, 1_000);
        let max_per_10s = self.positive("bitrix24.max_per_10s", b.max_per_10s, 50, 100_000);
        let default_user_id = match b.default_user_id {
            Some(id) if id >= 1 => Some(id as u64),
            Some(id) => {
                self.fail(
                    "bitrix24.default_user_id",
                    format!("{id} is not a user id"),
                    "use the numeric ID of an active Bitrix24 user",
                );
                None
            }
            None => None,
        };
        let b24_timeout = self.duration(
            "bitrix24.request_timeout",
            b.request_timeout,
            "75s",
            ("100ms", "10m"),
        );
        let retry_base_delay = self.duration(
            "bitrix24.retry_base_delay",
            b.retry_base_delay,
            "1s",
            ("1ms", "5m"),
        );
        let operating_limit = self
            .positive("bitrix24.operating_limit", b.operating_limit, 480, 86_400)
            .get() as f64;
        let b24_tz = match b.timezone {
            Some(t) => self.tz("bitrix24.timezone", Some(t), "UTC"),
            None => unitalk_tz,
        };

        // State.
        let state_path = PathBuf::from(raw.state.path.unwrap_or_else(|| "state/ubsync.db".into()));
        // Under systemd (StateDirectory=), a relative state path lives in the state directory.
        let state_path = if state_path.is_absolute() {
            state_path
        } else if let Some(dir) = env
            .get("STATE_DIRECTORY")
            .and_then(|d| d.split(':').next().map(PathBuf::from))
        {
            dir.join(state_path)
        } else {
            base_dir.join(state_path)
        };

        // Sync.
        let s = raw.sync;
        let start = match s.start {
            None => None,
            Some(raw_start) => match parse_start(&raw_start, unitalk_tz) {
                Some(t) => Some(t),
                None => {
                    self.fail(
                        "sync.start",
                        format!("`{raw_start}` is not a date"),
                        "write it as \"2026-11-01\", \"2026-11-01 08:00:00\" (Unitalk's zone) or RFC 3339",
                    );
                    None
                }
            },
        };
        let lookback = self.duration("sync.lookback", s.lookback, "10m", ("0s", "1day"));
        let settle = self.duration("sync.settle", s.settle, "2m", ("0s", "1h"));
        let max_window = self.duration("sync.max_window", s.max_window, "1h", ("1s", "1day"));
        let recording_wait = self.duration(
            "sync.recording_wait",
            s.recording_wait,
            "24h",
            ("0s", "30days"),
        );
        let max_call_duration = self.duration(
            "sync.max_call_duration",
            s.max_call_duration,
            "4h",
            ("1m", "2days"),
        );
        let sweep_every = self.duration("sync.sweep_every", s.sweep_every, "5m", ("10s", "1day"));
        let crm_cache = self.duration("sync.crm_cache", s.crm_cache.clone(), "10m", ("0s", "1day"));
        let stage_limit = self
            .positive("sync.stage_limit", s.stage_limit, 5000, 1_000_000)
            .get();
        let recording_repulls = self
            .positive("sync.recording_repulls", s.recording_repulls, 6, 1000)
            .get();
        let max_consecutive_failures = match s.max_consecutive_failures.unwrap_or(5) {
            v @ 0..=100 => v as u32,
            v => {
                self.fail(
                    "sync.max_consecutive_failures",
                    format!("{v} is out of range"),
                    "use a whole number from 0 to 100 (default 5)",
                );
                5
            }
        };
        if max_window < Duration::from_secs(60) {
            self.fail(
                "sync.max_window",
                "shorter than a minute",
                "use at least \"1m\" (default \"1h\")",
            );
        }
        let country_raw = s.default_country.unwrap_or_else(|| "UA".into());
        let default_country = match country_raw
            .trim()
            .to_uppercase()
            .parse::<phonenumber::country::Id>()
        {
            Ok(c) => c,
            Err(_) => {
                self.fail(
                    "sync.default_country",
                    format!("`{country_raw}` is not a country code"),
                    "use a two-letter ISO 3166 code such as \"UA\"",
                );
                phonenumber::country::Id::UA
            }
        };

        let activity = ActivityConfig {
            create_leads: raw.activity.create_leads.unwrap_or(true),
            lead_title: raw
                .activity
                .lead_title
                .unwrap_or_else(|| "Call from {phone}".into()),
        };
        let tasks_title = raw
            .tasks
            .title
            .unwrap_or_else(|| "Missed call from {phone}".into());
        if tasks_title.trim().is_empty() {
            self.fail(
                "tasks.title",
                "empty",
                "write a title template such as \"Missed call from {phone}\"",
            );
        }
        let deadline_minutes = match raw.tasks.deadline_minutes {
            None => 30,
            Some(m) if (1..=525_600).contains(&m) => m as u32,
            Some(m) => {
                self.fail(
                    "tasks.deadline_minutes",
                    format!("{m} is out of range"),
                    "use minutes from 1 to 525600",
                );
                30
            }
        };

        let schedule_explicit = raw.schedule.file.is_some();
        let schedule_file = PathBuf::from(
            raw.schedule
                .file
                .unwrap_or_else(|| "schedules/default.toml".into()),
        );
        let schedule_file = if schedule_file.is_absolute() {
            schedule_file
        } else {
            base_dir.join(schedule_file)
        };
        let health_max_age = self.duration(
            "health.max_age",
            raw.health.max_age,
            "10m",
            ("1s", "30days"),
        );

        if !self.problems.is_empty() {
            return None;
        }
        let recordings = self.recordings(&raw.recordings, mode);
        Some(Config {
            recordings,
            schedule_file,
            schedule_explicit,
            health_max_age,
            http: HttpConfig {
                install: raw.http.install.unwrap_or(false),
            },
            source: source.to_path_buf(),
            unitalk: UnitalkConfig {
                base_url: base_url?,
                api_key: SecretString::from(api_key?),
                timezone: unitalk_tz,
                request_timeout: unitalk_timeout,
                page_size,
                retry_base_delay: unitalk_retry,
                allow_insecure_http: unitalk_http,
                call_id_field,
            },
            bitrix24: Bitrix24Config {
                mode,
                portal_url,
                client_id,
                client_secret,
                oauth_url: oauth_url?,
                webhook_url,
                burst,
                per_second,
                max_per_10s,
                default_user_id,
                request_timeout: b24_timeout,
                retry_base_delay,
                operating_limit,
                timezone: b24_tz,
                allow_insecure_http: b24_http,
            },
            state: StateConfig { path: state_path },
            sync: SyncConfig {
                start,
                lookback,
                settle,
                max_window,
                default_country,
                skip_internal: s.skip_internal.unwrap_or(true),
                crm_create: s.crm_create.unwrap_or(true),
                add_to_chat: s.add_to_chat.unwrap_or(false),
                recording_wait,
                max_call_duration,
                sweep_every,
                stage_limit,
                recording_repulls,
                max_consecutive_failures,
                crm_cache,
                record_url_on_finish: s.record_url_on_finish.unwrap_or(false),
            },
            activity,
            tasks: TasksConfig {
                enabled: raw.tasks.enabled.unwrap_or(true),
                title: tasks_title,
                deadline_minutes,
            },
        })
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
