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
use clap::{Args, Parser, Subcommand};

use crate::bitrix24::{Bitrix24Client, Bitrix24Error};
use crate::clock::Clock;
use crate::config::{Config, ConfigError, Env, Mode};
use crate::store::{SharedStore, Store, StoreError};
use crate::sync::{run_pass, PassOptions, SyncCtx, SyncError};
use crate::unitalk::{UnitalkClient, UnitalkError};

pub mod inspect;
mod lines;
mod progress;
mod ranges;
mod rules_test;
mod setup;
mod simulate;

use ranges::{backfill, reconcile};
use setup::{check, set_refresh_token};
use simulate::sim;

/// Exit code for configuration and usage errors.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code when an upstream is temporarily unavailable (EX_TEMPFAIL).
pub const EXIT_TEMPFAIL: u8 = 75;

#[derive(Debug, Parser)]
#[command(
    name = "ubsync",
    version,
    about = "Keeps Bitrix24 CRM in step with the Unitalk cloud PBX",
    long_about = "ubsync pulls call history and inner-line statuses from Unitalk, diffs them against a local \
SQLite state store, and pushes calls, recordings and missed-call tasks to Bitrix24 in rate-limited batches.\n\n\
Start with `ubsync sim --write-config sim.toml` to try it against the built-in simulators, or copy \
ubsync.example.toml to ubsync.toml, fill it in and run `ubsync check`.\n\n\
Exit codes: 0 success, 1 other errors, 2 usage or configuration error, 3 reconcile found differences it did not \
repair, 4 sync failing for longer than health.max_age, 75 upstream temporarily unavailable (retry later)."
)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "UBSYNC_CONFIG",
        default_value = "ubsync.toml",
        value_name = "PATH"
    )]
    pub config: PathBuf,

    /// More logging (-v debug, -vv trace). UBSYNC_LOG overrides, e.g. UBSYNC_LOG=ubsync=debug.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only warnings and errors.
    #[arg(long, short = 'q', global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Coloured log lines: auto (on a terminal, unless NO_COLOR is set), always or never. Under
    /// journald, lines carry syslog priorities instead (`journalctl -p warning` works).
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    pub color: ColorChoice,

    #[command(subcommand)]
    pub command: Command,

    /// Whether `--config` was given on the command line (`demo` and `sim` use none).
    #[arg(skip)]
    pub config_given: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration, open the state store, and make one cheap authenticated request
    /// to Unitalk and to Bitrix24, printing a verdict for each.
    Check {
        /// Skip the requests to Unitalk and Bitrix24.
        #[arg(long)]
        offline: bool,
    },
    /// Run one sync pass: pull new Unitalk calls, push them to Bitrix24, create missed-call tasks.
    /// This is what the systemd timer runs. Ends with a one-line summary.
    Sync {
        /// Print the commands that would be sent, per call, and send nothing to Bitrix24. The pass
        /// plans on an in-memory copy of the state: the state file is left byte for byte as it was (only a
        /// refreshed OAuth token pair is stored, since Bitrix24 voids the old one at once).
        #[arg(long)]
        dry_run: bool,
    },
    /// Run as a daemon: the jobs of the schedule file ([schedule] file) one at a time, until
    /// SIGTERM or Ctrl-C. The long-running alternative to the systemd timer.
    Run {
        /// Serve GET /healthz, GET /metrics (Prometheus) and GET /status on this address, e.g.
        /// 127.0.0.1:9187. Events in are added when configured: POST /unitalk/webhook/<secret>
        /// ([webhooks] unitalk_secret) and POST /bitrix24/events ([webhooks] bitrix24_events,
        /// online route); put them behind an HTTPS reverse proxy. The install callback
        /// (POST /install) is added only with `[http] install = true`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Serve only the local application's install callback (POST /install) on this separate
        /// address, e.g. 127.0.0.1:8089, to put behind an HTTPS reverse proxy (telephony mode).
        #[arg(long, value_name = "ADDR")]
        install_listen: Option<SocketAddr>,
    },
    /// Show the cursor, the last run of each kind, calls by stage, follow-ups, quarantined calls
    /// and inner-line statuses. Times in the account's zone (`--json`: UTC). The daemon serves
    /// the same JSON at GET /status.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One call's story: the Unitalk record, its ledger stage, Bitrix24 ids (call, activity,
    /// task, CRM entity), attempts, errors, quarantine and recording state.
    Show {
        /// A Unitalk call id, an EXTERNAL_CALL_ID (unitalk-<id>) or a phone number (every call
        /// of that number, newest first).
        call: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The run log, newest first: every sync, backfill, reconcile, retry and events run, with what it did
    /// (the daemon's jobs included; a run killed mid-way shows as "running (or killed)").
    Runs {
        /// Only runs of this kind.
        #[arg(long, value_parser = ["sync", "backfill", "reconcile", "retry", "events"])]
        kind: Option<String>,
        /// How many runs to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Re-attempt quarantined calls (by Unitalk call id), then run a pass.
    Retry {
        /// Unitalk call ids, as `ubsync status` lists them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every quarantined call.
        #[arg(long)]
        all: bool,
    },
    /// Prove that Bitrix24 holds every call of a stretch of time exactly once, and repair what is
    /// missing (calls and missed-call tasks). Never deletes anything in the portal: duplicates
    /// are reported for a human. Prints a table and writes a JSON report under state/reports/.
    Reconcile {
        /// First day (default: yesterday in Unitalk's zone).
        #[arg(long, value_name = "DATE")]
        from: Option<String>,
        /// Last day, inclusive (default: the same as --from).
        #[arg(long, value_name = "DATE")]
        to: Option<String>,
        /// Report only; repair nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Migrate history on a first install: push every call from --from to --to. Resumable: after
    /// a crash or Ctrl-C, run the same command again and it continues from its last finished
    /// window. Shows a progress bar on a terminal and plain progress lines otherwise.
    Backfill {
        /// First day (or date-time, or RFC 3339) to push, in Unitalk's zone.
        #[arg(long, value_name = "DATE")]
        from: String,
        /// Last day to push (inclusive; a date-time is exclusive).
        #[arg(long, value_name = "DATE")]
        to: String,
    },
    /// Try ubsync end to end: start both simulators with a seeded call-centre day (including a DST
    /// change), run the real pipeline over real HTTP at the standard plan's limits, and check the
    /// simulated portal against the expected outcome. Needs no configuration.
    Demo,
    /// Run the Unitalk and Bitrix24 simulators on loopback, seeded with a realistic call-centre day.
    Sim(SimArgs),
    /// Manage the Bitrix24 OAuth tokens of the local application (telephony mode).
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Each Unitalk inner line: its status and since when, its operator, and the Bitrix24 user
    /// it maps to (UF_PHONE_INNER), flagging lines without a user and Bitrix24 users whose
    /// extension is no Unitalk line. Reads the state file (a pass or the daemon's `lines` job
    /// refreshes it) and, unless --offline, lists the portal's users.
    Lines {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Read only the state file; do not ask Bitrix24 for its users.
        #[arg(long)]
        offline: bool,
    },
    /// Try the business rules ([rules], [tasks]) on calls already in the state file.
    #[command(subcommand)]
    Rules(RulesCommand),
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Run the rules over stored calls and print, per call, which rules fired and what would be
    /// sent (the client number as rewritten, skip or push, the task's title, deadline and
    /// whether it is folded into the client's open task). Sends and writes nothing, so a rule
    /// can be tried before it is enabled: edit the config, run this, read.
    Test {
        /// First day (default: today in Unitalk's zone).
        #[arg(long, value_name = "DATE", conflicts_with = "call")]
        from: Option<String>,
        /// Last day, inclusive (default: the same as --from).
        #[arg(long, value_name = "DATE", conflicts_with = "call")]
        to: Option<String>,
        /// One call (Unitalk id or unitalk-<id>).
        #[arg(long, value_name = "ID")]
        call: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Receive the local application's install callback and store its tokens. Set the
    /// application's "installation path" to this address (behind your HTTPS reverse proxy), then
    /// add or reinstall the application in the portal.
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:8089 (port 0 picks one; the address is printed).
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// Exit after the first successful install.
        #[arg(long)]
        once: bool,
    },
    /// Exchange a refresh token for a fresh token pair and store it. Use this when the install
    /// callback cannot reach ubsync: copy the refresh token from the application's install data.
    /// The token is read from standard input (`-`, the default), a file (--token-file) or the
    /// environment variable UBSYNC_REFRESH_TOKEN; on the command line it would land in shell
    /// history and `ps`.
    SetRefreshToken {
        /// `-` (the default) reads the token from standard input. A token given here works but
        /// is visible to other users in `ps`: ubsync warns.
        token: Option<String>,
        /// Read the token from this file.
        #[arg(long, value_name = "PATH", conflicts_with = "token")]
        token_file: Option<PathBuf>,
    },
    /// Forget the address a portal was remembered to have moved to (after a redirect), so
    /// requests go to the configured address again.
    ForgetRedirect,
    /// Forget the stored install (tokens, member and application token), e.g. before
    /// reinstalling the application; the next install callback is then accepted as a first one.
    ForgetInstall,
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Address of the Unitalk simulator (loopback only).
    #[arg(long, default_value = "127.0.0.1:18081")]
    pub unitalk: SocketAddr,
    /// Address of the Bitrix24 simulator (loopback only).
    #[arg(long, default_value = "127.0.0.1:18082")]
    pub bitrix24: SocketAddr,
    /// Local day of the seeded calls (default: yesterday in Europe/Kyiv).
    #[arg(long, value_name = "YYYY-MM-DD")]
    pub date: Option<chrono::NaiveDate>,
    /// Number of seeded calls.
    #[arg(long, default_value_t = 400)]
    pub calls: usize,
    /// Number of seeded operators.
    #[arg(long, default_value_t = 20)]
    pub operators: usize,
    /// Seed of the scenario generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write a ubsync configuration pointing at the simulators to this file (the state file goes
    /// beside it, in state/).
    #[arg(long, value_name = "PATH")]
    pub write_config: Option<PathBuf>,
    /// Configure the written file for activity mode (incoming webhook) instead of telephony mode.
    #[arg(long)]
    pub activity: bool,
    /// The API key the Unitalk simulator accepts.
    #[arg(long, value_name = "KEY", default_value = crate::sim::unitalk::DEFAULT_API_KEY)]
    pub unitalk_key: String,
}

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
        std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read --token-file {}", path.display()))?
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
        tracing::warn!("signal received: finishing the batch in flight, then stopping");
        cancel.cancel();
    });
}

/// Runs one pass and records it in the run log.
async fn run_logged(
    ctx: &SyncCtx,
    job: &str,
    opts: &PassOptions,
) -> anyhow::Result<crate::sync::PassSummary> {
    let run_id = ctx.store.lock().begin_run(job, ctx.clock.now())?;
    let result = run_pass(ctx, opts).await;
    let now = ctx.clock.now();
    match &result {
        Ok(summary) => ctx.store.lock().finish_run(
            run_id,
            now,
            "ok",
            Some(&serde_json::to_value(summary)?),
            None,
        )?,
        Err(e) => {
            let outcome = if matches!(e, SyncError::Cancelled) {
                "interrupted"
            } else {
                "failed"
            };
            ctx.store
                .lock()
                .finish_run(run_id, now, outcome, None, Some(&e.to_string()))?
        }
    }
    Ok(result?)
}

async fn sync(path: &std::path::Path, dry_run: bool) -> anyhow::Result<u8> {
    let cfg = load_config(path)?;
    // A dry run only reads a snapshot; everything else is one writer at a time.
    let _lock = if dry_run {
        None
    } else {
        Some(crate::lock::StateLock::acquire(&cfg.state.path)?)
    };
    let store = Store::open(&cfg.state.path)?;
    if dry_run {
        // The pipeline plans on an in-memory copy of the state, but the Bitrix24 client keeps
        // the real store: a refreshed token pair must be stored for good (the portal voids the
        // old one at once).
        let scratch = store.in_memory_copy()?;
        let real = SharedStore::new(store);
        let mut ctx = context(cfg, SharedStore::new(scratch))?;
        ctx.b24 = Bitrix24Client::new(&ctx.cfg.bitrix24, real, ctx.clock.clone())?;
        let result = run_pass(
            &ctx,
            &PassOptions {
                dry_run: true,
                ..Default::default()
            },
        )
        .await;
        drop(ctx);
        let summary = result?;
        for line in &summary.plan {
            crate::say!("{line}");
        }
        crate::say!(
            "dry run: {} commands planned, nothing sent to Bitrix24; {}",
            summary.plan.len(),
            summary
        );
        return Ok(0);
    }
    let ctx = context(cfg, SharedStore::new(store))?;
    cancel_on_signals(ctx.cancel.clone());
    // On a terminal, a large backlog shows the same bar as a backfill (a timer run shows none).
    let mut opts = PassOptions::default();
    let progress = {
        use std::io::IsTerminal as _;
        if std::io::stderr().is_terminal() {
            let cursor = ctx.store.lock().cursor(crate::sync::HISTORY_STREAM)?;
            let now = ctx.clock.now();
            let from = cursor.unwrap_or(now - chrono::Duration::days(1));
            let total = crate::sync::estimate_calls(&ctx, from, now).await;
            let p = progress::CallProgress::start(
                "sync",
                total,
                0,
                ctx.cfg.bitrix24.per_second.get() as f64,
                false,
            );
            opts.progress = Some(p.callback());
            Some(p)
        } else {
            None
        }
    };
    let result = run_logged(&ctx, "sync", &opts).await;
    if let Some(p) = &progress {
        p.finish();
    }
    let summary = result?;
    crate::say!("sync: {summary}");
    Ok(0)
}

async fn retry(path: &std::path::Path, ids: &[String], all: bool) -> anyhow::Result<u8> {
    let cfg = load_config(path)?;
    let _lock = crate::lock::StateLock::acquire(&cfg.state.path)?;
    let mut store = Store::open(&cfg.state.path)?;
    let now = Clock::system().now();
    let tz = cfg.unitalk.timezone;
    let entries: Vec<_> = store
        .quarantined()?
        .into_iter()
        .filter(|q| all || q.call_id.as_ref().is_some_and(|c| ids.contains(c)))
        .collect();
    if entries.is_empty() {
        crate::say!("retry: no quarantined calls match");
        return Ok(if all { 0 } else { 1 });
    }
    // The cause may have been fixed in the portal (a user given the missing extension).
    store.forget_unmatched_operators()?;
    let mut released = 0;
    for q in &entries {
        if q.source == "unitalk"
            && store
                .ledger_row(q.call_id.as_deref().unwrap_or(""))?
                .is_none()
        {
            // An unreadable record: read it again; it enters the pipeline only if it now parses.
            let raw: serde_json::Value =
                serde_json::from_str(&q.raw).unwrap_or(serde_json::Value::Null);
            match crate::unitalk::wire::parse_call_as(&raw, tz, &cfg.unitalk.call_id_field) {
                Ok(call) => {
                    store.observe(
                        &[crate::store::ledger::Observation {
                            call_id: call.id.clone(),
                            started_at: call.started_at,
                            content_hash: crate::sync::call::content_hash(&call),
                            raw: q.raw.clone(),
                        }],
                        now,
                    )?;
                }
                Err(e) => {
                    crate::say!("retry: entry {} is still unreadable: {}", q.id, e.reason);
                    continue;
                }
            }
        }
        store.release(q.id, now)?;
        released += 1;
    }
    crate::say!(
        "retry: released {released} of {} quarantined entries; running a pass",
        entries.len()
    );
    let ctx = context(cfg, SharedStore::new(store))?;
    cancel_on_signals(ctx.cancel.clone());
    let summary = run_logged(&ctx, "retry", &PassOptions::default()).await?;
    crate::say!("sync: {summary}");
    let still: Vec<_> = ctx
        .store
        .lock()
        .quarantined()?
        .into_iter()
        .filter(|q| entries.iter().any(|e| e.call_id == q.call_id))
        .collect();
    for q in &still {
        crate::say!(
            "still quarantined: call {} — {}",
            q.call_id.as_deref().unwrap_or("?"),
            q.reason
        );
    }
    Ok(0)
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
    let since = match store.last_ok_run("sync") {
        Ok(Some(t)) => Some((t, "the last successful sync")),
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
