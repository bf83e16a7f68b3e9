//! The command line: argument parsing, logging set-up, and the one place that turns errors into
//! messages and exit codes.
//!
//! Exit codes: 0 success; 2 usage or configuration error (including credentials an admin must
//! fix); 75 (`EX_TEMPFAIL`) an upstream is temporarily unavailable or rate limited, so a timer
//! should simply retry later; 1 anything else. Errors print once, on one line, with their cause
//! chain, and never contain secrets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::bitrix24::{Bitrix24Client, Bitrix24Error};
use crate::clock::Clock;
use crate::config::{Config, ConfigError, Env, Mode};
use crate::store::{SharedStore, Store, StoreError};
use crate::sync::{run_pass, PassOptions, SyncCtx, SyncError};
use crate::unitalk::{UnitalkClient, UnitalkError};

mod args;
pub mod inspect;
mod lines;
mod passes;
mod progress;
mod ranges;
mod rules_test;
mod setup;
mod simulate;

pub use args::{AuthCommand, Cli, Command, RulesCommand, SimArgs};
use passes::{retry, run_logged, sync};
use ranges::{backfill, reconcile};
use setup::{check, set_refresh_token};
use simulate::sim;

/// Exit code for configuration and usage errors.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code when an upstream is temporarily unavailable (EX_TEMPFAIL).
pub const EXIT_TEMPFAIL: u8 = 75;

/// Parses arguments, runs the command, prints any error, and returns the exit code.
pub fn main() -> ExitCode {
    // Whatever the inherited umask, nothing ubsync creates (database, lock, reports,
    // temporaries) is readable by group or others.
    // SAFETY: umask only changes this process's file-creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    let cli = {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Cli::command().get_matches();
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        cli.config_given =
            matches.value_source("config") == Some(clap::parser::ValueSource::CommandLine);
        cli
    };
    // The demo's report is its output; its progress logs only with -v.
    let quiet = cli.quiet || (matches!(cli.command, Command::Demo) && cli.verbose == 0);
    init_logging(cli.verbose, quiet, cli.color);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            crate::redact::complain(&format!(
                "ubsync: error: cannot start the async runtime: {e}"
            ));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let text = format!("{e:#}");
            crate::redact::complain(&format!("ubsync: error: {text}"));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code an error maps to.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<SyncError>() {
            return match s {
                SyncError::Unitalk(u) => unitalk_code(u),
                SyncError::Bitrix24(b) => bitrix24_code(b),
                SyncError::Store(StoreError::Busy(_)) | SyncError::Cancelled => EXIT_TEMPFAIL,
                SyncError::Store(_) => 1,
                SyncError::IdentityChanged { .. } | SyncError::Uninstalled { .. } => EXIT_CONFIG,
            };
        }
        if cause.downcast_ref::<ConfigError>().is_some()
            || cause.downcast_ref::<UsageError>().is_some()
            || cause
                .downcast_ref::<crate::bitrix24::install::InstallError>()
                .is_some()
        {
            return EXIT_CONFIG;
        }
        if let Some(b) = cause.downcast_ref::<Bitrix24Error>() {
            return bitrix24_code(b);
        }
        if let Some(u) = cause.downcast_ref::<UnitalkError>() {
            return unitalk_code(u);
        }
        if cause
            .downcast_ref::<crate::lock::LockError>()
            .is_some_and(|l| matches!(l, crate::lock::LockError::Held { .. }))
        {
            return EXIT_TEMPFAIL;
        }
        if let Some(StoreError::Busy(_)) = cause.downcast_ref::<StoreError>() {
            return EXIT_TEMPFAIL;
        }
    }
    1
}

fn bitrix24_code(e: &Bitrix24Error) -> u8 {
    if e.needs_admin() {
        EXIT_CONFIG
    } else if e.is_retryable() {
        EXIT_TEMPFAIL
    } else {
        1
    }
}

fn unitalk_code(e: &UnitalkError) -> u8 {
    match e {
        UnitalkError::Auth { .. }
        | UnitalkError::Redirect { .. }
        | UnitalkError::Misconfigured { .. } => EXIT_CONFIG,
        e if e.is_retryable() => EXIT_TEMPFAIL,
        _ => 1,
    }
}

/// When log lines are coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// On a terminal, unless NO_COLOR is set.
    Auto,
    Always,
    Never,
}

fn init_logging(verbose: u8, quiet: bool, color: ColorChoice) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // The scheduler crate announces every job it adds at info: not news for an admin.
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (_, 0) => "info,tokio_cron_scheduler=warn",
        (_, 1) => "ubsync=debug,tokio_cron_scheduler=warn,info",
        _ => "ubsync=trace,debug",
    };
    let filter = EnvFilter::try_from_env("UBSYNC_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Under systemd, journald adds its own timestamps, reads syslog priority prefixes and does
    // not render colours.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = match color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            !journald && std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal()
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::redact::RedactingStderr {
            syslog_priorities: journald,
        })
        .with_ansi(ansi)
        .with_target(false);
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// Loads and validates the configuration.
pub fn load_config(path: &std::path::Path) -> Result<Config, ConfigError> {
    Config::load(path, &Env::from_process())
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Check { offline } => check(&cli.config, offline).await,
        Command::Sync { dry_run } => match sync(&cli.config, dry_run).await {
            Err(e) if !dry_run && exit_code(&e) == EXIT_TEMPFAIL => stale_or(&cli.config, e),
            r => r,
        },
        Command::Status { json } => inspect::status(&load_config(&cli.config)?, json),
        Command::Show { call, json } => inspect::show(&load_config(&cli.config)?, &call, json),
        Command::Runs { kind, limit, json } => {
            inspect::runs(&load_config(&cli.config)?, kind.as_deref(), limit, json)
        }
        Command::Run {
            listen,
            install_listen,
        } => run_daemon(&cli.config, listen, install_listen).await,
        Command::Backfill { from, to } => backfill(&cli.config, &from, &to).await,
        Command::Reconcile { from, to, dry_run } => reconcile(&cli.config, from, to, dry_run).await,
        Command::Lines { json, offline } => {
            lines::lines(&load_config(&cli.config)?, json, offline).await
        }
        Command::Rules(RulesCommand::Test {
            from,
            to,
            call,
            json,
        }) => rules_test::rules_test(&load_config(&cli.config)?, from, to, call, json),
        Command::Retry { ids, all } => retry(&cli.config, &ids, all).await,
        Command::Demo | Command::Sim(_) if cli.config_given => Err(UsageError(format!(
            "--config: `{}` runs against its own simulators and reads no configuration file; drop --config (`sim --write-config PATH` writes one for the other commands)",
            if matches!(cli.command, Command::Demo) { "demo" } else { "sim" }
        ))
        .into()),
        Command::Demo => {
            let report = crate::demo::run(Clock::system()).await?;
            crate::redact::say(report.text.trim_end_matches('\n'));
            Ok(if report.ok { 0 } else { 1 })
        }
        Command::Sim(args) => sim(args).await,
        Command::Auth(AuthCommand::SetRefreshToken { token, token_file }) => {
            let token = read_refresh_token(token, token_file)?;
            set_refresh_token(&cli.config, &token).await
        }
        Command::Auth(AuthCommand::ForgetRedirect) => forget_redirect(&cli.config),
        Command::Auth(AuthCommand::ForgetInstall) => forget_install(&cli.config),
        Command::Auth(AuthCommand::Serve { listen, once }) => {
            auth_serve(&cli.config, listen, once).await
        }
    }
}

fn verdict(what: &str, ok: &str, detail: &str) {
    crate::say!("{what:<9} {ok:<7} {detail}");
}

/// Environment variable `auth set-refresh-token` reads the token from.
pub const ENV_REFRESH_TOKEN: &str = "UBSYNC_REFRESH_TOKEN";

/// The refresh token for `auth set-refresh-token`: the environment, a file, standard input
/// (`-` or nothing), or, with a warning, the command line.
fn read_refresh_token(arg: Option<String>, file: Option<PathBuf>) -> anyhow::Result<String> {
    let token = if let Some(path) = file {
        std::fs::read_to_string(&path).map_err(|e| {
            UsageError(format!(
                "cannot read --token-file {} ({e}); give the file the token was saved in, or pipe the token in with `-`",
                path.display()
            ))
        })?
    } else if let Some(t) = arg.filter(|t| t != "-") {
        tracing::warn!("a token given on the command line is visible in `ps` and shell history; pass `-` and pipe it in, use --token-file, or set {ENV_REFRESH_TOKEN}");
        t
    } else if let Some(t) = std::env::var(ENV_REFRESH_TOKEN)
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        t
    } else {
        use std::io::{IsTerminal, Read};
        if std::io::stdin().is_terminal() {
            crate::redact::complain("Paste the refresh token and press Enter, then Ctrl-D:");
        }
        let mut t = String::new();
        std::io::stdin()
            .read_to_string(&mut t)
            .context("cannot read the refresh token from standard input")?;
        t
    };
    let token = token.trim().to_string();
    crate::redact::register(&token);
    if token.is_empty() {
        anyhow::bail!(UsageError(format!(
            "no refresh token given: pipe it in (`ubsync auth set-refresh-token - < file`), use --token-file PATH, or set {ENV_REFRESH_TOKEN}"
        )));
    }
    Ok(token)
}

/// A command-line problem (exit 2), not a configuration file problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The state file for a command that only reads it (`status`, `runs`, `show`, `lines`, `rules
/// test`): never created. A missing file is named, with what to do (exit 2).
pub(super) fn open_existing(cfg: &Config) -> anyhow::Result<Store> {
    let path = &cfg.state.path;
    if !path.exists() {
        anyhow::bail!(UsageError(format!(
            "there is no state file at {} (state.path in {}): nothing has run with this configuration yet. Run `ubsync sync` first, or point at the state of the install you mean (for the systemd service: `sudo ubsync-svc status`); nothing was created",
            path.display(),
            cfg.source.display()
        )));
    }
    Ok(Store::open(path)?)
}

fn forget_redirect(path: &std::path::Path) -> anyhow::Result<u8> {
    let cfg = load_config(path)?;
    let store = SharedStore::new(Store::open(&cfg.state.path)?);
    let b24 = Bitrix24Client::new(&cfg.bitrix24, store, Clock::system())?;
    let was = b24.remembered_move();
    b24.forget_move()?;
    match was {
        Some(to) => crate::say!(
            "forgot that {} moved to {to}; requests go to the configured address again",
            b24.configured_origin()
        ),
        None => crate::say!("no redirect was remembered for {}", b24.configured_origin()),
    }
    Ok(0)
}

fn forget_install(path: &std::path::Path) -> anyhow::Result<u8> {
    let cfg = load_config(path)?;
    telephony_only(&cfg)?;
    let portal = crate::bitrix24::portal_key(cfg.bitrix24.portal_url.as_ref().expect("validated"));
    let store = Store::open(&cfg.state.path)?;
    let had = store.forget_tokens(&portal)?;
    store.delete_fact(crate::sync::FACT_UNINSTALLED)?;
    crate::say!(
        "{}; the next install callback (or `auth set-refresh-token`) starts afresh",
        if had {
            "forgot the stored install"
        } else {
            "no install was stored"
        }
    );
    Ok(0)
}

/// Builds the worker's context over `store`.
fn context(cfg: Config, store: SharedStore) -> anyhow::Result<SyncCtx> {
    let clock = Clock::system();
    Ok(SyncCtx {
        unitalk: UnitalkClient::new(&cfg.unitalk)?,
        b24: Bitrix24Client::new(&cfg.bitrix24, store.clone(), clock.clone())?,
        recordings: crate::recording::client(&cfg),
        cfg,
        store,
        clock,
        cancel: tokio_util::sync::CancellationToken::new(),
    })
}

/// Cancels `ctx` on SIGINT or SIGTERM (what systemd sends), so a pass stops at a safe point.
fn cancel_on_signals(cancel: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::warn!("signal received: stopping now; the request in flight is abandoned and its calls are looked up in Bitrix24 by the next pass before anything is sent again");
        cancel.cancel();
    });
}

fn telephony_only(cfg: &Config) -> anyhow::Result<()> {
    if cfg.bitrix24.mode != Mode::Telephony {
        anyhow::bail!(ConfigError::Invalid {
            path: cfg.source.clone(),
            problems: vec![crate::config::KeyProblem {
                key: "bitrix24.mode".into(),
                problem: "OAuth tokens are only used in telephony mode".into(),
                fix:
                    "set bitrix24.mode = \"telephony\" with portal_url, client_id and client_secret"
                        .into(),
            }],
        });
    }
    Ok(())
}

async fn auth_serve(path: &std::path::Path, listen: SocketAddr, once: bool) -> anyhow::Result<u8> {
    use std::io::Write as _;
    let cfg = load_config(path)?;
    telephony_only(&cfg)?;
    let store = SharedStore::new(Store::open(&cfg.state.path)?);
    let state = crate::bitrix24::install::InstallState::new(&cfg, store, Clock::system())?;
    let installed = state.installed.clone();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    crate::say!(
        "listening on http://{addr}/install for the install callback of {}",
        cfg.bitrix24.portal_display()
    );
    std::io::stdout().flush()?;
    let cancel = tokio_util::sync::CancellationToken::new();
    cancel_on_signals(cancel.clone());
    let stop = cancel.clone();
    let server = axum::serve(listener, crate::bitrix24::install::router(state))
        .with_graceful_shutdown(async move { stop.cancelled().await });
    let waiter = async {
        loop {
            installed.notified().await;
            if once {
                crate::say!("tokens stored; run `ubsync check` to verify");
                // Graceful shutdown lets the portal's request get its answer first.
                cancel.cancel();
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        r = server => r.context("install callback server failed")?,
        _ = waiter => {}
    }
    Ok(0)
}

/// Reads `--from`/`--to`: a bare date means the whole day (so `--to` extends to its end).
/// `reconcile` found differences it did not repair (see the README's exit codes).
pub const EXIT_DIFFERENCES: u8 = 3;

/// Exit code of a oneshot `sync` that failed for a transient reason after no pass succeeded for
/// longer than `health.max_age`: an outage that `systemctl --failed` and `OnFailure=` must see
/// (75 counts as success in the shipped timer unit).
pub const EXIT_STALE: u8 = 4;

/// A transient failure stays `Err` (exit 75) while the outage is short; past `health.max_age`
/// without a successful sync it is reported and exits [`EXIT_STALE`].
fn stale_or(path: &std::path::Path, e: anyhow::Error) -> anyhow::Result<u8> {
    let Ok(cfg) = load_config(path) else {
        return Err(e);
    };
    let Ok(store) = Store::open(&cfg.state.path) else {
        return Err(e);
    };
    let since = match store.last_healthy_sync() {
        Ok(Some(t)) => Some((t, "the last successful sync (with an answer from Bitrix24)")),
        _ => store
            .first_run_at("sync")
            .ok()
            .flatten()
            .map(|t| (t, "the first sync attempt (none has succeeded)")),
    };
    let now = Clock::system().now();
    let max_age = chrono::Duration::from_std(cfg.health_max_age).unwrap_or(chrono::Duration::MAX);
    match since {
        Some((t, what)) if now - t > max_age => {
            crate::redact::complain(&format!("ubsync: error: {e:#}"));
            crate::redact::complain(&format!(
                "ubsync: error: {what} was at {} ({} min ago), longer ago than health.max_age ({} min): this is an outage, not a passing hiccup; exit code {EXIT_STALE}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                (now - t).num_minutes(),
                max_age.num_minutes()
            ));
            Ok(EXIT_STALE)
        }
        _ => Err(e),
    }
}

/// The schedule `run` would use, as a configuration problem when it cannot be read.
fn daemon_schedule(cfg: &Config) -> Result<(crate::schedule::Schedule, String), ConfigError> {
    crate::schedule::Schedule::for_config(cfg).map_err(|problem| ConfigError::Invalid {
        path: cfg.source.clone(),
        problems: vec![crate::config::KeyProblem {
            key: "schedule.file".into(),
            problem,
            fix: "see schedules/default.toml for the format, or remove [schedule] file to use the built-in schedule".into(),
        }],
    })
}

async fn run_daemon(
    path: &std::path::Path,
    listen: Option<SocketAddr>,
    install_listen: Option<SocketAddr>,
) -> anyhow::Result<u8> {
    use std::io::Write as _;
    let cfg = load_config(path)?;
    let (schedule, from) = daemon_schedule(&cfg)?;
    tracing::info!(schedule = %from, "schedule loaded");
    let _lock = crate::lock::StateLock::acquire(&cfg.state.path)?;
    let listener = match listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            crate::say!(
                "listening on http://{} (/healthz, /metrics, /status{})",
                l.local_addr()?,
                if cfg.http.install { ", /install" } else { "" }
            );
            std::io::stdout().flush()?;
            Some(l)
        }
        None => None,
    };
    let install_listener = match install_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            crate::say!(
                "listening on http://{}/install (install callback)",
                l.local_addr()?
            );
            std::io::stdout().flush()?;
            Some(l)
        }
        None => None,
    };
    let store = SharedStore::new(Store::open(&cfg.state.path)?);
    let ctx = context(cfg, store)?;
    cancel_on_signals(ctx.cancel.clone());
    crate::daemon::run(ctx, schedule, listener, install_listener).await?;
    Ok(0)
}
