//! Raw configuration → validated `Config`: every problem collected, each naming its key and fix.

use super::raw::*;
use super::*;

/// Where a secret comes from, strongest first: its environment variable, the `*_file` key, a
/// systemd credential (`LoadCredential=<name>:...`, read from `$CREDENTIALS_DIRECTORY/<name>`),
/// then the inline key. Returns the value, or a problem reading a named file.
pub(super) fn secret_source(
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

#[derive(Default)]
pub(super) struct Validator {
    pub(super) problems: Vec<KeyProblem>,
}

impl Validator {
    pub(super) fn fail(&mut self, key: &str, problem: impl Into<String>, fix: impl Into<String>) {
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

    pub(super) fn tz(&mut self, key: &str, raw: Option<String>, default: &str) -> Tz {
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
    pub(super) fn duration(
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

    pub(super) fn config(
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
        let record_check_after = self.duration(
            "sync.record_check_after",
            s.record_check_after.clone(),
            "0s",
            ("0s", "1day"),
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

        let tasks_title =
            self.template("tasks.title", raw.tasks.title, "Missed call from {client}");
        let tasks_description = raw
            .tasks
            .description
            .map(|d| self.template("tasks.description", Some(d), "{client}"));
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

        let legacy = match mode {
            Mode::Activity => super::rules::LegacyLeads {
                create: raw.activity.create_leads.unwrap_or(true),
                create_key: "activity.create_leads",
                title: raw.activity.lead_title.clone(),
            },
            Mode::Telephony => super::rules::LegacyLeads {
                create: s.crm_create.unwrap_or(true),
                create_key: "sync.crm_create",
                title: raw.activity.lead_title.clone(),
            },
        };
        let rules = self.rules(raw.rules, b24_tz, base_dir, legacy);
        let webhooks = self.webhooks(&raw.webhooks, env, mode, b24_http);
        if !self.problems.is_empty() {
            return None;
        }
        let recordings = self.recordings(&raw.recordings, mode);
        if !self.problems.is_empty() {
            return None;
        }
        Some(Config {
            webhooks,
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
                add_to_chat: s.add_to_chat.unwrap_or(false),
                recording_wait,
                max_call_duration,
                sweep_every,
                stage_limit,
                recording_repulls,
                max_consecutive_failures,
                crm_cache,
                record_url_on_finish: s.record_url_on_finish.unwrap_or(true),
                record_check_after,
            },
            tasks: TasksConfig {
                enabled: raw.tasks.enabled.unwrap_or(true),
                title: tasks_title,
                description: tasks_description,
                deadline_minutes,
                one_per_client: raw.tasks.one_per_client.unwrap_or(true),
                close_on_callback: raw.tasks.close_on_callback.unwrap_or(true),
            },
            rules,
        })
    }
}
