//! The one shared harness: starts both simulators on port 0 with a scenario and a clock, writes a
//! config pointing at them into a fresh temp directory, and runs the real `ubsync` binary.

use std::path::PathBuf;
use std::process::Output;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use ubsync::clock::Clock;
use ubsync::sim::bitrix24::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_WEBHOOK_CODE};
use ubsync::sim::unitalk::DEFAULT_API_KEY;
use ubsync::sim::{Bitrix24SimConfig, Scenario, Simulators};

/// The `[tasks]` of tests that want one task per missed call (the client rules off).
pub const ONE_TASK_EACH: &str = "[tasks]\none_per_client = false\nclose_on_callback = false\n";

pub struct TestEnv {
    pub sims: Simulators,
    pub clock: Clock,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

/// A fixed instant tests start from: 2026-11-22 12:00 UTC (14:00 in Kyiv).
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap()
}

impl TestEnv {
    /// Both simulators with `scenario`, default portal limits, and a manual clock at [`t0`].
    pub async fn start(scenario: Scenario) -> Self {
        Self::with(scenario, Bitrix24SimConfig::default(), Clock::manual(t0())).await
    }

    pub async fn with(scenario: Scenario, b24: Bitrix24SimConfig, clock: Clock) -> Self {
        let any = "127.0.0.1:0".parse().unwrap();
        let sims = Simulators::start(&scenario, b24, clock.clone(), any, any)
            .await
            .expect("simulators start");
        Self {
            sims,
            clock,
            dir: tempfile::tempdir().unwrap(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    pub fn b24(&self) -> String {
        self.sims.bitrix24_url()
    }

    pub fn webhook(&self) -> String {
        format!("{}/rest/1/{DEFAULT_WEBHOOK_CODE}/", self.b24())
    }

    /// POSTs JSON to a portal path and returns (status, body).
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.b24()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Calls a method through the incoming webhook.
    pub async fn hook(&self, method: &str, body: Value) -> (u16, Value) {
        self.post(&format!("/rest/1/{DEFAULT_WEBHOOK_CODE}/{method}"), body)
            .await
    }

    /// Calls a method as the OAuth application with `token`.
    pub async fn app(&self, token: &str, method: &str, mut body: Value) -> (u16, Value) {
        body["auth"] = Value::String(token.into());
        self.post(&format!("/rest/{method}"), body).await
    }

    /// POSTs JSON to the Unitalk simulator with the given Authorization header.
    pub async fn unitalk(&self, path: &str, auth: Option<&str>, body: Value) -> Value {
        let mut req = self
            .http
            .post(format!("{}/{path}", self.sims.unitalk_url()))
            .json(&body);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        req.send().await.unwrap().json().await.unwrap()
    }

    /// Writes a config for `mode` ("telephony" or "activity") plus `extra` TOML and returns its path.
    pub fn write_config(&self, mode: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join("ubsync.toml");
        let b24 = self.b24();
        let text = format!(
            "[unitalk]\nbase_url = \"{}\"\napi_key = \"{DEFAULT_API_KEY}\"\ntimezone = \"Europe/Kyiv\"\n\n\
             [bitrix24]\nmode = \"{mode}\"\nportal_url = \"{b24}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\n\
             client_secret = \"{DEFAULT_CLIENT_SECRET}\"\noauth_url = \"{b24}\"\nwebhook_url = \"{}\"\ndefault_user_id = 1\n\n\
             [state]\npath = \"state/ubsync.db\"\n{extra}\n",
            self.sims.unitalk_url(),
            self.webhook(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Rewrites the written config.
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let path = self.dir.path().join("ubsync.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, f(text)).unwrap();
    }

    /// Runs the real binary with `args` (after `--config <dir>/ubsync.toml`).
    pub async fn ubsync(&self, args: &[&str]) -> Output {
        let config = self.dir.path().join("ubsync.toml");
        tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("UBSYNC_UNITALK_API_KEY")
            .env_remove("UBSYNC_BITRIX24_CLIENT_SECRET")
            .env_remove("UBSYNC_BITRIX24_WEBHOOK_URL")
            .env_remove("UBSYNC_CONFIG")
            .env("NO_COLOR", "1")
            .output()
            .await
            .expect("ubsync runs")
    }
}

/// stdout + stderr of a finished command, for assertions and failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl TestEnv {
    /// Parses the written config.
    pub fn config(&self) -> ubsync::config::Config {
        ubsync::config::Config::load(
            &self.dir.path().join("ubsync.toml"),
            &ubsync::config::Env::default(),
        )
        .expect("valid test config")
    }

    /// The pipeline's context over the written config, the env's clock and its state file; in
    /// telephony mode the local application is installed and its tokens stored first.
    pub async fn ctx(&self) -> ubsync::sync::SyncCtx {
        self.ctx_with_clock(self.clock.clone()).await
    }

    /// The pipeline's context with its own clock (e.g. one that jumped while the world's did not).
    pub async fn ctx_with_clock(&self, clock: Clock) -> ubsync::sync::SyncCtx {
        let cfg = self.config();
        let store =
            ubsync::store::SharedStore::new(ubsync::store::Store::open(&cfg.state.path).unwrap());
        let b24 =
            ubsync::bitrix24::Bitrix24Client::new(&cfg.bitrix24, store.clone(), clock.clone())
                .unwrap();
        if cfg.bitrix24.mode == ubsync::config::Mode::Telephony
            && store.lock().tokens(&self.portal_key()).unwrap().is_none()
        {
            let (_, refresh) = self.sims.bitrix24.install_app(1);
            b24.exchange(&refresh).await.unwrap();
        }
        ubsync::sync::SyncCtx {
            recordings: ubsync::recording::client(&cfg),
            unitalk: ubsync::unitalk::UnitalkClient::new(&cfg.unitalk).unwrap(),
            b24,
            cfg,
            store,
            clock,
            cancel: tokio_util::sync::CancellationToken::new(),
        }
    }

    fn portal_key(&self) -> String {
        self.b24().trim_start_matches("http://").to_string()
    }
}

/// One pass with default options.
pub async fn pass(
    ctx: &ubsync::sync::SyncCtx,
) -> Result<ubsync::sync::PassSummary, ubsync::sync::SyncError> {
    ubsync::sync::run_pass(ctx, &ubsync::sync::PassOptions::default()).await
}
